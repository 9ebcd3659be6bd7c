"""The GPU checks that are not tests or timings (run by benchmarks/gpu_check.sh, on a CUDA GPU):

  * sync: eager and fused steps of the SD1.5-LoRA set (and a few vectors) inside torch.cuda.set_sync_debug_mode("error"),
    which raises on any host-device synchronisation in step();
  * tf32: the same eager and fused steps with TF32 matmuls allowed and forbidden: SinkGD's
    mat-vecs run in true float32 either way (library.automagic_sinkgd._ieee_float32_matmuls), so
    the weights must agree bit for bit; the step times of both are printed;
  * registers: registers and spills of every kernel variant the runs above compiled;
  * cpu: the eager and fused GPU steps against the CPU's eager step from the same weights and
    gradients (LoRA-sized and split-sized matrices, vectors of four lengths), fp32 and bf16 state,
    without and with the LoRA presets' lr_growth (sync too):
    each tensor's total update must agree to 1 % (float32 sums in another order may flip a few mask
    decisions, not more); a GPU-only defect (a padded stack's padding leaking, a kernel's missing
    dtype) shows as an error or an O(1) difference.

    python benchmarks/gpu_extras.py [--json benchmarks/results/gpu_extras.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.speed import lora_shapes, make_params  # noqa: E402
from library.automagic_sinkgd import Automagic_Sinkgd  # noqa: E402

SETTINGS = dict(lr=5e-5, min_lr=1e-6, max_lr=1e-3, warmup_steps=4, orthograd=True, stats_update_freq=1)
PRECISIONS = (("fp32", torch.float32), ("bf16", torch.bfloat16))
GROWTHS = (None, 1.0)  # the class default, and the lora and high_performance presets' growth factor


def _steps(fused: bool, steps: int = 6, dtype=torch.float32, state_precision: str = "fp32", sync_check=False,
           lr_growth=None):
    """Weights after ``steps`` steps (every phase: warm-up, its end, OrthoGrad) and the last step's ms."""
    # and vectors of three lengths, which the eager step stacks zero-padded
    params = make_params(lora_shapes() + [(320,), (640,), (1280,), (640,)], seed=0, dtype=dtype, device="cuda")
    optimizer = Automagic_Sinkgd(params, fused=fused, state_precision=state_precision, lr_growth=lr_growth, **SETTINGS)
    generator = torch.Generator(device="cuda").manual_seed(1)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for step in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator, device="cuda", dtype=dtype) * 1e-3
        if sync_check and step >= 1:  # the first step initialises the state (allocations, no syncs either)
            torch.cuda.set_sync_debug_mode("error")
        start.record()
        try:
            optimizer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        end.record()
    torch.cuda.synchronize()
    return [p.detach().clone() for p in params], start.elapsed_time(end)


def check_sync() -> dict:
    results = {}
    for fused, (precision, dtype), growth in itertools.product((False, True), PRECISIONS, GROWTHS):
        label = f"{'fused' if fused else 'eager'}, {precision} state" + (", lr_growth" if growth else "")
        try:
            _steps(fused, dtype=dtype, state_precision=precision, sync_check=True, lr_growth=growth)
            results[label] = "no host sync"
        except RuntimeError as error:  # a sync, or the step failing on this GPU
            kind = "SYNC" if "synchroniz" in str(error).lower() else "ERROR"
            results[label] = f"{kind}: {error}"
        print(f"sync  {label:33s} {results[label]}", flush=True)
    return results


AGREEMENT_SHAPES = [(4, 320)] * 3 + [(320, 4)] * 3 + [(640, 640)] * 2 + [(320,), (640,), (1280,), (7,), (640,)]


def _trained_updates(device: str, fused: bool, state_precision: str, steps: int = 6,
                     lr_growth=None) -> list[torch.Tensor]:
    """Each tensor's total update after ``steps`` steps from seeded weights and gradients (drawn on
    the CPU, so every device gets the same ones), as float64 on the CPU."""
    params = make_params(AGREEMENT_SHAPES, seed=0, device=device)
    start = [p.detach().double().cpu() for p in params]
    optimizer = Automagic_Sinkgd(params, fused=fused, state_precision=state_precision, lr_growth=lr_growth,
                                 **SETTINGS)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=generator) * 1e-3).to(device)
        optimizer.step()
    return [p.detach().double().cpu() - w for p, w in zip(params, start)]


