"""Optimizer step time and memory: Automagic_Sinkgd against AdamW (foreach, fused) and Prodigy.

Two parameter sets with the shapes of real Stable Diffusion 1.5 training, random values:
  * lora: a rank-16 kohya LoRA (2 x 192 U-Net modules incl. 1x1-conv proj_in/out, 2 x 72 CLIP-L
    modules): 528 tensors, ~9.5M parameters;
  * full: a full fine-tune slice of the SD1.5 U-Net (down_blocks.0, up_blocks.2, conv_in/out,
    time embedding): ~85M parameters, 3x3 convs, attention, 1-D norms.
Automagic_Sinkgd is timed in warm-up (mask, Prodigy signal, weight decay active) and after
warm-up (frozen mask, decay, OrthoGrad on). Steps of all optimizers are interleaved in one
process so load on the machine hits them alike; the median over repeats is reported.

    python benchmarks/speed.py                    # both sets, prints a markdown table
    python benchmarks/speed.py --sets lora --repeats 10 --json out.json
    python benchmarks/speed.py --state-precision fp32 bf16   # adds Automagic rows per state precision
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from library.automagic_sinkgd import Automagic_Sinkgd  # noqa: E402
from library.builtin.atomic import atomic_write  # noqa: E402

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 cross_attention_dim=768, attention_head_dim=8)
FULL_SLICE = ("down_blocks.0.", "up_blocks.2.", "conv_in.", "conv_out.", "conv_norm_out.", "time_embedding.")


def lora_shapes(rank: int = 16) -> list[tuple[int, ...]]:
    """(down, up) shapes of every module kohya's networks.lora trains on SD1.5."""
    shapes = []
    unet_dims = [320] * 2 + [640] * 2 + [1280] * 2 + [1280] + [1280] * 3 + [640] * 3 + [320] * 3
    for dim in unet_dims:  # 16 Transformer2DModel blocks
        for _ in range(4):  # attn1 q, k, v, out
            shapes += [(rank, dim), (dim, rank)]
        shapes += [(rank, dim), (dim, rank)]            # attn2 to_q
        shapes += [(rank, 768), (dim, rank)] * 2        # attn2 to_k, to_v (context dim)
        shapes += [(rank, dim), (dim, rank)]            # attn2 to_out
        shapes += [(rank, dim), (8 * dim, rank)]        # ff.net.0.proj (GEGLU)
        shapes += [(rank, 4 * dim), (dim, rank)]        # ff.net.2
        shapes += [(rank, dim, 1, 1), (dim, rank, 1, 1)] * 2  # proj_in, proj_out (1x1 conv)
    for _ in range(12):  # CLIP-L text encoder layers
        shapes += [(rank, 768), (768, rank)] * 4        # q, k, v, out_proj
        shapes += [(rank, 768), (3072, rank), (rank, 3072), (768, rank)]  # fc1, fc2
    return shapes


def full_slice_shapes() -> list[tuple[int, ...]]:
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    return [tuple(p.shape) for name, p in unet.named_parameters() if name.startswith(FULL_SLICE)]


def make_params(shapes, seed: int, dtype=torch.float32) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter((torch.randn(shape, generator=generator) * 0.02).to(dtype))
        p.grad = (torch.randn(shape, generator=generator) * 1e-3).to(dtype)
        params.append(p)
    return params


def optimizers_for(shapes, full: bool, state_precisions=("fp32",)):
    """name -> factory(params) -> optimizer; each optimizer gets its own parameter copy."""
    common = dict(lr=5e-5, min_lr=1e-6, max_lr=1e-3, full_finetune=full)
    factories = {
        "AdamW(foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True),
        "AdamW(fused)": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
        "Automagic warm-up": lambda ps: Automagic_Sinkgd(ps, warmup_steps=10**6, **common),
        "Automagic post-warm-up": lambda ps: Automagic_Sinkgd(ps, warmup_steps=2, orthograd=True, **common),
        "Automagic warm-up (per-tensor)": lambda ps: Automagic_Sinkgd(ps, warmup_steps=10**6, foreach=False, **common),
    }
    for precision in state_precisions:
        if precision != "fp32":
            factories[f"Automagic warm-up ({precision} state)"] = lambda ps, sp=precision: Automagic_Sinkgd(
                ps, warmup_steps=10**6, state_precision=sp, **common)
            factories[f"Automagic post-warm-up ({precision} state)"] = lambda ps, sp=precision: Automagic_Sinkgd(
                ps, warmup_steps=2, orthograd=True, state_precision=sp, **common)
    try:
        from prodigyopt import Prodigy
        factories["Prodigy"] = lambda ps: Prodigy(ps, lr=1.0, weight_decay=0.01, decouple=True,
                                                  use_bias_correction=True, safeguard_warmup=True)
    except ImportError:
        print("prodigyopt not installed: Prodigy left out", file=sys.stderr)
    return factories


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if torch.is_tensor(v))


