"""Tiny random-weight SDXL, Flux and SD3 models, tokenizers and a dataset for real sd-scripts runs on CPU.

Run with the python of a venv that has sd-scripts' requirements, offline:

    python tiny_models.py common OUT                      tokenizers, an offline HF cache, the dataset
    KOHYA_TINY=sdxl PYTHONPATH=<this folder> python tiny_models.py sdxl SD_SCRIPTS OUT
    KOHYA_TINY=flux PYTHONPATH=<this folder> python tiny_models.py flux SD_SCRIPTS OUT
    KOHYA_TINY=sd3  PYTHONPATH=<this folder> python tiny_models.py sd3  SD_SCRIPTS OUT

The models are built with sd-scripts' own classes, shrunk by ``sitecustomize.py`` in this folder
(the trainers must run with the same ``KOHYA_TINY``), and written where the trainers read them:
``OUT/sdxl`` (a diffusers folder), ``OUT/flux/*.safetensors``, ``OUT/sd3/*.safetensors``.
Nothing is downloaded: the CLIP tokenizers use a byte-level vocabulary (every character a token),
the T5 tokenizer a word-level one over the captions' words.
"""
import json
import os
import random
import sys
from pathlib import Path

CLIP_L, CLIP_G, T5 = "openai/clip-vit-large-patch14", "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", "google/t5-v1_1-xxl"
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle")
WORDS = ["a", "photo", "of", "sks", "on", "gray", "background", ","] + list(COLORS) + list(SHAPES)


# ------------------------------------------------------------------------------------ tokenizers


def byte_symbols() -> list[str]:
    """GPT-2 / CLIP byte-level BPE alphabet: one printable character per byte value, printable bytes
    standing for themselves and the others moved above 255."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    moved = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(moved)) for b in range(256)]


def write_tokenizers(out: Path) -> None:
    """Each tokenizer in sd-scripts' --tokenizer_cache_dir layout (the model id with "/" as "_")."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPTokenizer, T5TokenizerFast

    raw = out / "clip_byte_vocab"
    raw.mkdir(parents=True, exist_ok=True)
    symbols = byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    (raw / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (raw / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    for model_id, pad in ((CLIP_L, "<|endoftext|>"), (CLIP_G, "!")):  # bigG pads with "!", as the real one
        tokenizer = CLIPTokenizer(str(raw / "vocab.json"), str(raw / "merges.txt"), unk_token="<|endoftext|>",
                                  bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token=pad,
                                  model_max_length=77)
        tokenizer.save_pretrained(out / model_id.replace("/", "_"))
    # T5: pad 0, eos 1, unk 2 as in t5-v1_1; every id below the tiny SD3 T5's 64-entry vocabulary
    ids = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: 3 + i for i, w in enumerate(WORDS)}}
    word_level = Tokenizer(models.WordLevel(vocab=ids, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    word_level.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                              special_tokens=[("</s>", 1)])
    T5TokenizerFast(tokenizer_object=word_level, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0,
                    additional_special_tokens=None, model_max_length=512).save_pretrained(out / T5.replace("/", "_"))


def write_hf_cache(tokenizers: Path, hf_home: Path) -> None:
    """The tokenizers as an offline Hugging Face hub cache: flux_train.py and sd3_train.py load them
    by model id (they do not pass --tokenizer_cache_dir on)."""
    revision = "0" * 40
    for model_id in (CLIP_L, CLIP_G, T5):
        repo = hf_home / "hub" / ("models--" + model_id.replace("/", "--"))
        snapshot = repo / "snapshots" / revision
        snapshot.mkdir(parents=True, exist_ok=True)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(revision)
        for file in (tokenizers / model_id.replace("/", "_")).iterdir():
            (snapshot / file.name).write_bytes(file.read_bytes())


def write_dataset(out: Path, images: int = 4, repeats: int = 2, size: int = 64) -> None:
    """kohya's DreamBooth layout: ``train/<repeats>_<name>/`` with an image and a .txt caption each."""
    from PIL import Image, ImageDraw

    rng = random.Random(0)
    folder = out / "train" / f"{repeats}_shapes"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        color, shape = rng.choice(sorted(COLORS)), SHAPES[i % len(SHAPES)]
        image = Image.new("RGB", (size, size), (128, 128, 128))
        r, cx, cy = size // 4, rng.randint(size // 4, 3 * size // 4), rng.randint(size // 4, 3 * size // 4)
        draw = ImageDraw.Draw(image)
        (draw.rectangle if shape == "square" else draw.ellipse)([cx - r, cy - r, cx + r, cy + r], fill=COLORS[color])
        image.save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"sks {shape}, a photo of a {color} {shape} on gray background\n")


