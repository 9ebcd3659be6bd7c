"""What the Automagic mask learned, per layer in model order, and the schedule apart from it.

Reads an Automagic_Sinkgd state (a live optimizer, or a saved ``optimizer.bin`` from kohya's
``<output>-state/`` folder or the built-in backend's), groups its tensors by layer (U-Net block,
text-encoder layer) and draws two panels: per layer, the learned mask (median of its elements,
the 5-95% range and the extremes, log scale), and below it the schedule's factor (the post-warm-up
decay, 1 until the decay starts, 0 where a preset decays to zero). ``tools/lr_mask_picture.py``
is the command.

The mask is what warm-up learned and keeps after it; the effective rate of an element is
mask x ALLoRA's row factor (LoRA matrices) x the VRAdam brake x the decay. Drawing the mask and
the decay apart keeps the picture meaningful at any point of a run: the effective rate alone is
0 everywhere at the end of a run that decays to 0 (the ``lora`` preset's ``decay_floor=0``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import torch

from .automagic_sinkgd import decode_lr_mask, post_warmup_decay, vradam_brake

# Elements kept per tensor for the percentiles: enough for a 5-95% range, cheap for 800M weights.
_SAMPLE = 1 << 16


@dataclass
class LayerRates:
    name: str          # layer label, e.g. "unet down_blocks.0.attentions.0" or "te layer 3"
    group: int         # param group index
    values: torch.Tensor  # effective lr of (a sample of) its elements, float32 on the CPU
    numel: int         # elements in the layer
    mask: Optional[torch.Tensor] = None  # the learned mask of the same elements (None: same as values)
    factors: list = field(default_factory=list)  # the schedule's factor of each of its tensors


def learned_mask(state: dict) -> Optional[torch.Tensor]:
    """The mask warm-up learned, per element, flattened float32 on the CPU (the bf16 state's
    16-bit codes decoded); None when the tensor has no mask yet."""
    mask = state.get("lr_mask")
    if mask is None:
        return None
    if "lr_mask_codec" in state:
        return decode_lr_mask(mask.detach().cpu(), tuple(state["lr_mask_codec"])).reshape(-1)
    return mask.detach().float().cpu().reshape(-1)


def schedule_factor(state: dict, group: dict) -> float:
    """The post-warm-up decay the step applies to this tensor now: 1 before the decay starts,
    capped by an outside scheduler's lr / lr_max and floored at the group's decay_floor."""
    if "lr_decay" not in state:
        return 1.0
    lr_max = group.get("lr_max", group["lr"]) or group["lr"]
    ratio = group["lr"] / lr_max if lr_max > 0 else 1.0
    return float(post_warmup_decay(state["lr_decay"].float().cpu(), ratio, group.get("decay_floor", 0.1)))


def effective_rates(state: dict, group: dict) -> Optional[torch.Tensor]:
    """Per-element effective lr of one tensor's state, flattened, float32 on the CPU (None when the
    tensor has no mask yet)."""
    flat = learned_mask(state)
    if flat is None:
        return None
    rate = flat.reshape(state["lr_mask"].shape)
    if rate.ndim >= 2 and "row_scaling" in state:  # ALLoRA, one factor per row
        rate = rate.reshape(rate.shape[0], -1) * state["row_scaling"].float().cpu().reshape(-1, 1)
    scale = torch.ones(())
    if group.get("vradam", True) and "exp_avg" in state:
        scale = scale * vradam_brake(state["exp_avg"].float().cpu().reshape(1, -1))[0]
    if group.get("lr_growth") and "lr_growth" in state:  # the opt-in per-tensor growth factor
        scale = scale * state["lr_growth"].float().cpu()
    return (rate * scale * schedule_factor(state, group)).reshape(-1)


_KOHYA = re.compile(r"^lora_(unet|te\d?)_(.*?)\.(lora_down|lora_up|alpha|hada_\w+|lokr_\w+)(\.weight)?$")


def layer_of(name: str) -> str:
    """The layer a parameter belongs to: a U-Net block (down_blocks.i.attentions.j / resnets.j,
    mid_block, up_blocks.i...) or a text-encoder layer; kohya's ``lora_unet_...`` names too."""
    m = _KOHYA.match(name)
    if m:
        where, rest = m.group(1), m.group(2)
        prefix = where
        path = rest.replace("_", ".")
    else:
        head, _, path = name.partition(".")
        prefix = {"text_encoder": "te", "text_encoder_2": "te2", "unet": "unet"}.get(head)
        if prefix is None:
            prefix, path = "", name
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part == "layers" and i + 1 < len(parts):  # CLIP encoder layer
            return f"{prefix} layer {parts[i + 1]}".strip()
        if part in ("down", "up") and i + 2 < len(parts) and parts[i + 1] == "blocks":  # kohya's flattened names
            sub = parts[i + 3:i + 5] if i + 4 < len(parts) else []
            return f"{prefix} {part}_blocks.{parts[i + 2]}{'.' + '.'.join(sub) if sub else ''}".strip()
        if part in ("down_blocks", "up_blocks") and i + 1 < len(parts):
            sub = parts[i + 2:i + 4] if i + 3 < len(parts) else []
            return f"{prefix} {part}.{parts[i + 1]}{'.' + '.'.join(sub) if sub else ''}".strip()
        if part == "mid" and i + 1 < len(parts) and parts[i + 1] == "block":
            return f"{prefix} mid_block".strip()
        if part == "mid_block":
            return f"{prefix} mid_block".strip()
    return f"{prefix} {parts[0] if len(parts) > 1 else 'other'}".strip()


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _registration_order(name: str) -> list:
    """diffusers' U-Net registers down_blocks, up_blocks, then mid_block: the order kohya's
    named_modules() walk (and so the optimizer) sees them in."""
    return _natural(name.replace("mid_block", "up_blocks_~mid").replace("mid.block", "up.blocks.~mid"))


