"""Ctrl-C / SIGTERM during training, with real signals sent to a real training process: the step in
progress finishes, a state is saved, one line gives the exact command that continues, the exit status is
130 / 143, and that command ends with the same weights as a run never interrupted. A second Ctrl-C ends
the process at once, without saving."""

import os
import shlex
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

STEPS, SLOW_FROM = 8, 3

# The real trainer; from step SLOW_FROM on, each step's end waits a moment (and says so in a marker file),
# so the signal lands while the run is training.
CHILD = r'''
import os, sys, time
from pathlib import Path
from library.builtin import trainer

slow_from, pause, marker = int(os.environ.get("SLOW_FROM", "0")), float(os.environ.get("PAUSE", "0")), os.environ.get("MARKER")
real_periodic = trainer.Run._periodic

def periodic(self, done):
    real_periodic(self, done)
    if slow_from and done >= slow_from:
        Path(marker).write_text(str(done))
        time.sleep(pause)

trainer.Run._periodic = periodic
sys.exit(trainer.main(sys.argv[1:]))
'''


def _env(**extra) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO),
                **{k: str(v) for k, v in extra.items()})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
    child = root / "train_child.py"
    child.write_text(CHILD)
    model, data = build_tiny_pipeline(root / "model"), build_dataset(root / "data")
    reference = root / "reference"
    argv = _argv(model, data, reference)
    done = subprocess.run([sys.executable, str(child), *argv], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return child, model, data, reference


def _argv(model, data, out: Path) -> list[str]:
    return base_args(model, data, out, STEPS) + ["--optimizer_type", "automagic_sinkgd",
                                                 "--optimizer_args", "warmup_steps=4", "lr_bump=1e-4"]


def _start_and_signal(child: Path, argv: list[str], marker: Path, signals: list[int], pause: float):
    process = subprocess.Popen([sys.executable, str(child), *argv], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               env=_env(SLOW_FROM=SLOW_FROM, PAUSE=pause, MARKER=marker))
    deadline = time.monotonic() + 300
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), f"training never reached step {SLOW_FROM}: {process.communicate()[1][-3000:]}"
    sent = time.monotonic()
    for i, sig in enumerate(signals):
        if i:
            time.sleep(0.5)
        process.send_signal(sig)
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err, time.monotonic() - sent


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_a_signal_saves_a_state_and_the_printed_command_continues_it_exactly(setup, tmp_path, sig, status):
    child, model, data, reference = setup
    out = tmp_path / "out"
    rc, stdout, stderr, _ = _start_and_signal(child, _argv(model, data, out), tmp_path / "reached", [sig], pause=1)
    assert rc == status, stderr[-3000:]
    assert "Traceback" not in stderr
    lines = [line for line in stdout.splitlines() if "continue with" in line]
    assert len(lines) == 1, stdout[-3000:]
    state = out / f"tiny-step{SLOW_FROM:08d}-state"  # the signal came after step 3: step 3 is the one saved
    assert lines[0].startswith(f"stopped at step {SLOW_FROM} of {STEPS}; continue with: ")
    command = shlex.split(lines[0].split("continue with: ", 1)[1])
    assert command[-2:] == ["--resume", str(state)] and command[:2] == ["python", str(child)]
    assert checkpoint.read_state(str(state))[3]["current_step"] == SLOW_FROM
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]  # saved atomically, nothing half-written
    assert not (out / "tiny.safetensors").exists()
    if sig != signal.SIGINT:
        return
    # the printed command, as printed (python = this interpreter), ends where the uninterrupted run ended
    resumed = subprocess.run([sys.executable, *command[1:]], cwd=REPO, env=_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed at step {SLOW_FROM} of {STEPS}" in resumed.stdout
    a, b = load_file(str(out / "tiny.safetensors")), load_file(str(reference / "tiny.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_ctrl_c_stops_at_once_without_saving(setup, tmp_path):
    child, model, data, _ = setup
    out = tmp_path / "out"
    rc, stdout, stderr, took = _start_and_signal(child, _argv(model, data, out), tmp_path / "reached",
                                                 [signal.SIGINT, signal.SIGINT], pause=60)
    assert rc == 130 and took < 30, stderr[-3000:]  # not after the 60 s the step's end is held for
    assert "stopping now, without saving" in stderr and "Traceback" not in stderr
    assert "continue with" not in stdout
    assert not list(out.glob("*-state"))


def test_the_resume_command_replaces_an_earlier_resume_and_quotes_paths(monkeypatch):
    from library.builtin.trainer import resume_command

    monkeypatch.setattr(sys.modules["__main__"], "__spec__", None)  # started as a script, not python -m
    monkeypatch.setattr(sys, "argv", ["train_network_patch.py", "--preset", "lora", "--resume", "old-state",
                                      "--output_name", "my lora"])
    assert resume_command(Path("out/my lora-step00000010-state")) == (
        "python train_network_patch.py --preset lora --output_name 'my lora' "
        "--resume 'out/my lora-step00000010-state'")
    monkeypatch.setattr(sys, "argv", ["/venv/bin/automagic-sinkgd-train", "--resume=old", "--seed", "1"])
    assert resume_command(Path("s")) == "automagic-sinkgd-train --seed 1 --resume s"
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", type("Spec", (), {"name": "train_network_patch"})())
    monkeypatch.setattr(sys, "argv", ["/repo/train_network_patch.py", "--preset", "lora"])
    assert resume_command(Path("s")) == "python -m train_network_patch --preset lora --resume s"
