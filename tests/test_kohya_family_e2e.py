"""Real kohya-ss sd-scripts SDXL, Flux and SD3 trainers (LoRA and full fine-tune) through
train_network_patch.py, on tiny random-weight models (slow; skipped unless configured).

Needs, through environment variables only:
  SD_SCRIPTS_DIR     a kohya-ss sd-scripts checkout
  KOHYA_VENV         a virtual environment with sd-scripts' requirements (its bin/python runs kohya)
Optional:
  KOHYA_E2E_REPORT   a file to which each run appends one JSON line (trainer, run, wall time, peak
                     RSS, tensors changed): the source of the table in docs/kohya_trainers.md

Everything runs offline on CPU. The set-up builds the models, tokenizers and a 4-image dataset with
tests/kohya_tiny/ (about half a minute); sd-scripts hard-codes the widths of these models, so each
run imports tests/kohya_tiny/sitecustomize.py, which shrinks them (KOHYA_TINY=sdxl|flux|sd3).

Each trainer runs twice with the preset made for it: run 1 trains 3 steps and saves its state
(--save_state); run 2 resumes from that state and extends the run to 6 steps. The checks: both runs
end cleanly; the weights load, are finite and changed; the optimizer state continued (per-tensor
step counters 3 -> 6, "All optimizer states loaded successfully"); the effective-lr curves are
named after the trainer's param groups and logged at each step.
"""

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "train_network_patch.py"
TINY = Path(__file__).resolve().parent / "kohya_tiny"
SD_SCRIPTS = os.environ.get("SD_SCRIPTS_DIR")
VENV = os.environ.get("KOHYA_VENV")
EFF = "lr/automagic_eff/"
FIRST, TOTAL = 3, 6  # run 1's steps; the steps after run 2 extended it


def _missing() -> str | None:
    if not SD_SCRIPTS or not Path(SD_SCRIPTS, "sdxl_train_network.py").is_file():
        return "SD_SCRIPTS_DIR is not set to a kohya-ss sd-scripts checkout"
    if not VENV or not Path(VENV, "bin", "python").is_file():
        return "KOHYA_VENV is not set to a virtual environment with sd-scripts' requirements"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=f"real sd-scripts runs: {_missing()}")


@dataclass(frozen=True)
class Trainer:
    script: str
    preset: str
    model: str  # sdxl | flux | sd3: the tiny model and the KOHYA_TINY switch
    args: tuple[str, ...]
    curves: tuple[str, ...]  # the param groups' names (lr/automagic_eff/<name>); LoRA: in the order of their lr

    @property
    def lora(self) -> bool:
        return self.script.endswith("_train_network")


# Text encoders at 1e-5 (and 2e-5 for a second one), the U-Net at 1e-4: a curve under the wrong name
# shows as a rate out of this order.
LORA = ("--network_dim", "4", "--network_alpha", "1", "--mixed_precision", "no", "--unet_lr", "1e-4",
        "--text_encoder_lr", "1e-5", "2e-5")
FULL = ("--mixed_precision", "bf16", "--full_bf16")
CACHED = ("--cache_text_encoder_outputs", "--cache_latents")

TRAINERS = {
    # networks.lora puts both SDXL text encoders in one group
    "sdxl_lora": Trainer("sdxl_train_network", "lora", "sdxl", ("--network_module", "networks.lora", *LORA),
                         ("textencoder", "unet")),
    "sdxl_full_fused": Trainer("sdxl_train", "full", "sdxl", (*FULL, "--fused_backward_pass"), ("unet",)),
    "sdxl_full": Trainer("sdxl_train", "full", "sdxl", FULL, ("unet",)),
    "flux_lora": Trainer("flux_train_network", "lora", "flux", ("--network_module", "networks.lora_flux", *LORA),
                         ("textencoder 1", "unet")),
    "flux_full_fused": Trainer("flux_train", "full", "flux", (*FULL, "--fused_backward_pass", *CACHED), ("unet",)),
    # lora_sd3 describes CLIP-L and CLIP-G both as "textencoder 1 ": the curves must still be apart
    "sd3_lora": Trainer("sd3_train_network", "lora", "sd3", ("--network_module", "networks.lora_sd3", *LORA),
                        ("textencoder 1", "textencoder 2", "unet")),
    "sd3_full_fused": Trainer("sd3_train", "full", "sd3", (*FULL, "--fused_backward_pass", *CACHED), ("unet",)),
}