def match_names(names_and_shapes: dict[str, tuple], shapes: list[tuple]) -> Optional[list[str]]:
    """Names for the optimizer's tensors (in its order), from a weights file of the same training
    (which does not keep the order): each tensor takes the first unused name of its shape in the
    order kohya and the built-in trainer build their groups (text encoder, then the U-Net's
    down, up and mid blocks, as diffusers registers them). Same-shape tensors of one layer (to_q,
    to_k, ...) may swap names, which the per-layer picture does not see. None if the shapes do
    not fit."""
    names = [n for n in names_and_shapes if not n.endswith(".alpha")]
    if len(names) != len(shapes):
        return None
    pools: dict[tuple, list[str]] = {}
    for n in sorted(names, key=_registration_order, reverse=True):  # popped from the end: first first
        pools.setdefault(tuple(names_and_shapes[n]), []).append(n)
    out = []
    for shape in shapes:
        pool = pools.get(tuple(shape)) if shape is not None else None
        if not pool:
            return None
        out.append(pool.pop())
    return out


def layers_from_state(state_dict: dict, names: Optional[list[str]] = None) -> list[LayerRates]:
    """Layers (in the optimizer's order, which is model order for kohya and the built-in trainer)
    from an optimizer ``state_dict()``; without names, each param group is one layer per tensor."""
    layers: dict[str, LayerRates] = {}
    position = 0
    for gi, group in enumerate(state_dict["param_groups"]):
        for pid in group["params"]:
            st = state_dict["state"].get(pid, {})
            label = layer_of(names[position]) if names else f"group {gi} tensor {position}"
            position += 1
            rates, mask = effective_rates(st, group), learned_mask(st)
            if rates is None:
                continue
            if rates.numel() > _SAMPLE:  # a fixed stride keeps it deterministic
                stride = rates.numel() // _SAMPLE + 1
                rates, mask = rates[::stride], mask[::stride]
            key = f"{gi}:{label}"
            factor = schedule_factor(st, group)
            if key in layers:
                layer = layers[key]
                layer.values = torch.cat([layer.values, rates])
                layer.mask = torch.cat([layer.mask, mask])
                layer.numel += st["lr_mask"].numel()
                layer.factors.append(factor)
            else:
                layers[key] = LayerRates(label, gi, rates, st["lr_mask"].numel(), mask, [factor])
    return list(layers.values())


