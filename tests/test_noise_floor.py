"""benchmarks/noise_floor.py: the report's arithmetic and its argument checks (no training)."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import noise_floor as nf  # noqa: E402
from benchmarks import robustness as rob  # noqa: E402


def test_spread_is_relative_to_the_unperturbed_run():
    width, move = nf.spread({"0": 2.0, "1e-05": 2.02, "-1e-05": 1.99, "0.0001": 2.0})
    assert width == pytest.approx(0.03 / 2.0)
    assert move == pytest.approx(0.02 / 2.0)


def test_perturbed_spec_moves_only_the_lr():
    preset = {"lr": 5e-5, "warmup_steps": 0.65}
    spec = nf.perturbed_spec(preset, 1e-5)
    assert spec["kwargs"] == {"lr": 5e-5 * (1 + 1e-5), "warmup_steps": 0.65}
    assert preset["lr"] == 5e-5  # the preset itself is not modified


def test_report_divides_a_matrix_cell_by_its_own_seeds_best_adamw(tmp_path):
    cell = "charlm|cal alpha=1|2000"
    matrix = {"runs": {cell: {"AdamW lr=0.003": {"0": {"final": 2.5}, "1": {"final": 1.0}},
                              "AdamW lr=0.0003": {"0": {"final": 2.0}}}}}
    (tmp_path / "robustness.json").write_text(json.dumps(matrix))
    values = {"0": 2.04, "1e-05": 2.02, "-1e-05": 2.06, "0.0001": 2.04}
    store = {"runs": {cell: {"high_performance": {"0": values}},
                      "lora_real:500": {"lora": {"0": {"0": 0.1137, "1e-05": 0.1139, "-1e-05": 0.1136,
                                                       "0.0001": 0.1137}}}}}
    text = nf.render_markdown(store, rob.Store(tmp_path / "robustness.json"))
    matrix_row = next(line for line in text.splitlines() if line.startswith("| charlm cal alpha=1 2000 |"))
    # seed 0's best AdamW is 2.0 (not seed 1's 1.0): the ratios are 1.02 / 1.01 / 1.03 / 1.02
    assert "| 1.0200 | 1.0100 | 1.0300 | 1.0200 | 1.0200 | 1.96% | 0.98% |" in matrix_row
    real_row = next(line for line in text.splitlines() if line.startswith("| lora_real:500 "))
    assert "| 0.1137 | 0.1139 | 0.1136 | 0.1137 | 0.1137 |" in real_row  # a convergence task: the loss itself


@pytest.mark.parametrize("cell", ["charlm|alpha=1", "charlm|alpha=1|123", "lora_real", "lora_real:5x", "toy:500"])
def test_a_malformed_cell_is_refused_before_anything_runs(cell, capsys):
    with pytest.raises(SystemExit):
        nf.parse_args(["--cells", cell])
    assert "--cells" in capsys.readouterr().err


def test_adamw_is_run_at_its_own_seeds_best_grid_lr(tmp_path):
    """--preset adamw measures the matrix's denominator: AdamW at the lr that won the cell's grid for
    that seed (not another seed's), with only the lr perturbed."""
    cell = "charlm|cal alpha=1|2000"
    matrix = {"runs": {cell: {"AdamW lr=0.003": {"0": {"final": 2.5}, "1": {"final": 1.0}},
                              "AdamW lr=0.000949": {"0": {"final": 2.0}, "1": {"final": 1.5}},
                              "Prodigy": {"0": {"final": 1.0}}}}}
    (tmp_path / "robustness.json").write_text(json.dumps(matrix))
    store = rob.Store(tmp_path / "robustness.json")
    assert nf.best_adamw_lr(cell, 0, store) == 0.000949
    assert nf.best_adamw_lr(cell, 1, store) == 0.003
    spec = nf.perturbed_adamw_spec(0.003, -1e-5)
    assert spec["kind"] == "adamw" and spec["lr"] == pytest.approx(0.003 * (1 - 1e-5))
    with pytest.raises(SystemExit, match="no AdamW search"):
        nf.best_adamw_lr("digits|alpha=1|200", 0, store)


def test_adamw_takes_matrix_cells_only(capsys):
    with pytest.raises(SystemExit):
        nf.parse_args(["--preset", "adamw", "--cells", "lora_real:500"])
    assert "matrix cells" in capsys.readouterr().err
