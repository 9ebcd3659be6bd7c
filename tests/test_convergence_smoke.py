"""Smoke test of the convergence benchmark's pieces (benchmarks/convergence.py).

Tiny: the quick model, a random (not pretrained) base, a few optimizer steps. It checks that
the harness still runs end to end (data, LoRA wrapper, metric, every optimizer family it
compares, the report), not any convergence number.
"""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def conv():
    spec = importlib.util.spec_from_file_location("convergence_bench", ROOT / "benchmarks" / "convergence.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["convergence_bench"] = mod
    spec.loader.exec_module(mod)
    torch.set_num_threads(1)
    return mod


@pytest.fixture(scope="module")
def data(conv):
    return conv.Data()


@pytest.fixture
def small_data(conv, data):
    """The same data with a 48-sample validation set, to keep the runs below fast."""
    import copy

    d = copy.copy(data)
    d.val_x, d.val_y, d.val_t, d.val_noise = data.val_x[:48], data.val_y[:48], data.val_t[:48], data.val_noise[:48]
    return d


def test_splits_are_disjoint_and_heldout(conv, data):
    assert set(data.ft_y.tolist()) == set(conv.HELDOUT_CLASSES)
    assert set(data.val_y.tolist()) == set(conv.HELDOUT_CLASSES)
    assert not set(data.pre_y.tolist()) & set(conv.HELDOUT_CLASSES)
    assert data.val_x.min() >= -1 and data.val_x.max() <= 1
    # fixed validation noise / timesteps: a second construction gives the same set
    again = conv.Data()
    assert torch.equal(again.val_noise, data.val_noise) and torch.equal(again.val_t, data.val_t)


def test_lora_starts_as_identity_and_only_lora_trains(conv, data):
    torch.manual_seed(0)
    model = conv.make_unet(quick=True)
    before = conv.val_loss(model, data)
    model.requires_grad_(False)
    params = conv.inject_lora(model)
    assert params and all(p.requires_grad for p in params)
    assert math.isclose(conv.val_loss(model, data), before, rel_tol=1e-6)
    assert sum(p.requires_grad for p in model.parameters()) == len(params)


def _kinds():
    kinds = [dict(name="AdamW", kind="adamw", group="adamw", lr=1e-3),
             dict(name="Prodigy", kind="prodigy", group="prodigy")]
    try:
        has_automagic = importlib.util.find_spec("library.automagic_sinkgd") is not None
    except ModuleNotFoundError:
        has_automagic = False
    if has_automagic:
        kinds.append(dict(name="Automagic", kind="automagic", group="automagic",
                          kwargs=dict(lr=5e-5, warmup_steps=2, orthograd=True, stats_update_freq=3)))
    return kinds


def test_real_scale_full_keeps_the_function_and_scales_the_gradients(conv, data):
    torch.manual_seed(0)
    plain = conv.make_unet(quick=True)
    scaled = conv.make_unet(quick=True)
    scaled.load_state_dict(plain.state_dict())
    params = conv.scale_parametrize(scaled, 50.0)
    assert len(params) == len(list(plain.parameters()))
    assert math.isclose(conv.val_loss(scaled, data), conv.val_loss(plain, data), rel_tol=1e-5)
    xt, t, c, noise = data.batch(data.ft_x, data.ft_y, torch.Generator().manual_seed(0), 4)
    for model in (plain, scaled):
        torch.nn.functional.mse_loss(model(xt, t, c).sample, noise).backward()
    # dL/dW' = s * dL/dW, and W' = W / s: an element-wise step of lr moves W by s * lr
    w, w_scaled = plain.conv_in.weight, scaled.conv_in.parametrizations.weight.original
    torch.testing.assert_close(w_scaled.grad, 50.0 * w.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(w_scaled.detach() * 50.0, w.detach())


def test_real_scale_lora_scale_is_k(conv):
    torch.manual_seed(0)
    model = conv.make_unet(quick=True)
    model.requires_grad_(False)
    conv.inject_lora(model, alpha=conv.TASKS["lora_real"]["alpha"])
    scales = {m.scale for m in model.modules() if isinstance(m, conv.LoRALinear)}
    assert scales == {conv.REAL_LORA_K}


@pytest.mark.parametrize("task", ["lora", "full", "lora_real", "full_real"])
def test_runs_and_report(conv, small_data, task, tmp_path):
    data = small_data
    steps = 3
    torch.manual_seed(0)
    base = conv.make_unet(quick=True).state_dict()
    runs = []
    for spec in _kinds():
        if spec["kind"] == "prodigy":
            pytest.importorskip("prodigyopt")
        rec = dict(spec, seeds=[conv.run_one(task, spec, 0, steps, data, base, quick=True)])
        conv.summarize(rec)
        assert rec["seeds"][0]["status"] == "ok"
        assert len(rec["mean_losses"]) == len(conv.task_eval_points(task, steps))
        assert all(math.isfinite(v) for v in rec["mean_losses"])
        assert rec["ms_step"] > 0 and rec["ms_opt"] > 0
        runs.append(rec)
    res = dict(task=task, steps=steps, eval_steps=conv.task_eval_points(task, steps), preset_source="test",
               doc_warmup=1, machine="test", command="test", batch_size=conv.BATCH_SIZE,
               train_images=len(data.ft_y), runs=runs, lora=dict(alpha=conv.TASKS[task]["alpha"]),
               weight_scale=conv.TASKS[task]["weight_scale"])
    (tmp_path / f"convergence_{task}.json").write_text(json.dumps(res))
    conv.write_report(tmp_path, quick=False)
    stem = "convergence_real" if task in conv.REAL_TASKS else "convergence"
    md = (tmp_path / f"{stem}.md").read_text()
    assert "AdamW" in md and "final / best AdamW" in md and "final / Prodigy" in md
    assert (tmp_path / f"{stem}.png").stat().st_size > 0


def test_real_scale_run_list(conv):
    presets, _ = conv.load_presets()
    main = conv.run_specs("lora_real", 2000, presets, "main")
    advice = [s for s in main if s["group"] == "automagic_advice"]
    assert {s["kwargs"]["warmup_steps"] for s in advice} == {1000}
    shipped = [s for s in main if s["group"] == "automagic"]
    assert [s["kwargs"] for s in shipped] == [presets["lora"], presets["high_performance"]]
    adamw = sorted(s["lr"] for s in main if s["kind"] == "adamw")
    assert len(adamw) == 5 and adamw[0] < 1e-4 < 5e-4 < adamw[-1]  # the grid brackets real SD LoRA rates
    fixes = conv.run_specs("lora_real", 2000, presets, "fixes")
    run = [s["kwargs"] for s in fixes if "total_steps" in s["kwargs"]]
    assert run and all(k["total_steps"] == 2000 for k in run)
    for spec in fixes + shipped:  # every config builds, with the run's length and LoRA scale handed over as the trainers do
        opt = conv.build_optimizer(spec, [torch.nn.Parameter(torch.zeros(2, 2))], 2000,
                                   lora_scale=conv.TASKS["lora_real"]["user_lora_scale"])
        assert opt.param_groups[0]["total_steps"] == 2000
        assert opt.param_groups[0]["lora_lr_factor"] == 1.0  # lora_real stands for alpha = rank