def _forward_rank(label: str) -> int:
    """Where a layer sits on the forward pass: text encoder, U-Net input, down, mid, up, output."""
    words = label.split()
    head, rest = (words[0], words[1] if len(words) > 1 else "") if words else ("", "")
    if head.startswith("te"):
        return 0
    for rank, start in ((2, "down_blocks"), (3, "mid_block"), (4, "up_blocks")):
        if rest.startswith(start) or head.startswith(start):
            return rank
    return 5 if ("out" in rest or "out" in head) else 1


def in_forward_order(layers: list[LayerRates]) -> list[LayerRates]:
    """Layers by group, then as the forward pass meets them (the optimizer keeps diffusers'
    registration order, which puts mid_block after up_blocks); stable otherwise."""
    return sorted(layers, key=lambda layer: (layer.group, _forward_rank(layer.name)))


def shapes_in_state(state_dict: dict) -> list[tuple]:
    out = []
    for group in state_dict["param_groups"]:
        for pid in group["params"]:
            mask = state_dict["state"].get(pid, {}).get("lr_mask")
            out.append(tuple(mask.shape) if mask is not None else None)
    return out


def names_from_folder(folder: Path, state_dict: dict) -> Optional[list[str]]:
    """Parameter names from a ``*.safetensors`` in a state folder whose tensors fit the state."""
    from safetensors import safe_open

    shapes = shapes_in_state(state_dict)
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            names_and_shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        names = match_names(names_and_shapes, shapes)
        if names is not None:
            return names
    return None


def load_state_folder(path: Path) -> tuple[dict, Optional[list[str]]]:
    """An ``optimizer.bin`` (or the folder holding it) and the names found beside it."""
    path = Path(path)
    file = path / "optimizer.bin" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no optimizer.bin (written by kohya's or the built-in --save_state)")
    state_dict = torch.load(file, map_location="cpu", weights_only=True)
    if not any("lr_mask" in s for s in state_dict.get("state", {}).values()):
        raise ValueError(f"{file}: not an Automagic_Sinkgd state (no lr_mask); was the run trained with it?")
    return state_dict, names_from_folder(file.parent, state_dict)


def summary(layers: Iterable[LayerRates]) -> list[dict]:
    """Per layer: the learned mask's 5/50/95 percentiles and extremes (p05, median, p95, min, max),
    the schedule's factor (its tensors' smallest and largest) and the effective rate's median."""
    rows = []
    levels = torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)
    for layer in layers:
        mask = layer.mask if layer.mask is not None else layer.values
        q = torch.quantile(mask.double(), levels)
        factors = layer.factors or [1.0]
        rows.append(dict(layer=layer.name, group=layer.group, numel=layer.numel, p05=float(q[0]),
                         median=float(q[1]), p95=float(q[2]), min=float(mask.min()), max=float(mask.max()),
                         factor_min=min(factors), factor_max=max(factors),
                         effective_median=float(torch.quantile(layer.values.double(), 0.5))))
    return rows


def table(layers: Iterable[LayerRates]) -> str:
    """The summary as text: what ``tools/lr_mask_picture.py --table`` prints."""
    lines = [f"{'layer':<44s} {'group':>5s} {'elements':>9s} {'mask p05':>9s} {'median':>9s} {'p95':>9s} "
             f"{'decay':>11s} {'eff. median':>11s}"]
    for r in summary(in_forward_order(list(layers))):
        decay = (f"{r['factor_min']:.3g}" if r["factor_min"] == r["factor_max"]
                 else f"{r['factor_min']:.2g}-{r['factor_max']:.2g}")
        lines.append(f"{r['layer']:<44s} {r['group']:>5d} {r['numel']:>9d} {r['p05']:>9.3g} {r['median']:>9.3g} "
                     f"{r['p95']:>9.3g} {decay:>11s} {r['effective_median']:>11.3g}")
    return "\n".join(lines)


