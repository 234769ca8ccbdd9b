"""AF operating points (issue 33 item 6): thresholds on known values, old predictions.csv
without probabilities, the shipped ticket's threshold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import operating_point as op
import plot_results
import train as tr

IS_AF = np.array([1, 1, 1, 0, 0, 0, 1, 0], dtype=bool)
SCORES = np.array([0.9, 0.8, 0.7, 0.65, 0.6, 0.5, 0.4, 0.1])
# flagged from the top: PPV 1, 1, 1, 3/4, 3/5, 3/6, 4/7, 4/8; sensitivity 1/4, 2/4, 3/4, ..., 4/4 at 0.4
LOWER = np.array([0.8, 0.75, 0.6, 0.55, 0.5, 0.4, 0.3, 0.0])  # test scores: at 0.7 the first two AF flagged


def test_thresholds_on_known_values() -> None:
    assert op.threshold_at_ppv(IS_AF, SCORES, 0.9) == 0.7  # the lowest with PPV >= 0.9: sensitivity 0.75
    assert op.sensitivity_ppv(IS_AF, SCORES, 0.7) == (0.75, 1.0)
    assert op.threshold_at_ppv(IS_AF, SCORES, 0.55) == 0.4  # PPV is not monotone: 4/7 at 0.4 passes again
    assert op.threshold_at_ppv(IS_AF, SCORES, 1.01) is None
    assert op.threshold_at_sensitivity(IS_AF, SCORES, 1.0) == 0.4
    assert op.threshold_at_sensitivity(IS_AF, SCORES, 0.5) == 0.8
    assert op.threshold_at_sensitivity(np.zeros(3, bool), SCORES[:3], 0.5) is None
    with pytest.raises(ValueError, match="target"):
        op.choose(IS_AF, SCORES, "f1", 0.5)


def _run(folder: Path, val: np.ndarray, test: np.ndarray, probabilities: bool = True) -> Path:
    """A run whose validation and test records are the 8 above; P(AF) = ``val`` / ``test``."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for split, scores in (("val", val), ("test", test)):
        part = pd.DataFrame({"record": [f"R{i}" for i in range(8)], "split": split,
                             "label": np.where(IS_AF, "A", "N"), "predicted": np.where(scores > 0.5, "A", "N")})
        if probabilities:
            part = part.assign(p_N=1 - scores, p_A=scores, p_O=0.0, **{"p_~": 0.0})
        parts.append(part)
    pd.concat(parts).to_csv(folder / tr.PREDICTIONS, index=False)
    return folder


def test_the_threshold_is_chosen_on_validation_and_read_on_test(tmp_path: Path) -> None:
    """Validation as above: PPV >= 0.9 picks 0.7. Test scores lower: at 0.7 only the first
    two AF records are flagged (sensitivity 0.5, PPV 1)."""
    run = _run(tmp_path / "r", SCORES, LOWER)
    d = op.operating_point([run], "ppv", 0.9)
    assert d["thresholds"] == [0.7] and d["sensitivity"]["mean"] == 0.5 and d["ppv"]["mean"] == 1.0
    assert d["sensitivity"]["low"] <= 0.5 <= d["sensitivity"]["high"]
    shipped = op.shipped_threshold(run)
    assert shipped["threshold"] == 0.7 and shipped["chosen_on"] == "val"
    assert (shipped["val_sensitivity"], shipped["val_ppv"]) == (0.75, 1.0)
    assert shipped["test_sensitivity"]["mean"] == 0.5
    assert op.shipped_threshold(run, "ppv", 1.01)["threshold"] is None  # never reached on validation
    # two seeds: the mean of their test figures
    other = _run(tmp_path / "s", SCORES, SCORES)
    two = op.operating_point([run, other], "ppv", 0.9)
    assert two["sensitivity"]["mean"] == pytest.approx((0.5 + 0.75) / 2)


def test_runs_without_probabilities_are_reported_as_such(tmp_path: Path) -> None:
    old = _run(tmp_path / "old", SCORES, SCORES, probabilities=False)
    assert op.read_scores(old, "val") is None and op.shipped_threshold(old) is None
    assert op.operating_point([old, _run(tmp_path / "new", SCORES, SCORES)], "ppv", 0.9) is None
    assert op.text(None) == "no probabilities"
    damaged = _run(tmp_path / "bad", SCORES, SCORES + 0.5)  # P > 1
    with pytest.raises(SystemExit, match="p_A"):
        op.read_scores(damaged, "test")


def test_summary_has_operating_points_only_where_probabilities_exist(tmp_path: Path) -> None:
    rows = []
    for seed in (0, 1):
        rows.append({"folder": str(_run(tmp_path / f"seed{seed}/dense", SCORES, SCORES).relative_to(tmp_path)),
                     "method": "lr_rewind", "control": "none", "seed": seed, "round": 0, "compression": 1.0})
        rows.append({"folder": str(_run(tmp_path / f"seed{seed}/lr_rewind/round_01", SCORES, LOWER)
                                   .relative_to(tmp_path)),
                     "method": "lr_rewind", "control": "none", "seed": seed, "round": 1, "compression": 2.0})
    table = pd.DataFrame(rows)
    lines = plot_results.af_operating_table(tmp_path, table)
    assert lines[0].startswith("| compression | method | seeds | test at PPV >= 0.90")
    dense = next(line for line in lines if "| dense |" in line)
    assert "sens. 0.75 (" in dense and "PPV 1.00 (" in dense
    assert "sens. 0.50 (" in next(line for line in lines if line.startswith("| 2.0x"))
    for seed in (0, 1):  # runs made before probabilities: no table
        _run(tmp_path / f"seed{seed}/lr_rewind/round_01", SCORES, SCORES, probabilities=False)
        _run(tmp_path / f"seed{seed}/dense", SCORES, SCORES, probabilities=False)
    assert plot_results.af_operating_table(tmp_path, table) == []
