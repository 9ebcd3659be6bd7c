"""Optimizer state memory of a full U-Net fine-tune (SD1.5 and SDXL), per phase and precision.

The U-Net shapes come from the diffusers configs of SD1.5 and SDXL base, built on the meta device
(no weights are downloaded or allocated). For each optimizer, each distinct parameter shape gets
the optimizer's own state, and its bytes are counted tensor by tensor:
  * Automagic_Sinkgd (the ``full`` preset's settings) in fp32 and bf16 state, in each phase: early
    warm-up (t < warmup/2: Prodigy x0 kept), late warm-up (x0 freed), after warm-up (signs freed).
    The layout is built by the optimizer's own state code on the meta device (what a step keeps
    is allocated there and only updated in place afterwards; tests/test_state_precision.py checks
    real steps keep these bytes);
  * peers, from one real step on a real tensor of each distinct shape: torch AdamW, bitsandbytes
    AdamW8bit (if importable; else its documented ~2 B/param is shown, marked as not measured),
    transformers Adafactor (kohya's usual SDXL setting: no momentum, factored second moment),
    prodigyopt Prodigy.
Then the SDXL ``--full_bf16 --fused_backward_pass`` fit check for a 24 GiB card: bf16 U-Net
weights + optimizer state + the largest gradient (fused backward frees each gradient once its
tensor is stepped) + the step's own transient memory for the largest tensor (measured on CPU with
the profiler, plus the float32 load buffers a bf16 state keeps between steps). Activations, text
encoders, VAE and the CUDA context are NOT counted.

    python benchmarks/memory.py --json benchmarks/results/memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.speed import SD15_UNET, transient_peak_bytes  # noqa: E402
from library.automagic_sinkgd import Automagic_Sinkgd  # noqa: E402
from library.builtin.atomic import atomic_write  # noqa: E402

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (the keys that decide the shapes)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
MODELS = {"SD1.5 U-Net": SD15_UNET, "SDXL U-Net": SDXL_UNET}
# configs/full.toml; warmup_steps only decides when the phases change, not what they keep
FULL_PRESET = dict(lr=1e-5, min_lr=5e-7, max_lr=5e-4, d_coef=2, weight_decay=1e-4, warmup_steps=8,
                   full_finetune=True, orthograd=True, stats_update_freq=5)
PHASES = {"early warm-up": 1, "late warm-up": 4, "after warm-up": 8}  # a step t in each phase
GIB = 2**30


def unet_shapes(config: dict) -> Counter:
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    return Counter(tuple(p.shape) for p in unet.parameters())


def _state_bytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))


def automagic_bytes(shapes: Counter, weights: torch.dtype, precision: str) -> dict[str, int]:
    """State bytes of the whole model in each phase, from the optimizer's own state code."""
    totals = dict.fromkeys(PHASES, 0)
    for shape, count in shapes.items():
        p = torch.nn.Parameter(torch.empty(shape, dtype=weights, device="meta"))
        optimizer = Automagic_Sinkgd([p], state_precision=precision, **FULL_PRESET)
        group = optimizer.param_groups[0]
        state = optimizer._init_state(p, group)
        t = 0
        for phase, target in PHASES.items():
            while t < target:
                t = optimizer._advance_phase(state, group)
            totals[phase] += count * _state_bytes(state)
    return totals


def peer_factories() -> dict:
    factories = {"AdamW (torch)": lambda ps: torch.optim.AdamW(ps, lr=1e-5, foreach=False)}
    notes = {}
    try:
        import bitsandbytes as bnb
        factories["AdamW8bit (bitsandbytes)"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-5)
        notes["AdamW8bit (bitsandbytes)"] = f"bitsandbytes {bnb.__version__}"
    except ImportError:
        notes["AdamW8bit (bitsandbytes)"] = "not installed here: its documented ~2 B/param, not measured"
    try:
        from transformers.optimization import Adafactor
        factories["Adafactor (transformers)"] = lambda ps: Adafactor(ps, lr=1e-5, scale_parameter=False,
                                                                    relative_step=False, warmup_init=False)
    except ImportError:
        notes["Adafactor (transformers)"] = "transformers not installed: left out"
    try:
        from prodigyopt import Prodigy
        factories["Prodigy (prodigyopt)"] = lambda ps: Prodigy(ps, lr=1.0)
    except ImportError:
        notes["Prodigy (prodigyopt)"] = "prodigyopt not installed: left out"
    return factories, notes


def peer_bytes(shapes: Counter, weights: torch.dtype, make) -> int:
    """One real step on one real tensor of each distinct shape; its state bytes times its count."""
    total = 0
    generator = torch.Generator().manual_seed(0)
    for shape, count in shapes.items():
        p = torch.nn.Parameter((torch.randn(shape, generator=generator) * 0.02).to(weights))
        p.grad = (torch.randn(shape, generator=generator) * 1e-3).to(weights)
        optimizer = make([p])
        optimizer.step()
        total += count * _state_bytes(optimizer.state[p])
        del optimizer, p
    return total


