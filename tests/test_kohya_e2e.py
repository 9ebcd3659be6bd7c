"""Real kohya-ss sd-scripts runs through train_network_patch.py (slow; skipped unless configured).

Needs, through environment variables only:
  SD_SCRIPTS_DIR   a kohya-ss sd-scripts checkout
  KOHYA_VENV       a virtual environment with sd-scripts' requirements (its bin/python runs kohya)
  KOHYA_E2E_WORK   a folder with an SD1.5-architecture diffusers model in model/, the CLIP tokenizer
                   in tokenizers/ (--tokenizer_cache_dir layout) and a DreamBooth-style dataset in
                   data/train/<repeats>_<name>/ (images + .txt captions)
  KOHYA_E2E_FULL=1 also run the full fine-tune (train_db.py, ~16 GB of RAM on CPU)
Everything runs offline on CPU. Each run prints its wall time and peak memory.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "train_network_patch.py"
SD_SCRIPTS = os.environ.get("SD_SCRIPTS_DIR")
VENV = os.environ.get("KOHYA_VENV")
WORK = os.environ.get("KOHYA_E2E_WORK")


def _missing() -> str | None:
    if not SD_SCRIPTS or not Path(SD_SCRIPTS, "train_network.py").is_file():
        return "SD_SCRIPTS_DIR is not set to a kohya-ss sd-scripts checkout"
    if not VENV or not Path(VENV, "bin", "python").is_file():
        return "KOHYA_VENV is not set to a virtual environment with sd-scripts' requirements"
    if not WORK or not all(Path(WORK, p).exists() for p in ("model/model_index.json", "tokenizers", "data/train")):
        return "KOHYA_E2E_WORK is not set to a folder with model/, tokenizers/ and data/train/"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=f"real sd-scripts runs: {_missing()}")

EFF = "lr/automagic_eff/"


def run_kohya(args, out: Path, name: str, script: str = "train_network") -> tuple[subprocess.Popen, str]:
    """Run the launcher with the kohya venv's python; log to out/<name>.log; report time and memory."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1",
               HF_HOME=str(Path(WORK, "hf_home")))
    command = [str(Path(VENV, "bin", "python")), str(LAUNCHER), "--script", script, *args]
    log_path = out / f"{name}.log"
    start = time.monotonic()
    with open(log_path, "w") as log_file:
        child = subprocess.Popen(command, cwd=out, env=env, stdout=log_file, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak memory
        child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - start
    log = log_path.read_text(errors="replace")
    print(f"[kohya e2e] {name}: rc={child.returncode} wall={wall:.1f}s peak_rss={usage.ru_maxrss / 2**20:.2f}GiB ({script})")
    return child, log


def common_lora_args(out: Path, steps: int) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(Path(WORK, "model")),
        "--tokenizer_cache_dir", str(Path(WORK, "tokenizers")),
        "--train_data_dir", str(Path(WORK, "data", "train")), "--caption_extension", ".txt",
        "--resolution", "64", "--train_batch_size", "1", "--max_data_loader_n_workers", "0",
        "--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "1",
        "--max_train_steps", str(steps), "--mixed_precision", "no", "--seed", "42",
        "--output_dir", str(out / "out"), "--output_name", "lora", "--save_model_as", "safetensors", "--save_state",
        "--logging_dir", str(out / "logs"), "--console_log_simple",
    ]


