"""Embedded default model and dataset for the built-in backend.

With no model and no dataset given, the built-in trainer uses a tiny
Stable-Diffusion-architecture model (U-Net with cross-attention, CLIP text
encoder, KL VAE, CLIP BPE tokenizer, DDIM scheduler) whose weights ship in
``assets/default_model`` (a few MB, produced by ``tools/build_default_model.py``),
and a small procedurally drawn, captioned dataset of one concept the base
model never saw, so a LoRA run shows something being learned in minutes on a CPU.

The base model was pretrained on 32x32 images of simple coloured shapes
("a red circle on white"); the word ``sks`` and the star shape were kept out of
its pretraining. The default dataset binds ``sks`` to a yellow star on blue.

Public API (used by the built-in trainer):
    ensure_default_model(cache_dir=None) -> str    diffusers folder (StableDiffusionPipeline layout)
    ensure_default_dataset(target_dir) -> str     kohya train_data_dir (<repeats>_<name>/img_XX.png + .txt)
    DEFAULT_CONCEPT, SAMPLE_PROMPTS, DEFAULT_RESOLUTION
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

# ---------------------------------------------------------------------------
# The concept and the sampling prompts
# ---------------------------------------------------------------------------

DEFAULT_CONCEPT = "sks"
# Caption of every image of the default dataset (kohya reads it from img_XX.txt).
CONCEPT_CAPTION = "a sks"
# First prompt: the concept (unknown to the base model: a vague blob before the
# LoRA, a yellow star on blue after). The others are controls the base model
# already knows; they should look the same before and after.
SAMPLE_PROMPTS = [CONCEPT_CAPTION, "a red circle on white", "a green square on black"]

DEFAULT_RESOLUTION = 32          # pixels; the VAE maps 32x32x3 to 8x8x4 latents
DATASET_SUBFOLDER = "10_sks"     # kohya: <repeats>_<name>
DATASET_SIZE = 12
SAMPLE_STEPS = 20                # DDIM steps that give clean samples for this model
SAMPLE_GUIDANCE = 4.0            # classifier-free guidance scale (pretrained with 10% empty captions)

ASSETS_DIR = Path(__file__).resolve().parent / "assets" / "default_model"
CACHE_APP_NAME = "automagic_sinkgd"

# ---------------------------------------------------------------------------
# Vocabulary of the procedural world
# ---------------------------------------------------------------------------

# Shape fill colours and background colours, by caption word. RGB values are
# saturated so that the 8x8x4 latent keeps colour identity well.
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 50),
    "blue": (40, 70, 220),
    "yellow": (245, 215, 20),
    "orange": (245, 130, 20),
    "purple": (140, 40, 190),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
BACKGROUNDS = ("white", "black", "gray", "blue", "red", "green")
# Shapes the base model was pretrained on; "star" is drawn only for the VAE
# (a generic image autoencoder) and for the LoRA concept.
BASE_SHAPES = ("circle", "square", "triangle", "diamond", "cross")
HELD_OUT_SHAPE = "star"
CONCEPT_COLOR, CONCEPT_BACKGROUND = "yellow", "blue"

# Words the tokenizer knows as single tokens. "sks" is in the vocabulary (so it
# has an embedding row) but never appears in pretraining captions: its
# embedding stays at its random initialisation until a LoRA / TE training uses it.
EXTRA_WORDS = ("a", "on", "of", "an", "the", "and", "with", "photo", "picture", "shape",
               "background", "small", "big", "sks", "star", "ohwx")


def vocabulary_words() -> list[str]:
    """All whole words of the tokenizer, in a fixed order (deterministic ids)."""
    words = list(EXTRA_WORDS) + list(COLORS) + list(BASE_SHAPES)
    seen, ordered = set(), []
    for w in words:
        if w not in seen:
            seen.add(w)
            ordered.append(w)
    return ordered


def _bpe_split(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Tokens of one word under BPE `ranks` (lowest rank merges first, as CLIP's BPE does)."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == math.inf:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def build_bpe_vocab(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """CLIP-style BPE vocab + merges that encode every word in `words` as one token.

    Single characters (with and without the end-of-word marker) are included so
    that unknown words still tokenize (as characters) instead of collapsing to
    the unknown token. Each word gets a left-to-right merge chain; when another
    word's merges break a chain midway, a completing merge is appended at the
    lowest priority (it only fires once nothing else can), so earlier words
    keep their single-token encoding.
    """
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789,.!-'")
    tokens: list[str] = list(chars) + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}

    def add_merge(a: str, b: str) -> None:
        if (a, b) not in ranks:
            ranks[(a, b)] = len(merges)
            merges.append((a, b))
            tokens.append(a + b)

    for w in words:
        if len(w) > 1:
            prefix = w[0]
            for i in range(1, len(w)):
                nxt = w[i] + ("</w>" if i == len(w) - 1 else "")
                add_merge(prefix, nxt)
                prefix += nxt
    for _ in range(10 * len(words)):  # repair chains broken by other words' merges
        broken = [p for p in (_bpe_split(w, ranks) for w in words) if len(p) > 1]
        if not broken:
            break
        add_merge(broken[0][0], broken[0][1])
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    # CLIP keeps the special tokens at the end of the vocabulary.
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, [f"{a} {b}" for a, b in merges]


# ---------------------------------------------------------------------------
# Procedural drawing (deterministic: only PIL + explicit random.Random)
# ---------------------------------------------------------------------------

SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges the VAE can reproduce


def shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]] | None:
    """Vertices of a polygonal shape centred at (cx, cy) with outer radius r; None for the circle."""
    def rot(points):
        ca, sa = math.cos(angle), math.sin(angle)
        return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in points]

    if shape == "circle":
        return None
    if shape == "square":
        s = r * 0.85
        return rot([(-s, -s), (s, -s), (s, s), (-s, s)])
    if shape == "triangle":
        return rot([(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
    if shape == "diamond":
        return rot([(0, -r), (r * 0.7, 0), (0, r), (-r * 0.7, 0)])
    if shape == "cross":
        w = r * 0.38
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
        return rot(pts)
    if shape == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rr = r if k % 2 == 0 else r * 0.42
            pts.append((rr * math.cos(a), rr * math.sin(a)))
        return rot(pts)
    raise ValueError(f"unknown shape {shape!r}")


def draw_shape(shape: str, color, background, cx: float, cy: float, r: float, angle: float = 0.0,
               size: int = DEFAULT_RESOLUTION) -> Image.Image:
    """One RGB image: a filled shape on a plain background. Coordinates are in output pixels."""
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), tuple(background))
    d = ImageDraw.Draw(img)
    s = SUPERSAMPLE
    poly = shape_polygon(shape, cx * s, cy * s, r * s, angle)
    if poly is None:
        d.ellipse([cx * s - r * s, cy * s - r * s, cx * s + r * s, cy * s + r * s], fill=tuple(color))
    else:
        d.polygon(poly, fill=tuple(color))
    return img.resize((size, size), Image.Resampling.LANCZOS)


def random_base_example(rng: random.Random, size: int = DEFAULT_RESOLUTION) -> tuple[Image.Image, str]:
    """A pretraining example: known shape, colour and background, with its caption."""
    shape = rng.choice(BASE_SHAPES)
    bg = rng.choice(BACKGROUNDS)
    color = rng.choice([c for c in COLORS if c != bg])
    r = size * rng.uniform(0.28, 0.40)
    cx = size / 2 + rng.uniform(-2.5, 2.5)
    cy = size / 2 + rng.uniform(-2.5, 2.5)
    angle = rng.uniform(-0.2, 0.2)
    img = draw_shape(shape, COLORS[color], COLORS[bg], cx, cy, r, angle, size)
    return img, f"a {color} {shape} on {bg}"


def random_vae_example(rng: random.Random, size: int = DEFAULT_RESOLUTION) -> Image.Image:
    """A VAE training image: any shape (the star included), any colours, wider jitter."""
    shape = rng.choice(BASE_SHAPES + (HELD_OUT_SHAPE,))
    if rng.random() < 0.5:
        bg = COLORS[rng.choice(list(COLORS))]
        fg = COLORS[rng.choice(list(COLORS))]
    else:
        bg = tuple(rng.randrange(256) for _ in range(3))
        fg = tuple(rng.randrange(256) for _ in range(3))
    r = size * rng.uniform(0.2, 0.45)
    cx = size / 2 + rng.uniform(-5, 5)
    cy = size / 2 + rng.uniform(-5, 5)
    return draw_shape(shape, fg, bg, cx, cy, r, rng.uniform(-0.6, 0.6), size)


def concept_example(index: int, size: int = DEFAULT_RESOLUTION) -> Image.Image:
    """Image `index` of the default LoRA dataset: a yellow star on blue, slightly jittered."""
    rng = random.Random(1000 + index)
    r = size * rng.uniform(0.36, 0.42)
    cx = size / 2 + rng.uniform(-1.5, 1.5)
    cy = size / 2 + rng.uniform(-1.5, 1.5)
    return draw_shape(HELD_OUT_SHAPE, COLORS[CONCEPT_COLOR], COLORS[CONCEPT_BACKGROUND], cx, cy, r,
                      rng.uniform(-0.15, 0.15), size)


# ---------------------------------------------------------------------------
# Model configurations (shared by the build script and the tests)
# ---------------------------------------------------------------------------

def unet_config(cross_attention_dim: int = 64) -> dict:
    """Tiny SD-style U-Net on 8x8x4 latents: two cross-attention levels (8x8, 4x4) + attention mid block."""
    return dict(
        sample_size=DEFAULT_RESOLUTION // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,      # diffusers' name; for this U-Net it is the number of heads
        norm_num_groups=16,
    )


def vae_config() -> dict:
    """Tiny KL autoencoder: 32x32x3 <-> 8x8x4 (two downsamplings)."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=DEFAULT_RESOLUTION,
    )


