#!/usr/bin/env python
"""Noise floor of a paired comparison: how far a benchmark cell's final loss moves under a change
that should not matter.

A candidate preset is judged by comparing its final loss with the shipped preset's on the same
seed (same initial weights, same data order). Two such runs still differ by more than the
candidate's effect: training is chaotic, and any perturbation, however small, sends the run down
another trajectory. This script measures that spread directly: it runs a preset with its learning
rate multiplied by 1 +- 1e-5 and 1 + 1e-4 (a change with no systematic effect on the result) next
to the exact preset. A difference between two candidates smaller than this spread is not evidence.

``--preset adamw`` does the same for the matrix's denominator: AdamW at the best lr of the cell's
grid for that seed (matrix cells only). Where those runs spread too, the grid's best is a minimum
over noisy values and sits below what AdamW at that lr gives on average.

Cells: a robustness-matrix cell ``family|scale|steps`` (benchmarks/robustness.py; reported as final
loss / best AdamW of that cell and seed from the matrix's JSON) or a convergence task
``lora_real:STEPS`` / ``full_real:STEPS`` (benchmarks/convergence.py; reported as final loss).

Usage::

    python benchmarks/noise_floor.py --preset high_performance --cells "charlm|cal alpha=1|2000" lora_real:500
    python benchmarks/noise_floor.py --preset adamw --cells "charlm|cal alpha=1|2000" --seeds 0 1
    python benchmarks/noise_floor.py --report-only

Outputs in ``--out`` (default benchmarks/results/robustness): ``noise_floor.json`` (cached per
cell, preset, seed and perturbation, with the preset's settings: a changed preset is run again)
and ``noise_floor.md``.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from benchmarks import convergence as conv  # noqa: E402
from benchmarks import robustness as rob  # noqa: E402

# Relative lr perturbations: 0 is the preset itself.
PERTURBATIONS = (0.0, 1e-5, -1e-5, 1e-4)


def perturbed_spec(preset_kwargs: dict, rel: float) -> dict:
    kwargs = dict(preset_kwargs)
    kwargs["lr"] = kwargs["lr"] * (1.0 + rel)
    return dict(name=f"lr x (1{rel:+g})", kind="automagic", kwargs=kwargs)


def best_adamw_lr(cell: str, seed: int, matrix: "rob.Store") -> float:
    """The lr of the matrix's best AdamW run in ``cell`` for ``seed`` (its denominator)."""
    rows = matrix.data["runs"].get(cell, {})
    finals = {name: by_seed[str(seed)]["final"] for name, by_seed in rows.items()
              if name.startswith("AdamW lr=") and str(seed) in by_seed}
    if not finals:
        raise SystemExit(f"--preset adamw: the matrix has no AdamW search for {cell!r}, seed {seed} "
                         "(run benchmarks/robustness.py first)")
    return float(min(finals, key=finals.get).split("lr=", 1)[1])


def perturbed_adamw_spec(lr: float, rel: float) -> dict:
    return dict(name=f"AdamW lr x (1{rel:+g})", kind="adamw", lr=lr * (1.0 + rel))


@functools.lru_cache(maxsize=1)
def _convergence_data(cache: Path) -> tuple:
    """The convergence benchmark's data and pretrained base, loaded once for every run."""
    data = conv.Data()
    return data, conv.get_base_state(data, cache, False)


def run_perturbed(cell: str, spec: dict, seed: int, cache: Path) -> float:
    """Final held-out loss of ``spec`` in ``cell`` (a matrix cell or TASK:STEPS)."""
    if ":" in cell:
        task, steps = cell.split(":")
        data, base = _convergence_data(cache)
        return conv.run_one(task, spec, seed, int(steps), data, base, False)["losses"][-1]
    family, scale, steps = cell.split("|")
    return rob.run_cell(family, scale, int(steps), spec, seed, rob.Context(cache))["final"]


def reference(cell: str, seed: int, matrix: rob.Store) -> float | None:
    """The best AdamW final loss of a matrix cell and seed (the matrix's denominator), else None."""
    rows = matrix.data["runs"].get(cell, {})
    best = [by_seed[str(seed)]["final"] for name, by_seed in rows.items()
            if name.startswith("AdamW") and str(seed) in by_seed]
    return min(best) if best else None


def spread(values: dict) -> tuple[float, float]:
    """(largest - smallest) and largest |value - the unperturbed value|, relative to the
    unperturbed value: the noise floor of a paired difference in this cell."""
    exact = values["0"]
    vals = list(values.values())
    return (max(vals) - min(vals)) / exact, max(abs(v - exact) for v in vals) / exact