# ------------------------------------------------------------------------------------ models


def randomize(module, scale: float = 0.02):
    """Small random weights everywhere (sd-scripts leaves some layers at zero), norm scales at 1."""
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            is_scale = p.dim() == 1 and ("norm" in name or name.endswith(".scale")) and not name.endswith("bias")
            p.copy_(torch.ones_like(p) if is_scale else torch.randn_like(p) * scale)
    return module


def save_tensors(module, path: Path, prefix: str = "") -> dict:
    import torch
    from safetensors.torch import save_file

    tensors = {prefix + k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    assert all(torch.isfinite(v).all() for v in tensors.values()), f"non-finite tensor for {path}"
    if path is not None:
        save_file(tensors, str(path))
    return tensors


def build_sdxl(out: Path, tokenizers: Path) -> None:
    """A diffusers folder (sdxl_train_util loads it with StableDiffusionXLPipeline). The U-Net is made
    with sd-scripts' own SdxlUNet2DConditionModel and converted to diffusers keys, so the loader's
    conversion back is exact."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from library import sdxl_model_util, sdxl_original_unet
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    channels, context, adm = (sdxl_original_unet.MODEL_CHANNELS, sdxl_original_unet.CONTEXT_DIM,
                              sdxl_original_unet.ADM_IN_CHANNELS)
    assert channels != 320, "KOHYA_TINY=sdxl and this folder on PYTHONPATH are needed"
    te1_width = 32
    te2_width, te2_projection = context - te1_width, adm - 6 * 256
    kohya_unet = randomize(sdxl_original_unet.SdxlUNet2DConditionModel())
    config = dict(sdxl_model_util.DIFFUSERS_SDXL_UNET_CONFIG, block_out_channels=[channels, 2 * channels, 4 * channels],
                  attention_head_dim=[max(1, channels // 64), 2 * channels // 64, 4 * channels // 64],
                  cross_attention_dim=context, projection_class_embeddings_input_dim=adm,
                  transformer_layers_per_block=[1, 1, 1], sample_size=8)
    unet = UNet2DConditionModel(**config)
    unet.load_state_dict(sdxl_model_util.convert_sdxl_unet_state_dict_to_diffusers(kohya_unet.state_dict()), strict=True)
    clip = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0,
                eos_token_id=2, num_attention_heads=2)
    # sd-scripts reads TE1's hidden state 11: it needs 12 layers
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=te1_width, intermediate_size=2 * te1_width, num_hidden_layers=12,
                                       hidden_act="quick_gelu", projection_dim=te1_width, **clip))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=te2_width, intermediate_size=2 * te2_width,
                                                     num_hidden_layers=2, hidden_act="gelu",
                                                     projection_dim=te2_projection, **clip))
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(32,) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=32,
                        sample_size=64, scaling_factor=0.13025)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, unet=unet, scheduler=scheduler,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizers / CLIP_L.replace("/", "_")),
        tokenizer_2=CLIPTokenizer.from_pretrained(tokenizers / CLIP_G.replace("/", "_")))
    pipe.save_pretrained(out, safe_serialization=True)
    # the U-Net in the layout sdxl_train.py saves (model.diffusion_model.*), to compare its output with
    save_tensors(kohya_unet, out.parent / "sdxl_unet_base.safetensors", "model.diffusion_model.")


def build_flux(out: Path) -> None:
    """flux.safetensors (BFL keys, 1 double + 1 single block), ae, clip_l, t5xxl: sd-scripts reads only
    the block counts from the file."""
    import dataclasses

    import torch
    from library import flux_models, flux_utils
    from transformers import CLIPTextModel, T5EncoderModel

    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    spec = flux_models.configs["dev"]
    assert spec.params.hidden_size != 3072, "KOHYA_TINY=flux and this folder on PYTHONPATH are needed"
    dit = flux_models.Flux(dataclasses.replace(spec.params, depth=1, depth_single_blocks=1))
    save_tensors(randomize(dit), out / "flux.safetensors")
    save_tensors(flux_models.AutoEncoder(spec.ae_params), out / "ae.safetensors")
    clip = flux_utils.CLIPConfig(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
                                 pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5,
                                 attention_dropout=0.0, dropout=0.0, initializer_range=0.02, initializer_factor=1.0)
    save_tensors(CLIPTextModel._from_config(clip), out / "clip_l.safetensors")
    t5 = flux_utils.T5Config(vocab_size=32128, feed_forward_proj="gated-gelu", is_encoder_decoder=True,
                             pad_token_id=0, eos_token_id=1, dense_act_fn="gelu_new", is_gated_act=True,
                             layer_norm_epsilon=1e-6, tie_word_embeddings=False)
    save_tensors(T5EncoderModel(t5), out / "t5xxl.safetensors")


def build_sd3(out: Path) -> None:
    """sd3.safetensors (MMDiT depth 2 under model.diffusion_model., SDVAE under first_stage_model.),
    clip_l, clip_g, t5xxl. sd-scripts infers the MMDiT's shape from the file."""
    import torch
    from library import flux_utils, sd3_models, sd3_utils
    from safetensors.torch import save_file
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    clip = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0,
                eos_token_id=2)
    clip_l = sd3_utils.CLIPTextConfig(hidden_size=768, hidden_act="quick_gelu", projection_dim=768, **clip)
    clip_g = sd3_utils.CLIPTextConfig(hidden_size=1280, hidden_act="gelu", projection_dim=1280, **clip)
    assert clip_l.hidden_size != 768, "KOHYA_TINY=sd3 and this folder on PYTHONPATH are needed"
    save_tensors(CLIPTextModelWithProjection(clip_l), out / "clip_l.safetensors")
    save_tensors(CLIPTextModelWithProjection(clip_g), out / "clip_g.safetensors")
    t5 = flux_utils.T5Config(vocab_size=32128, feed_forward_proj="gated-gelu", is_encoder_decoder=True,
                             pad_token_id=0, eos_token_id=1, dense_act_fn="gelu_new", is_gated_act=True,
                             layer_norm_epsilon=1e-6, tie_word_embeddings=False)
    save_tensors(T5EncoderModel(t5), out / "t5xxl.safetensors")
    depth, positions = 2, 32
    params = sd3_models.SD3Params(patch_size=2, depth=depth, num_patches=positions ** 2, pos_embed_max_size=positions,
                                  adm_in_channels=clip_l.projection_dim + clip_g.projection_dim, qk_norm=None,
                                  x_block_self_attn_layers=[], context_embedder_in_features=4096,
                                  context_embedder_out_features=64 * depth, model_type="medium")
    mmdit = randomize(sd3_models.create_sd3_mmdit(params))
    # pos_embed is made with torch.empty and filled by the checkpoint: the fixed 2D sin-cos table
    table = sd3_models.get_2d_sincos_pos_embed(mmdit.pos_embed.shape[-1], positions)
    mmdit.pos_embed.data.copy_(torch.from_numpy(table).float().unsqueeze(0))
    tensors = {**save_tensors(mmdit, None, "model.diffusion_model."),
               **save_tensors(sd3_models.SDVAE(), None, "first_stage_model.")}
    save_file(tensors, str(out / "sd3.safetensors"))


def main(argv: list[str]) -> int:
    what = argv[0] if argv else ""
    if what == "common" and len(argv) == 2:
        out = Path(argv[1])
        write_tokenizers(out / "tokenizers")
        write_hf_cache(out / "tokenizers", out / "hf_home")
        write_dataset(out / "data")
        return 0
    if what in ("sdxl", "flux", "sd3") and len(argv) == 3:
        if os.environ.get("KOHYA_TINY") != what:
            sys.exit(f"run with KOHYA_TINY={what} and {Path(__file__).parent} on PYTHONPATH")
        sys.path.insert(0, argv[1])
        out = Path(argv[2])
        if what == "sdxl":
            build_sdxl(out / "sdxl", out / "tokenizers")
        else:
            (build_flux if what == "flux" else build_sd3)(out / what)
        return 0
    sys.exit(__doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