def draw(layers: list[LayerRates], path: Path, title: str = "", group_names: Optional[list[str]] = None) -> Path:
    """PNG with two panels sharing the layer axis (model order): the learned mask per layer (median,
    5-95% range, min-max, log y) and, below, the schedule's factor per layer (0 to 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .builtin.atomic import atomic_write

    rows = summary(in_forward_order(layers))
    fig, (ax, ax_f) = plt.subplots(2, 1, figsize=(max(6.0, 0.22 * len(rows) + 2.5), 6.2), sharex=True,
                                   height_ratios=(3, 1))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    xs = list(range(len(rows)))
    positive = [v for r in rows for v in (r["min"], r["p05"], r["median"]) if v > 0]
    floor = min(positive) if positive else None  # min_lr=0 lets mask elements reach 0, off a log axis
    for gi in sorted({r["group"] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r["group"] == gi]
        c = colours[gi % len(colours)]
        label = group_names[gi] if group_names and gi < len(group_names) else f"group {gi}"

        def at(key):
            return [max(rows[i][key], floor) if floor else rows[i][key] for i in idx]

        ax.vlines(idx, at("min"), at("max"), colors=c, lw=0.6, alpha=0.5)
        ax.vlines(idx, at("p05"), at("p95"), colors=c, lw=3.0, alpha=0.6)
        ax.plot(idx, at("median"), "o", color=c, ms=3.5, label=f"{label} mask (median, 5-95%, min-max)")
        ax_f.vlines(idx, [rows[i]["factor_min"] for i in idx], [rows[i]["factor_max"] for i in idx], colors=c, lw=3)
        ax_f.plot(idx, [rows[i]["factor_max"] for i in idx], "_", color=c, ms=6)
    if floor:
        ax.set_yscale("log")
    ax.set_ylabel("learned lr mask")
    ax.set_title(title or "Automagic_Sinkgd: learned lr mask per layer", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    if rows:
        ax.legend(fontsize=7, loc="best")
    ax_f.set_ylim(-0.05, 1.05)
    ax_f.set_ylabel("decay factor", fontsize=8)
    ax_f.grid(alpha=0.3, axis="y")
    ax_f.set_xticks(xs)
    ax_f.set_xticklabels([r["layer"] for r in rows], rotation=90, fontsize=6)
    factors = sorted({round(r["factor_max"], 4) for r in rows} | {round(r["factor_min"], 4) for r in rows})
    ax_f.set_title("schedule: effective lr = mask x ALLoRA row factor x VRAdam brake x this factor "
                   f"(now {factors[0]:.3g}{'-' + format(factors[-1], '.3g') if len(factors) > 1 else ''})"
                   if rows else "", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def draw_optimizer(optimizer, names: Optional[list[str]], path: Path, title: str = "",
                   group_names: Optional[list[str]] = None) -> Path:
    """The same picture from a live optimizer (``names`` in its parameter order)."""
    return draw(layers_from_state(optimizer.state_dict(), names), path, title, group_names)


def mask_histograms(optimizer) -> list[torch.Tensor]:
    """Each param group's mask values (a strided sample per tensor, on the device), for a TensorBoard
    histogram on logged steps; computing it costs nothing on the steps that do not log."""
    out = []
    for group in optimizer.param_groups:
        parts = []
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            mask = state.get("lr_mask")
            if mask is not None:
                flat = mask.reshape(-1)
                flat = flat[:: flat.numel() // _SAMPLE + 1]
                if "lr_mask_codec" in state:  # the bf16 state's 16-bit codes, as learning rates
                    flat = decode_lr_mask(flat, tuple(state["lr_mask_codec"]))
                parts.append(flat)
        out.append(torch.cat(parts) if parts else None)
    return out
