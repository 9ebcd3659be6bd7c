"""The split kernels' machine code, compiled for sm_80 as a GPU would run them (no GPU needed):
no float atomics (their sums are added in a fixed order), 128-bit accesses of gradients, weights
and state, no spills, registers under the margin. ``benchmarks/compile_kernels.py`` checks every
launched variant for sm_80 and sm_90 (minutes); this is the split path of one full fine-tune
matrix in its early warm-up step, with bf16 weights and the compact state (its widest code).

Runs in a subprocess: tests/conftest.py makes Triton interpret, which cannot compile."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, sys, torch
from benchmarks import compile_kernels as ck
shapes = {"matrix": [(640, 512)]}  # 327,680 elements: the split path (one chunk, 12 blocks of rows)
variants = ck.launched_variants(["matrix"], 80, shapes_of=shapes, configs=[(torch.bfloat16, "bf16")], steps=2)
rows = []
for variant in variants.values():
    row = dict(ck.describe(variant), **ck.machine_code(variant, 80))
    row["problems"] = ck.problems(row)
    rows.append(row)
print(json.dumps(rows))
"""


def _nvidia_compiler_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return os.path.exists(get_ptxas(80).path)
    except Exception:  # no Triton, or one without its NVIDIA backend
        return False


@pytest.mark.skipif(not _nvidia_compiler_available(), reason="Triton's compiler for CUDA targets is not here")
def test_split_kernels_compile_without_float_atomics_spills_or_narrow_accesses():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    kernels = {row["kernel"] for row in rows}
    assert {"split_reductions", "split_state", "split_weights", "split_sinkgd"} <= kernels, kernels
    for row in rows:
        assert row["columns_multiple_of_16"], row  # 512 columns: 128-bit accesses are expected
        assert not row["float_atomics"], row
        assert row["spill_bytes"] == 0 and row["registers"] <= 232, row
        if row["kernel"] in ("split_reductions", "split_state", "split_sinkgd", "split_weights"):  # tensors' data
            assert row["v4_loads"] > 0 and row["narrow_accesses"] == 0, row
        assert not row["problems"], row
