"""kill -9 of a training process in the middle of writing a LoRA, and of writing a state folder.

The child process is the real trainer; only its writers are wrapped so that, with the real bytes written,
they keep half of them and then wait to be killed, as a kill in the middle of the write would leave them.
Afterwards the earlier outputs must load, and --resume from the last complete state must end with the
same weights as a run that was never interrupted. Every run is a fresh process started the same way
(in-process and subprocess runs differ in the last float bits).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from builtin_fixtures import REPO, base_args, build_dataset, build_tiny_pipeline
from builtin_fixtures import offline_single_thread  # noqa: F401 (fixture)
from library.builtin import checkpoint

STEPS, EVERY = 6, 2
KILLED_SAVE = "tiny-step00000004"  # the second intermediate save; the one at step 2 is complete

CHILD = r'''
import os, sys, time
from pathlib import Path
import torch
from library.builtin import checkpoint
from library.builtin.trainer import main

where, tag, marker = os.environ["KILL_WHILE_WRITING"], os.environ["KILL_TAG"], Path(os.environ["KILL_MARKER"])

def half_written_then_wait(path):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    marker.write_text(str(path))
    time.sleep(600)  # the test kills us here

real_save_file, real_torch_save = checkpoint.save_file, torch.save

def save_file(tensors, path, metadata=None):
    real_save_file(tensors, path, metadata=metadata)
    if where == "lora" and tag in Path(path).name and "-state" not in str(path):
        half_written_then_wait(path)

def torch_save(obj, f, *args, **kwargs):
    real_torch_save(obj, f, *args, **kwargs)
    if where == "state" and f"{tag}-state.tmp-" in str(f) and str(f).endswith("optimizer.bin"):
        half_written_then_wait(f)

checkpoint.save_file, torch.save = save_file, torch_save
sys.exit(main(sys.argv[1:]))
'''


def _env(where: str = "nowhere", marker: Path | None = None) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO),
                KILL_WHILE_WRITING=where, KILL_TAG=KILLED_SAVE, KILL_MARKER=str(marker or ""))


def _train(argv: list[str]) -> None:
    done = subprocess.run([sys.executable, "-c", CHILD, *argv], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _argv(model, data, out: Path) -> list[str]:
    return base_args(model, data, out, STEPS) + [
        "--optimizer_type", "automagic_sinkgd", "--optimizer_args", "warmup_steps=4", "lr_bump=1e-4",
        "--save_every_n_steps", str(EVERY), "--save_state"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("sigkill")
    model, data = build_tiny_pipeline(root / "model"), build_dataset(root / "data")
    out = root / "uninterrupted"
    _train(_argv(model, data, out))
    return model, data, out


def _same_tensors(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _kill_while_writing(where: str, argv: list[str], marker: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD, *argv], cwd=REPO, env=_env(where, marker),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if child.poll() is not None:
        pytest.fail(f"the training process ended (rc {child.returncode}) before the save: {child.stderr.read()[-3000:]}")
    assert marker.exists(), "the save was not reached in time"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL


@pytest.mark.parametrize("where", ["lora", "state"])
def test_sigkill_during_a_save_keeps_earlier_outputs_and_resume_gives_the_same_result(uninterrupted, tmp_path, where):
    model, data, reference = uninterrupted
    out = tmp_path / "out"
    argv = _argv(model, data, out)
    _kill_while_writing(where, argv, tmp_path / "reached")

    # what an earlier save wrote is complete and loads
    assert _same_tensors(out / "tiny-step00000002.safetensors", reference / "tiny-step00000002.safetensors")
    weights, optimizer_state, _, train_state = checkpoint.read_state(str(out / "tiny-step00000002-state"))
    assert train_state["current_step"] == EVERY and optimizer_state["state"] and weights
    leftovers = [p.name for p in out.iterdir() if ".tmp-" in p.name]
    if where == "lora":  # no half LoRA under the real name; its hidden temporary is all that is left
        assert not (out / f"{KILLED_SAVE}.safetensors").exists()
        assert len(leftovers) == 1 and leftovers[0].startswith(f".{KILLED_SAVE}.tmp-")
    else:  # the LoRA of that save is complete; its state folder never appeared under its name
        assert _same_tensors(out / f"{KILLED_SAVE}.safetensors", reference / f"{KILLED_SAVE}.safetensors")
        assert not (out / f"{KILLED_SAVE}-state").exists()
        assert len(leftovers) == 1 and leftovers[0].startswith(f".{KILLED_SAVE}-state.tmp-")
    assert not (out / "tiny.safetensors").exists()

    # --resume from the last complete state, into the same folder: the leftover goes, the result is the same
    last_good = max(out.glob("tiny-step*-state"))
    assert last_good.name == "tiny-step00000002-state"
    _train(argv + ["--resume", str(last_good)])
    assert _same_tensors(out / "tiny.safetensors", reference / "tiny.safetensors")
    assert _same_tensors(out / f"{KILLED_SAVE}.safetensors", reference / f"{KILLED_SAVE}.safetensors")
    assert checkpoint.read_state(str(out / f"{KILLED_SAVE}-state"))[3]["current_step"] == 2 * EVERY
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]
