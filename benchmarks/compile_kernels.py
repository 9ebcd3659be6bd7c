"""Machine-code check of the fused step, without a GPU: every kernel variant the optimizer launches,
compiled by Triton for sm_80 (A100) and sm_90 (H100/H200), checked from its PTX and ptxas's report.

The variants are the ones a real run launches: the fused step runs on CPU with its kernels replaced
by recorders (the host code, its stacks, tables and launch arguments are real) on the benchmark's
parameter sets, for fp32 and bf16 weights and the fp32 and compact (state_precision="bf16")
state, without and with the presets' ``lr_growth``, through every phase (first warm-up half, late
warm-up, first post-warm-up step, OrthoGrad).
Each launch is specialised as Triton's JIT would specialise it (16-byte aligned pointers, integers
divisible by 16, integers equal to 1), so what is compiled is what a GPU would run. Per variant:
  * no float atomics (``atom``/``red`` on f16/f32/f64): the reductions are bit-for-bit repeatable;
  * 128-bit accesses: at least one ``ld.global.v4`` and no 16-bit element loads or stores (a
    bf16 tensor read element by element), where the row length allows it (columns a multiple of
    16 elements: every SD matrix);
  * no spills, and at most MAX_REGISTERS registers per thread (see there for why that number).
Scalar 32-bit loads remain and are expected: the rounding-noise table is a gather, per-tensor
scalars are single values, packed sign bytes are read per element (8 elements share a byte).

    python benchmarks/compile_kernels.py                    # lora set, sm_80 and sm_90, a table
    python benchmarks/compile_kernels.py --arch 90 --sets lora full \\
        --json benchmarks/results/machine_code_sm90.json --md benchmarks/results/machine_code_sm90.md

Needs Triton with its NVIDIA backend (the Linux wheels), nothing else: no GPU, no CUDA toolkit.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from library import automagic_sinkgd_kernels as kernels  # noqa: E402
from library.automagic_sinkgd import Automagic_Sinkgd  # noqa: E402

# 255 is the hardware's limit per thread, where ptxas starts spilling. 232 leaves ~10% (23
# registers) for the next feature before a spill, and keeps 2 programs of 4 warps per SM
# (65536 / (128 * 232) = 2.2) as at 255, so nothing below it changes occupancy either.
MAX_REGISTERS = 232
KERNEL_NAMES = ("_bucket_step_kernel", "_split_reductions_kernel", "_split_state_kernel",
                "_split_sinkgd_kernel", "_split_weights_kernel")
CONFIGS = [(torch.float32, "fp32"), (torch.float32, "bf16"), (torch.bfloat16, "fp32"), (torch.bfloat16, "bf16")]
# The class default (no growth factor) and the lora / high_performance presets' lr_growth
GROWTHS = (None, 1.0)


def specialise(fn, args: tuple, kwargs: dict) -> tuple:
    """(signature, constexprs, attrs) of one launch, as Triton's JIT specialises it."""
    values = dict(zip(fn.arg_names, args), **kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[(index,)] = "constexpr", value
            continue
        kind, attr = native_specialize_impl(BaseBackend, value, False, not param.do_not_specialize,
                                            not param.do_not_specialize_on_alignment)
        signature[param.name] = kind
        if kind == "constexpr":  # an integer 1
            constexprs[(index,)] = attr
        elif isinstance(attr, str) and attr:
            attrs[(index,)] = BaseBackend.parse_attr(attr)
    return signature, constexprs, attrs


@contextlib.contextmanager
def recorded_launches(variants: dict, label: str, arch: int):
    """The kernels replaced by recorders of their launches' specialisations (nothing runs), the
    host's choices (tile size) made as for a GPU of compute capability ``arch``."""
    saved = {name: getattr(kernels, name) for name in KERNEL_NAMES + ("interpreting", "tile_elements")}
    gpu = torch.device("cuda", 0)
    capability = (arch // 10, arch % 10)
    real_capability = torch.cuda.get_device_capability
    torch.cuda.get_device_capability = lambda device=None: capability
    kernels.tile_elements = lambda device: saved["tile_elements"](gpu)

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def launch(*args, num_warps=4, maxnreg=None, **kwargs):
                signature, constexprs, attrs = specialise(self.fn, args, kwargs)
                key = (self.fn.__name__, num_warps, maxnreg, tuple(signature.items()),
                       tuple(sorted(constexprs.items())), tuple(sorted((k, str(v)) for k, v in attrs.items())))
                variants.setdefault(key, dict(fn=self.fn, signature=signature, constexprs=constexprs, attrs=attrs,
                                              options=dict(num_warps=num_warps, maxnreg=maxnreg),
                                              seen_in=set()))["seen_in"].add(label)
            return launch

    for name in KERNEL_NAMES:
        setattr(kernels, name, Recorder(saved[name]))
    kernels.interpreting = lambda: True
    try:
        yield
    finally:
        torch.cuda.get_device_capability = real_capability
        for name, value in saved.items():
            setattr(kernels, name, value)


def launched_variants(sets: list[str], arch: int, shapes_of: dict = None, configs=CONFIGS, steps: int = 8,
                      growths=GROWTHS) -> dict:
    """Every kernel variant one run launches on these parameter sets on a GPU of compute
    capability ``arch``, with where it was seen (``shapes_of``: set name -> its shapes), for each
    ``lr_growth`` of ``growths``."""
    from benchmarks.speed import full_slice_shapes, lora_shapes, make_params, sdxl_lora_shapes
    shapes_of = shapes_of or dict(lora=lora_shapes, sdxl_lora=sdxl_lora_shapes, full=full_slice_shapes)
    variants: dict = {}
    for name in sets:
        shapes = shapes_of[name]() if callable(shapes_of[name]) else shapes_of[name]
        for (dtype, precision), growth in itertools.product(configs, growths):
            label = f"{name}/{str(dtype)[6:]} weights/{precision} state" + (f"/lr_growth={growth}" if growth else "")
            with recorded_launches(variants, label, arch):
                optimizer = Automagic_Sinkgd(make_params(shapes, seed=0, dtype=dtype), lr=5e-5, min_lr=1e-6,
                                             max_lr=1e-3, warmup_steps=6, orthograd=True, full_finetune=name == "full",
                                             state_precision=precision, fused=True, stats_update_freq=1,
                                             lr_growth=growth)
                for _ in range(steps):  # t = 2: early warm-up; 4, 5: late; 6: first post-warm-up; 7, 8: OrthoGrad
                    optimizer.step()
            del optimizer
    return variants


def _ptxas(arch: int):
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(arch).path


def machine_code(variant: dict, arch: int) -> dict:
    """Compile one variant for sm_<arch>; its registers, spills, atomics and access widths."""
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(variant["fn"], variant["signature"], variant["constexprs"], variant["attrs"]),
                              target=GPUTarget("cuda", arch, 32), options=variant["options"])
    seconds = time.perf_counter() - start
    ptx = compiled.asm["ptx"]
    gpu_name = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as handle:
        handle.write(ptx)
    try:
        report = subprocess.run([_ptxas(arch), "-v", f"--gpu-name={gpu_name}", "-o", os.devnull, handle.name],
                                capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(handle.name)
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    loads = re.findall(r"\bld\.global(?:\.[a-z_]+)*?(?:\.v(\d))?\.[bfsu](\d+)", ptx)
    stores = re.findall(r"\bst\.global(?:\.[a-z_]+)*?(?:\.v(\d))?\.[bfsu](\d+)", ptx)
    float_atomics = sorted(set(re.findall(r"\b(?:atom|red)\.[a-z_.]*\.f(?:16|32|64)\b", ptx)))
    # bf16 elements read or written one or two at a time (8 one-byte signs per thread are one
    # 64-bit v2.b32 access: as wide as they come)
    narrow = [f"ld v{v or 1} b{b}" for v, b in loads if b == "16"] + \
             [f"st v{v or 1} b{b}" for v, b in stores if b == "16"]
    return dict(arch=f"sm_{arch}", registers=registers, spill_bytes=spills, float_atomics=float_atomics,
                v4_loads=sum(1 for v, _ in loads if v == "4"), v4_stores=sum(1 for v, _ in stores if v == "4"),
                scalar_loads=sum(1 for v, b in loads if not v and b in ("32", "8")), narrow_accesses=len(narrow),
                compile_s=round(seconds, 1))


def describe(variant: dict) -> dict:
    """A variant in words: kernel, tile, dtypes, phase flags, the row length's specialisation."""
    constants = {variant["fn"].arg_names[k[0]]: v for k, v in variant["constexprs"].items()}
    flags = [name for name in ("WARMUP", "SIGNAL", "DECAY", "HAS_STATS", "POST", "ORTHO", "KEEP_NORM", "VRADAM",
                               "HAS_ROW_SCALING", "GROWTH", "GROWING") if constants.get(name)]
    c_index = variant["fn"].arg_names.index("C")
    aligned_rows = (c_index,) in variant["attrs"]
    weights = "bf16" if constants.get("BF16", constants.get("ROUND_BF16")) else "fp32"
    return dict(kernel=variant["fn"].__name__.strip("_").replace("_kernel", ""), warps=variant["options"]["num_warps"],
                tile=f"{constants.get('BLOCK_R')}x{constants.get('BLOCK_C')}",
                weights=weights if "BF16" in constants or "ROUND_BF16" in constants else "-",
                state="bf16" if constants.get("COMPACT") else ("fp32" if "COMPACT" in constants else "-"),
                matrix=bool(constants.get("IS_MATRIX", True)), sinkgd_iters=constants.get("SINKGD_ITERS"),
                flags=" ".join(flag.lower() for flag in flags), columns_multiple_of_16=aligned_rows,
                seen_in=sorted(variant["seen_in"]))


def problems(row: dict) -> list[str]:
    """What a variant fails of the checks above."""
    found = []
    if row["float_atomics"]:
        found.append(f"float atomics {row['float_atomics']}")
    if row["spill_bytes"]:
        found.append(f"{row['spill_bytes']} bytes of spills")
    if row["registers"] > MAX_REGISTERS:
        found.append(f"{row['registers']} registers > {MAX_REGISTERS}")
    if row["columns_multiple_of_16"] and (row["narrow_accesses"] or not row["v4_loads"]):
        found.append(f"element-wise accesses ({row['narrow_accesses']} narrow, {row['v4_loads']} v4 loads)")
    return found


def markdown(rows: list[dict]) -> str:
    lines = ["| kernel | tile | weights | state | flags | C%16 | arch | regs | spills | float atomics | "
             "v4 ld/st | narrow | scalar ld | ok |", "|---" * 14 + "|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['tile']} | {r['weights']} | {r['state']} | {r['flags']} | "
                     f"{'yes' if r['columns_multiple_of_16'] else 'no'} | {r['arch']} | {r['registers']} | "
                     f"{r['spill_bytes']} | {len(r['float_atomics'])} | {r['v4_loads']}/{r['v4_stores']} | "
                     f"{r['narrow_accesses']} | {r['scalar_loads']} | {'yes' if not r['problems'] else 'NO'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities x 10")
    parser.add_argument("--sets", nargs="+", default=["lora"], choices=["lora", "sdxl_lora", "full"])
    parser.add_argument("--json", help="write the table here")
    parser.add_argument("--md", help="write the table as markdown here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for arch in args.arch:
        variants = launched_variants(args.sets, arch)
        print(f"{len(variants)} kernel variants launched on {', '.join(args.sets)} for sm_{arch} "
              f"(triton {triton.__version__})", flush=True)
        for variant in variants.values():
            row = dict(describe(variant), **machine_code(variant, arch))
            row["problems"] = problems(row)
            rows.append(row)
            print(f"{row['arch']} {row['kernel']:16s} {row['tile']:7s} w={row['weights']:4s} s={row['state']:4s} "
                  f"{row['flags']:44s} regs={row['registers']:3d} spills={row['spill_bytes']} "
                  f"v4={row['v4_loads']}/{row['v4_stores']} narrow={row['narrow_accesses']} "
                  f"{'ok' if not row['problems'] else row['problems']}", flush=True)
    failed = [r for r in rows if r["problems"]]
    summary = {arch: max(r["registers"] for r in rows if r["arch"] == arch) for arch in {r["arch"] for r in rows}}
    print(f"{len(rows)} compiled, {len(failed)} failing; most registers: {summary}")
    machine = f"{platform.machine()}, torch {torch.__version__}, triton {triton.__version__}, no GPU (compiled only)"
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(dict(machine=machine, sets=args.sets, max_registers=MAX_REGISTERS,
                           command="python benchmarks/compile_kernels.py " + " ".join(argv or sys.argv[1:]),
                           rows=rows), handle, indent=1)
    if args.md:
        with open(args.md, "w") as handle:
            handle.write(f"# Fused kernels' machine code ({machine})\n\n"
                         f"`python benchmarks/compile_kernels.py {' '.join(argv or sys.argv[1:])}`; checks: no float "
                         f"atomics, v4 accesses where rows allow, 0 spills, <= {MAX_REGISTERS} registers.\n\n"
                         + markdown(rows) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