def largest_step_transient(shape: tuple, precision: str) -> int:
    """Transient bytes of one bf16-weight step of the largest tensor, in early warm-up (its
    busiest phase), plus the buffers a compact state keeps between steps for its float32 loads."""
    generator = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter((torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16))
    optimizer = Automagic_Sinkgd([p], state_precision=precision, **dict(FULL_PRESET, warmup_steps=1000))
    for _ in range(3):
        p.grad = (torch.randn(shape, generator=generator) * 1e-3).to(torch.bfloat16)
        optimizer.step()
    kept = sum(b.numel() * b.element_size() for b in getattr(optimizer, "_workspaces", {}).values())
    return transient_peak_bytes(optimizer) + kept


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--skip-peers", action="store_true", help="only Automagic_Sinkgd (fast)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    machine = f"{platform.machine()}, torch {torch.__version__}"
    factories, notes = ({}, {}) if args.skip_peers else peer_factories()
    results = dict(machine=machine, notes=notes, models=[])
    for model, config in MODELS.items():
        shapes = unet_shapes(config)
        numel = sum(torch.Size(s).numel() * n for s, n in shapes.items())
        largest = max(shapes, key=lambda s: torch.Size(s).numel())
        entry = dict(model=model, params=numel, tensors=sum(shapes.values()), largest_tensor=list(largest), rows=[])
        for weights in (torch.float32, torch.bfloat16):
            wname = "fp32" if weights == torch.float32 else "bf16"
            for precision in ("fp32", "bf16"):
                per_phase = automagic_bytes(shapes, weights, precision)
                entry["rows"].append(dict(optimizer=f"Automagic_Sinkgd, {precision} state", weights=wname,
                                          bytes=per_phase,
                                          bytes_per_param={k: v / numel for k, v in per_phase.items()}))
            for name, make in factories.items():
                total = peer_bytes(shapes, weights, make)
                entry["rows"].append(dict(optimizer=name, weights=wname, bytes={"any": total},
                                          bytes_per_param={"any": total / numel}))
        results["models"].append(entry)
        print(f"\n{model}: {numel / 1e9:.3f}B params in {entry['tensors']} tensors, largest {largest}")
        print("| optimizer | weights | B/param early warm-up | late warm-up | after | GiB (early) |")
        print("|---|---|---:|---:|---:|---:|")
        for row in entry["rows"]:
            bpp = row["bytes_per_param"]
            cells = [bpp.get(p, bpp.get("any")) for p in PHASES]
            worst = max(row["bytes"].values())
            print(f"| {row['optimizer']} | {row['weights']} | " + " | ".join(f"{c:.2f}" for c in cells)
                  + f" | {worst / GIB:.1f} |")
        if model == "SDXL U-Net":
            results["sdxl_24gb"] = fit_check(entry, largest, numel)
    if args.json:
        report = json.dumps(results, indent=1)
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(report))
    return 0


def fit_check(entry: dict, largest: tuple, numel: int) -> list[dict]:
    """SDXL --full_bf16 --fused_backward_pass on a 24 GiB card, optimizer side only."""
    weights = numel * 2
    gradient = torch.Size(largest).numel() * 2
    print("\nSDXL full fine-tune, --full_bf16 --fused_backward_pass, 24 GiB card: bf16 U-Net weights"
          " + state (worst phase) + largest gradient + the step's transient for the largest tensor."
          " NOT counted: activations, text encoders, VAE, CUDA context.")
    print("| optimizer | weights GiB | state GiB | gradient GiB | step transient GiB | total GiB | left of 24 GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for row in entry["rows"]:
        if row["weights"] != "bf16":
            continue
        transient = None
        if row["optimizer"].startswith("Automagic_Sinkgd"):
            precision = row["optimizer"].split(", ")[1].split()[0]
            try:
                transient = largest_step_transient(largest, precision)
            except RuntimeError:
                transient = None
        state = max(row["bytes"].values())
        total = weights + state + gradient + (transient or 0)
        rows.append(dict(optimizer=row["optimizer"], weights=weights, state=state, gradient=gradient,
                         transient=transient, total=total, left_of_24gib=24 * GIB - total))
        shown = f"{transient / GIB:.2f}" if transient is not None else "not measured"
        print(f"| {row['optimizer']} | {weights / GIB:.2f} | {state / GIB:.2f} | {gradient / GIB:.2f} | {shown} | "
              f"{total / GIB:.2f} | {(24 * GIB - total) / GIB:.2f} |")
    return rows


if __name__ == "__main__":
    sys.exit(main())
