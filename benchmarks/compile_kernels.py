"""Compile every fused-step kernel variant for a CUDA GPU without one (Triton's own ptxas).

Triton's interpreter, which runs the kernel tests on CPU, accepts code that the compiler rejects;
this catches that before a GPU is at hand. It compiles each kernel for sm_90 (Hopper) in every
phase the optimizer launches, with bf16 weights (the widest set of code paths), for the fp32 and
the compact (state_precision="bf16") state layouts, and prints the compile time of each; the machine's Triton must have its NVIDIA backend (the Linux wheels do).

    python benchmarks/compile_kernels.py [--arch 90]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from library import automagic_sinkgd_kernels as kernels  # noqa: E402

POINTERS = dict(polarity_ptr="*u8", grad_table_ptr="*i64", weight_table_ptr="*i64", x0_ptr="*bf16",
                table_ptr="*i32", noise_offsets_ptr="*i32")
COMPACT_POINTERS = dict(exp_avg_ptr="*bf16", lr_mask_ptr="*i16")  # bf16 momentum, 16-bit mask codes
SCALARS = dict(B="i32", R="i32", C="i32", ROWS_PER_PROGRAM="i32", COLS_PER_PROGRAM="i32", packed_bytes="i32",
               **{n: "fp32" for n in ("lr_ratio", "momentum_weight", "lr_bump", "d_coef", "min_lr", "max_lr",
                                      "weight_decay", "sqrt_rows", "decay_floor", "mask_anchor", "mask_step", "mask_inverse",
                                      "mask_bias")})
PHASES = {  # the flag sets step_bucket passes: early warm-up, post-warm-up, vectors, OrthoGrad without SinkGD
    "early warm-up": dict(IS_MATRIX=True, GRAMS=True, VRADAM=True, WARMUP=True, SIGNAL=True, DECAY=True,
                          HAS_STATS=True, ORTHO=False, KEEP_NORM=False, POST=False, HAS_ROW_SCALING=True),
    "post-warm-up": dict(IS_MATRIX=True, GRAMS=True, VRADAM=True, WARMUP=False, SIGNAL=False, DECAY=False,
                         HAS_STATS=False, ORTHO=True, KEEP_NORM=False, POST=True, HAS_ROW_SCALING=False),
    "vectors": dict(IS_MATRIX=False, GRAMS=True, VRADAM=True, WARMUP=True, SIGNAL=True, DECAY=True,
                    HAS_STATS=True, ORTHO=False, KEEP_NORM=False, POST=False, HAS_ROW_SCALING=False),
    "orthograd, no SinkGD": dict(IS_MATRIX=True, GRAMS=True, VRADAM=True, WARMUP=False, SIGNAL=False, DECAY=False,
                                 HAS_STATS=False, ORTHO=True, KEEP_NORM=True, POST=True, HAS_ROW_SCALING=False),
}


def compile_kernel(fn, constexprs: dict, target: GPUTarget) -> float:
    wanted = {name: value for name, value in constexprs.items() if name in fn.arg_names}
    pointers = dict(POINTERS, **(COMPACT_POINTERS if constexprs.get("COMPACT") else {}))
    signature = {name: "constexpr" if name in wanted else pointers.get(name, SCALARS.get(name, "*fp32"))
                 for name in fn.arg_names}
    start = time.perf_counter()
    triton.compile(ASTSource(fn, signature, constexprs=wanted), target=target)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90: H100/H200)")
    args = parser.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    total = 0.0
    for phase, flags, compact in [(p, f, c) for p, f in PHASES.items() for c in (False, True)]:
        iters = 4 if flags["IS_MATRIX"] and not flags["KEEP_NORM"] else 0
        block_r, block_c = kernels._blocks(16 if flags["IS_MATRIX"] else 1, 320)
        constexprs = dict(flags, SINKGD_ITERS=iters, SINKGD=iters > 0, ROW_SUMS=iters > 0, ROUND_BF16=True,
                          BF16=True, ABS_SUM=flags["HAS_STATS"], COMPACT=compact, BLOCK_R=block_r, BLOCK_C=block_c)
        phase = phase + (", bf16 state" if compact else "")
        launched = [kernels._bucket_step_kernel]
        if flags["IS_MATRIX"]:
            launched += [kernels._split_reductions_kernel, kernels._split_state_kernel, kernels._split_weights_kernel]
            if iters:
                launched += [kernels._split_sinkgd_cols_kernel, kernels._split_sinkgd_rows_kernel]
        for fn in launched:
            seconds = compile_kernel(fn, constexprs, target)
            total += seconds
            print(f"sm_{args.arch} {phase:34s} {fn.__name__:28s} {seconds:5.1f} s")
    print(f"all compiled in {total:.0f} s (triton {triton.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