# ---------------------------------------------------------------------------- set-up


def kohya_env(model: str | None, assets: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KOHYA_TINY")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1",
               HF_HOME=str(assets / "hf_home"), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if model:
        env.update(KOHYA_TINY=model, PYTHONPATH=str(TINY))
    return env


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Path:
    """Tokenizers, an offline HF cache, the dataset and the three tiny models, built once."""
    out = tmp_path_factory.mktemp("kohya_tiny")
    python = str(Path(VENV, "bin", "python"))
    steps = [(None, ["common", str(out)])] + [(m, [m, SD_SCRIPTS, str(out)]) for m in ("sdxl", "flux", "sd3")]
    for model, argv in steps:
        proc = subprocess.run([python, str(TINY / "tiny_models.py"), *argv], env=kohya_env(model, out),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def model_args(model: str, assets: Path) -> list[str]:
    tokenizers = ["--tokenizer_cache_dir", str(assets / "tokenizers")]
    if model == "sdxl":
        return ["--pretrained_model_name_or_path", str(assets / "sdxl"), *tokenizers]
    files = assets / model
    if model == "flux":
        return ["--pretrained_model_name_or_path", str(files / "flux.safetensors"), "--ae", str(files / "ae.safetensors"),
                "--clip_l", str(files / "clip_l.safetensors"), "--t5xxl", str(files / "t5xxl.safetensors"), *tokenizers]
    return ["--pretrained_model_name_or_path", str(files / "sd3.safetensors"), "--clip_l", str(files / "clip_l.safetensors"),
            "--clip_g", str(files / "clip_g.safetensors"), "--t5xxl", str(files / "t5xxl.safetensors"), *tokenizers]


@dataclass
class Run:
    dir: Path
    rc: int
    log: str
    wall_s: float
    peak_rss_gib: float

    @property
    def weights(self) -> Path:
        return self.dir / "out" / "tiny.safetensors"

    @property
    def state(self) -> Path:
        return self.dir / "out" / "tiny-state"


def run_trainer(name: str, trainer: Trainer, assets: Path, out: Path, steps: int, resume: Path | None = None) -> Run:
    """One launch of the trainer with its preset; the child's own peak RSS and wall time are kept."""
    out.mkdir(parents=True)
    command = [str(Path(VENV, "bin", "python")), str(LAUNCHER), "--sd_scripts", SD_SCRIPTS, "--script", trainer.script,
               "--preset", trainer.preset, *model_args(trainer.model, assets),
               "--train_data_dir", str(assets / "data" / "train"), "--caption_extension", ".txt",
               "--resolution", "64", "--train_batch_size", "1", "--max_data_loader_n_workers", "0", "--seed", "42",
               "--save_model_as", "safetensors", "--console_log_simple", *trainer.args,
               "--max_train_steps", str(steps), "--output_dir", str(out / "out"), "--output_name", "tiny",
               "--logging_dir", str(out / "logs"), "--save_state"]
    if resume is not None:
        command += ["--resume", str(resume)] + (["--skip_until_initial_step"] if trainer.lora else [])
    start = time.monotonic()
    with open(out / "train.log", "w") as log_file:
        child = subprocess.Popen(command, cwd=out, env=kohya_env(trainer.model, assets), stdout=log_file,
                                 stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak memory (KiB on Linux)
    run = Run(out, os.waitstatus_to_exitcode(status), (out / "train.log").read_text(errors="replace"),
              time.monotonic() - start, usage.ru_maxrss / 2**20)
    print(f"[kohya family e2e] {name}/{out.name}: rc={run.rc} wall={run.wall_s:.1f}s peak_rss={run.peak_rss_gib:.2f}GiB")
    return run


_RUNS: dict[str, tuple[Run, Run]] = {}


def runs_of(name: str, assets: Path, tmp_path_factory) -> tuple[Run, Run]:
    """Run 1 (FIRST steps, --save_state), then run 2: --resume, extended to TOTAL steps. The scripts
    without --skip_until_initial_step (sdxl_train, flux_train, sd3_train) count the steps of a
    resumed run from 0, so they are given the steps still to go."""
    if name not in _RUNS:
        trainer, root = TRAINERS[name], tmp_path_factory.mktemp(name)
        first = run_trainer(name, trainer, assets, root / "run1", FIRST)
        assert first.rc == 0, first.log[-4000:]
        second = run_trainer(name, trainer, assets, root / "run2", TOTAL if trainer.lora else TOTAL - FIRST,
                             resume=first.state)
        assert second.rc == 0, second.log[-4000:]
        _RUNS[name] = first, second
    return _RUNS[name]


# ---------------------------------------------------------------------------- reading the outputs


def tensors(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})


def changed(before: dict, after: dict) -> int:
    """Tensors of ``after`` that differ from ``before`` (compared in after's dtype, as saved)."""
    return sum(not bool((before[k].to(v.dtype) == v).all()) for k, v in after.items() if k in before)


def base_weights(trainer: Trainer, assets: Path) -> dict:
    """The tiny model's weights, keyed as the full fine-tune scripts save them."""
    if trainer.model == "sdxl":
        return tensors(assets / "sdxl_unet_base.safetensors")[0]
    return tensors(assets / trainer.model / f"{trainer.model}.safetensors")[0]


def step_counters(run: Run) -> set[int]:
    import torch

    state = torch.load(run.state / "optimizer.bin", map_location="cpu", weights_only=True)
    return {int(s["step"]) for s in state["state"].values()}


def scalars(run: Run) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folders = sorted({p.parent for p in (run.dir / "logs").glob("*/*/events.out.tfevents*")})
    assert folders, f"no TensorBoard run under {run.dir / 'logs'}"
    events = EventAccumulator(str(folders[-1]))
    events.Reload()
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}


def preset_setting(preset: str, key: str):
    from library.optimizer_factory import parse_optimizer_args
    from library.presets import load_preset

    return parse_optimizer_args(load_preset(preset)["optimizer_args"])[key]


def report(name: str, run: Run, **facts) -> None:
    path = os.environ.get("KOHYA_E2E_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"trainer": name, "script": TRAINERS[name].script, "run": run.dir.name, "rc": run.rc,
                                "wall_s": round(run.wall_s, 1), "peak_rss_gib": round(run.peak_rss_gib, 2),
                                **facts}) + "\n")


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(TRAINERS))
def test_trains_saves_resumes_and_logs_named_curves(name, assets, tmp_path_factory):
    import torch

    trainer = TRAINERS[name]
    first, second = runs_of(name, assets, tmp_path_factory)
    for run in (first, second):
        assert "use automagic_sinkgd |" in run.log and "Automagic_Sinkgd" in run.log
        weights, meta = tensors(run.weights)
        assert weights and all(torch.isfinite(t).all() for t in weights.values())
    start, _ = tensors(first.weights)
    if trainer.lora:
        ups = [k for k in start if k.endswith("lora_up.weight")]
        moved = sum(float(start[k].abs().max()) > 0 for k in ups)  # sd-scripts starts them at zero
        assert moved > 0, "run 1 left every lora_up at zero"
        assert meta["ss_optimizer"].startswith("automagic_sinkgd_plugin.automagic_sinkgd.Automagic_Sinkgd(")
        assert f"stats_update_freq={preset_setting(trainer.preset, 'stats_update_freq')}" in meta["ss_optimizer"]
        report(name, first, changed=f"{moved}/{len(ups)} lora_up")
    else:
        base = base_weights(trainer, assets)
        moved = changed(base, {k: v for k, v in start.items() if k in base})
        assert moved > 0, "run 1 changed no weight of the base model"
        assert f"'full_finetune': {preset_setting(trainer.preset, 'full_finetune')}" in first.log
        report(name, first, changed=f"{moved}/{len(base)} vs base")

    # the resume restored the optimizer: per-tensor step counters continue (warm-up is not restarted)
    assert "All optimizer states loaded successfully" in second.log
    assert step_counters(first) == {FIRST} and step_counters(second) == {TOTAL}
    end, _ = tensors(second.weights)
    assert set(end) == set(start)
    report(name, second, changed=f"{changed(start, end)}/{len(end)} vs run 1",
           step_counters=f"{sorted(step_counters(first))} -> {sorted(step_counters(second))}")

    # one effective-lr curve per param group, named after it, at every step (the scripts without
    # --skip_until_initial_step number a resumed run's steps from 1 again)
    for run, steps in ((first, range(1, FIRST + 1)),
                       (second, range(FIRST + 1, TOTAL + 1) if trainer.lora else range(1, TOTAL - FIRST + 1))):
        logged = scalars(run)
        curves = sorted(t[len(EFF):] for t in logged if t.startswith(EFF))
        assert curves == sorted(trainer.curves), (run.dir.name, curves, sorted(logged))
        for curve in trainer.curves:
            assert [s for s, _ in logged[EFF + curve]] == list(steps)
            # (0 is the end of the lora preset's decay; run 2, extended, must train: tested below)
            assert all(0 <= v < 1 for _, v in logged[EFF + curve]), logged[EFF + curve]
            assert any(v > 0 for _, v in logged[EFF + curve]), logged[EFF + curve]
        report_curves = {c: [round(v, 9) for _, v in logged[EFF + c]] for c in trainer.curves}
        print(f"[kohya family e2e] {name}/{run.dir.name} effective lr: {report_curves}")
    if trainer.lora:  # at step 1 each group's rate follows its lr: the names sit on the right groups
        at_step_1 = [scalars(first)[EFF + c][0][1] for c in trainer.curves]
        assert at_step_1 == sorted(at_step_1) and len(set(at_step_1)) == len(at_step_1), dict(zip(trainer.curves, at_step_1))