def render_markdown(store: dict, matrix: rob.Store) -> str:
    lines = ["# Noise floor of paired comparisons", "",
             "The final loss of a preset with its lr multiplied by 1 + each perturbation (same seed), and "
             "their mean. Matrix cells: final loss / best AdamW of the cell and seed; `TASK:STEPS`: final loss. "
             f"Command: `python benchmarks/noise_floor.py` (see its docstring). Machine: {store.get('machine', '?')}.",
             "", "| cell | preset | seed | " + " | ".join(f"{p:+g}" for p in PERTURBATIONS)
             + " | mean | range | largest move |", "|---|---|---:|" + "---:|" * (len(PERTURBATIONS) + 3)]
    for cell, presets in store["runs"].items():
        for preset, seeds in presets.items():
            for seed, values in seeds.items():
                if not all(f"{p:g}" in values for p in PERTURBATIONS):
                    continue
                ref = reference(cell, int(seed), matrix) if ":" not in cell else None
                shown = [values[f"{p:g}"] / ref if ref else values[f"{p:g}"] for p in PERTURBATIONS]
                width, move = spread({k: values[k] for k in (f"{p:g}" for p in PERTURBATIONS)})
                label = f"AdamW, the grid's best lr {values['lr']:g}" if preset == "adamw" else preset
                lines.append(f"| {cell.replace('|', ' ')} | {label} | {seed} | " + " | ".join(f"{v:.4f}" for v in shown)
                             + f" | {sum(shown) / len(shown):.4f} | {width:.2%} | {move:.2%} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="high_performance", choices=("lora", "high_performance", "full", "adamw"),
                    help="a preset, or adamw: AdamW at the best lr of the matrix's grid for the cell and seed")
    ap.add_argument("--cells", nargs="+", default=[],
                    help='matrix cells "family|scale|steps" or convergence tasks "lora_real:STEPS"')
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--out", default=str(rob.OUT_DEFAULT))
    ap.add_argument("--cache", default=str(REPO_ROOT / "benchmarks" / "results"),
                    help="where the pretrained base models are cached")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    for cell in args.cells:
        if ":" in cell:
            task, _, steps = cell.partition(":")
            if task not in ("lora_real", "full_real") or not steps.isdigit():
                ap.error(f"--cells {cell!r}: a convergence task is lora_real:STEPS or full_real:STEPS")
        elif cell.count("|") != 2 or cell.rsplit("|", 1)[1] not in {str(n) for ls in rob.LENGTHS.values() for n in ls}:
            ap.error(f"--cells {cell!r}: a matrix cell is family|scale|steps, e.g. 'charlm|cal alpha=1|2000'")
        if args.preset == "adamw" and ":" in cell:
            ap.error(f"--cells {cell!r}: --preset adamw takes matrix cells (the best lr of their AdamW grid)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.out)
    path = out / "noise_floor.json"
    store = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    presets, _ = conv.load_presets()
    matrix = rob.Store(out / "robustness.json")
    if args.cells:
        store["machine"] = conv.machine_desc()
    if args.cells and args.preset != "adamw":
        if store.setdefault("presets", {}).get(args.preset) != presets[args.preset]:
            # measured with other settings (the preset changed since): those runs are not this preset's
            for rows in store["runs"].values():
                rows.pop(args.preset, None)
            store["presets"][args.preset] = presets[args.preset]
    for cell in args.cells:
        for seed in args.seeds:
            values = store["runs"].setdefault(cell, {}).setdefault(args.preset, {}).setdefault(str(seed), {})
            if args.preset == "adamw":
                lr = best_adamw_lr(cell, seed, matrix)
                if values.get("lr") != lr:  # the search found another best since: measure it again
                    values.clear()
                    values["lr"] = lr
            for rel in PERTURBATIONS:
                if f"{rel:g}" in values:
                    continue
                spec = (perturbed_adamw_spec(values["lr"], rel) if args.preset == "adamw"
                        else perturbed_spec(presets[args.preset], rel))
                values[f"{rel:g}"] = run_perturbed(cell, spec, seed, Path(args.cache))
                conv.log(f"{cell} {args.preset} seed {seed} lr x (1{rel:+g}): {values[f'{rel:g}']:.5f}")
                out.mkdir(parents=True, exist_ok=True)
                conv.atomic_write_text(path, json.dumps(store, indent=1, sort_keys=True))
    conv.atomic_write_text(out / "noise_floor.md", render_markdown(store, matrix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
