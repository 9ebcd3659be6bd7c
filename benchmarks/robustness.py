#!/usr/bin/env python
"""Robustness matrix: does one preset beat tuned AdamW and Prodigy at every LoRA scale, model
weight scale and run length a user trains with?

Every cell is a (task family, scale, run length) a kohya user can meet. Each optimizer's value in
a cell is its final held-out loss divided by the best final loss of an AdamW learning-rate search
in that cell (lower is better; 1.00 = as good as tuned AdamW). The AdamW search walks a
half-decade grid (x sqrt(10)) from a start point until the best point has two worse points on
both sides, so the best is never at an edge of what was tried.

Task families (all CPU-sized, no downloads):

* ``digits``: the convergence benchmark's image-diffusion task (benchmarks/convergence.py: SD-style
  cross-attention U-Net, epsilon prediction on sklearn's digits, LoRA on the transformer blocks'
  Linears, classes 7-9 held out of the base model), with the smaller U-Net (channels 16, 24)
  pretrained here on classes 0-6;
* ``charlm``: a byte-level causal transformer (2 blocks, width 64) pretrained on the English
  prose of CPython's bundled pydoc topics, LoRA-tuned on Python source code of standard-library
  modules, evaluated on the code of other modules: different data, different loss (next-byte
  cross-entropy);
* ``digits_full``: the digits task, every U-Net weight trained, at weight scale 1 and as
  ``s x W'`` (W' = W / s, the same function; an element-wise step of lr in W' moves W by s x lr,
  as a large model's weights respond to a step more than the toy's).

LoRA scales: kohya's ``alpha / rank`` with alpha = 1 (kohya's default), alpha = rank, and alpha =
16 x rank. Run lengths: a short and a long run per family (``--lengths``).

Optimizers in each cell: AdamW (the search), Prodigy with kohya's usual settings (d_coef 1,
safeguard_warmup, use_bias_correction, weight_decay 0.01), the shipped presets (read from
``configs/*.toml``, ``total_steps`` = the run length as kohya's hook passes it), and candidate
preset changes (``CANDIDATES``). Results are cached per (cell, optimizer, seed) in the JSON, so an
interrupted or extended run continues where it stopped.

Usage::

    python benchmarks/robustness.py                       # the whole matrix, 2 seeds
    python benchmarks/robustness.py --families charlm --seeds 0
    python benchmarks/robustness.py --only "preset lora"   # one optimizer row, every cell
    python benchmarks/robustness.py --report-only          # table + heatmap from the JSON

Outputs in ``--out`` (default benchmarks/results/robustness): ``robustness.json``,
``robustness.md`` (the matrix per optimizer), ``robustness.png`` (heatmaps).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import convergence as conv  # noqa: E402

OUT_DEFAULT = REPO_ROOT / "benchmarks" / "results" / "robustness"
LORA_RANK = 8
ALPHAS = {"alpha=1": lambda r: 1.0, "alpha=rank": lambda r: float(r), "alpha=16xrank": lambda r: 16.0 * r}
# The same three user settings on the toy calibrated to real SD learning rates: the convergence
# benchmark's lora_real found the toy's AdamW optimum 20x above real SD's at equal alpha / rank, so
# a user's alpha maps to 20 x alpha on the toy (alpha = 20 x rank is its lora_real task).
CALIBRATION_K = 20.0
CALIBRATED_ALPHAS = {"cal alpha=1": lambda r: CALIBRATION_K, "cal alpha=rank": lambda r: CALIBRATION_K * r,
                     "cal alpha=16xrank": lambda r: CALIBRATION_K * 16.0 * r}
ALL_ALPHAS = {**ALPHAS, **CALIBRATED_ALPHAS}
FULL_SCALES = {"W": 1.0, "16xW'": 16.0}
# 2000: the calibrated LoRA cells only (CPU time), 1 seed
LENGTHS = {"digits": (200, 600, 2000), "charlm": (200, 1000, 2000), "digits_full": (150, 600)}
ADAMW_START = {"digits": 3e-3, "charlm": 3e-3, "digits_full": 3e-4}
HALF_DECADE = math.sqrt(10.0)
DIGITS_PRETRAIN_STEPS = 400

# Candidate preset changes, measured on the whole matrix: (label, preset, overrides of the shipped
# preset). Rows measured against earlier presets stay in the JSON with the settings they ran with
# ("kwargs" of each result); a cached result counts only while its settings are the spec's.
CANDIDATES: tuple = (
    # the lora preset before this round: a quarter-run warm-up, power 0 above alpha = rank
    ("warmup_steps=0.25, lora_scale_power_above=0 (the preset before this round)", "lora",
     dict(warmup_steps=0.25, lora_scale_power_above=0.0)),
    ("without lora_scale_power, quarter-run warm-up (two presets ago)", "lora",
     dict(lora_scale_power=0.0, lora_scale_power_above=None, warmup_steps=0.25)),
    ("without lora_scale_power (the previous preset)", "high_performance", dict(lora_scale_power=0.0)),
    ("lora_scale_power 1 on both sides of alpha = rank", "lora", dict(lora_scale_power_above=None, warmup_steps=0.25)),
    ("lora_scale_power 0.75 on both sides", "lora",
     dict(lora_scale_power=0.75, lora_scale_power_above=None, warmup_steps=0.25)),
    ("lora_scale_power 0.5 on both sides", "lora",
     dict(lora_scale_power=0.5, lora_scale_power_above=None, warmup_steps=0.25)),
    ("lora_scale_power_above=0.5", "high_performance", dict(lora_scale_power_above=0.5)),
    ("lora_scale_power_above=0.75", "high_performance", dict(lora_scale_power_above=0.75)),
    # its fixed 800-step warm-up then decays to 0 at the run's end (acts on runs longer than 800 only)
    ("decay over the run to 0", "high_performance", dict(decay_horizon="run", decay_floor=0.0)),
    # the warm-up as a share of the run, at most 800 steps (the shipped preset takes 0.8): a short
    # run decays over its last part instead of never leaving warm-up
    ("warmup_steps=0.9", "high_performance", dict(warmup_steps=0.9)),
    ("fixed 800-step warm-up (the preset before this round)", "high_performance",
     dict(warmup_steps=800, max_warmup_steps=None)),
    # a longer cap on the warm-up: runs over 1,000 steps warm up longer (acts on them only)
    ("max_warmup_steps=1200", "high_performance", dict(max_warmup_steps=1200)),
    ("max_warmup_steps=1600", "high_performance", dict(max_warmup_steps=1600)),
    # with lora_scale_power: the log-space mask reaches the toy's 20x higher rates in warm-up
    ("lora_scale_power, multiplicative mask 0.35 annealed after 10, max_lr=0.1", "lora",
     dict(mask_rule="multiplicative", relative_bump=0.35, mask_bump_decay=10, max_lr=0.1, warmup_steps=0.25,
          lora_scale_power_above=0.0)),
    # longer warm-ups (the mask climbs longer: the toy's alpha <= rank cells gain, alpha = 16 x rank
    # at real scale loses on long runs unless its rates are lowered: lora_scale_power_above)
    ("lora_scale_power, warmup_steps=0.4", "lora", dict(warmup_steps=0.4, lora_scale_power_above=0.0)),
    ("lora_scale_power, warmup_steps=0.5", "lora", dict(warmup_steps=0.5, lora_scale_power_above=0.0)),
    ("lora_scale_power, warmup_steps=0.65", "lora", dict(warmup_steps=0.65, lora_scale_power_above=0.0)),
    ("max_lr=3e-3 with warmup_steps=0.65", "lora", dict(max_lr=3e-3, lora_scale_power_above=0.0)),
    ("lora_scale_power_above 0.5 with warmup_steps=0.5", "lora", dict(warmup_steps=0.5)),
    ("warmup_steps=0.5, lora_scale_power_above=0.5, relative_bump=0.35", "lora",
     dict(warmup_steps=0.5, relative_bump=0.35)),
    # a per-tensor factor that grows while gradient and momentum agree (tensor-level hypergradient
    # sign test): the mask's travel becomes geometric where the model wants far higher rates
    ("lr_growth=1, lr_growth_max=100", "lora", dict(lr_growth=1.0, lr_growth_max=100.0)),
    ("lr_growth=1, lr_growth_max=100", "high_performance", dict(lr_growth=1.0, lr_growth_max=100.0)),
    ("lr_growth=1, lr_growth_max=100", "full", dict(lr_growth=1.0, lr_growth_max=100.0)),
    # the same, adapting over the first 60 steps only: the start's scale is found, and a long
    # warm-up no longer lets the factor creep on a slowly descending valley
    ("lr_growth_steps=60 with lr_growth=1, lr_growth_max=100", "lora",
     dict(lr_growth=1.0, lr_growth_steps=60, lr_growth_max=100.0)),
    ("lr_growth_steps=60 with lr_growth=1, lr_growth_max=100", "high_performance",
     dict(lr_growth=1.0, lr_growth_steps=60, lr_growth_max=100.0)),
    # the same over all of warm-up, with a lower bound on the factor: long warm-ups creep less
    ("lr_growth=1, lr_growth_max=10", "lora", dict(lr_growth=1.0, lr_growth_max=10.0)),
    ("lr_growth=1, lr_growth_max=10", "high_performance", dict(lr_growth=1.0, lr_growth_max=10.0)),
    ("lr_growth=1, lr_growth_max=10", "full", dict(lr_growth=1.0, lr_growth_max=10.0)),
    ("lr_growth=0.5, lr_growth_max=10", "lora", dict(lr_growth=0.5, lr_growth_max=10.0)),
    # the presets before they took lr_growth=1
    ("without lr_growth (the preset before it took lr_growth)", "high_performance", dict(lr_growth=None)),
    ("without lr_growth (the preset before it took lr_growth)", "lora", dict(lr_growth=None)),
    # full: the post-warm-up decay spread over the rest of the run (full_real, 4000 steps, seed 0:
    # 1.8% better than the warm-up-long decay), and masks that reach the weight scale's rate
    ("the document's decay (the preset before this round)", "full", dict(decay_horizon="warmup", decay_floor=0.1)),
    ("decay over the run to 0", "full", dict(decay_horizon="run", decay_floor=0.0)),
    ("decay over the run to 0, warmup_steps=0.5", "full", dict(decay_horizon="run", decay_floor=0.0, warmup_steps=0.5)),
    ("decay over the run to 0, multiplicative mask 0.2 annealed after 25", "full",
     dict(decay_horizon="run", decay_floor=0.0, mask_rule="multiplicative", relative_bump=0.2, mask_bump_decay=25)),
    ("decay over the run to 0, multiplicative mask 0.2 annealed after 25, max_lr=5e-3", "full",
     dict(decay_horizon="run", decay_floor=0.0, mask_rule="multiplicative", relative_bump=0.2, mask_bump_decay=25,
          max_lr=5e-3)),
    ("decay over the run to 0, multiplicative mask 0.5 annealed after 10", "full",
     dict(decay_horizon="run", decay_floor=0.0, mask_rule="multiplicative", relative_bump=0.5, mask_bump_decay=10)),
    ("decay over the run to 0, warmup_steps=0.65", "full", dict(decay_horizon="run", decay_floor=0.0, warmup_steps=0.65)),
    ("decay over the run to 0, warmup_steps=0.5, lr_bump=4e-6", "full",
     dict(decay_horizon="run", decay_floor=0.0, warmup_steps=0.5, lr_bump=4e-6)),
    ("decay over the run to 0, warmup_steps=0.5, multiplicative mask 0.5 annealed after 10", "full",
     dict(decay_horizon="run", decay_floor=0.0, warmup_steps=0.5, mask_rule="multiplicative", relative_bump=0.5,
          mask_bump_decay=10)),
    ("decay over the run to 0, warmup_steps=0.5, multiplicative mask 0.5 annealed after 10, max_lr=5e-3", "full",
     dict(decay_horizon="run", decay_floor=0.0, warmup_steps=0.5, mask_rule="multiplicative", relative_bump=0.5,
          mask_bump_decay=10, max_lr=5e-3)),
    ("decay over the run to 0, warmup_steps=0.5, multiplicative mask 0.2 annealed after 25, max_lr=5e-3", "full",
     dict(decay_horizon="run", decay_floor=0.0, warmup_steps=0.5, mask_rule="multiplicative", relative_bump=0.2,
          mask_bump_decay=25, max_lr=5e-3)),
    ("decay over the run to 0, warmup_steps=0.65, lr_bump=4e-6", "full",
     dict(decay_horizon="run", decay_floor=0.0, warmup_steps=0.65, lr_bump=4e-6)),
    ("decay over the run to 0, warmup_steps=0.5, lr_bump=6e-6", "full",
     dict(decay_horizon="run", decay_floor=0.0, warmup_steps=0.5, lr_bump=6e-6)),
    ("decay over the run to 0, warmup_steps=0.65, lr_bump=3e-6", "full",
     dict(decay_horizon="run", decay_floor=0.0, warmup_steps=0.65, lr_bump=3e-6)),
)

# --------------------------------------------------------------------------------------
# char-level language model
# --------------------------------------------------------------------------------------

CTX, WIDTH, HEADS, BLOCKS, VOCAB = 64, 64, 4, 2, 128
PRETRAIN_STEPS, PRETRAIN_BATCH = 800, 32
FT_BATCH = 16


def _stdlib_text(*names: str) -> bytes:
    root = Path(sysconfig.get_paths()["stdlib"])
    return b"".join((root / n).read_bytes() for n in names)


class CharData:
    """Pretraining: pydoc's topic texts (English prose). Fine-tuning: Python source of a few
    standard-library modules; validation: other modules' source (fixed windows)."""

    def __init__(self):
        def ascii_ids(raw: bytes) -> torch.Tensor:
            return torch.tensor(list(raw), dtype=torch.int64).clamp_(max=VOCAB - 1)

        self.pre = ascii_ids(_stdlib_text("pydoc_data/topics.py"))
        self.train = ascii_ids(_stdlib_text("textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py"))
        val = ascii_ids(_stdlib_text("calendar.py"))
        g = torch.Generator().manual_seed(777)
        starts = torch.randint(0, len(val) - CTX - 1, (256,), generator=g)
        self.val = torch.stack([val[s:s + CTX + 1] for s in starts.tolist()])

    @staticmethod
    def batch(ids: torch.Tensor, gen: torch.Generator, bs: int) -> torch.Tensor:
        starts = torch.randint(0, len(ids) - CTX - 1, (bs,), generator=gen)
        return torch.stack([ids[s:s + CTX + 1] for s in starts.tolist()])


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.q, self.k, self.v, self.o = (nn.Linear(WIDTH, WIDTH) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.ln1(x)
        q, k, v = (m(h).view(b, t, HEADS, WIDTH // HEADS).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, WIDTH)
        x = x + self.o(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class CharLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Parameter(torch.zeros(CTX, WIDTH))
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.ln = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, ids):
        x = self.emb(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def char_loss(model, seqs: torch.Tensor) -> torch.Tensor:
    logits = model(seqs[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), seqs[:, 1:].reshape(-1))


def char_base_state(data: CharData, cache_dir: Path) -> dict:
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(json.dumps([CTX, WIDTH, HEADS, BLOCKS, VOCAB, PRETRAIN_STEPS, PRETRAIN_BATCH]).encode())
    path = cache_dir / f"charlm_base_{key.hexdigest()[:10]}.safetensors"
    if path.exists():
        return load_file(str(path))
    torch.manual_seed(1234)
    model = CharLM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(1234)
    for s in range(PRETRAIN_STEPS):
        for group in opt.param_groups:
            group["lr"] = 3e-3 * min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / PRETRAIN_STEPS))
        loss = char_loss(model, data.batch(data.pre, gen, PRETRAIN_BATCH))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    conv.atomic_write(path, lambda tmp: save_file(state, tmp))
    conv.log(f"charlm base: {PRETRAIN_STEPS} steps, final train loss {loss.item():.3f} -> {path.name}")
    return state


def inject_char_lora(model: CharLM, rank: int, alpha: float) -> list[nn.Parameter]:
    params = []
    for block in model.blocks:
        for name in ("q", "k", "v", "o", "fc1", "fc2"):
            lora = conv.LoRALinear(getattr(block, name), rank, alpha)
            setattr(block, name, lora)
            params += [lora.lora_down.weight, lora.lora_up.weight]
    return params


# --------------------------------------------------------------------------------------
# one run
# --------------------------------------------------------------------------------------

class Context:
    """Data and base weights, built once per family."""

    def __init__(self, cache_dir: Path):
        self.cache_dir = cache_dir
        self._digits = self._char = None

    def digits(self):
        if self._digits is None:
            # the smaller U-Net, pretrained longer than the convergence benchmark's --quick smoke base
            conv.QUICK_PRETRAIN = dict(conv.PRETRAIN, steps=DIGITS_PRETRAIN_STEPS)
            data = conv.Data()
            self._digits = (data, conv.get_base_state(data, self.cache_dir, quick=True))
        return self._digits

    def char(self):
        if self._char is None:
            data = CharData()
            self._char = (data, char_base_state(data, self.cache_dir))
        return self._char


def _build(family: str, scale_name: str, ctx: Context, seed: int):
    torch.manual_seed(seed)
    if family == "charlm":
        data, base = ctx.char()
        model = CharLM()
        model.load_state_dict(base)
        model.requires_grad_(False)
        params = inject_char_lora(model, LORA_RANK, ALL_ALPHAS[scale_name](LORA_RANK))
        gen = torch.Generator().manual_seed(10_000 + seed)
        return model, params, (lambda: char_loss(model, data.batch(data.train, gen, FT_BATCH))), (
            lambda: char_loss(model, data.val).item())
    data, base = ctx.digits()
    model = conv.make_unet(quick=True)
    model.load_state_dict(base)
    if family == "digits":
        model.requires_grad_(False)
        params = conv.inject_lora(model, rank=LORA_RANK, alpha=ALL_ALPHAS[scale_name](LORA_RANK))
    elif FULL_SCALES[scale_name] != 1.0:
        params = conv.scale_parametrize(model, FULL_SCALES[scale_name])
    else:
        params = list(model.parameters())
    gen = torch.Generator().manual_seed(10_000 + seed)

    def train_loss():
        xt, t, c, noise = data.batch(data.ft_x, data.ft_y, gen, 8)
        return F.mse_loss(model(xt, t, c).sample, noise)

    return model, params, train_loss, (lambda: conv.val_loss(model, data))


def user_lora_scale(family: str, scale: str) -> float | None:
    """The network_alpha / network_dim the kohya hook would pass as lora_scale for this cell: the
    toy's own for the plain cells, the user's (toy alpha / CALIBRATION_K) for the calibrated ones."""
    if family == "digits_full":
        return None
    alpha = ALL_ALPHAS[scale](LORA_RANK)
    return (alpha / CALIBRATION_K if scale in CALIBRATED_ALPHAS else alpha) / LORA_RANK


def run_cell(family: str, scale: str, steps: int, spec: dict, seed: int, ctx: Context) -> dict:
    model, params, train_loss, val_loss = _build(family, scale, ctx, seed)
    model.train()
    opt = conv.build_optimizer(spec, params, steps, lora_scale=user_lora_scale(family, scale))
    t0 = time.perf_counter()
    status, loss = "ok", float("nan")
    for s in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        loss_t = train_loss()
        loss_t.backward()
        opt.step()
        if s % 50 == 0 or s == steps:
            loss = loss_t.item()
            if not math.isfinite(loss):
                status = f"diverged at step {s}"
                break
    model.eval()
    with torch.no_grad():
        final = val_loss() if status == "ok" else float("inf")
    return dict(final=final if math.isfinite(final) else float("inf"), status=status,
                wall_s=round(time.perf_counter() - t0, 2))


# --------------------------------------------------------------------------------------
# the matrix
# --------------------------------------------------------------------------------------

def cells(families, calibrated: bool = False) -> list[tuple[str, str, int]]:
    out = []
    for family in families:
        scales = FULL_SCALES if family == "digits_full" else (CALIBRATED_ALPHAS if calibrated else ALPHAS)
        for scale in scales:
            for steps in LENGTHS[family]:
                out.append((family, scale, steps))
    return out


def cell_key(family: str, scale: str, steps: int) -> str:
    return f"{family}|{scale}|{steps}"


def preset_specs(family: str, candidates: bool = True) -> list[dict]:
    presets, _ = conv.load_presets()
    names = ("full",) if family == "digits_full" else ("lora", "high_performance")
    specs = [dict(name=f"preset {n}", kind="automagic", kwargs=dict(presets[n])) for n in names]
    for label, preset, over in CANDIDATES if candidates else ():
        if preset in names:
            specs.append(dict(name=f"{preset}: {label}", kind="automagic", kwargs=dict(presets[preset], **over)))
    return specs


class Store:
    """robustness.json: {"runs": {cell: {optimizer name: {seed: result}}}, "untrained": {cell: {seed:
    held-out loss before training}}}, written after every run."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"runs": {}}

    def get(self, cell: str, name: str, seed: int):
        return self.data["runs"].get(cell, {}).get(name, {}).get(str(seed))

    def put(self, cell: str, name: str, seed: int, result: dict) -> None:
        self.data["runs"].setdefault(cell, {}).setdefault(name, {})[str(seed)] = result
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conv.atomic_write_text(self.path, json.dumps(self.data, indent=1, sort_keys=True))


def _run_cached(store: Store, cell: tuple, spec: dict, seed: int, ctx: Context) -> float:
    key = cell_key(*cell)
    hit = store.get(key, spec["name"], seed)
    if hit is not None and spec["kind"] == "automagic" and hit.get("kwargs") != spec["kwargs"]:
        hit = None  # measured with other settings (a preset changed since): run again
    if hit is None:
        hit = run_cell(*cell, spec, seed, ctx)
        if spec["kind"] == "automagic":
            hit["kwargs"] = {k: v for k, v in spec["kwargs"].items()}
        store.put(key, spec["name"], seed, hit)
        conv.log(f"{key:28s} seed {seed} {spec['name']:48s} {hit['final']:.5f} [{hit['wall_s']:.0f} s] {hit['status']}")
    return hit["final"]


def untrained_loss(store: Store, cell: tuple, seed: int, ctx: Context) -> float:
    """The held-out loss of the cell's model before any step (a LoRA starts as the identity)."""
    key = cell_key(*cell)
    cached = store.data.setdefault("untrained", {}).get(key, {}).get(str(seed))
    if cached is None:
        cached = run_cell(*cell[:2], 0, dict(name="untrained", kind="adamw", lr=0.0), seed, ctx)["final"]
        store.data["untrained"].setdefault(key, {})[str(seed)] = cached
        store.save()
    return cached


def adamw_search(store: Store, cell: tuple, seed: int, ctx: Context) -> float:
    """Best final loss of AdamW over a half-decade grid, walked until the best is bracketed.

    A run that ends worse than the model it started from has diverged, and the diverged side of
    the grid is not monotone (a wilder lr can end a little less wrong): while every point tried
    ends above the untrained loss, the search first walks down until one does not, at most 8
    half-decades, and only then brackets."""
    def at(lr: float) -> float:
        lr = float(f"{lr:.3g}")
        return _run_cached(store, cell, dict(name=f"AdamW lr={lr:g}", kind="adamw", lr=lr), seed, ctx)

    start = ADAMW_START[cell[0]]
    best_lr, best = start, at(start)
    lowest = start
    while not best < untrained_loss(store, cell, seed, ctx) and lowest > start * HALF_DECADE ** -8:
        lowest /= HALF_DECADE
        value = at(lowest)
        if value < best:
            best_lr, best = lowest, value
    # Walk each way until two points in a row are worse than the best so far: a diverging lr can
    # be "better" than a slightly less diverging one, so one worse point does not bracket.
    for direction in (HALF_DECADE, 1 / HALF_DECADE):
        lr, worse = best_lr, 0
        while worse < 2:
            lr *= direction
            value = at(lr)
            if value < best:
                best_lr, best, worse = lr, value, 0
            else:
                worse += 1
    return best


def _matches(only: str, name: str) -> bool:
    """``--only``: a part of the optimizer's name, or with a leading "=" the whole name."""
    return only[1:] == name if only.startswith("=") else only.lower() in name.lower()


def run_matrix(args) -> None:
    store = Store(Path(args.out) / "robustness.json")
    ctx = Context(Path(args.cache))
    store.data["machine"] = conv.machine_desc()
    store.data["settings"] = dict(lora_rank=LORA_RANK, lengths=LENGTHS, adamw_weight_decay=conv.ADAMW_WEIGHT_DECAY,
                                  prodigy=conv.PRODIGY_KWARGS)
    for cell in cells(args.families, args.calibrated):
        if (args.lengths and cell[2] not in args.lengths) or (args.scales and cell[1] not in args.scales):
            continue
        seeds = args.seeds if (cell[2] == min(LENGTHS[cell[0]]) or not args.long_seeds) else args.long_seeds
        for seed in seeds:
            specs = preset_specs(cell[0], candidates=not args.no_candidates)
            if args.only:
                specs = [s for s in specs if any(_matches(o, s["name"]) for o in args.only)]
            else:
                adamw_search(store, cell, seed, ctx)
                _run_cached(store, cell, dict(name="Prodigy", kind="prodigy"), seed, ctx)
            for spec in specs:
                _run_cached(store, cell, spec, seed, ctx)


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------

def ratios(store: Store) -> dict:
    """{optimizer: {cell: (mean ratio over the seeds that have both, seeds)}} against the best
    AdamW point of the same seed."""
    out: dict = {}
    for cell, rows in store.data["runs"].items():
        adamw = [n for n in rows if n.startswith("AdamW")]
        for name, by_seed in rows.items():
            if name.startswith("AdamW"):
                continue
            values = []
            for seed, result in by_seed.items():
                best = [rows[a][seed]["final"] for a in adamw if seed in rows[a]]
                if best:
                    values.append(result["final"] / min(best))
            if values:
                out.setdefault(name, {})[cell] = (sum(values) / len(values), len(values))
    return out


def _cell_label(cell: str) -> str:
    family, scale, steps = cell.split("|")
    return f"{family} {scale} {steps}"


def render_markdown(store: Store) -> str:
    table = ratios(store)
    all_cells = list(dict.fromkeys(cell_key(*c) for cal in (False, True) for c in cells(("digits", "charlm", "digits_full"), cal)))
    present = [c for c in all_cells if c in store.data["runs"]]
    names = sorted(table, key=lambda n: (not n.startswith("preset"), n != "Prodigy", n))
    lines = ["# Robustness matrix", "",
             "Final held-out loss / best AdamW of a half-decade search in the same cell (mean over seeds; "
             "lower is better). Command: `python benchmarks/robustness.py` (see its docstring). "
             f"Machine: {store.data.get('machine', '?')}.", "",
             "| optimizer | " + " | ".join(_cell_label(c) for c in present) + " | worst |",
             "|---|" + "---:|" * (len(present) + 1)]
    for name in names:
        row = table[name]
        vals = [row.get(c) for c in present]
        shown = [f"{v[0]:.3f}" + ("" if v[1] > 1 else "¹") if v else "" for v in vals]
        worst = max((v[0] for v in vals if v), default=float("nan"))
        lines.append(f"| {name} | " + " | ".join(shown) + f" | {worst:.3f} |")
    best_lr = []
    for c in present:
        rows = store.data["runs"][c]
        adamw = {n: v for n, v in rows.items() if n.startswith("AdamW")}
        if adamw:
            per_seed = {}
            for n, by_seed in adamw.items():
                for seed, r in by_seed.items():
                    if seed not in per_seed or r["final"] < per_seed[seed][1]:
                        per_seed[seed] = (n, r["final"])
            best_lr.append(f"{_cell_label(c)}: " + ", ".join(f"seed {s} {n.split('=')[1]} ({v:.4f})"
                                                            for s, (n, v) in sorted(per_seed.items())))
    lines += ["", "¹ one seed.", "", "Best AdamW learning rate per cell (the search's bracketed optimum):", ""]
    lines += [f"- {b}" for b in best_lr]
    return "\n".join(lines) + "\n"


def render_heatmap(store: Store, path: Path, names: list[str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    table = ratios(store)
    names = [n for n in (names or sorted(table)) if n in table]
    all_cells = list(dict.fromkeys(cell_key(*c) for cal in (False, True) for c in cells(("digits", "charlm", "digits_full"), cal)))
    present = [c for c in all_cells if c in store.data["runs"]]
    grid = [[table[n].get(c, (float("nan"), 0))[0] for c in present] for n in names]
    fig, ax = plt.subplots(figsize=(3.5 + 0.7 * len(present), 1.6 + 0.42 * len(names)))
    im = ax.imshow(grid, cmap="RdYlGn_r", norm=TwoSlopeNorm(vcenter=1.0, vmin=0.9, vmax=1.2), aspect="auto")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if v == v:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    import textwrap

    ax.set_xticks(range(len(present)), [_cell_label(c).replace("alpha=", "α=").replace(" ", "\n") for c in present],
                  fontsize=6.5)
    ax.set_yticks(range(len(names)), [textwrap.fill(n, 42) for n in names], fontsize=7)
    ax.set_title("final held-out loss / best tuned AdamW (green < 1 < red)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    conv.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


# The rows of the README's picture: what ships, Prodigy, and each preset before its measured changes.
SUMMARY_ROWS = ["preset lora", "preset high_performance", "preset full", "Prodigy",
                "full: the document's decay (the preset before this round)",
                "lora: warmup_steps=0.25, lora_scale_power_above=0 (the preset before this round)",
                "lora: without lora_scale_power, quarter-run warm-up (two presets ago)",
                "high_performance: without lora_scale_power (the previous preset)",
                "high_performance: fixed 800-step warm-up (the preset before this round)",
                "high_performance: without lr_growth (the preset before it took lr_growth)",
                "lora: without lr_growth (the preset before it took lr_growth)"]


def write_report(out: Path) -> None:
    store = Store(out / "robustness.json")
    conv.atomic_write_text(out / "robustness.md", render_markdown(store))
    render_heatmap(store, out / "robustness.png")
    render_heatmap(store, out / "robustness_presets.png", SUMMARY_ROWS)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="+", default=["charlm", "digits", "digits_full"],
                    choices=["charlm", "digits", "digits_full"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--long-seeds", nargs="+", type=int, default=None,
                    help="seeds for the long runs (default: --seeds)")
    ap.add_argument("--lengths", nargs="+", type=int, default=None, help="only these run lengths")
    ap.add_argument("--scales", nargs="+", default=None,
                    help="only these scales (e.g. alpha=16xrank 'cal alpha=16xrank'): a candidate that differs from a "
                         "row only on one side of alpha = rank")
    ap.add_argument("--only", nargs="+", default=None,
                    help="only the optimizers whose name contains one of these ('=NAME': exactly that name)")
    ap.add_argument("--no-candidates", action="store_true", help="the shipped presets only (no CANDIDATES rows)")
    ap.add_argument("--out", default=str(OUT_DEFAULT))
    ap.add_argument("--cache", default=str(REPO_ROOT / "benchmarks" / "results"),
                    help="where the pretrained base models are cached")
    ap.add_argument("--calibrated", action="store_true",
                    help="the LoRA cells at the alphas calibrated to real SD learning rates (CALIBRATED_ALPHAS)")
    ap.add_argument("--report-only", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if not args.report_only:
        run_matrix(args)
    write_report(Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
