"""What goes wrong around a run's files: damaged state folders, a full disk, leftovers of a killed save,
a resume whose optimizer settings or dataset differ from the run that made the state."""

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from builtin_fixtures import base_args, offline_single_thread, tiny  # noqa: F401 (fixtures)
from library.builtin import atomic, checkpoint
from library.builtin.atomic import atomic_dir, atomic_write, clean_stale_temporaries
from library.builtin.trainer import main

AUTOMAGIC = ["--optimizer_type", "automagic_sinkgd", "--optimizer_args", "warmup_steps=4", "lr_bump=1e-4"]


@pytest.fixture(scope="module")
def saved_state(tiny, tmp_path_factory):
    """A 2-step Automagic run with its state folder."""
    model, data = tiny
    out = tmp_path_factory.mktemp("first") / "out"
    assert main(base_args(model, data, out, 2) + AUTOMAGIC + ["--save_state"]) == 0
    return out / "tiny-state"


def _one_line_error(err: str) -> str:
    """The one error line (stderr also carries diffusers' loading bars); no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------- damaged state files under --resume


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(3000))


@pytest.mark.parametrize("name", ["optimizer.bin", "scheduler.bin", "model.safetensors", "train_state.json"])
@pytest.mark.parametrize("damage", [_truncate, _garbage], ids=["truncated", "random bytes"])
def test_damaged_state_file_is_one_line_naming_it(tiny, saved_state, tmp_path, capsys, name, damage):
    model, data = tiny
    state = tmp_path / "state"
    shutil.copytree(saved_state, state)
    damage(state / name)
    out = tmp_path / "out"
    assert main(base_args(model, data, out, 4) + AUTOMAGIC + ["--resume", str(state)]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert str(state / name) in line and "damaged, truncated or not such a file" in line
    assert "weights_only" not in line  # torch's advice for foreign pickles would run their code
    assert not out.exists()  # the output folder this run made is gone again, not left empty


def test_state_file_of_the_wrong_kind_is_named(tiny, saved_state, tmp_path, capsys):
    model, data = tiny
    state = tmp_path / "state"
    shutil.copytree(saved_state, state)
    torch.save([1, 2, 3], state / "optimizer.bin")  # a valid file, not an optimizer state
    (state / "train_state.json").write_text("{}")
    assert main(base_args(model, data, tmp_path / "o", 4) + AUTOMAGIC + ["--resume", str(state)]) == 2
    assert str(state / "optimizer.bin") in _one_line_error(capsys.readouterr().err)


def test_damaged_network_weights_file_is_named(tiny, tmp_path, capsys):
    model, data = tiny
    bad = tmp_path / "lora.safetensors"
    bad.write_bytes(os.urandom(500))
    assert main(base_args(model, data, tmp_path / "o", 1) + ["--network_weights", str(bad)]) == 2
    assert str(bad) in _one_line_error(capsys.readouterr().err)


# ---------------------------------------------------------------- disk full while saving


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("what", ["lora", "state"])
def test_disk_full_during_a_save_is_one_line_and_keeps_earlier_outputs(tiny, tmp_path, capsys, monkeypatch, what):
    model, data = tiny
    out = tmp_path / "out"
    argv = base_args(model, data, out, 2) + ["--save_state"]
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in [out / "tiny.safetensors", *(out / "tiny-state").iterdir()]}
    capsys.readouterr()
    if what == "lora":
        monkeypatch.setattr(checkpoint, "save_file", _disk_full)
    else:
        monkeypatch.setattr(checkpoint.torch, "save", _disk_full)
    assert main(argv) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "the disk is full" in line and "earlier outputs" in line and str(out) in line
    after = {p.name: p.read_bytes() for p in [out / "tiny.safetensors", *(out / "tiny-state").iterdir()]}
    if what == "state":  # the new LoRA was written (complete) before the state failed
        assert load_file(str(out / "tiny.safetensors"))  # complete and loadable
        del before["tiny.safetensors"], after["tiny.safetensors"]
    assert after == before  # the previous LoRA / state are untouched
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]  # and no temporary is left behind


# ---------------------------------------------------------------- leftovers of a kill -9


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid  # finished and reaped: no process has this id (until the system reuses it)


def _leftover(folder: Path, target: str, pid: int, kind: str = "tmp", host: str | None = None, suffix: str = "",
              is_dir: bool = True) -> Path:
    path = folder / f".{target}.{kind}-{pid}-{host or atomic._host_hash()}abc123{suffix}"
    if is_dir:
        path.mkdir()
        (path / "optimizer.bin").write_bytes(b"half")
    else:
        path.write_bytes(b"half")
    return path


def test_stale_temporaries_of_a_killed_save_are_removed_and_nothing_else(tmp_path):
    dead = _dead_pid()
    stale_dir = _leftover(tmp_path, "last-state", dead)
    stale_file = _leftover(tmp_path, "last", dead, suffix=".safetensors", is_dir=False)
    running = _leftover(tmp_path, "mine-state", os.getpid())  # a save of a live process
    other_host = _leftover(tmp_path, "theirs-state", dead, host="000000")  # another machine, shared disk
    not_ours = [tmp_path / ".last-state.tmp-keepme", tmp_path / ".hidden", tmp_path / "last.safetensors"]
    for path in not_ours:
        path.write_text("user file")
    actions = clean_stale_temporaries(tmp_path)
    assert not stale_dir.exists() and not stale_file.exists() and len(actions) == 2
    assert running.exists() and other_host.exists() and all(p.exists() for p in not_ours)
    # another machine's leftover goes once nothing touched it for an hour
    assert clean_stale_temporaries(tmp_path, now=time.time() + 2 * atomic.OTHER_HOST_STALE_S)
    assert not other_host.exists() and running.exists() and all(p.exists() for p in not_ours)


def test_a_state_renamed_aside_is_put_back_when_the_kill_came_between_the_renames(tmp_path):
    dead = _dead_pid()
    aside = _leftover(tmp_path, "last-state", dead, kind="old")
    half_new = _leftover(tmp_path, "last-state", dead)
    actions = clean_stale_temporaries(tmp_path)
    assert (tmp_path / "last-state" / "optimizer.bin").read_bytes() == b"half"  # the previous state, back
    assert not aside.exists() and not half_new.exists() and "restored" in actions[0]
    # with the new state in place, a leftover previous one is just removed
    aside = _leftover(tmp_path, "last-state", dead, kind="old")
    clean_stale_temporaries(tmp_path)
    assert not aside.exists() and (tmp_path / "last-state").is_dir()


def test_temporaries_carry_the_writers_pid_and_host(tmp_path):
    seen = []
    atomic_write(tmp_path / "a.safetensors", lambda tmp: (seen.append(Path(tmp).name), Path(tmp).write_bytes(b"x")))
    with atomic_dir(tmp_path / "s-state") as tmp:
        seen.append(tmp.name)
    for name in seen:
        match = atomic._LEFTOVER.match(name)
        assert match and int(match["pid"]) == os.getpid() and match["host"] == atomic._host_hash(), name
    assert clean_stale_temporaries(tmp_path) == []


def test_a_run_cleans_its_output_folder_of_stale_temporaries(tiny, tmp_path, capsys):
    model, data = tiny
    out = tmp_path / "out"
    out.mkdir()
    stale = _leftover(out, "tiny-state", _dead_pid())
    assert main(base_args(model, data, out, 1)) == 0
    assert not stale.exists() and f"removed {stale}" in capsys.readouterr().err


# ---------------------------------------------------------------- resume with other settings


def test_resume_with_changed_optimizer_args_warns_and_records_the_values_in_effect(tiny, saved_state, tmp_path,
                                                                                   capsys):
    model, data = tiny
    out = tmp_path / "out"
    changed = ["--optimizer_type", "automagic_sinkgd", "--optimizer_args", "warmup_steps=100", "lr_bump=1e-4"]
    assert main(base_args(model, data, out, 3) + changed + ["--resume", str(saved_state)]) == 0
    captured = capsys.readouterr()
    warning = [line for line in captured.err.splitlines() if line.startswith("warning: resuming")]
    assert len(warning) == 1 and "warmup_steps=4 (requested 100)" in warning[0] and "lr_bump" not in warning[0]
    assert "optimizer library.automagic_sinkgd.Automagic_Sinkgd(warmup_steps=4,lr_bump=0.0001)" in captured.out
    with safe_open(str(out / "tiny.safetensors"), "pt") as f:
        assert f.metadata()["ss_optimizer"].endswith("Automagic_Sinkgd(warmup_steps=4,lr_bump=0.0001)")


def test_resume_with_the_same_settings_says_nothing(tiny, saved_state, tmp_path, capsys):
    model, data = tiny
    assert main(base_args(model, data, tmp_path / "o", 3) + AUTOMAGIC + ["--resume", str(saved_state)]) == 0
    assert "warning" not in capsys.readouterr().err


def test_resume_of_a_state_made_on_own_data_needs_that_data(tiny, saved_state, tmp_path, capsys):
    """Before: without --train_data_dir it resumed silently on the embedded demo dataset (and its seed)."""
    model, data = tiny
    argv = [a for a in base_args(model, data, tmp_path / "o", 3) + AUTOMAGIC + ["--resume", str(saved_state)]]
    i = argv.index("--train_data_dir")
    del argv[i:i + 2]
    assert main(argv) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert f"--train_data_dir {data}" in line and "built-in demo dataset" in line
    saved = json.loads((saved_state / "train_state.json").read_text())
    assert saved["train_data_dir"] == str(data) and saved["embedded_dataset"] is False
