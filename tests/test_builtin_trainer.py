"""Built-in backend end to end on a tiny random SD pipeline: outputs, kohya LoRA format, resume,
full fine-tune, safety, diffusers loading, and a 2-process accelerate run."""

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from builtin_fixtures import IMAGE_SIZE, base_args, offline_single_thread, run_cli, tiny  # noqa: F401 (fixtures)
from library.builtin.trainer import main


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_lora_run_writes_kohya_lora_loss_curve_and_samples(tiny, tmp_path, capsys):
    model, data = tiny
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of zkz --d 3 --s 2\n# a comment\nzkz number 1 --s 2 --l 3.0\n")
    out = tmp_path / "out"
    # 8 examples / batch 2 = 4 steps per epoch; kohya: --max_train_epochs wins over --max_train_steps
    argv = base_args(model, data, out, 99) + ["--max_train_epochs", "1", "--sample_prompts", str(prompts),
                                              "--sample_at_first", "--sample_every_n_steps", "2",
                                              "--training_comment", "hi"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "loss=" in printed and "lr_unet=1.00e-03" in printed and "lr_te=" in printed  # the progress bar shows loss and lr
    files = _files(out)
    assert "tiny.safetensors" in files and "tiny_loss.png" in files and "sample/tiny_grid.png" in files
    assert not [f for f in files if ".tmp" in f]  # every temp name was renamed away

    tensors = load_file(str(out / "tiny.safetensors"))
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    for name in names:
        assert re.fullmatch(r"lora_(unet|te)_[a-z0-9_]+", name), name
        assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= tensors.keys()
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in names
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2" in names
    # 4 transformers (down 1, mid 1, up 2) x (proj_in/out + 2 attentions x 4 + 2 feed-forward); 6 per CLIP layer
    assert len([n for n in names if n.startswith("lora_unet")]) == 4 * 12
    assert len([n for n in names if n.startswith("lora_te")]) == 2 * 6
    assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape[0] == 2
    assert float(tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"]) == 1.0
    assert max(tensors[k].abs().max() for k in tensors if k.endswith("lora_up.weight")) > 0  # it trained

    with safe_open(str(out / "tiny.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "2"
    assert meta["ss_network_alpha"] == "1.0" and meta["ss_steps"] == "4" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_optimizer"].startswith("torch.optim.adamw.AdamW") and meta["ss_output_name"] == "tiny"
    assert meta["ss_training_comment"] == "hi" and meta["ss_seed"] == "7"

    grid = Image.open(out / "sample" / "tiny_grid.png")
    assert grid.size == (200 + 3 * 192, 20 + 2 * 192)  # 2 prompts x (before, step 2, after)
    assert Image.open(out / "tiny_loss.png").size[0] > 100
    samples = [f for f in files if re.fullmatch(r"sample/tiny_\d{6}_\d{2}\.png", f)]
    assert sorted(samples) == [f"sample/tiny_{s:06d}_{i:02d}.png" for s in (0, 2, 4) for i in (0, 1)]


AUTOMAGIC = ["--optimizer_type", "automagic_sinkgd", "--optimizer_args", "warmup_steps=4", "lr_bump=1e-4"]


@pytest.mark.parametrize("optimizer", [[], AUTOMAGIC], ids=["AdamW", "automagic_sinkgd"])
def test_resume_is_bit_identical(tiny, tmp_path, optimizer, capsys):
    model, data = tiny
    common = base_args(model, data, tmp_path / "a", 6) + ["--lr_scheduler", "linear", "--lr_warmup_steps", "2",
                                                          "--flip_aug", "--gradient_accumulation_steps", "2"]
    common += optimizer
    assert main(common + ["--save_every_n_steps", "3", "--save_state"]) == 0
    if optimizer:  # the progress bar shows the optimizer's own effective lr next to the scheduler's
        assert "eff_lr_unet=" in capsys.readouterr().out
    state = tmp_path / "a" / "tiny-step00000003-state"
    assert sorted(os.listdir(state)) == ["model.safetensors", "optimizer.bin", "scheduler.bin", "train_state.json"]
    assert json.loads((state / "train_state.json").read_text())["current_step"] == 3
    torch.load(state / "optimizer.bin", weights_only=True)  # plain data, loadable the safe way
    resumed = [x if x != str(tmp_path / "a") else str(tmp_path / "b") for x in common]
    assert main(resumed + ["--resume", str(state)]) == 0
    a, b = load_file(str(tmp_path / "a" / "tiny.safetensors")), load_file(str(tmp_path / "b" / "tiny.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(AssertionError):  # and resuming really did something: step-3 weights differ
        c = load_file(str(tmp_path / "a" / "tiny-step00000003.safetensors"))
        assert all(torch.equal(a[k], c[k]) for k in a)


def test_network_weights_start_from_a_saved_lora(tiny, tmp_path):
    model, data = tiny
    assert main(base_args(model, data, tmp_path / "a", 2)) == 0
    # lr 0: the run must end exactly where the given LoRA started
    again = base_args(model, data, tmp_path / "b", 1) + ["--network_weights", str(tmp_path / "a" / "tiny.safetensors"),
                                                         "--learning_rate", "0", "--seed", "99"]
    assert main(again) == 0
    a, b = load_file(str(tmp_path / "a" / "tiny.safetensors")), load_file(str(tmp_path / "b" / "tiny.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_incomplete_state(tiny, tmp_path, capsys):
    model, data = tiny
    (tmp_path / "broken").mkdir()
    assert main(base_args(model, data, tmp_path / "o", 2) + ["--resume", str(tmp_path / "broken")]) == 2
    assert "not a complete state folder" in capsys.readouterr().err


def test_failed_run_keeps_earlier_outputs(tiny, tmp_path, capsys):
    model, data = tiny
    out = tmp_path / "out"
    assert main(base_args(model, data, out, 1)) == 0
    before = (out / "tiny.safetensors").read_bytes()
    bad_data = tmp_path / "bad"
    shutil.copytree(data, bad_data)
    (bad_data / "2_toy" / "img_0.png").write_bytes(b"\x89PNG broken")
    assert main(base_args(model, bad_data, out, 1)) == 2
    assert "img_0.png" in capsys.readouterr().err
    assert (out / "tiny.safetensors").read_bytes() == before
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    assert main(base_args(model, data, blocker / "out", 1)) == 2
    assert "cannot be written" in capsys.readouterr().err
    junk = tmp_path / "model.safetensors"
    junk.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")  # a valid but empty safetensors file
    assert main(base_args(junk, data, out, 1)) == 2
    assert "cannot load single-file checkpoint" in capsys.readouterr().err
    assert (out / "tiny.safetensors").read_bytes() == before


def test_lora_loads_in_diffusers_and_changes_output(tiny, tmp_path):
    from diffusers import StableDiffusionPipeline

    model, data = tiny
    out = tmp_path / "out"
    # a large lr so that a few steps move the LoRA far enough to see
    assert main(base_args(model, data, out, 3) + ["--learning_rate", "0.05", "--network_alpha", "2",
                                                  "--cache_latents"]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def render():
        return pipe("a photo of zkz", num_inference_steps=2, height=IMAGE_SIZE, width=IMAGE_SIZE,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images

    plain = render()
    pipe.load_lora_weights(str(out / "tiny.safetensors"))
    n_unet = sum(1 for n, _ in pipe.unet.named_modules() if n.endswith(".lora_A.default_0"))
    n_te = sum(1 for n, _ in pipe.text_encoder.named_modules() if n.endswith(".lora_A.default_0"))
    assert (n_unet, n_te) == (48, 12)  # every saved module was applied
    assert (render() - plain).abs().max() > 1e-3


def test_full_finetune_saves_diffusers_folder_and_single_file(tiny, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    model, data = tiny
    out = tmp_path / "out"
    assert main(base_args(model, data, out, 2), script="fine_tune") == 0
    trained = UNet2DConditionModel.from_pretrained(str(out / "tiny"), subfolder="unet")
    base = UNet2DConditionModel.from_pretrained(str(model), subfolder="unet")
    changed = [n for (n, p), (_, q) in zip(trained.named_parameters(), base.named_parameters()) if not torch.equal(p, q)]
    assert len(changed) > 0.9 * len(list(base.parameters()))  # all U-Net weights are trained
    assert (out / "tiny" / "model_index.json").is_file()
    # the same run saved as one file in the original SD layout reads back with diffusers' single-file loader
    assert main(base_args(model, data, out, 2) + ["--save_model_as", "safetensors"], script="fine_tune") == 0
    single = StableDiffusionPipeline.from_single_file(str(out / "tiny.safetensors"), config=str(model),
                                                      local_files_only=True, safety_checker=None,
                                                      requires_safety_checker=False)
    expected = trained.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in single.unet.state_dict().items())


def test_single_file_keys_match_diffusers_converter_for_sd15_shapes():
    # diffusers converts original -> diffusers; ours must be its inverse on the real SD 1.5 U-Net layout
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from library.builtin.sd_checkpoint import _unet_upsampler_key, unet_key

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)  # the defaults are SD 1.x's shapes
    with_attention = {i for i, t in enumerate(unet.config.up_block_types) if "CrossAttn" in t}
    original = {}
    for key, value in unet.state_dict().items():
        name = _unet_upsampler_key(key, 2, with_attention) or unet_key(key, 2)
        original["model.diffusion_model." + name] = key
    back = convert_ldm_unet_checkpoint(original, dict(unet.config))
    assert back == {v: v for v in original.values()}


def test_two_processes_match_one_process_and_only_main_writes(tiny, tmp_path):
    model, data = tiny
    common = ["--max_data_loader_n_workers", "0"]
    one = base_args(model, data, tmp_path / "one", 3) + common
    assert main(one) == 0
    two = base_args(model, data, tmp_path / "two", 3) + common
    two[two.index("--train_batch_size") + 1] = "1"  # 2 processes x 1 = the same global batch of 2
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517"]
    result = run_cli(two, launcher=launcher)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "(4 batches/epoch x 2 process(es))" in result.stdout
    assert "weights identical on all 2 processes" in result.stdout
    assert result.stdout.count("saved ") == 2  # the LoRA and the loss curve, written once
    assert _files(tmp_path / "two") == ["tiny.safetensors", "tiny_loss.png"]
    a, b = load_file(str(tmp_path / "one" / "tiny.safetensors")), load_file(str(tmp_path / "two" / "tiny.safetensors"))
    for k in a:  # same examples, same noise, gradients averaged by DDP: equal up to float rounding
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_quick_start_uses_embedded_model_and_dataset(tmp_path):
    """The README's quick start, shortened: the launcher with only --preset, everything else embedded."""
    out = tmp_path / "run"
    out.mkdir()
    result = run_cli(["--preset", "lora", "--max_train_steps", "2"], script="train_network_patch.py", cwd=out,
                     env_extra={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Automagic_Sinkgd" in result.stdout and "eff_lr_unet=" in result.stdout
    files = _files(out / "output")
    assert {"last.safetensors", "last_loss.png", "sample/last_grid.png"} <= set(files)
    with safe_open(str(out / "output" / "last.safetensors"), "pt") as f:
        assert f.metadata()["ss_optimizer"].endswith(
            "(min_lr=1e-06,max_lr=0.001,eta=2.0,warmup_steps=0.65,full_finetune=False,orthograd=True,stats_update_freq=3,"
            "relative_bump=0.2,decay_horizon=run,decay_floor=0.0,lora_scale_power=1.0,lora_scale_power_above=0.5,lr_growth=1.0)")
        assert f.metadata()["ss_network_alpha"] == "4.0" and f.metadata()["ss_batch_size_per_device"] == "4"
        assert f.metadata()["ss_seed"] == "42"  # fixed for the quick start, so its grid is reproducible
    grid = Image.open(out / "output" / "sample" / "last_grid.png")
    assert grid.size == (200 + 2 * 192, 20 + 3 * 192)  # 3 prompts x (before, after)


def test_user_model_and_data_get_kohya_defaults(tiny):
    from library.builtin.args import parse_args
    from library.builtin.trainer import compute_max_steps, resolve

    model, data = tiny
    setup = resolve(parse_args(["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data)]),
                    "train_network")
    args = setup.args
    assert (args.train_batch_size, args.network_dim, args.network_alpha) == (1, 4, 1.0)
    assert compute_max_steps(args, batches_per_epoch=8) == 1600
    assert args.resolution == str(IMAGE_SIZE)  # the model's own size, not kohya's 512 (it was built for 16 px)
    assert setup.caption_extension == ".caption" and setup.prompts == [] and not setup.full_finetune


def test_the_embedded_model_named_explicitly_trains_at_its_own_size_without_demo_prompts(tiny, tmp_path):
    """Before: 512 px (80x slower than its native 32 px, no warning) and the demo prompts on the user's data."""
    from library.builtin import default_model
    from library.builtin.args import parse_args
    from library.builtin.trainer import native_resolution, resolve

    _, data = tiny
    embedded = default_model.ensure_default_model()
    setup = resolve(parse_args(["--pretrained_model_name_or_path", embedded, "--train_data_dir", str(data)]),
                    "train_network")
    assert setup.args.resolution == str(default_model.DEFAULT_RESOLUTION) == "32"
    assert setup.prompts == [] and not setup.quick_start  # own data: no demo prompts, kohya's defaults
    assert setup.args.train_batch_size == 1 and setup.args.seed is None
    setup = resolve(parse_args(["--pretrained_model_name_or_path", embedded, "--resolution", "64"]), "train_network")
    assert setup.args.resolution == "64"  # a given size is kept
    assert native_resolution(str(tmp_path / "no-such-model")) is None  # falls back to kohya's 512


def test_optional_kohya_flags_run(tiny, tmp_path):
    """bf16 autocast, half-precision export, checkpointing, TensorBoard, clip skip, noise offset, min-SNR.
    In a fresh process: accelerate keeps one mixed-precision setting per process."""
    model, data = tiny
    out = tmp_path / "out"
    argv = base_args(model, data, out, 2) + [
        "--mixed_precision", "bf16", "--save_precision", "fp16", "--gradient_checkpointing", "--clip_skip", "2",
        "--noise_offset", "0.05", "--min_snr_gamma", "5", "--logging_dir", str(out / "logs"), "--lr_scheduler",
        "cosine", "--lr_warmup_steps", "0.5", "--save_every_n_epochs", "1", "--max_train_epochs", "1"]
    result = run_cli(argv)
    assert result.returncode == 0, result.stderr[-3000:]
    tensors = load_file(str(out / "tiny.safetensors"))
    assert {v.dtype for k, v in tensors.items() if k.endswith(".weight")} == {torch.float16}
    assert list((out / "logs").rglob("events.out.tfevents*"))
    with safe_open(str(out / "tiny.safetensors"), "pt") as f:
        assert f.metadata()["ss_mixed_precision"] == "bf16" and f.metadata()["ss_steps"] == "4"
