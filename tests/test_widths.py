"""Tickets across widths (issue 32 item 2): partial experiments draw, edges on known values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_summary import CLASSES, _noisy, _run

import plot_results
import plot_widths


def _experiment(exp: Path, width: float, seeds: tuple[int, ...], ratios: tuple[float, ...], prunable: int) -> None:
    """A grid of lr_rewind tickets: as good as dense up to 4x, worse beyond (more so at 16x)."""
    rng = np.random.default_rng(int(width * 100))
    labels = rng.choice(list(CLASSES), 200, p=[0.5, 0.2, 0.2, 0.1])
    rows = []
    for seed in seeds:
        (exp / f"seed{seed}" / "lr_rewind").mkdir(parents=True)
        for folder in ("dense", "lr_rewind"):
            (exp / f"seed{seed}" / folder / "config.json").parent.mkdir(parents=True, exist_ok=True)
            (exp / f"seed{seed}" / folder / "config.json").write_text(
                json.dumps({"flags": {"model": {"width": width, "blocks": 4}}}))
        dense = _noisy(labels, 0.1, rng)
        rows.append(_run(exp, f"seed{seed}/dense", labels, dense, method="lr_rewind", seed=seed, round=0,
                         compression=1.0, remaining=prunable))
        for r, ratio in enumerate(ratios, 1):
            predicted = dense if ratio <= 4 else _noisy(labels, 0.2 if ratio < 16 else 0.6, rng)
            rows.append(_run(exp, f"seed{seed}/lr_rewind/round_{r:02d}", labels, predicted, method="lr_rewind",
                             seed=seed, round=r, compression=ratio, remaining=prunable / ratio))
    table = pd.DataFrame(rows).assign(accepted=True, attempt=0, prunable=prunable, val_accuracy=0.5,
                                      test_accuracy=0.5)
    table.to_csv(exp / "results.csv", index=False)


def test_widths_draw_partial_experiments_and_name_their_seeds(tmp_path: Path) -> None:
    """Width 0.125 has 2 seeds and 4 levels; width 0.25 one seed and 2 levels (a grid still
    running): both draw, each legend entry says n, and the table has both."""
    _experiment(tmp_path / "a", 0.125, (0, 1), (2.0, 4.0, 8.0, 16.0), 10_000)
    _experiment(tmp_path / "b", 0.25, (0,), (2.0, 4.0), 40_000)
    out = tmp_path / "cmp"
    plot_results.main(["--widths", f"{tmp_path / 'a'},{tmp_path / 'b'}", "--out", str(out)])
    assert (out / "widths.png").stat().st_size > 10_000
    text = (out / "widths.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| lr_rewind |")]
    assert rows[0].startswith("| lr_rewind | 0.125 | 10,000 | 2 | 4x (2,500) / 8x (1,250) |")
    assert rows[1].startswith("| lr_rewind | 0.25 | 40,000 | 1 | inside to 4x (10,000), the last level run |")
    assert rows[0].endswith("| 4x (2,500) |") and rows[1].endswith("| 4x (10,000) |")  # largest level inside
    curves = plot_widths.width_rows([tmp_path / "a", tmp_path / "b"], 0.01)
    labels = plot_widths.plot(curves, out)
    assert labels == ["LR rewind (Renda et al.), width 0.125 (n=2 seeds)",
                      "LR rewind (Renda et al.), width 0.25 (n=1 seed)"]
    assert curves[1]["test"]["which"].eq("bootstrap").all()  # one seed: no t interval, the bootstrap stands
    with pytest.raises(SystemExit):
        plot_results.main(["--widths", str(tmp_path / "a")])  # no --out
    # a grid not started yet (no results.csv) is left out, the others draw
    plot_results.main(["--widths", f"{tmp_path / 'a'},{tmp_path / 'none'}", "--out", str(out)])
    assert "width 0.125" in (out / "widths.md").read_text()
    with pytest.raises(SystemExit):
        plot_results.main(["--widths", str(tmp_path / "none"), "--out", str(out)])


def test_edges_on_known_values() -> None:
    points = pd.DataFrame({"compression": [2.0, 4.0, 8.0, 16.0], "remaining": [500.0, 250.0, 125.0, 62.5],
                           "per_seed": [{0: 0.0, 1: 0.0}, {0: 0.0, 1: -0.02}, {0: -0.02, 1: 0.0}, {0: 0.0, 1: 0.0}]})
    assert plot_widths.edge(points, -0.008, pd.Series([True, True, False, True])) == "4x (250) / 8x (125)"
    assert plot_widths.edge(points, -0.008, pd.Series([False] * 4)) == "none / 2x (500)"
    # the curve leaves at 8x and comes back at 16x: the edge stays at 4x, the largest level inside is 16x
    assert plot_widths.largest_inside(points, pd.Series([True, True, False, True])) == "16x (62)"
    assert plot_widths.largest_inside(points, pd.Series([False, True, False, False])) == "4x (250)"
    assert plot_widths.largest_inside(points, pd.Series([False] * 4)) == "none"
    # seed 0 leaves at 8x (edge 4x), seed 1 at 4x (edge 2x); a third seed never inside
    assert plot_widths.seed_edges(points, {0: -0.008, 1: -0.008}) == "2x-4x (500-250 weights), 2 seeds"
    assert plot_widths.seed_edges(points, {0: -0.008, 1: -0.008, 2: -0.008}).startswith("none on 1 of 3 seeds, ")
    assert plot_widths.seed_edges(points, {0: -0.008}) == "4x (250 weights), 1 seed"  # one seed: no range


def test_y_range_holds_the_curves_not_a_one_df_band() -> None:
    """Two seeds' t band (±1.0 here) must not set the axis: the range holds every point, 0 and
    each -1 % bar, padded by 30 % of their span, and nothing more."""
    test = pd.DataFrame({"diff": [0.02, -0.10, np.nan], "low": [-1.0, -1.1, np.nan], "high": [1.0, 0.9, np.nan]})
    curves = [{"test": test, "test_bar": -0.008}, {"test": test.assign(diff=[0.05, 0.0, 0.01]), "test_bar": -0.007}]
    low, high = plot_widths.y_range(curves)
    assert (low, high) == pytest.approx((-0.10 - 0.3 * 0.15, 0.05 + 0.3 * 0.15))
    assert plot_widths.y_range([{"test": test.iloc[2:], "test_bar": 0.0}]) == (-0.05, 0.05)  # nothing to span
