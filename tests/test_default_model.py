"""The embedded default model and dataset: loadable offline, deterministic, atomic."""

import hashlib
import os
from pathlib import Path

import pytest

from library.builtin import default_model as dm

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Any attempt to reach the Hub would fail loudly instead of hanging.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("DIFFUSERS_OFFLINE", "1")
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return dm.ensure_default_model(str(tmp_path_factory.mktemp("cache")))


def _tree_digest(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_assets_are_small():
    total = sum(p.stat().st_size for p in dm.ASSETS_DIR.rglob("*") if p.is_file())
    assert total <= 8 * 1024 * 1024, f"shipped assets are {total / 1e6:.1f} MB"


def test_model_folder_layout(model_dir):
    root = Path(model_dir)
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (root / sub).is_dir(), sub
    assert (root / "model_index.json").is_file()


def test_pipeline_loads_offline_and_generates(model_dir):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True)
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    assert pipe.unet.dtype == torch.float32  # cache copy is upcast from the float16 assets
    assert any("CrossAttn" in t for t in pipe.unet.config.down_block_types)
    assert 0.1 < pipe.vae.config.scaling_factor < 10
    pipe.set_progress_bar_config(disable=True)
    img = pipe(dm.SAMPLE_PROMPTS[0], height=dm.DEFAULT_RESOLUTION, width=dm.DEFAULT_RESOLUTION,
               num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (dm.DEFAULT_RESOLUTION, dm.DEFAULT_RESOLUTION)


def test_tokenizer_knows_the_concept(model_dir):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(os.path.join(model_dir, "tokenizer"), local_files_only=True)
    ids = tok(dm.DEFAULT_CONCEPT).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(ids) == 3, "the trigger word must be a single token"
    assert tok.convert_ids_to_tokens(ids[1]) == dm.DEFAULT_CONCEPT + "</w>"
    for prompt in dm.SAMPLE_PROMPTS:
        ids = tok(prompt).input_ids
        assert tok.unk_token_id not in ids[1:-1] or tok.unk_token_id == tok.eos_token_id
        assert len(ids) == len(prompt.split()) + 2, prompt  # one token per word
    assert tok.model_max_length == 77


def test_bpe_vocab_single_token_per_word():
    vocab, merges = dm.build_bpe_vocab(dm.vocabulary_words())
    ranks = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
    for w in dm.vocabulary_words():
        assert dm._bpe_split(w, ranks) == [w + "</w>"]
    assert vocab["<|endoftext|>"] == len(vocab) - 1


def test_model_is_idempotent(model_dir):
    root = Path(model_dir)
    before = _tree_digest(root)
    again = dm.ensure_default_model(str(root.parent))
    assert again == model_dir
    assert _tree_digest(root) == before


def test_model_build_is_atomic(tmp_path, monkeypatch):
    # A crash while assembling must leave no folder that a later call would mistake for a complete one.
    def boom(src, dst):
        (dst / "model_index.json").write_text("{}")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(dm, "_assemble_model", boom)
    with pytest.raises(RuntimeError):
        dm.ensure_default_model(str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == []
    monkeypatch.undo()
    path = Path(dm.ensure_default_model(str(tmp_path)))
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_dataset_kohya_layout_and_captions(tmp_path):
    root = Path(dm.ensure_default_dataset(str(tmp_path / "data")))
    subs = [p for p in root.iterdir() if p.is_dir()]
    assert [p.name for p in subs] == [dm.DATASET_SUBFOLDER]
    repeats, _, name = subs[0].name.partition("_")
    assert int(repeats) >= 1 and name
    pngs = sorted(subs[0].glob("*.png"))
    assert len(pngs) == dm.DATASET_SIZE
    from PIL import Image
    for p in pngs:
        caption = p.with_suffix(".txt").read_text(encoding="utf-8")
        assert dm.DEFAULT_CONCEPT in caption.split()
        with Image.open(p) as im:
            assert im.size == (dm.DEFAULT_RESOLUTION, dm.DEFAULT_RESOLUTION) and im.mode == "RGB"


def test_dataset_deterministic_and_idempotent(tmp_path):
    a = Path(dm.ensure_default_dataset(str(tmp_path / "a")))
    b = Path(dm.ensure_default_dataset(str(tmp_path / "b")))
    assert _tree_digest(a) == _tree_digest(b)
    first = _tree_digest(a)
    dm.ensure_default_dataset(str(a))
    assert _tree_digest(a) == first


def test_dataset_build_is_atomic(tmp_path, monkeypatch):
    def boom(folder):
        (folder / "img_00.png").write_bytes(b"partial")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(dm, "_write_dataset", boom)
    with pytest.raises(RuntimeError):
        dm.ensure_default_dataset(str(tmp_path))
    assert not (tmp_path / dm.DATASET_SUBFOLDER).exists()
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


def test_sample_prompts_cover_concept_and_control():
    assert any(dm.DEFAULT_CONCEPT in p.split() for p in dm.SAMPLE_PROMPTS)
    assert any(dm.DEFAULT_CONCEPT not in p.split() for p in dm.SAMPLE_PROMPTS)


def test_concept_and_star_not_in_pretraining_captions():
    import random

    rng = random.Random(0)
    for _ in range(200):
        _, caption = dm.random_base_example(rng)
        words = caption.split()
        assert dm.DEFAULT_CONCEPT not in words and dm.HELD_OUT_SHAPE not in words