def lora_file(out: Path):
    from safetensors import safe_open

    with safe_open(str(out / "out" / "lora.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = sorted(logdir.glob("*/network_train"))
    assert runs, f"no TensorBoard run under {logdir}"
    events = EventAccumulator(str(runs[-1]))
    events.Reload()
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}


def optimizer_state(out: Path):
    import torch

    return torch.load(out / "out" / "lora-state" / "optimizer.bin", map_location="cpu", weights_only=True)


def train_and_resume(tmp: Path, first: int, total: int, extra: list[str], resume_extra: list[str] = ()):
    """Run 1: `first` steps + save_state. Run 2: resume from that state up to `total` steps."""
    run1, run2 = tmp / "run1", tmp / "run2"
    run1.mkdir()
    run2.mkdir()
    proc1, log1 = run_kohya(common_lora_args(run1, first) + extra, run1, "run1")
    assert proc1.returncode == 0, log1[-3000:]
    state = str(run1 / "out" / "lora-state")
    proc2, log2 = run_kohya(common_lora_args(run2, total) + extra + list(resume_extra)
                            + ["--resume", state, "--skip_until_initial_step"], run2, "run2")
    assert proc2.returncode == 0, log2[-3000:]
    return (run1, log1), (run2, log2)


def check_lora_runs(runs, first: int, total: int, preset_marker: str):
    import torch

    (run1, log1), (run2, log2) = runs
    for log in (log1, log2):
        assert "use automagic_sinkgd |" in log and "Automagic_Sinkgd" in log
    tensors1, meta1 = lora_file(run1)
    tensors2, _ = lora_file(run2)
    ups = [k for k in tensors1 if k.endswith("lora_up.weight")]
    assert ups and max(float(tensors1[k].abs().max()) for k in ups) > 0  # moved from the zero init
    assert all(torch.isfinite(t).all() for t in tensors1.values())
    assert set(tensors2) == set(tensors1)  # (whether run 2 moved them: test_extending_a_finished_run_trains)
    assert meta1["ss_optimizer"].startswith("automagic_sinkgd_plugin.automagic_sinkgd.Automagic_Sinkgd(")
    assert preset_marker in meta1["ss_optimizer"]

    for run, steps in ((run1, range(1, first + 1)), (run2, range(first + 1, total + 1))):
        logged = scalars(run / "logs")
        for group in ("textencoder", "unet"):
            values = logged.get(EFF + group)
            assert values, f"{EFF}{group} missing; scalars: {sorted(logged)}"
            assert [s for s, _ in values] == list(steps)
            # 0 is the end of the lora preset's decay (its last step); a run 2 at 0 throughout is issue 5
            assert all(0 <= v < 1 for _, v in values), values
            assert run is run2 or any(v > 0 for _, v in values), values
            print(f"[kohya e2e] {run.name} {EFF}{group}: " + ", ".join(f"{s}:{v:.3g}" for s, v in values))

    # the resume restored the optimizer: per-tensor step counters continue (warm-up is not restarted)
    assert "All optimizer states loaded successfully" in log2
    for run, steps in ((run1, first), (run2, total)):
        state = optimizer_state(run)
        counters = {int(s["step"]) for s in state["state"].values()}
        assert counters == {steps}, (run.name, counters)
        assert all(g.get("group_step", steps) == steps for g in state["param_groups"])


def preset_setting(preset: str, key: str):
    """A value of a shipped preset's optimizer_args, read from the preset (so the expectations follow it)."""
    from library.optimizer_factory import parse_optimizer_args
    from library.presets import load_preset

    return parse_optimizer_args(load_preset(preset)["optimizer_args"])[key]


_PRESET_FLAG_RUNS = {}


def preset_flag_runs(tmp_path_factory):
    """3 steps with --preset lora and --save_state, then a resume that extends the run to 6 steps (once).
    (The preset's decay reaches 0 at the run's last step, so run 1's last step and a too-short
    extension train nothing whether the decay was re-planned or not: 3 -> 6 leaves room.)"""
    if not _PRESET_FLAG_RUNS:
        _PRESET_FLAG_RUNS["runs"] = train_and_resume(tmp_path_factory.mktemp("preset_flag"), 3, 6, ["--preset", "lora"],
                                                     resume_extra=["--optimizer_args", "warmup_steps=100"])
    return _PRESET_FLAG_RUNS["runs"]


def test_lora_with_preset_flag_trains_logs_saves_and_resumes(tmp_path_factory):
    # the resumed run asks for another warm-up: the state's settings win (torch), so it must say so and
    # its LoRA's ss_optimizer must record the warm-up that really ran
    runs = preset_flag_runs(tmp_path_factory)
    check_lora_runs(runs, 3, 6, preset_marker=f"stats_update_freq={preset_setting('lora', 'stats_update_freq')}")
    (_, log1), (run2, log2) = runs
    warmup = preset_setting("lora", "warmup_steps")
    assert warmup != 100
    assert "the saved optimizer state overrides" not in log1
    assert f"the saved optimizer state overrides warmup_steps={warmup!r} (requested 100)" in log2
    ss_optimizer = lora_file(run2)[1]["ss_optimizer"]
    assert f"warmup_steps={warmup}," in ss_optimizer + "," and "warmup_steps=100" not in ss_optimizer, ss_optimizer


# Extending a finished run (the lora preset decays to 0 at its end) must re-plan the decay and train on.
def test_extending_a_finished_run_trains(tmp_path_factory):
    (run1, _), (run2, _) = preset_flag_runs(tmp_path_factory)
    tensors1, tensors2 = lora_file(run1)[0], lora_file(run2)[0]
    ups = [k for k in tensors1 if k.endswith("lora_up.weight")]
    assert max(float((tensors2[k] - tensors1[k]).abs().max()) for k in ups) > 0  # run 2 trained on


def test_lora_with_the_preset_as_kohyas_own_config_file(tmp_path):
    # 3 steps: the first step of the optimizer's ADOPT moment only initialises it, and the lora preset's
    # decay reaches 0 at the run's last step, so a 2-step run would leave the LoRA at its zero start
    # (a 3-step run with the preset's 0.65 warm-up: steps 2 and 3 decay, step 2 at half the rate)
    runs = train_and_resume(tmp_path, 3, 4, ["--config_file", str(REPO / "configs" / "lora.toml")])
    check_lora_runs(runs, 3, 4, preset_marker=f"stats_update_freq={preset_setting('lora', 'stats_update_freq')}")
    assert "Loading settings from" in runs[0][1]


def test_high_performance_preset_keeps_its_growth_factors_through_a_resume(tmp_path):
    """The high_performance preset's lr_growth: one factor per tensor in the optimizer state that
    kohya's save_state writes and --resume loads."""
    runs = train_and_resume(tmp_path, 3, 4, ["--preset", "high_performance"])
    check_lora_runs(runs, 3, 4, preset_marker=f"lr_growth={preset_setting('high_performance', 'lr_growth')}")
    for run, _ in runs:
        entries = optimizer_state(run)["state"].values()
        assert entries and all(float(s["lr_growth"]) >= 1.0 for s in entries)


def test_typo_in_optimizer_args_fails_fast(tmp_path):
    start = time.monotonic()
    proc, log = run_kohya(common_lora_args(tmp_path, 2) + ["--preset", "lora", "--optimizer_args", "warmup_step=10"],
                          tmp_path, "typo")
    assert proc.returncode == 2
    assert "no setting 'warmup_step' (did you mean 'warmup_steps'?)" in log and "valid keys:" in log
    assert "Loading" not in log and time.monotonic() - start < 60  # stopped before kohya loaded anything


@pytest.mark.skipif(os.environ.get("KOHYA_E2E_FULL") != "1", reason="full fine-tune needs ~16 GB RAM: set KOHYA_E2E_FULL=1")
def test_full_finetune_with_full_preset(tmp_path):
    out = tmp_path / "full"
    out.mkdir()
    args = [
        "--preset", "full",
        # d_coef=1 drops the Prodigy copy of the weights (3.4 GB for the fp32 SD1.5 U-Net on CPU)
        "--optimizer_args", "d_coef=1",
        "--pretrained_model_name_or_path", str(Path(WORK, "model")),
        "--tokenizer_cache_dir", str(Path(WORK, "tokenizers")),
        "--train_data_dir", str(Path(WORK, "data", "train")), "--caption_extension", ".txt",
        "--resolution", "64", "--train_batch_size", "1", "--max_data_loader_n_workers", "0",
        "--stop_text_encoder_training", "-1",  # U-Net only
        "--max_train_steps", "2", "--mixed_precision", "no", "--seed", "42",
        "--output_dir", str(out / "out"), "--output_name", "ft", "--save_model_as", "safetensors",
        "--save_precision", "bf16", "--logging_dir", str(out / "logs"), "--console_log_simple",
    ]
    proc, log = run_kohya(args, out, "full", script="train_db")
    assert proc.returncode == 0, log[-3000:]
    assert "use automagic_sinkgd |" in log and f"'full_finetune': {preset_setting('full', 'full_finetune')}" in log
    assert "'d_coef': 1" in log and "Text Encoder is not trained" in log
    event_files = sorted((out / "logs").glob("**/events.out.tfevents*"))
    assert event_files, "no TensorBoard logs"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(event_files[-1].parent))
    events.Reload()
    assert any(t.startswith(EFF) for t in events.Tags()["scalars"]), events.Tags()["scalars"]
    assert re.search(r"ft\.safetensors", " ".join(os.listdir(out / "out")))