def update_disagreement(device: str, fused: bool, state_precision: str, reference: str = "cpu",
                        lr_growth=None) -> float:
    """The largest relative difference between a tensor's total update on ``device`` and on the
    ``reference`` device's eager step: ||u_device - u_ref|| / ||u_ref||."""
    ours = _trained_updates(device, fused, state_precision, lr_growth=lr_growth)
    theirs = _trained_updates(reference, False, state_precision, lr_growth=lr_growth)
    return max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(ours, theirs))


def check_cpu_agreement() -> dict:
    results = {}
    for fused, (precision, _), growth in itertools.product((False, True), PRECISIONS, GROWTHS):
        label = f"{'fused' if fused else 'eager'}, {precision} state" + (", lr_growth" if growth else "")
        try:
            worst = update_disagreement("cuda", fused, precision, lr_growth=growth)
            results[label] = dict(relative_difference=worst, agrees=worst <= 1e-2)
            verdict = "agrees" if worst <= 1e-2 else "DIFFERS"
            print(f"cpu   {label:33s} {verdict} with the CPU step (worst tensor {worst:.2e})", flush=True)
        except Exception as error:  # noqa: BLE001 - reported, and counted as a failure
            results[label] = dict(error=f"{type(error).__name__}: {error}", agrees=False)
            print(f"cpu   {label:33s} ERROR {type(error).__name__}: {error}", flush=True)
    return results


def check_tf32() -> dict:
    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_tf32
    results = {}
    try:
        for fused in (False, True):
            runs = {}
            for tf32 in (False, True):
                matmul.allow_tf32 = tf32
                runs[tf32] = _steps(fused)
            same = all(torch.equal(a, b) for a, b in zip(runs[False][0], runs[True][0]))
            label = "fused" if fused else "eager"
            results[label] = dict(bitwise_equal=same, ms_tf32_off=runs[False][1], ms_tf32_on=runs[True][1])
            print(f"tf32  {label}: weights {'bit-equal' if same else 'DIFFER'} with TF32 on and off; step "
                  f"{runs[False][1]:.2f} ms off, {runs[True][1]:.2f} ms on", flush=True)
    finally:
        matmul.allow_tf32 = previous
    return results


def compiled_registers() -> list[dict]:
    """Registers and spills of every variant the Triton JIT compiled in this process."""
    from library import automagic_sinkgd_kernels as kernels
    rows = []
    for name in ("_bucket_step_kernel", "_split_reductions_kernel", "_split_state_kernel",
                 "_split_sinkgd_kernel", "_split_weights_kernel"):
        fn = getattr(kernels, name)
        try:  # Triton's JIT caches (3.x): device -> (compiled kernels by key, ...)
            compiled_kernels = [k for caches in fn.device_caches.values() for k in caches[0].values()]
            for compiled in compiled_kernels:
                compiled._init_handles()
                rows.append(dict(kernel=name, registers=compiled.n_regs, spills=compiled.n_spills,
                                 warps=compiled.metadata.num_warps))
                print(f"regs  {name:28s} {compiled.n_regs:4d} registers, {compiled.n_spills} spills", flush=True)
        except (AttributeError, IndexError, TypeError) as error:  # another Triton's cache layout
            print(f"regs  {name}: cannot read Triton's kernel cache ({error}); see compile_kernels.py")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, sync=check_sync(),
                  tf32=check_tf32(), cpu=check_cpu_agreement(), registers=compiled_registers())
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)
    failed = [k for k, v in report["sync"].items() if v != "no host sync"]
    failed += [k for k, v in report["tf32"].items() if not v["bitwise_equal"]]
    failed += [f"cpu agreement, {k}" for k, v in report["cpu"].items() if not v["agrees"]]
    failed += [r["kernel"] for r in report["registers"] if r["spills"]]
    print("gpu_extras: " + ("all checks passed" if not failed else f"FAILED: {failed}"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
