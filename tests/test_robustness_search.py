"""benchmarks/robustness.py's AdamW search: the denominator of every cell of the matrix."""
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import robustness as rob  # noqa: E402

UNTRAINED = 0.17


def _landscape(valley_lr: float, diverged: dict):
    """A fake run_cell: a smooth valley in log(lr) below 1e-3, the given values above it (a
    diverged plateau), UNTRAINED for the zero-step run."""
    calls = []

    def run_cell(family, scale, steps, spec, seed, ctx):
        calls.append(spec["lr"])
        if steps == 0:
            return dict(final=UNTRAINED, status="ok", wall_s=0.0)
        lr = spec["lr"]
        key = float(f"{lr:.3g}")
        if key in diverged:
            return dict(final=diverged[key], status="ok", wall_s=0.0)
        return dict(final=0.15 + 0.01 * math.log10(lr / valley_lr) ** 2, status="ok", wall_s=0.0)

    return run_cell, calls


def _search(monkeypatch, tmp_path, run_cell):
    monkeypatch.setattr(rob, "run_cell", run_cell)
    monkeypatch.setattr(rob.conv, "log", lambda msg: None)
    store = rob.Store(tmp_path / "robustness.json")
    best = rob.adamw_search(store, ("digits", "cal alpha=16xrank", 600), 1, ctx=None)
    return best, store


def test_a_search_that_starts_on_a_diverged_plateau_still_finds_the_valley(monkeypatch, tmp_path):
    """The matrix's seed-1 searches of the calibrated alpha = 16 x rank digits cells started at
    3e-3 on a non-monotone diverged plateau (1.03, 1.04, then 0.91 at 3e-2, then inf) and
    stopped there, reporting 0.91 as tuned AdamW (the presets' ratio read 0.55)."""
    run_cell, _ = _landscape(3e-5, {3e-3: 1.0305, 9.49e-3: 1.0366, 3e-2: 0.9062, 9.49e-2: math.inf,
                                    3e-1: math.inf, 9.49e-4: 0.93, 3e-4: 0.19})
    best, store = _search(monkeypatch, tmp_path, run_cell)
    assert best == pytest.approx(0.15)  # the valley's floor, at 3e-5
    tried = sorted(float(n.split("=")[1]) for n in store.data["runs"]["digits|cal alpha=16xrank|600"])
    assert 3e-5 in tried and min(tried) < 3e-5  # bracketed below as well
    assert store.data["untrained"]["digits|cal alpha=16xrank|600"]["1"] == UNTRAINED


def test_a_search_that_starts_in_the_valley_tries_what_it_did_before(monkeypatch, tmp_path):
    """Where the start learns something, the walk is the bracket walk alone: the cached points
    of the committed matrix stay its points."""
    run_cell, calls = _landscape(3e-3, {})
    best, _ = _search(monkeypatch, tmp_path, run_cell)
    assert best == pytest.approx(0.15)
    # start, two up, two down (and the one zero-step evaluation)
    assert sorted(lr for lr in calls if lr) == pytest.approx(sorted([3e-3, 9.49e-3, 3e-2, 9.49e-4, 3e-4]), rel=1e-3)
