"""Single-file Stable Diffusion 1.x/2.x checkpoint (the original "ldm" layout) from diffusers weights.

kohya's fine_tune.py saves a full fine-tune as one .safetensors/.ckpt in the original layout
(model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.*) that every SD tool and
diffusers' from_single_file read. diffusers only converts the other way, so the renames are spelled out
here, from the two layouts' structure:

U-Net, with L = layers_per_block: input_blocks[0] is conv_in; level i's resnet/attention j sits at
input_blocks[1 + i(L+1) + j] (.0 resnet, .1 attention) and its downsampler at input_blocks[(i+1)(L+1)];
output_blocks[i(L+1) + j] holds up level i's resnet/attention j (L+1 per level) and the last one of a level
also its upsampler (after the attention if there is one). Inside a resnet: norm1/conv1/time_emb_proj/
norm2/conv2/conv_shortcut = in_layers.0/in_layers.2/emb_layers.1/out_layers.0/out_layers.3/skip_connection.
VAE: down_blocks.i -> down.i, up_blocks.i -> up.(n-1-i), resnets -> block, mid resnets -> block_1/2, the
mid attention's linear q/k/v/out -> 1x1 convs q/k/v/proj_out, conv_shortcut -> nin_shortcut.
"""

from __future__ import annotations

import re

import torch

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str, table: dict[str, str]) -> str:
    head, _, tail = rest.partition(".")
    return f"{table.get(head, head)}.{tail}"


def unet_key(key: str, layers_per_block: int) -> str:
    stride = layers_per_block + 1
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    head, _, tail = key.rpartition(".")
    if head in fixed:
        return f"{fixed[head]}.{tail}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + i * stride + j
        return f"input_blocks.{index}.0.{_resnet(rest, _UNET_RESNET)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key)
    if m:
        return f"input_blocks.{(int(m[1]) + 1) * stride}.0.op.{m[2]}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        if m[1] == "attentions":
            return f"middle_block.1.{m[3]}"
        return f"middle_block.{2 * int(m[2])}.{_resnet(m[3], _UNET_RESNET)}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = i * stride + j
        return f"output_blocks.{index}.0.{_resnet(rest, _UNET_RESNET)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"
    raise KeyError(key)


def _unet_upsampler_key(key: str, layers_per_block: int, has_attention: set[int]) -> str | None:
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key)
    if not m:
        return None
    i = int(m[1])
    slot = 2 if i in has_attention else 1
    return f"output_blocks.{i * (layers_per_block + 1) + layers_per_block}.{slot}.conv.{m[2]}"


def vae_key(key: str, n_levels: int) -> str:
    for side in ("encoder", "decoder"):
        if not key.startswith(side + "."):
            continue
        rest = key[len(side) + 1:]
        rest = re.sub(r"^conv_norm_out\.", "norm_out.", rest)
        m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest)
        if m:
            level = int(m[2]) if m[1] == "down" else n_levels - 1 - int(m[2])
            inner = m[4].replace("conv_shortcut", "nin_shortcut")
            return f"{side}.{m[1]}.{level}.block.{m[3]}.{inner}"
        m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(down|up)samplers\.0\.conv\.(.+)", rest)
        if m:
            level = int(m[2]) if m[1] == "down" else n_levels - 1 - int(m[2])
            return f"{side}.{m[1]}.{level}.{m[3]}sample.conv.{m[4]}"
        m = re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", rest)
        if m:
            return f"{side}.mid.block_{int(m[1]) + 1}.{m[2].replace('conv_shortcut', 'nin_shortcut')}"
        m = re.fullmatch(r"mid_block\.attentions\.0\.(.+)\.(weight|bias)", rest)
        if m:
            return f"{side}.mid.attn_1.{_VAE_ATTENTION[m[1]]}.{m[2]}"
        return f"{side}.{rest}"
    return key  # quant_conv, post_quant_conv


def to_original_checkpoint(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """One state dict in the original SD layout (what from_single_file / A1111 / ComfyUI load)."""
    layers = unet.config.layers_per_block
    if not isinstance(layers, int):
        raise ValueError("per-level layers_per_block is not supported by the single-file export")
    with_attention = {i for i, t in enumerate(unet.config.up_block_types) if "CrossAttn" in t}
    out: dict[str, torch.Tensor] = {}
    for key, value in unet.state_dict().items():
        name = _unet_upsampler_key(key, layers, with_attention) or unet_key(key, layers)
        out[f"model.diffusion_model.{name}"] = value
    levels = len(vae.config.block_out_channels)
    for key, value in vae.state_dict().items():
        name = vae_key(key, levels)
        if ".mid.attn_1." in name and name.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # the original VAE attention uses 1x1 convolutions
        out[f"first_stage_model.{name}"] = value
    for key, value in text_encoder.state_dict().items():
        # transformers >= 5 dropped CLIPTextModel's `text_model.` level; the original layout has it
        name = key if key.startswith("text_model.") else f"text_model.{key}"
        out[f"cond_stage_model.transformer.{name}"] = value
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}
