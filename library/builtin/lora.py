"""LoRA in kohya's layout (networks.lora): which layers get one, how they are named, how the file looks.

Targets, as kohya chooses them for SD 1.x/2.x: in the U-Net every Linear and 1x1 Conv2d inside a
Transformer2DModel (attention q/k/v/out, feed-forward, proj_in/proj_out); in the CLIP text encoder every
Linear inside the attention and MLP blocks. A layer's name is the prefix plus its module path with '.'
replaced by '_', e.g. lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.

Each LoRA module is registered as a child of the layer it adapts (so the U-Net's parameters include it
and DistributedDataParallel syncs its gradients) and the layer's forward becomes
    original(x) + up(down(x)) * multiplier * alpha / dim
with `up` initialised to zero, so training starts from the unchanged model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

UNET_TARGETS = ("Transformer2DModel",)
TEXT_ENCODER_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIX = "lora_te"


class LoRAModule(nn.Module):
    def __init__(self, lora_name: str, layer: nn.Module, dim: int, alpha: float):
        super().__init__()
        self.lora_name = lora_name
        if isinstance(layer, nn.Conv2d):
            self.lora_down = nn.Conv2d(layer.in_channels, dim, layer.kernel_size, layer.stride, layer.padding, bias=False)
            self.lora_up = nn.Conv2d(dim, layer.out_channels, 1, bias=False)
        else:
            self.lora_down = nn.Linear(layer.in_features, dim, bias=False)
            self.lora_up = nn.Linear(dim, layer.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        # alpha is saved in the file (kohya's `.alpha` key); a buffer keeps it in state_dict
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.scale = float(alpha) / dim
        self.multiplier = 1.0
        self.enabled = True
        # plain attribute (a bound method, not a Module): the original forward of the adapted layer
        object.__setattr__(self, "original_forward", layer.forward)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.original_forward(x)
        if not self.enabled:
            return out
        delta = self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype)))
        return out + (delta * (self.multiplier * self.scale)).to(out.dtype)


def _is_target_layer(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)


def _kohya_root(model: nn.Module, prefix: str) -> str:
    """Module-path prefix kohya's names carry. kohya names text-encoder layers from CLIPTextModel's
    `text_model.` sub-module; transformers >= 5 dropped that wrapper, so it is put back in the name."""
    if prefix == TEXT_ENCODER_PREFIX and not hasattr(model, "text_model"):
        return "text_model."
    return ""


def find_targets(model: nn.Module, prefix: str, target_classes: tuple[str, ...]) -> dict[str, nn.Module]:
    """kohya name -> layer, in module order."""
    found: dict[str, nn.Module] = {}
    root = _kohya_root(model, prefix)
    for name, module in model.named_modules():
        if type(module).__name__ not in target_classes:
            continue
        for child_name, child in module.named_modules():
            if child_name and _is_target_layer(child):
                lora_name = f"{prefix}.{root}{name}.{child_name}".replace(".", "_")
                found.setdefault(lora_name, child)
    return found


def inject(model: nn.Module, prefix: str, target_classes: tuple[str, ...], dim: int, alpha: float) -> list[LoRAModule]:
    modules = []
    for lora_name, layer in find_targets(model, prefix, target_classes).items():
        lora = LoRAModule(lora_name, layer, dim, alpha)
        lora.to(device=next(layer.parameters()).device)
        layer.add_module("lora", lora)
        layer.forward = lora.forward  # instance attribute wins over the class's forward in nn.Module.__call__
        modules.append(lora)
    if not modules:
        raise ValueError(f"no {'/'.join(target_classes)} layers found for {prefix}: is this an SD 1.x/2.x model?")
    return modules


def set_multiplier(modules: list[LoRAModule], multiplier: float) -> None:
    for m in modules:
        m.multiplier = multiplier


def kohya_state_dict(modules: list[LoRAModule], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """`<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha`, contiguous CPU tensors."""
    out = {}
    for m in modules:
        for key, tensor in (("lora_down.weight", m.lora_down.weight), ("lora_up.weight", m.lora_up.weight),
                            ("alpha", m.alpha)):
            t = tensor.detach().to("cpu")
            if dtype is not None and key != "alpha":
                t = t.to(dtype)
            out[f"{m.lora_name}.{key}"] = t.contiguous()
    return out


def load_kohya_state_dict(modules: list[LoRAModule], state: dict[str, torch.Tensor], source: str) -> None:
    """Copy weights saved by kohya_state_dict back; every module must be present with the same shapes."""
    by_name = {m.lora_name: m for m in modules}
    expected = {f"{n}.{k}" for n in by_name for k in ("lora_down.weight", "lora_up.weight", "alpha")}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"{source}: LoRA keys do not match this model and --network_dim/--network_train_* settings "
            f"(missing {len(missing)}: {missing[:3]}, unexpected {len(unexpected)}: {unexpected[:3]})"
        )
    with torch.no_grad():
        for name, m in by_name.items():
            for key, target in (("lora_down.weight", m.lora_down.weight), ("lora_up.weight", m.lora_up.weight)):
                value = state[f"{name}.{key}"]
                if value.shape != target.shape:
                    raise ValueError(f"{source}: {name}.{key} has shape {tuple(value.shape)}, model needs "
                                     f"{tuple(target.shape)} (different --network_dim?)")
                target.copy_(value)
            m.alpha.copy_(state[f"{name}.alpha"])
            m.scale = float(m.alpha) / m.lora_down.weight.shape[0]
