"""What a new user hits first with the built-in backend: --resume at the LoRA file, file modes, a warm-up
longer than the run, --train_data_dir one folder too deep, several broken images, and the resumed step."""

import os
import stat

import pytest
import torch
from PIL import Image

from builtin_fixtures import base_args, offline_single_thread, tiny  # noqa: F401 (fixtures)
from library.builtin import checkpoint
from library.builtin.data import scan_dataset
from library.builtin.errors import UserError
from library.builtin.trainer import main, warmup_outlasts_run

AUTOMAGIC = ["--optimizer_type", "automagic_sinkgd", "--optimizer_args", "warmup_steps=2", "lr_bump=1e-4"]


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """A 3-step Automagic run with --save_state: its LoRA, its state folder, and its output."""
    model, data = tiny
    out = tmp_path_factory.mktemp("finished") / "out"
    old = os.umask(0o022)
    try:
        assert main(base_args(model, data, out, 3) + AUTOMAGIC + ["--save_state"]) == 0
    finally:
        os.umask(old)
    return out


def test_resume_at_the_lora_file_names_the_state_folder(tiny, finished, tmp_path, capsys):
    model, data = tiny
    lora = finished / "tiny.safetensors"
    assert main(base_args(model, data, tmp_path / "o", 4) + ["--resume", str(lora)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "is a file" in line and f"--resume {finished / 'tiny-state'}" in line and "not there" not in line
    # a LoRA saved without --save_state: the folder is named, and said to be missing
    alone = tmp_path / "other.safetensors"
    alone.write_bytes(lora.read_bytes())
    assert main(base_args(model, data, tmp_path / "o", 4) + ["--resume", str(alone)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert f"--resume {tmp_path / 'other-state'}" in line and "without --save_state" in line


def test_lora_and_state_files_get_the_normal_mode_not_0600(finished):
    """safetensors' writer creates 0600 files; a LoRA must be readable by a web UI of another user (0644
    with the usual umask 022, like the state's other files)."""
    for path in (finished / "tiny.safetensors", finished / "tiny-state" / "model.safetensors",
                 finished / "tiny-state" / "optimizer.bin"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_file_modes_follow_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        path = checkpoint.save_weights(tmp_path / "private.safetensors", {"w": torch.zeros(2)}, None)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_resumed_run_says_where_it_resumed(tiny, finished, tmp_path, capsys):
    model, data = tiny
    argv = base_args(model, data, tmp_path / "o", 5) + AUTOMAGIC + ["--resume", str(finished / "tiny-state")]
    assert main(argv) == 0
    assert f"resumed at step 3 of 5 from {finished / 'tiny-state'}" in capsys.readouterr().out


def test_a_warmup_longer_than_the_run_warns_in_one_line(tiny, tmp_path, capsys):
    """warmup_steps=800 (the high_performance preset's before it took a share of short runs) on a
    short run: the mask would never settle. The preset itself, 0.8 of the run and at most 800
    steps, warns on no run length."""
    from library.optimizer_factory import build_optimizer
    from library.presets import load_preset

    preset = load_preset("high_performance")
    params = [torch.nn.Parameter(torch.zeros(4, 4))]

    def built(optimizer_args, run_length):
        return build_optimizer(preset["optimizer_type"], [{"params": params, "lr": preset["learning_rate"]}],
                               preset["learning_rate"], optimizer_args, run_length=run_length, lora_scale=1.0)[2]

    fixed = [arg for arg in preset["optimizer_args"] if not arg.startswith(("warmup_steps", "max_warmup_steps"))]
    message = warmup_outlasts_run(built(fixed + ["warmup_steps=800"], 40), 40)
    assert message and "warmup_steps=800" in message and "40 steps" in message and "\n" not in message
    assert warmup_outlasts_run(built(fixed + ["warmup_steps=800"], 2000), 2000) is None
    for run_length in (40, 600, 2000):
        assert warmup_outlasts_run(built(preset["optimizer_args"], run_length), run_length) is None
    assert warmup_outlasts_run(torch.optim.AdamW(params), 40) is None

    model, data = tiny  # and a real run prints it once, as a warning line
    argv = base_args(model, data, tmp_path / "o", 3) + ["--optimizer_type", "automagic_sinkgd",
                                                         "--optimizer_args", "warmup_steps=800"]
    assert main(argv) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warmup_steps=800" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning:")


def test_train_data_dir_at_a_repeats_folder_suggests_its_parent(tiny):
    _, data = tiny
    inner = data / "2_toy"
    with pytest.raises(UserError, match=f"itself a <repeats>_<name> folder.*--train_data_dir {data}$"):
        scan_dataset(str(inner), ".txt")


def test_every_broken_image_is_reported_in_one_run(tmp_path):
    folder = tmp_path / "data" / "3_thing"
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "good.png")
    for name in ("bad_a.png", "bad_b.jpg", "bad_c.webp"):
        (folder / name).write_bytes(b"not an image")
    with pytest.raises(UserError) as error:
        scan_dataset(str(tmp_path / "data"), ".txt")
    message = str(error.value)
    assert message.startswith("3 images cannot be decoded") and "\n" not in message
    assert all(name in message for name in ("bad_a.png", "bad_b.jpg", "bad_c.webp")) and "good.png" not in message
