#!/usr/bin/env bash
# The whole GPU check of the step, one command (budget: under 5 minutes on a fresh machine with an
# NVIDIA GPU of compute capability 8.0 or later, PyTorch with CUDA and Triton, installs included):
#   1. installs what is missing (diffusers for the SDXL and full sets, prodigyopt, pytest), never torch;
#   2. the kernel tests compiled on the GPU (TRITON_INTERPRET cleared): the fused step against the
#      eager one in every phase, and tests/test_gpu_readiness.py, which runs the same state and
#      gradients twice through every fused path (one-program, split; fp32 and bf16 state) and
#      the eager step, compared bit for bit;
#   3. benchmarks/gpu_extras.py: step() under torch.cuda.set_sync_debug_mode("error") (eager and
#      fused, fp32 and bf16 state), TF32 on against off (bit-equal weights, both step times), the
#      GPU's steps against the CPU's eager step (each tensor's update within 1 %), the registers and
#      spills of every kernel variant that launched;
#   4. the benchmark: eager / fused / AdamW(foreach) / AdamW(fused) on the SD1.5-LoRA, SDXL-LoRA and
#      full sets, and eager / fused / AdamW(fused) on the SDXL full fine-tune (every U-Net weight in
#      bf16, the full preset's bf16 state), step times, profiler launch counts and GB/s, into
#      benchmarks/results/speed_cuda.json.
# Usage: bash benchmarks/gpu_check.sh [extra benchmark args, e.g. --repeats 10]
#        DRY_RUN=1 bash benchmarks/gpu_check.sh   # print the commands, run nothing (works anywhere)
# Logs go beside the JSON (benchmarks/results/gpu_check_*.log); COPY_TO=<dir> copies all of it there.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
RESULTS=benchmarks/results
unset TRITON_INTERPRET
start=$SECONDS

run() {  # run (or, with DRY_RUN=1, print) one step of the check; its output also into a log
  local log=$1
  shift
  if [[ -n "${DRY_RUN:-}" ]]; then
    echo "gpu_check (dry run): $* > $RESULTS/$log"
    return 0
  fi
  "$@" 2>&1 | tee "$RESULTS/$log"
  return "${PIPESTATUS[0]}"
}

if [[ -z "${DRY_RUN:-}" ]]; then
  "$PY" - <<'PYEOF' || { echo "gpu_check: needs PyTorch with a CUDA device and Triton"; exit 2; }
import torch, triton
assert torch.cuda.is_available(), "torch sees no CUDA device"
major, minor = torch.cuda.get_device_capability()
print(f"gpu_check: {torch.cuda.get_device_name()} (sm_{major}{minor}), torch {torch.__version__}, "
      f"triton {triton.__version__}")
if (major, minor) < (8, 0):
    print("gpu_check: the fused kernels need compute capability 8.0 or later; the fused rows will be eager")
PYEOF
fi

# Installs: only what is missing, pinned to the torch that is there (a CUDA torch must stay).
missing=()
for module_package in diffusers:diffusers prodigyopt:prodigyopt pytest:pytest; do
  "$PY" -c "import ${module_package%%:*}" 2>/dev/null || missing+=("${module_package##*:}")
done
if ((${#missing[@]})) && [[ -z "${DRY_RUN:-}" ]]; then
  echo "gpu_check: installing ${missing[*]}"
  torch_version=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
  "$PY" -m pip install --quiet "${missing[@]}" -c <(echo "torch==$torch_version") \
    || echo "gpu_check: install failed (no network?); sets that need a missing package are left out"
fi
sets=(lora)
if "$PY" -c "import diffusers" 2>/dev/null; then
  sets+=(sdxl_lora full sdxl_full)  # sdxl_full: bf16 weights, one optimizer at a time (run_large_set)
else
  echo "gpu_check: no diffusers: only the SD1.5 LoRA set"
fi

echo "gpu_check: kernel tests on the GPU, compiled ($((SECONDS - start)) s so far)"
run gpu_check_tests.log "$PY" -m pytest -q -p no:cacheprovider tests/test_fused_kernels.py tests/test_gpu_readiness.py
tests_rc=$?

echo "gpu_check: host syncs, TF32 on/off, registers ($((SECONDS - start)) s so far)"
run gpu_check_extras.log "$PY" benchmarks/gpu_extras.py --json "$RESULTS/gpu_extras.json"
extras_rc=$?

echo "gpu_check: benchmark, sets ${sets[*]} ($((SECONDS - start)) s so far)"
run gpu_check_bench.log "$PY" benchmarks/speed.py --device cuda --sets "${sets[@]}" --repeats 10 \
  --state-precision fp32 bf16 --json "$RESULTS/speed_cuda.json" "$@"
bench_rc=$?

if [[ -n "${COPY_TO:-}" && -z "${DRY_RUN:-}" ]]; then
  cp -f "$RESULTS"/speed_cuda.json "$RESULTS"/gpu_extras.json "$RESULTS"/gpu_check_*.log "$COPY_TO"/ 2>/dev/null
fi
echo "gpu_check: tests rc=$tests_rc, extras rc=$extras_rc, benchmark rc=$bench_rc, $((SECONDS - start)) s"
exit $((tests_rc || extras_rc || bench_rc))