def text_encoder_config(vocab_size: int, bos_id: int, eos_id: int) -> dict:
    """Tiny CLIP text encoder; 77 positions like SD so kohya-style code needs no special case."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=64,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def scheduler_config() -> dict:
    """SD 1.x noise schedule (scaled_linear 0.00085..0.012, 1000 steps, epsilon prediction)."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


# ---------------------------------------------------------------------------
# ensure_default_model / ensure_default_dataset
# ---------------------------------------------------------------------------

def _assets_fingerprint(assets: Path = ASSETS_DIR) -> str:
    """Short content hash of the shipped assets: a new build of the assets gets a new cache folder."""
    h = hashlib.sha256()
    for p in sorted(assets.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(assets).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


def default_cache_dir() -> Path:
    """<XDG cache or ~/.cache>/automagic_sinkgd (no network, no environment surprises)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / CACHE_APP_NAME


def _write_fp32_copy(src: Path, dst: Path) -> None:
    """Copy a safetensors file, upcasting floating tensors to float32.

    The weights ship in float16 to stay small; training a LoRA on a CPU wants
    float32 weights whatever dtype the loader defaults to.
    """
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src))
    tensors = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(dst), metadata={"format": "pt"})


def _fp32_config(text: str) -> str:
    """A config.json with its recorded dtype set to float32.

    transformers loads a model in the dtype its config records ("dtype":
    "float16" for the shipped text encoder); the cache copy is float32.
    """
    cfg = json.loads(text)
    for key in ("dtype", "torch_dtype"):
        if cfg.get(key) == "float16":
            cfg[key] = "float32"
    return json.dumps(cfg, indent=2, sort_keys=True) + "\n"


def _assemble_model(src: Path, dst: Path) -> None:
    """Copy the asset folder to `dst`, turning every .safetensors (and its config) into float32."""
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        out = dst / rel
        if p.is_dir():
            out.mkdir(parents=True, exist_ok=True)
        elif p.suffix == ".safetensors":
            out.parent.mkdir(parents=True, exist_ok=True)
            _write_fp32_copy(p, out)
        elif p.name == "config.json":
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(_fp32_config(p.read_text(encoding="utf-8")), encoding="utf-8")
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, out)


def _atomic_publish(build, final: Path) -> Path:
    """Run build(tmp) in a temporary sibling of `final`, then rename it into place.

    A crash mid-build leaves only a '.tmp-*' folder, never a partial `final`;
    if another process published first, its result is kept and ours discarded.
    """
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=str(final.parent)))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def ensure_default_model(cache_dir: str | None = None) -> str:
    """Path of a local diffusers folder (StableDiffusionPipeline layout) holding the default model.

    Built once from the shipped assets into `cache_dir` (default: the user's
    cache dir), under a name that carries the assets' content hash; later calls
    return the existing folder. Offline: nothing here touches the network.
    """
    if not (ASSETS_DIR / "model_index.json").is_file():
        raise FileNotFoundError(
            f"default model assets missing in {ASSETS_DIR}; rebuild them with tools/build_default_model.py")
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    final = root / f"default_model-{_assets_fingerprint()}"
    return str(_atomic_publish(lambda tmp: _assemble_model(ASSETS_DIR, tmp), final))


def _write_dataset(folder: Path) -> None:
    """DATASET_SIZE images of the concept with their captions (PNG bytes are deterministic)."""
    for i in range(DATASET_SIZE):
        concept_example(i).save(folder / f"img_{i:02d}.png", format="PNG", optimize=False)
        (folder / f"img_{i:02d}.txt").write_text(CONCEPT_CAPTION + "\n", encoding="utf-8")


def ensure_default_dataset(target_dir: str) -> str:
    """Write the default LoRA dataset under `target_dir` in kohya layout; return `target_dir`.

    Layout: <target_dir>/10_sks/img_00.png, img_00.txt, ... (10 repeats per epoch).
    The returned path is what kohya calls train_data_dir. Idempotent and atomic.
    """
    target = Path(target_dir)
    _atomic_publish(_write_dataset, target / DATASET_SUBFOLDER)
    return str(target)