def transient_peak_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Peak CPU memory allocated during one step() above what was live before it.

    Uses the profiler's memory timeline (a private torch API, present since 2.1), which follows
    each allocation from creation to release; raises RuntimeError if this torch lacks it.
    """
    from torch.profiler import ProfilerActivity, profile
    try:
        from torch.profiler._memory_profiler import MemoryProfileTimeline
    except ImportError as error:
        raise RuntimeError("this torch has no profiler memory timeline") from error
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        optimizer.step()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    totals = [sum(row) for row in sizes]
    return max(totals) - totals[0] if totals else 0


def run_set(name: str, shapes, full: bool, repeats: int, warmup_steps_to_skip: int = 4,
            state_precisions=("fp32",)):
    factories = optimizers_for(shapes, full, state_precisions)
    numel = sum(torch.Size(s).numel() for s in shapes)
    optimizers = {label: make(make_params(shapes, seed=0)) for label, make in factories.items()}
    for optimizer in optimizers.values():  # past Automagic's init step and into its phase
        for _ in range(warmup_steps_to_skip):
            optimizer.step()
    times = {label: [] for label in optimizers}
    for _ in range(repeats):
        for label, optimizer in optimizers.items():
            start = time.perf_counter()
            optimizer.step()
            times[label].append(time.perf_counter() - start)
    rows = []
    base = statistics.median(times["AdamW(foreach)"])
    fused = statistics.median(times["AdamW(fused)"])
    for label, optimizer in optimizers.items():
        median = statistics.median(times[label])
        rows.append(dict(set=name, optimizer=label, ms=median * 1e3, vs_foreach=median / base,
                         vs_fused=median / fused, state_bytes_per_param=state_bytes(optimizer) / numel,
                         transient_mb=transient_peak_bytes(optimizer) / 2**20))
    largest = max(torch.Size(s).numel() for s in shapes)
    return rows, dict(set=name, tensors=len(shapes), params=numel, largest_tensor_mb=largest * 4 / 2**20)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--state-precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                        help="Automagic_Sinkgd state precisions to time (fp32 rows are always there)")
    parser.add_argument("--compile", choices=["static", "dynamic"], default=None,
                        help="time Automagic_Sinkgd with its bucket math under torch.compile "
                             "(compile time, minutes on CPU, is left out of the step times)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile:
        import torch._dynamo
        import library.automagic_sinkgd as core
        # every bucket shape and phase is its own graph with static shapes
        torch._dynamo.config.cache_size_limit = 256
        torch._dynamo.config.accumulated_cache_size_limit = 4096
        core._bucket_math = torch.compile(core._bucket_math, dynamic=args.compile == "dynamic")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if args.compile:
        machine += f", Automagic bucket math under torch.compile(dynamic={args.compile == 'dynamic'})"
    print(f"machine: {machine}")
    all_rows, infos = [], []
    for name in args.sets:
        shapes = lora_shapes() if name == "lora" else full_slice_shapes()
        rows, info = run_set(name, shapes, full=name == "full", repeats=args.repeats,
                             state_precisions=args.state_precision)
        all_rows += rows
        infos.append(info)
        print(f"\n{name}: {info['tensors']} tensors, {info['params'] / 1e6:.1f}M params, "
              f"largest tensor {info['largest_tensor_mb']:.1f} MB (fp32)")
        print("| optimizer | step ms | x AdamW(foreach) | x AdamW(fused) | state bytes/param | transient MB |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['optimizer']} | {r['ms']:.1f} | {r['vs_foreach']:.2f} | {r['vs_fused']:.2f} | "
                  f"{r['state_bytes_per_param']:.1f} | {r['transient_mb']:.1f} |")
    if args.json:
        report = json.dumps(dict(machine=machine, sets=infos, rows=all_rows), indent=1)
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
