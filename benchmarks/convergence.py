#!/usr/bin/env python
"""Convergence benchmark: Automagic_Sinkgd vs AdamW and Prodigy, with ablations.

Miniature Stable Diffusion training that runs on a CPU without downloads:

* data: scikit-learn's bundled ``load_digits`` (1797 8x8 grey images, classes 0-9),
  scaled to [-1, 1];
* model: a small diffusers ``UNet2DConditionModel`` with SD's structure (cross-attention
  down / mid / up blocks, linear projections, time embedding), trained as an epsilon
  (noise) predictor with SD's noise schedule (1000 steps, scaled-linear betas);
* conditioning: every class has a FIXED random "prompt" of 4 tokens x 32 dims, read by the
  cross-attention layers. It plays the role of SD's frozen text encoder: it is never trained,
  so to learn a new class the U-Net itself (or its LoRA) has to adapt;
* base model: pretrained (seeded, cached) on classes 0-6 only;
* tasks, both on the held-out classes 7, 8, 9 (60 training images per class, a LoRA-sized
  dataset): (a) ``lora``: kohya-style LoRA (rank 4, alpha 1, up initialised to zero) on every
  Linear of the U-Net's transformer blocks (to_q/k/v/out, ff, proj_in/out), base frozen;
  (b) ``full``: every U-Net parameter trained;
* metric: held-out denoising MSE on 192 images of classes 7-9 never used in training
  (64 per class), each with 2 fixed noise draws at fixed, stratified timesteps, measured at
  several points of the run. Lower is better.

Compared in one run: ``Automagic_Sinkgd`` with each preset untuned (values from the
shipped ``configs/*.toml`` when the presets module is importable, else the preset table of
the specification), the same presets with the user document's warm-up rule
``warmup_steps = min(1000, total_steps // 10)`` (labelled), ``torch.optim.AdamW`` at a
3-point learning-rate grid, ``prodigyopt.Prodigy`` with its README's diffusion settings,
and ablations of the task's own preset (each technique switched off in turn).

Usage::

    python benchmarks/convergence.py                 # both tasks, every run group, seed 0
    # what produced benchmarks/results (2 seeds for the comparisons, 1 for the ablations):
    python benchmarks/convergence.py --runs main tuning --seeds 0 1
    python benchmarks/convergence.py --runs ablations --seeds 0 --resume
    python benchmarks/convergence.py --task lora --steps 600 --out DIR   # a longer run
    python benchmarks/convergence.py --quick         # tiny model, few steps: smoke run
    python benchmarks/convergence.py --report-only   # rebuild table + plot from the JSON

Run groups (--runs): ``main`` (presets, presets + doc warm-up, AdamW grid, Prodigy),
``tuning`` (labelled candidate preset changes), ``ablations`` (one technique off at a time,
plus OrthoGrad off on the doc warm-up variant, where it is active), ``ablations_docwu``
(every ablation on the doc warm-up variant), ``precision`` (the task's preset, and its doc
warm-up variant, with ``state_precision="bf16"``). Runs are deterministic for a given seed.

Outputs (written atomically) in ``--out`` (default ``benchmarks/results``):
``convergence_<task>.json``, ``convergence.md`` (tables), ``convergence.png`` (curves).
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from library.builtin.atomic import atomic_write  # noqa: E402

# --------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------

PRETRAIN_CLASSES = tuple(range(7))
HELDOUT_CLASSES = (7, 8, 9)
TRAIN_PER_CLASS = 60
VAL_PER_CLASS = 64
VAL_NOISE_DRAWS = 2
N_TOKENS = 4
CROSS_DIM = 32
BATCH_SIZE = 32
NUM_TRAIN_TIMESTEPS = 1000

MODEL_CONFIG = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    layers_per_block=1,
    block_out_channels=(32, 48),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    cross_attention_dim=CROSS_DIM,
    attention_head_dim=8,
    norm_num_groups=8,
    use_linear_projection=True,
)
QUICK_MODEL_CONFIG = dict(MODEL_CONFIG, block_out_channels=(16, 24), attention_head_dim=8)

PRETRAIN = dict(steps=800, batch_size=64, lr=1e-3, weight_decay=1e-2, seed=1234)
QUICK_PRETRAIN = dict(steps=60, batch_size=32, lr=1e-3, weight_decay=1e-2, seed=1234)

LORA_RANK = 4
LORA_ALPHA = 1.0
LORA_TARGET_SUFFIXES = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
)

# AdamW learning-rate grids (3 points per task, chosen to bracket AdamW's optimum on this
# benchmark; the table reports every point).
# (The LoRA grid was first 3e-4 / 1e-3 / 3e-3; its best point was the edge, so it was moved up.)
ADAMW_GRID = {"lora": (1e-3, 3e-3, 1e-2), "full": (1e-4, 3e-4, 1e-3),
              "lora_real": (1e-4, 3e-4, 1e-3), "full_real": (3e-7, 1e-6, 3e-6)}
# (lora_real: k = 20 was picked with a 400-step AdamW probe at k = 8, whose best was 1e-3;
# full_real: s = 50 from a probe at s = 100, whose best was 1e-6 .. 3e-6 at 400 steps.)
# Points outside the grid, run to show the grid brackets AdamW's optimum (or that it does not).
ADAMW_EXTRA = {"lora": (3e-4, 3e-2), "full": (), "lora_real": (3e-5, 3e-3), "full_real": ()}
ADAMW_WEIGHT_DECAY = 1e-2  # torch default

# prodigyopt README, section "Diffusion models": safeguard_warmup=True,
# use_bias_correction=True, weight_decay=0.01, betas=(0.9, 0.99); lr=1 (always).
PRODIGY_KWARGS = dict(lr=1.0, betas=(0.9, 0.99), weight_decay=0.01, decouple=True,
                      use_bias_correction=True, safeguard_warmup=True, d_coef=1.0)

# The user document's preset table. Used when the shipped presets cannot
# be read (configs/ or library/presets.py missing).
DOCUMENT_PRESETS = {
    "lora": dict(lr=5e-5, min_lr=1e-6, max_lr=1e-3, eta=2.0, warmup_steps=500,
                 full_finetune=False, orthograd=True, stats_update_freq=3),
    "full": dict(lr=1e-5, min_lr=5e-7, max_lr=5e-4, d_coef=2, weight_decay=1e-4,
                 warmup_steps=1000, full_finetune=True, orthograd=True, stats_update_freq=5),
    "high_performance": dict(lr=3e-5, beta1=0.85, weight_decay=5e-4, warmup_steps=800,
                             full_finetune=False, orthograd=False, stats_update_freq=10),
}
# Real-scale variants of the two tasks. The toy's AdamW optimum sits 30-100x above real SD
# (1e-2 LoRA, 3e-4 full, against ~1e-4 .. 5e-4 and ~1e-6 .. 5e-6), so these keep the data, the
# base model and the metric and change only how much one unit of learning rate moves the function:
#   lora_real: network_alpha = REAL_LORA_K x rank (kohya's scale alpha / rank = K instead of 1/4),
#     as a wide real model's LoRA, where one step of size lr in A and B changes many more outputs;
#   full_real: every weight trained as s * W' (W' initialised to W / s, the function unchanged),
#     so an element-wise step of lr in W' moves W by s * lr.
# They run 4x the longest preset warm-up (4 x 500 for LoRA, 4 x 1000 for full) with a smaller
# batch (8 LoRA, 4 full) to fit a 2-core CPU budget, and evaluate at 10 points.
REAL_LORA_K = 20.0
REAL_FULL_SCALE = 50.0
# user_lora_scale: the network_alpha / network_dim the kohya hook would pass as lora_scale. The toy
# task is taken at its own scale; lora_real stands for a user's alpha = rank on real SD (its K x
# rank alpha is the toy calibrated to real SD's learning rates), so the hook would pass 1.
TASKS = {
    "lora": dict(kind="lora", alpha=LORA_ALPHA, weight_scale=1.0, batch_size=BATCH_SIZE, steps=200,
                 user_lora_scale=LORA_ALPHA / LORA_RANK),
    "full": dict(kind="full", alpha=LORA_ALPHA, weight_scale=1.0, batch_size=BATCH_SIZE, steps=200),
    "lora_real": dict(kind="lora", alpha=REAL_LORA_K * LORA_RANK, weight_scale=1.0, batch_size=8, steps=2000,
                      eval_every=0.1, user_lora_scale=1.0),
    "full_real": dict(kind="full", alpha=LORA_ALPHA, weight_scale=REAL_FULL_SCALE, batch_size=4, steps=4000,
                      eval_every=0.1),
}
TOY_TASKS, REAL_TASKS = ("lora", "full"), ("lora_real", "full_real")

PRESET_FOR_TASK = {"lora": "lora", "full": "full", "lora_real": "lora", "full_real": "full"}
STATE_PRECISIONS = ("bf16",)  # the "precision" run group; fp32 state is the preset's own row
# presets run on each task: the LoRA-mode presets (full_finetune=False) on the LoRA task, the
# full fine-tune preset on the full task (a user would not cross them).
PRESETS_ON_TASK = {"lora": ("lora", "high_performance"), "full": ("full",),
                   "lora_real": ("lora", "high_performance"), "full_real": ("full",)}

# Ablations: (label, kwargs overriding the task's preset, what is switched off)
ABLATIONS = (
    ("no SinkGD", dict(sinkgd_iters=0), "sinkgd_iters=0"),
    ("no Grams", dict(grams=False), "grams=False (plain momentum direction)"),
    ("no OrthoGrad", dict(orthograd=False), "orthograd=False"),
    ("no Prodigy signal", dict(d_coef=1), "d_coef=1"),
    ("no VRAdam", dict(vradam=False), "vradam=False"),
    ("no ALLoRA", dict(allora=False), "allora=False (LoRA mode only)"),
    ("no weight decay", dict(weight_decay=0.0), "weight_decay=0"),
    ("mask frozen at lr", dict(lr_bump=0.0), "lr_bump=0"),
)


# Candidate preset changes (--runs tuning), each labelled with what it changes from the preset.
TUNING = {
    "lora": (
        ("lr=1e-4", dict(lr=1e-4)),
        ("lr_bump=2e-5", dict(lr_bump=2e-5)),
        ("lr=1e-4, lr_bump=2e-5", dict(lr=1e-4, lr_bump=2e-5)),
        ("doc 'too slow' recipe: lr_bump=2e-5, d_coef=3, warmup_steps=200",
         dict(lr_bump=2e-5, d_coef=3, warmup_steps=200)),
        ("max_lr=1e-2", dict(max_lr=1e-2)),
        ("max_lr=1e-2, lr_bump=5e-5", dict(max_lr=1e-2, lr_bump=5e-5)),
        ("warmup_steps=0.25 (a quarter of the run)", dict(warmup_steps=0.25)),
    ),
    "full": (
        ("lr_bump=2e-5", dict(lr_bump=2e-5)),
        ("lr=3e-5", dict(lr=3e-5)),
        ("warmup_steps=0.25 (a quarter of the run)", dict(warmup_steps=0.25)),
    ),
}


# Fix candidates on the real-scale tasks (--runs fixes): (label, overrides of the task's preset);
# "{steps}" / "{half}" are the run's length and the README's warm-up advice (steps // 2).
FIXES = {
    "lora_real": (
        ("decay over the run to 0", dict(decay_horizon="run", total_steps="{steps}", decay_floor=0.0)),
        ("no post-warm-up decay (decay_floor=1)", dict(decay_floor=1.0)),
        ("the document's decay (over warmup_steps, floor 0.1)", dict(decay_horizon="warmup", decay_floor=0.1)),
        ("relative_bump=0.05", dict(relative_bump=0.05)),
        ("relative_bump=0.5", dict(relative_bump=0.5)),
        ("mask frozen at lr (relative_bump=0)", dict(relative_bump=0.0)),
        ("warm-up advice + decay over the run to 0",
         dict(warmup_steps="{half}", decay_horizon="run", total_steps="{steps}", decay_floor=0.0)),
        # the same as the preset's 500 at 2000 steps: it differs on runs of other lengths (--steps)
        ("warmup_steps=0.25 (a quarter of the run)", dict(warmup_steps=0.25)),
        # the robustness matrix's candidates (benchmarks/robustness.py), checked at real scale
        ("multiplicative mask 0.2", dict(mask_rule="multiplicative", relative_bump=0.2)),
        ("multiplicative mask 0.2 annealed after 25",
         dict(mask_rule="multiplicative", relative_bump=0.2, mask_bump_decay=25)),
        ("multiplicative mask 0.5 annealed after 10",
         dict(mask_rule="multiplicative", relative_bump=0.5, mask_bump_decay=10)),
        ("multiplicative mask 0.5 annealed after 10, max_lr=0.01",
         dict(mask_rule="multiplicative", relative_bump=0.5, mask_bump_decay=10, max_lr=0.01)),
        ("multiplicative mask 0.5 annealed after 10, max_lr=0.1",
         dict(mask_rule="multiplicative", relative_bump=0.5, mask_bump_decay=10, max_lr=0.1)),
        ("warmup_steps=0.25, multiplicative mask 0.5 annealed after 10",
         dict(warmup_steps=0.25, mask_rule="multiplicative", relative_bump=0.5, mask_bump_decay=10),
         "high_performance"),
        # longer warm-ups (the robustness matrix's toy and alpha <= rank cells gain; lora_real is alpha
        # = rank for lora_scale_power, so lora_scale_power_above does not act here)
        ("warmup_steps=0.5", dict(warmup_steps=0.5)),
        ("warmup_steps=0.65", dict(warmup_steps=0.65)),
        # the robustness matrix's high_performance candidate: its 800-step warm-up, then to 0 at the end
        ("decay over the run to 0", dict(decay_horizon="run", total_steps="{steps}", decay_floor=0.0),
         "high_performance"),
        ("the document's decay (the preset before this round)", dict(decay_horizon="warmup", decay_floor=0.1),
         "high_performance"),
        # the preset's warm-up before it took 0.8 of a run shorter than 1,000 steps (such a run never
        # left this one)
        ("fixed 800-step warm-up (the preset before this round)", dict(warmup_steps=800, max_warmup_steps=None),
         "high_performance"),
        # the robustness matrix's per-tensor growth factor, checked at real scale
        ("lr_growth=1, lr_growth_max=100", dict(lr_growth=1.0, lr_growth_max=100.0)),
        ("lr_growth=1, lr_growth_max=100", dict(lr_growth=1.0, lr_growth_max=100.0), "high_performance"),
        ("lr_growth=1, lr_growth_steps=60, lr_growth_max=100",
         dict(lr_growth=1.0, lr_growth_steps=60, lr_growth_max=100.0)),
        ("lr_growth=1, lr_growth_max=10", dict(lr_growth=1.0, lr_growth_max=10.0)),
        ("lr_growth=1, lr_growth_max=10", dict(lr_growth=1.0, lr_growth_max=10.0), "high_performance"),
        ("lr_growth=0.5, lr_growth_max=10", dict(lr_growth=0.5, lr_growth_max=10.0)),
        # the presets before they took lr_growth (for the paired seeds)
        ("without lr_growth (the preset before it took lr_growth)", dict(lr_growth=None), "high_performance"),
        ("without lr_growth (the preset before it took lr_growth)", dict(lr_growth=None)),
    ),
    "full_real": (
        ("lr_growth=1, lr_growth_max=10", dict(lr_growth=1.0, lr_growth_max=10.0)),
        # relative_bump needs fp32 state (a compact mask is a lattice of absolute lr_bump steps)
        ("relative_bump=0.2, fp32 state", dict(relative_bump=0.2, state_precision="fp32")),
        ("warm-up advice + relative_bump=0.2, fp32 state",
         dict(warmup_steps="{half}", relative_bump=0.2, state_precision="fp32")),
        ("decay over the run to 0", dict(decay_horizon="run", total_steps="{steps}", decay_floor=0.0)),
        ("no post-warm-up decay (decay_floor=1)", dict(decay_floor=1.0)),
        ("warmup_steps=0.25 (a quarter of the run)", dict(warmup_steps=0.25)),
        ("multiplicative mask 0.5 annealed after 10",
         dict(mask_rule="multiplicative", relative_bump=0.5, mask_bump_decay=10)),
        # the robustness matrix's full candidates (benchmarks/robustness.py), checked at real scale;
        # the preset before it decayed over the run, for the paired seeds
        ("the document's decay (the preset before this round)", dict(decay_horizon="warmup", decay_floor=0.1)),
        ("decay over the run to 0, warmup_steps=0.5, lr_bump=4e-6",
         dict(decay_horizon="run", total_steps="{steps}", decay_floor=0.0, warmup_steps=0.5, lr_bump=4e-6)),
        ("decay over the run to 0, warmup_steps=0.5, multiplicative mask 0.5 annealed after 10",
         dict(decay_horizon="run", total_steps="{steps}", decay_floor=0.0, warmup_steps=0.5,
              mask_rule="multiplicative", relative_bump=0.5, mask_bump_decay=10)),
    ),
}


def _fill(over: dict, steps: int) -> dict:
    return {k: (int(v.format(steps=steps, half=advice_warmup(steps))) if isinstance(v, str) and "{" in v else v)
            for k, v in over.items()}


def compact_state_kwargs(preset: dict, precision: str) -> dict:
    """The preset with a compact state. A compact mask is a lattice of absolute lr_bump steps, so a
    relative bump becomes the same absolute move (relative_bump x lr) as lr_bump."""
    kw = dict(preset, state_precision=precision)
    if kw.get("relative_bump") is not None:
        kw["lr_bump"] = kw.pop("relative_bump") * kw["lr"]
    return kw


def doc_warmup(total_steps: int) -> int:
    """The user document's warm-up advice: min(1000, total_steps // 10)."""
    return max(1, min(1000, total_steps // 10))


# --------------------------------------------------------------------------------------
# small utilities
# --------------------------------------------------------------------------------------

def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def log(msg: str) -> None:
    print(f"[{_dt.datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


def eval_points(steps: int, every: float | None = None) -> list[int]:
    fr = (0, 1 / 12, 1 / 6, 1 / 3, 1 / 2, 2 / 3, 5 / 6, 1)
    if every:
        fr = [i * every for i in range(int(round(1 / every)) + 1)]
    return sorted({int(round(steps * f)) for f in fr})


def task_eval_points(task: str, steps: int) -> list[int]:
    return eval_points(steps, TASKS[task].get("eval_every"))


def advice_warmup(total_steps: int) -> int:
    """The README's warm-up advice ("at least half of your planned steps"): total_steps // 2."""
    return max(1, total_steps // 2)


# --------------------------------------------------------------------------------------
# data, conditioning, noise schedule
# --------------------------------------------------------------------------------------

class Data:
    """Fixed splits of sklearn digits + fixed validation noise."""

    def __init__(self, split_seed: int = 0):
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.from_numpy((d.images / 16.0 * 2.0 - 1.0).astype(np.float32)).unsqueeze(1)
        y = torch.from_numpy(d.target.astype(np.int64))
        rng = np.random.RandomState(split_seed)
        pre = [i for i in range(len(y)) if int(y[i]) in PRETRAIN_CLASSES]
        tr, va = [], []
        for c in HELDOUT_CLASSES:
            idx = np.flatnonzero(d.target == c)
            rng.shuffle(idx)
            tr += idx[:TRAIN_PER_CLASS].tolist()
            va += idx[TRAIN_PER_CLASS:TRAIN_PER_CLASS + VAL_PER_CLASS].tolist()
        assert not set(tr) & set(va)
        self.pre_x, self.pre_y = x[pre], y[pre]
        self.ft_x, self.ft_y = x[tr], y[tr]
        vx, vy = x[va], y[va]
        # fixed class "prompts": frozen random token embeddings (the text encoder's role)
        g = torch.Generator().manual_seed(4242)
        self.class_emb = torch.randn(10, N_TOKENS, CROSS_DIM, generator=g)
        # fixed validation set: each image with VAL_NOISE_DRAWS noise draws, stratified t
        g = torch.Generator().manual_seed(777)
        self.val_x = vx.repeat(VAL_NOISE_DRAWS, 1, 1, 1)
        self.val_y = vy.repeat(VAL_NOISE_DRAWS)
        n = len(self.val_y)
        t = (torch.arange(n, dtype=torch.float64) + torch.rand(n, generator=g, dtype=torch.float64))
        t = (t / n * NUM_TRAIN_TIMESTEPS).long().clamp_(0, NUM_TRAIN_TIMESTEPS - 1)
        self.val_t = t[torch.randperm(n, generator=g)]
        self.val_noise = torch.randn(self.val_x.shape, generator=g)
        from diffusers import DDPMScheduler

        sched = DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="scaled_linear",
                              beta_start=0.00085, beta_end=0.012)
        self.alphas_cumprod = sched.alphas_cumprod.float().clone()

    def noisy(self, x0, noise, t):
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def batch(self, x, y, gen: torch.Generator, bs: int):
        idx = torch.randint(0, len(y), (bs,), generator=gen)
        x0, yy = x[idx], y[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (bs,), generator=gen)
        return self.noisy(x0, noise, t), t, self.class_emb[yy], noise


def make_unet(quick: bool):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**(QUICK_MODEL_CONFIG if quick else MODEL_CONFIG))


class _Scaled(nn.Module):
    """W = s * W' (torch.nn.utils.parametrize); right_inverse sets W' = W / s at registration."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, w):
        return w * self.scale

    def right_inverse(self, w):
        return w / self.scale


def scale_parametrize(model: nn.Module, scale: float) -> list[nn.Parameter]:
    """Train every parameter of ``model`` as scale * W' (same function, gradients x scale, and an
    element-wise optimizer step of lr in W' moves W by scale * lr). Returns the W' parameters."""
    from torch.nn.utils import parametrize

    for module in list(model.modules()):
        for name, p in list(module.named_parameters(recurse=False)):
            if p is not None:
                parametrize.register_parametrization(module, name, _Scaled(scale))
    return [p for n, p in model.named_parameters() if n.endswith(".original")]


@torch.no_grad()
def val_loss(model, data: Data, chunk: int = 512) -> float:
    was_training = model.training
    model.eval()
    tot, n = 0.0, 0
    for i in range(0, len(data.val_y), chunk):
        x0 = data.val_x[i:i + chunk]
        noise = data.val_noise[i:i + chunk]
        t = data.val_t[i:i + chunk]
        pred = model(data.noisy(x0, noise, t), t, data.class_emb[data.val_y[i:i + chunk]]).sample
        tot += torch.nn.functional.mse_loss(pred, noise, reduction="sum").item()
        n += noise.numel()
    model.train(was_training)
    return tot / n


# --------------------------------------------------------------------------------------
# base model (pretrained on classes 0-6, cached)
# --------------------------------------------------------------------------------------

def base_cache_path(cache_dir: Path, quick: bool) -> Path:
    cfg = dict(model=QUICK_MODEL_CONFIG if quick else MODEL_CONFIG,
               pretrain=QUICK_PRETRAIN if quick else PRETRAIN,
               classes=PRETRAIN_CLASSES, tokens=N_TOKENS, cross=CROSS_DIM, emb_seed=4242)
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return cache_dir / f"convergence_base_{'quick_' if quick else ''}{h}.safetensors"


def get_base_state(data: Data, cache_dir: Path, quick: bool) -> dict:
    from safetensors.torch import load_file, save_file

    path = base_cache_path(cache_dir, quick)
    if path.exists():
        log(f"base model: cached {path}")
        return {k: v.float() for k, v in load_file(str(path)).items()}
    pc = QUICK_PRETRAIN if quick else PRETRAIN
    log(f"base model: pretraining {pc['steps']} steps on classes {PRETRAIN_CLASSES} -> {path}")
    torch.manual_seed(pc["seed"])
    model = make_unet(quick)
    opt = torch.optim.AdamW(model.parameters(), lr=pc["lr"], weight_decay=pc["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / pc["steps"])))
    gen = torch.Generator().manual_seed(pc["seed"])
    t0 = time.perf_counter()
    for s in range(pc["steps"]):
        xt, t, c, noise = data.batch(data.pre_x, data.pre_y, gen, pc["batch_size"])
        loss = torch.nn.functional.mse_loss(model(xt, t, c).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (s + 1) % 250 == 0:
            log(f"  pretrain step {s + 1}: train loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)")
    # fp16 storage keeps the cached file small (< 2 MB); the benchmark loads it as fp32.
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata={
        "what": "convergence benchmark base U-Net (classes 0-6)", "pretrain": json.dumps(pc)}))
    return {k: v.float() for k, v in sd.items()}


# --------------------------------------------------------------------------------------
# LoRA (kohya-style: down kaiming-uniform, up zero, scale alpha / rank)
# --------------------------------------------------------------------------------------

class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.lora_down = nn.Linear(base.in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.scale = alpha / rank

    def forward(self, x):
        return self.base(x) + self.lora_up(self.lora_down(x)) * self.scale


def inject_lora(model: nn.Module, rank: int = LORA_RANK, alpha: float = LORA_ALPHA) -> list[nn.Parameter]:
    targets = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and ".attentions." in f".{name}" and name.endswith(LORA_TARGET_SUFFIXES):
            targets.append(name)
    params = []
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        lora = LoRALinear(getattr(parent, child), rank, alpha)
        setattr(parent, child, lora)
        params += [lora.lora_down.weight, lora.lora_up.weight]
    return params


# --------------------------------------------------------------------------------------
# optimizers
# --------------------------------------------------------------------------------------

AUTOMAGIC_IMPL = "library.automagic_sinkgd:Automagic_Sinkgd"


def _import_automagic():
    import importlib

    mod, _, cls = AUTOMAGIC_IMPL.partition(":")
    return getattr(importlib.import_module(mod), cls)


def load_presets() -> tuple[dict, str]:
    """Preset kwargs (optimizer keyword -> value) per preset name, and where they came from."""
    try:
        from library.optimizer_factory import parse_optimizer_args
        from library.presets import PRESET_NAMES, load_preset

        out = {}
        for name in PRESET_NAMES:
            flat = load_preset(name)
            kw = parse_optimizer_args(list(flat.get("optimizer_args") or []))
            if "lr" not in kw and "learning_rate" in flat:
                kw["lr"] = float(flat["learning_rate"])
            out[name] = kw
        return out, "configs/*.toml via library.presets"
    except ImportError as e:  # presets module not there (yet): use the spec's table
        return copy.deepcopy(DOCUMENT_PRESETS), f"the design document's preset table (presets module unavailable: {type(e).__name__}: {e})"


def build_optimizer(spec: dict, params: list[nn.Parameter], steps: int | None = None,
                    lora_scale: float | None = None):
    kind = spec["kind"]
    groups = [{"params": params}]
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=spec["lr"], weight_decay=ADAMW_WEIGHT_DECAY)
    if kind == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(groups, **PRODIGY_KWARGS)
    if kind == "automagic":
        kw = dict(spec["kwargs"])
        lr = kw.pop("lr")
        if steps is not None:  # the run's length, as kohya's hook and the built-in trainer hand it
            kw.setdefault("total_steps", steps)
        if lora_scale is not None:  # a LoRA's alpha / rank, as kohya's hook hands it
            kw.setdefault("lora_scale", lora_scale)
        # kohya passes the learning rate as the group's lr; the mask starts at it
        return _import_automagic()(groups, lr=lr, **kw)
    raise ValueError(kind)


def mean_effective_lr(opt) -> float | None:
    f = getattr(opt, "effective_lrs", None)
    if f is None:
        if "d" in opt.param_groups[0]:  # prodigy: d * lr
            g = opt.param_groups[0]
            return float(g["d"] * g["lr"])
        return float(opt.param_groups[0]["lr"])
    try:
        v = [float(x) for x in f()]
        return sum(v) / len(v)
    except Exception:
        return None


# --------------------------------------------------------------------------------------
# one run
# --------------------------------------------------------------------------------------

def run_one(task: str, spec: dict, seed: int, steps: int, data: Data, base_state: dict, quick: bool) -> dict:
    cfg = TASKS[task]
    torch.manual_seed(seed)
    model = make_unet(quick)
    model.load_state_dict(base_state)
    if cfg["kind"] == "lora":
        model.requires_grad_(False)
        params = inject_lora(model, alpha=cfg["alpha"])
    elif cfg["weight_scale"] != 1.0:
        params = scale_parametrize(model, cfg["weight_scale"])
    else:
        params = [p for p in model.parameters()]
        for p in params:
            p.requires_grad_(True)
    model.train()
    opt = build_optimizer(spec, params, steps, lora_scale=cfg.get("user_lora_scale"))
    gen = torch.Generator().manual_seed(10_000 + seed)  # same data stream for every optimizer
    points = task_eval_points(task, steps)
    batch_size = cfg["batch_size"]
    losses, eff_lrs, step_ms, opt_ms, train_losses = [], [], [], [], []
    status = "ok"
    if 0 in points:
        losses.append(val_loss(model, data))
        eff_lrs.append(mean_effective_lr(opt))
    for s in range(1, steps + 1):
        xt, t, c, noise = data.batch(data.ft_x, data.ft_y, gen, batch_size)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(xt, t, c).sample, noise)
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        step_ms.append((t2 - t0) * 1e3)
        opt_ms.append((t2 - t1) * 1e3)
        train_losses.append(loss.item())
        if not math.isfinite(train_losses[-1]):
            status = f"diverged at step {s}"
            break
        if s in points:
            losses.append(val_loss(model, data))
            eff_lrs.append(mean_effective_lr(opt))
            if not math.isfinite(losses[-1]):
                status = f"diverged at step {s}"
                break
    while len(losses) < len(points):
        losses.append(float("nan"))
        eff_lrs.append(None)
    if MASK_PICTURES and spec["kind"] == "automagic" and spec.get("group") in ("automagic", "automagic_advice", "fixes"):
        draw_mask_picture(model, params, opt, Path(MASK_PICTURES) / f"lr_mask_{task}_{_slug(spec['name'])}_seed{seed}.png",
                          f"{task}, {spec['name']}, seed {seed}: effective lr per layer after {steps} steps")
    return dict(seed=seed, losses=losses, eff_lr=eff_lrs, status=status,
                ms_step=statistics.median(step_ms[1:] or step_ms),
                ms_opt=statistics.median(opt_ms[1:] or opt_ms),
                train_loss_last50=float(np.mean(train_losses[-50:])) if train_losses else float("nan"),
                n_params=sum(p.numel() for p in params), n_tensors=len(params))


MASK_PICTURES: str | None = None  # --mask-pictures DIR


def _slug(name: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def draw_mask_picture(model, params, opt, path: Path, title: str) -> None:
    """The effective lr per layer the run ended with (library/lr_mask_view.py)."""
    from library.lr_mask_view import draw_optimizer

    by_id = {id(p): n for n, p in model.named_parameters()}
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_optimizer(opt, [by_id[id(p)] for p in params], path, title)


# --------------------------------------------------------------------------------------
# run list
# --------------------------------------------------------------------------------------

def run_specs(task: str, steps: int, presets: dict, what: str) -> list[dict]:
    specs = []
    wu = doc_warmup(steps)
    real = task in REAL_TASKS
    if what in ("all", "main"):
        for name in PRESETS_ON_TASK[task]:
            kw = presets[name]
            specs.append(dict(name=f"Automagic preset {name}", kind="automagic", group="automagic",
                              preset=name, kwargs=dict(kw)))
        for name in PRESETS_ON_TASK[task]:
            kw = presets[name]
            if real:  # the README's advice instead of the document's rule
                specs.append(dict(name=f"Automagic preset {name} + warm-up advice ({advice_warmup(steps)})",
                                  kind="automagic", group="automagic_advice", preset=name,
                                  kwargs=dict(kw, warmup_steps=advice_warmup(steps))))
                continue
            specs.append(dict(name=f"Automagic preset {name} + doc warm-up ({wu})", kind="automagic",
                              group="automagic_docwu", preset=name, kwargs=dict(kw, warmup_steps=wu)))
        for lr in sorted(ADAMW_GRID[task] + ADAMW_EXTRA[task]):
            specs.append(dict(name=f"AdamW lr={lr:g}", kind="adamw", group="adamw", lr=lr))
        specs.append(dict(name="Prodigy (diffusion settings)", kind="prodigy", group="prodigy"))
    if what in ("all", "fixes") and task in FIXES:
        pname = PRESET_FOR_TASK[task]
        for label, over, *base in FIXES[task]:
            name = base[0] if base else pname  # a candidate may start from another preset
            specs.append(dict(name=f"{name}: {label}", kind="automagic", group="fixes", preset=name,
                              change=label, kwargs=dict(presets[name], **_fill(over, steps))))
    if real and what in ("ablations", "ablations_docwu", "tuning"):
        return specs  # the toy tasks' groups; the real-scale tasks have "fixes"
    if what in ("all", "ablations"):
        pname = PRESET_FOR_TASK[task]
        for label, over, desc in ABLATIONS:
            if "allora" in over and presets[pname].get("full_finetune", False):
                continue  # ALLoRA acts only in LoRA mode: nothing to switch off
            specs.append(dict(name=f"{pname}: {label}", kind="automagic", group="ablation",
                              preset=pname, ablation=desc, kwargs=dict(presets[pname], **over)))
    if what in ("all", "tuning"):
        pname = PRESET_FOR_TASK[task]
        for label, over in TUNING[task]:
            specs.append(dict(name=f"{pname} preset, {label}", kind="automagic", group="tuning",
                              preset=pname, change=label, kwargs=dict(presets[pname], **over)))
    if what in ("all", "precision"):
        # The task's preset with a compact optimizer state (state_precision), against the same
        # preset in fp32 state (its "main" rows); the doc warm-up variant reaches every phase.
        pname = PRESET_FOR_TASK[task]
        for precision in STATE_PRECISIONS:
            specs.append(dict(name=f"{pname} preset, {precision} state", kind="automagic", group="precision",
                              preset=pname, kwargs=compact_state_kwargs(presets[pname], precision)))
            if real:
                continue  # the real-scale runs already reach every phase
            specs.append(dict(name=f"{pname}+doc warm-up, {precision} state", kind="automagic",
                              group="precision_docwu", preset=pname,
                              kwargs=dict(presets[pname], warmup_steps=wu, state_precision=precision)))
    if what in ("all", "ablations", "ablations_docwu"):
        # OrthoGrad only acts after warm-up, which the presets' warm-up (500-1000 steps) never
        # reaches in a short run: ablate it on the doc warm-up variant as well. --runs
        # ablations_docwu runs every ablation on that variant.
        pname = PRESET_FOR_TASK[task]
        for label, over, desc in ABLATIONS:
            if "allora" in over and presets[pname].get("full_finetune", False):
                continue
            if what != "ablations_docwu" and "orthograd" not in over:
                continue
            specs.append(dict(name=f"{pname}+doc warm-up: {label}", kind="automagic", group="ablation_docwu",
                              preset=pname, ablation=desc,
                              kwargs=dict(presets[pname], warmup_steps=wu, **over)))
    return specs


def summarize(rec: dict) -> None:
    L = np.array([r["losses"] for r in rec["seeds"]], dtype=np.float64)
    rec["mean_losses"] = [float(v) for v in np.mean(L, axis=0)]
    rec["final_mean"] = float(np.mean(L[:, -1]))
    rec["final_spread"] = float((np.max(L[:, -1]) - np.min(L[:, -1])) / 2) if len(L) > 1 else 0.0
    rec["best_mean"] = float(np.mean(np.nanmin(L, axis=1))) if np.isfinite(L).any() else float("nan")
    rec["ms_step"] = float(np.median([r["ms_step"] for r in rec["seeds"]]))
    rec["ms_opt"] = float(np.median([r["ms_opt"] for r in rec["seeds"]]))


def portable_command(cmd: str) -> str:
    """The command line with absolute paths made repo-relative (or <other-dir> outside the repo)."""
    import re

    root = REPO_ROOT.as_posix()

    def fix(m):
        path = m.group(0)
        if path == root or path.startswith(root + "/"):
            return path[len(root) + 1:] or "."
        return "<other-dir>"

    return re.sub(r"(?<![\w.])/[^\s;]+", fix, cmd)


def _impl_hash() -> str | None:
    try:
        mod = sys.modules.get(AUTOMAGIC_IMPL.partition(":")[0]) or __import__(
            AUTOMAGIC_IMPL.partition(":")[0], fromlist=["_"])
        return hashlib.sha256(Path(mod.__file__).read_bytes()).hexdigest()[:16]
    except Exception:
        return None


def machine_desc() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
            f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), no GPU")


def run_task(task: str, args, data: Data, base_state: dict) -> dict:
    presets, src = load_presets()
    steps = args.steps or (24 if args.quick else TASKS[task]["steps"])
    specs = [sp for what in args.runs for sp in run_specs(task, steps, presets, what)]
    if args.only:
        # "=NAME" matches one config exactly, anything else is a substring of the name
        specs = [s for s in specs if any((o[1:] == s["name"]) if o.startswith("=") else (o.lower() in s["name"].lower())
                                         for o in args.only)]
    out_path = Path(args.out) / f"convergence_{task}{'_quick' if args.quick else ''}.json"
    prev = []
    if args.resume and out_path.exists():
        prev = json.loads(out_path.read_text())["runs"]
    wanted = {s["name"] for s in specs}
    cfg = TASKS[task]
    result = dict(task=task, steps=steps, eval_steps=task_eval_points(task, steps),
                  preset_source=src, presets=presets, doc_warmup=doc_warmup(steps),
                  advice_warmup=advice_warmup(steps), weight_scale=cfg["weight_scale"],
                  automagic_impl=AUTOMAGIC_IMPL, automagic_sha256=_impl_hash(),
                  machine=machine_desc(),
                  command=portable_command(shlex.join(["python", Path(sys.argv[0]).as_posix()] + sys.argv[1:])),
                  started=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  lora=dict(rank=LORA_RANK, alpha=cfg["alpha"], targets=LORA_TARGET_SUFFIXES),
                  batch_size=cfg["batch_size"], train_images=len(data.ft_y), val_samples=len(data.val_y),
                  runs=[r for r in prev if r["name"] not in wanted])  # --resume: keep other configs
    if prev:
        old = json.loads(out_path.read_text())
        if old.get("steps") != steps:
            raise SystemExit(f"--resume: {out_path} has {old.get('steps')} steps, not {steps}")
        result["command"] = old.get("command", "") + " ; " + result["command"]
    prev_by_name = {r["name"]: r for r in prev}
    log(f"task {task}: {len(specs)} configs x {len(args.seeds)} seeds, {steps} steps; presets from {src}")
    for spec in specs:
        done = prev_by_name.get(spec["name"])
        if done and sorted(r["seed"] for r in done["seeds"]) == sorted(args.seeds):
            result["runs"].append(done)
            continue
        rec = {k: v for k, v in spec.items()}
        rec["seeds"] = []
        t0 = time.perf_counter()
        try:
            for seed in args.seeds:
                rec["seeds"].append(run_one(task, spec, seed, steps, data, base_state, args.quick))
        except ImportError as e:
            log(f"  SKIP {spec['name']}: {e}")
            continue
        summarize(rec)
        rec["wall_s"] = time.perf_counter() - t0
        if rec["kind"] == "automagic":  # which version of the optimizer produced this row
            rec["automagic_sha256"] = result["automagic_sha256"]
        log(f"  {spec['name']:<55s} final {rec['final_mean']:.5f} (±{rec['final_spread']:.5f}) "
            f"best {rec['best_mean']:.5f}  {rec['ms_step']:.1f} ms/step, opt {rec['ms_opt']:.2f} ms "
            f"[{rec['wall_s']:.0f} s] {','.join(sorted({r['status'] for r in rec['seeds']}))}")
        result["runs"].append(rec)
        atomic_write_text(out_path, json.dumps(result, indent=1))  # partial results survive
    result["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    atomic_write_text(out_path, json.dumps(result, indent=1))
    return result


# --------------------------------------------------------------------------------------
# report: markdown table + plot
# --------------------------------------------------------------------------------------

GROUP_TITLES = [
    ("automagic", "Automagic_Sinkgd, presets untuned"),
    ("automagic_docwu", "Automagic_Sinkgd, presets + the document's warm-up rule"),
    ("automagic_advice", "Automagic_Sinkgd, presets + the README's warm-up advice (warmup_steps = steps // 2)"),
    ("adamw", "AdamW grid"),
    ("prodigy", "Prodigy"),
    ("tuning", "Candidate preset changes (not the shipped presets)"),
    ("fixes", "Fix candidates (opt-in settings, on the task's preset as shipped unless named)"),
    ("ablation", "Ablations of the task's preset (one technique off at a time)"),
    ("ablation_docwu", "Ablations of the task's preset + doc warm-up"),
    ("precision", "The task's preset in a compact optimizer state (vs preset: the fp32-state row)"),
    ("precision_docwu", "The task's preset + doc warm-up in a compact optimizer state"),
]


def _fmt(v: float) -> str:
    return "nan" if v is None or not math.isfinite(v) else f"{v:.4f}"


def _reference_for(r: dict, runs: list) -> dict | None:
    """The preset run an ablation / candidate change is compared with (same seeds)."""
    want = {"ablation": "automagic", "tuning": "automagic", "ablation_docwu": "automagic_docwu",
            "precision": "automagic", "precision_docwu": "automagic_docwu", "fixes": "automagic"}.get(r["group"])
    if want is None:
        return None
    for x in runs:
        if x["group"] == want and x.get("preset") == r.get("preset"):
            return x
    return None


def render_markdown(results: dict) -> str:
    lines = ["# Convergence benchmark results", ""]
    for task, res in results.items():
        runs = res["runs"]
        adam = [r for r in runs if r["group"] == "adamw" and math.isfinite(r["final_mean"])]
        best_adam = min(adam, key=lambda r: r["final_mean"]) if adam else None
        prodigy = next((r for r in runs if r["group"] == "prodigy" and math.isfinite(r["final_mean"])), None)
        base = runs[0]["mean_losses"][0] if runs and res["eval_steps"][0] == 0 else float("nan")
        lines += [f"## Task `{task}`", "",
                  f"{res['steps']} steps, batch {res['batch_size']}, {res['train_images']} training images, "
                  f"mean over the seeds listed per row (± = half the range over seeds), "
                  f"held-out loss of the base model {_fmt(base)}. "
                  f"Presets from: {res['preset_source']}. Doc warm-up = {res['doc_warmup']} steps."
                  + (f" LoRA rank {LORA_RANK}, network_alpha {res['lora']['alpha']:g} (scale alpha / rank"
                     f" = {res['lora']['alpha'] / LORA_RANK:g})." if "lora" in task else "")
                  + (f" Every weight trained as {res.get('weight_scale', 1):g} * W'." if res.get("weight_scale", 1) != 1 else ""),
                  f"Machine: {res['machine']}. Command: `{res['command']}`.",
                  "`vs preset`: final loss minus the preset's final loss on the same seeds (negative = better). "
                  "`ms/step` (forward + backward + step, median) and `ms opt.step` were measured on a shared, "
                  "variably loaded machine: compare them only within a block of rows run together.", ""]
        if best_adam:
            lines += [f"Best AdamW: {best_adam['name']} (final {_fmt(best_adam['final_mean'])}).", ""]
        steps_hdr = " | ".join(f"@{s}" for s in res["eval_steps"][1:-1])
        hdr = (f"| config | seeds | {steps_hdr} | final | best | final / best AdamW | final / Prodigy | vs preset | "
               f"ms/step | ms opt.step |")
        sep = "|" + "---|" * (hdr.count("|") - 1)
        for group, title in GROUP_TITLES:
            gr = [r for r in runs if r["group"] == group]
            if not gr:
                continue
            lines += [f"**{title}**", "", hdr, sep]
            for r in gr:
                mid = " | ".join(_fmt(v) for v in r["mean_losses"][1:-1])
                ratio = r["final_mean"] / best_adam["final_mean"] if best_adam else float("nan")
                vs_prodigy = r["final_mean"] / prodigy["final_mean"] if prodigy else float("nan")
                fin = _fmt(r["final_mean"]) + (f" ± {r['final_spread']:.4f}" if len(r["seeds"]) > 1 else "")
                status = {s["status"] for s in r["seeds"]} - {"ok"}
                name = r["name"] + (f" ({'; '.join(sorted(status))})" if status else "")
                ref = _reference_for(r, runs)
                delta = ""
                if ref is not None:
                    same = [x["losses"][-1] for x in ref["seeds"] if x["seed"] in {y["seed"] for y in r["seeds"]}]
                    if same:
                        delta = f"{r['final_mean'] - float(np.mean(same)):+.4f}"
                lines.append(f"| {name} | {len(r['seeds'])} | {mid} | {fin} | {_fmt(r['best_mean'])} | {ratio:.3f} | "
                             f"{vs_prodigy:.3f} | "
                             f"{delta} | {r['ms_step']:.1f} | {r['ms_opt']:.2f} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def render_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results)
    fig, axes = plt.subplots(2, len(tasks), figsize=(7 * len(tasks), 9), squeeze=False)
    for j, task in enumerate(tasks):
        res = results[task]
        x = res["eval_steps"]
        for i, groups in enumerate((("automagic", "automagic_docwu", "automagic_advice", "adamw", "prodigy"),
                                    ("ablation", "ablation_docwu", "tuning", "fixes", "automagic"))):
            ax = axes[i][j]
            for r in res["runs"]:
                if r["group"] not in groups:
                    continue
                if i == 1 and r["group"] == "automagic" and r.get("preset") != PRESET_FOR_TASK[task]:
                    continue
                style = {"automagic": "-", "automagic_docwu": "--", "automagic_advice": "--", "adamw": ":",
                         "prodigy": "-.", "ablation": "-", "ablation_docwu": "--", "tuning": "-.",
                         "fixes": "-."}[r["group"]]
                lw = 2.5 if (r["group"] == "automagic" and r.get("preset") == PRESET_FOR_TASK[task]) else 1.2
                ax.plot(x[1:], r["mean_losses"][1:], style, lw=lw, label=r["name"], marker="o", ms=3)
            ax.set_title(f"{task}: {'optimizers' if i == 0 else 'ablations and candidate changes'}")
            if task in REAL_TASKS:
                ax.set_ylim(top=min(0.16, ax.get_ylim()[1]))
            ax.set_xlabel("step")
            ax.set_ylabel("held-out denoising MSE")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6.5, loc="upper right")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)


def merge_results(out: Path, sources: list[Path], quick: bool, replace: bool = False) -> None:
    """Append the configs of other result files (same task and steps) that --out lacks; with
    ``replace``, their configs also replace --out's rows of the same name (a re-run)."""
    suffix = "_quick" if quick else ""
    for task in TOY_TASKS + REAL_TASKS:
        dst = out / f"convergence_{task}{suffix}.json"
        for src_dir in sources:
            src = src_dir / f"convergence_{task}{suffix}.json"
            if not src.exists():
                continue
            other = json.loads(src.read_text())
            if not dst.exists():
                atomic_write_text(dst, json.dumps(other, indent=1))
                continue
            res = json.loads(dst.read_text())
            if other["steps"] != res["steps"]:
                raise SystemExit(f"--merge-from: {src} has {other['steps']} steps, {dst} {res['steps']}")
            incoming = {r["name"] for r in other["runs"]}
            if replace:
                res["runs"] = [r for r in res["runs"] if r["name"] not in incoming]
            have = {r["name"] for r in res["runs"]}
            new = [r for r in other["runs"] if r["name"] not in have]
            res["runs"] += new
            if replace and other.get("automagic_sha256"):
                res["automagic_sha256"] = other["automagic_sha256"]
            res["command"] = portable_command(res["command"] + " ; " + other["command"])
            atomic_write_text(dst, json.dumps(res, indent=1))
            log(f"merged {len(new)} configs from {src} into {dst}")


def write_report(out: Path, quick: bool) -> None:
    """convergence.md / .png for the toy-scale tasks, convergence_real.md / .png for the real-scale ones."""
    suffix = "_quick" if quick else ""
    wrote = False
    for tasks, stem in ((TOY_TASKS, "convergence"), (REAL_TASKS, "convergence_real")):
        results = {}
        for task in tasks:
            p = out / f"convergence_{task}{suffix}.json"
            if p.exists():
                results[task] = json.loads(p.read_text())
        if not results:
            continue
        atomic_write_text(out / f"{stem}{suffix}.md", render_markdown(results))
        render_plot(results, out / f"{stem}{suffix}.png")
        log(f"wrote {out / f'{stem}{suffix}.md'} and {out / f'{stem}{suffix}.png'}")
        wrote = True
    if not wrote:
        log("no results to report")


# --------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("lora", "full", "both", "lora_real", "full_real", "real"), default="both",
                   help="both = the toy-scale lora and full; real = lora_real and full_real")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per run (default 200 toy, 2000 lora_real, 4000 full_real; 24 with --quick)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: 0; --seed is an alias)")
    p.add_argument("--seed", type=int, default=None, help="single seed (same as --seeds N)")
    p.add_argument("--runs", choices=("all", "main", "ablations", "ablations_docwu", "tuning", "precision", "fixes"),
                   nargs="+", default=["all"])
    p.add_argument("--only", nargs="+", default=None, help="run only configs whose name contains one of these (=NAME: exactly this name)")
    p.add_argument("--quick", action="store_true", help="tiny model, few steps: a smoke run of every config")
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    p.add_argument("--cache-dir", default=None, help="where the pretrained base is cached (default: --out)")
    p.add_argument("--resume", action="store_true", help="keep configs already in the task's JSON")
    p.add_argument("--report-only", action="store_true", help="only rebuild the table and plot from JSON")
    p.add_argument("--merge-from", nargs="+", default=None, metavar="DIR",
                   help="add the configs of DIR/convergence_<task>.json (runs made in parallel with another "
                        "--out) to --out's JSON, then rebuild the report")
    p.add_argument("--replace", action="store_true",
                   help="with --merge-from: the merged configs replace rows of the same name (a re-run)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mask-pictures", default=None, metavar="DIR",
                   help="draw the effective lr per layer at the end of every preset run into DIR")
    p.add_argument("--automagic-impl", default=None, metavar="MODULE:CLASS",
                   help="benchmark another implementation with the same API "
                        "(default library.automagic_sinkgd:Automagic_Sinkgd)")
    a = p.parse_args(argv)
    if a.seeds is None:
        a.seeds = [a.seed if a.seed is not None else 0]
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    global AUTOMAGIC_IMPL, MASK_PICTURES
    MASK_PICTURES = args.mask_pictures
    if args.automagic_impl:
        AUTOMAGIC_IMPL = args.automagic_impl
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        t0 = time.perf_counter()
        data = Data()
        base_state = get_base_state(data, Path(args.cache_dir) if args.cache_dir else out, args.quick)
        for task in {"both": TOY_TASKS, "real": REAL_TASKS}.get(args.task, (args.task,)):
            run_task(task, args, data, base_state)
        log(f"total wall time {time.perf_counter() - t0:.0f} s")
    if args.merge_from:
        merge_results(out, [Path(d) for d in args.merge_from], args.quick, replace=args.replace)
    write_report(out, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
