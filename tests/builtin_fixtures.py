"""Tiny random Stable-Diffusion pipelines and kohya-layout datasets for the built-in backend's tests.

Built in-test (no download, no shipped weights) and small enough that a training step takes milliseconds:
the point is the trainer's behaviour, not image quality.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 16  # pixels; the VAE below halves it, so latents are 8x8


def _byte_level_tokenizer(folder: Path) -> None:
    """A CLIP BPE tokenizer with single characters only (no merges): enough to turn captions into ids."""
    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(33, 127)]
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77).save_pretrained(str(folder))


def build_tiny_pipeline(folder: Path, seed: int = 0) -> Path:
    """Save a random StableDiffusionPipeline (SD 1.x layout: cross-attention U-Net, CLIP text, KL VAE)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=2,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=4, sample_size=IMAGE_SIZE,
    )
    tok_dir = folder.parent / (folder.name + "-tokenizer")
    _byte_level_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def build_dataset(root: Path, n_images: int = 4, repeats: int = 2, name: str = "toy", caption_ext: str = ".txt") -> Path:
    """kohya layout: root/<repeats>_<name>/img_i.png + img_i<caption_ext>, deterministic colours."""
    folder = root / f"{repeats}_{name}"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        colour = ((60 * i) % 256, (255 - 50 * i) % 256, (120 + 40 * i) % 256)
        image = Image.new("RGB", (IMAGE_SIZE * 2, IMAGE_SIZE * 2), colour)
        image.paste((255, 255, 0), (4 + i, 4, 16 + i, 16))
        image.save(folder / f"img_{i}.png")
        (folder / f"img_{i}{caption_ext}").write_text(f"a photo of zkz number {i}\n")
    return root


def base_args(model: Path, data: Path, out: Path, steps: int = 3, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--caption_extension", ".txt",
        "--output_dir", str(out), "--output_name", "tiny", "--resolution", str(IMAGE_SIZE), "--train_batch_size", "2",
        "--max_train_steps", str(steps), "--seed", "7", "--network_dim", "2", "--network_alpha", "1",
        "--optimizer_type", "AdamW", "--learning_rate", "1e-3", *extra,
    ]


def run_cli(argv: list[str], timeout: int = 300, launcher: list[str] | None = None, env_extra: dict | None = None,
            script: str | None = None, cwd: Path | None = None):
    """Run the built-in trainer (or a top-level script) in a fresh process as a user would: no network."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), **(env_extra or {}))
    target = [str(REPO / script)] if script else ["-m", "library.builtin.trainer"]
    cmd = (launcher or [sys.executable]) + target + argv
    return subprocess.run(cmd, cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout)


# Fixtures shared by the built-in backend's test modules (each imports the ones it uses).


@pytest.fixture(autouse=True)
def offline_single_thread(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny pipeline and a dataset, built once per test module."""
    root = tmp_path_factory.mktemp("tiny")
    return build_tiny_pipeline(root / "model"), build_dataset(root / "data")
