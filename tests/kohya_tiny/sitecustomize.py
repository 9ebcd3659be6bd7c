"""Tiny widths for the SDXL, Flux and SD3 models of kohya-ss sd-scripts, applied at import time.

sd-scripts takes most widths of these models from its own code, not from the checkpoint (the SDXL
U-Net is 2.6B parameters whatever the file holds; Flux and SD3 hard-code their text-encoder and VAE
configs), so a CPU test cannot load a small checkpoint without this. Python imports
``sitecustomize`` at start-up from the first folder on ``sys.path`` that has one: with this folder
on PYTHONPATH and ``KOHYA_TINY`` set to ``sdxl``, ``flux`` or ``sd3``, the named sd-scripts
modules are changed right after their body runs. No sd-scripts file is edited. The model builder
(``tiny_models.py``) and every trainer run on its output must use the same ``KOHYA_TINY``.
"""
import importlib.abc
import os
import sys

# SDXL U-Net: channels (320 real; GroupNorm(32) needs a multiple of 32), cross-attention width
# (TE1 hidden + TE2 hidden, 2048 real), label input (TE2 projection + 6 x 256, 2816 real).
SDXL = dict(channels=32, context=64, adm=1568)
# Flux DiT / AE / CLIP-L / T5 widths (3072 hidden, 24 heads, AE ch 128, CLIP-L 768, T5 4096 real).
FLUX = dict(hidden=64, heads=2, axes=[8, 12, 12], clip=32, t5=32)
# SD3 CLIP-L / CLIP-G widths (768 / 1280 real) and SDVAE channels (128 real). Its T5 keeps d_model
# 4096 (sd-scripts pads text encodings to that width) and is made small in depth and vocabulary.
SD3 = dict(clip=32, vae=32)
SD3_T5 = dict(d_model=4096, d_ff=32, d_kv=16, num_heads=2, num_layers=1, num_decoder_layers=1, vocab_size=64)


def shrink_sdxl_unet(module):
    module.MODEL_CHANNELS = SDXL["channels"]
    module.TIME_EMBED_DIM = 4 * SDXL["channels"]
    module.ADM_IN_CHANNELS = SDXL["adm"]
    module.CONTEXT_DIM = SDXL["context"]
    build = module.Transformer2DModel.__init__

    def one_layer_transformer(self, *args, **kwargs):
        kwargs.update(cross_attention_dim=SDXL["context"], num_transformer_layers=1)
        build(self, *args, **kwargs)

    module.Transformer2DModel.__init__ = one_layer_transformer


def shrink_flux_models(module):
    import dataclasses

    for name, spec in list(module.configs.items()):
        params = dataclasses.replace(spec.params, hidden_size=FLUX["hidden"], num_heads=FLUX["heads"],
                                     axes_dim=list(FLUX["axes"]), vec_in_dim=FLUX["clip"], context_in_dim=FLUX["t5"])
        ae = dataclasses.replace(spec.ae_params, ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1)
        module.configs[name] = dataclasses.replace(spec, params=params, ae_params=ae)


def shrink_flux_text_encoders(module):
    clip_config, t5_config = module.CLIPConfig, module.T5Config
    if os.environ.get("KOHYA_TINY") == "sd3":
        t5 = SD3_T5
    else:
        width = FLUX["t5"]
        t5 = dict(d_model=width, d_ff=2 * width, d_kv=width // 2, num_heads=2, num_layers=2, num_decoder_layers=2)

    def small_clip(**kwargs):
        width = FLUX["clip"]
        kwargs.update(hidden_size=width, intermediate_size=2 * width, num_attention_heads=2, num_hidden_layers=2,
                      projection_dim=width)
        return clip_config(**kwargs)

    def small_t5(**kwargs):
        return t5_config(**{**kwargs, **t5})

    module.CLIPConfig, module.T5Config = small_clip, small_t5


def shrink_sd3_text_encoders(module):
    clip_config = module.CLIPTextConfig

    def small_clip(**kwargs):
        if kwargs.get("hidden_size") in (768, 1280):  # CLIP-L, CLIP-G
            width = SD3["clip"]
            kwargs.update(hidden_size=width, intermediate_size=2 * width, num_attention_heads=2, num_hidden_layers=2,
                          projection_dim=width)
        return clip_config(**kwargs)

    module.CLIPTextConfig = small_clip


def shrink_sd3_vae(module):
    for cls in (module.VAEEncoder, module.VAEDecoder):
        def small(self, *args, _build=cls.__init__, **kwargs):
            kwargs.update(ch=SD3["vae"], ch_mult=(1, 1, 1, 1), num_res_blocks=1)
            _build(self, *args, **kwargs)

        cls.__init__ = small


PATCHES = {
    "sdxl": {"library.sdxl_original_unet": shrink_sdxl_unet},
    "flux": {"library.flux_models": shrink_flux_models, "library.flux_utils": shrink_flux_text_encoders},
    "sd3": {"library.sd3_utils": shrink_sd3_text_encoders, "library.sd3_models": shrink_sd3_vae,
            "library.flux_utils": shrink_flux_text_encoders},
}.get(os.environ.get("KOHYA_TINY", ""), {})


class _ThenPatch(importlib.abc.Loader):
    def __init__(self, loader, patch):
        self.loader, self.patch = loader, patch

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        self.patch(module)

    def __getattr__(self, name):
        return getattr(self.loader, name)


class _TinyFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        patch = PATCHES.get(fullname)
        if patch is None:
            return None
        for finder in sys.meta_path:
            spec = None if finder is self or not hasattr(finder, "find_spec") else finder.find_spec(fullname, path, target)
            if spec is not None:
                spec.loader = _ThenPatch(spec.loader, patch)
                return spec
        return None


if PATCHES:
    sys.meta_path.insert(0, _TinyFinder())
