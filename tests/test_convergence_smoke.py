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


@pytest.mark.parametrize("task", ["lora", "full"])
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
        assert len(rec["mean_losses"]) == len(conv.eval_points(steps))
        assert all(math.isfinite(v) for v in rec["mean_losses"])
        assert rec["ms_step"] > 0 and rec["ms_opt"] > 0
        runs.append(rec)
    res = dict(task=task, steps=steps, eval_steps=conv.eval_points(steps), preset_source="test",
               doc_warmup=1, machine="test", command="test", batch_size=conv.BATCH_SIZE,
               train_images=len(data.ft_y), runs=runs)
    (tmp_path / f"convergence_{task}.json").write_text(json.dumps(res))
    conv.write_report(tmp_path, quick=False)
    md = (tmp_path / "convergence.md").read_text()
    assert "AdamW" in md and "final / best AdamW" in md
    assert (tmp_path / "convergence.png").stat().st_size > 0