# The lora preset decays its learning rate to 0 at max_train_steps (decay_horizon="run",
# decay_floor=0); extending a finished 3-step run to 6 steps must re-plan that decay for the new
# length and train on (it used to bring the finished state back and train nothing).
@pytest.mark.parametrize("name", list(TRAINERS))
def test_extending_a_finished_run_on_resume_trains(name, assets, tmp_path_factory):
    first, second = runs_of(name, assets, tmp_path_factory)
    start, end = tensors(first.weights)[0], tensors(second.weights)[0]
    assert changed(start, end) > 0, f"run 2 ({FIRST} -> {TOTAL} steps) left every tensor as run 1 saved it"


def test_sdxl_fused_backward_pass_gives_the_plain_steps_weights(assets, tmp_path_factory):
    """sdxl_train --fused_backward_pass steps each parameter from its gradient hook; the result must be
    the non-fused step's, bit for bit (same seed, data and bf16 weights)."""
    fused, _ = runs_of("sdxl_full_fused", assets, tmp_path_factory)
    plain, _ = runs_of("sdxl_full", assets, tmp_path_factory)
    fused_weights, plain_weights = tensors(fused.weights)[0], tensors(plain.weights)[0]
    assert set(fused_weights) == set(plain_weights)
    assert changed(plain_weights, fused_weights) == 0
