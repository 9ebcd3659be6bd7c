#!/usr/bin/env bash
# The whole GPU check of the fused step, in one script (budget: under 5 minutes on a fresh machine
# with an NVIDIA GPU, PyTorch with CUDA and Triton, installs included):
#   1. installs what is missing (diffusers for the full and SDXL sets, prodigyopt, pytest), never torch;
#   2. runs the fused kernels' tests on the GPU (no interpreter: TRITON_INTERPRET is cleared);
#   3. runs the CUDA benchmark, which writes benchmarks/results/speed_cuda.json.
# Usage: bash benchmarks/gpu_check.sh [extra benchmark args, e.g. --repeats 10]
# The logs go beside the JSON (benchmarks/results/gpu_check_*.log), so they are committed with it;
# COPY_TO=<dir> also copies the JSON and the logs there.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
unset TRITON_INTERPRET
start=$SECONDS

"$PY" - <<'PYEOF' || { echo "gpu_check: needs PyTorch with a CUDA device and Triton"; exit 2; }
import torch, triton
assert torch.cuda.is_available(), "torch sees no CUDA device"
print(f"gpu_check: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
PYEOF

# Installs: only what is missing, pinned to the torch that is there (a CUDA torch must stay).
missing=()
for module_package in diffusers:diffusers prodigyopt:prodigyopt pytest:pytest; do
  "$PY" -c "import ${module_package%%:*}" 2>/dev/null || missing+=("${module_package##*:}")
done
if ((${#missing[@]})); then
  echo "gpu_check: installing ${missing[*]}"
  torch_version=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
  "$PY" -m pip install --quiet "${missing[@]}" -c <(echo "torch==$torch_version") \
    || echo "gpu_check: install failed (no network?); sets that need a missing package are left out"
fi
sets=(lora)
"$PY" -c "import diffusers" 2>/dev/null && sets+=(sdxl_lora full) || echo "gpu_check: no diffusers: only the SD1.5 LoRA set"

echo "gpu_check: kernel tests on the GPU ($((SECONDS - start)) s so far)"
"$PY" -m pytest -q -p no:cacheprovider tests/test_fused_kernels.py 2>&1 | tee benchmarks/results/gpu_check_tests.log
tests_rc=${PIPESTATUS[0]}

echo "gpu_check: benchmark, sets ${sets[*]} ($((SECONDS - start)) s so far)"
"$PY" benchmarks/speed.py --device cuda --sets "${sets[@]}" --repeats 20 --state-precision fp32 bf16 \
  --json benchmarks/results/speed_cuda.json "$@" 2>&1 | tee benchmarks/results/gpu_check_bench.log
bench_rc=${PIPESTATUS[0]}

if [[ -n "${COPY_TO:-}" ]]; then
  cp -f benchmarks/results/speed_cuda.json benchmarks/results/gpu_check_tests.log benchmarks/results/gpu_check_bench.log "$COPY_TO"/ 2>/dev/null
fi
echo "gpu_check: tests rc=$tests_rc, benchmark rc=$bench_rc, $((SECONDS - start)) s"
exit $((tests_rc || bench_rc))
