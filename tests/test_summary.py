"""The statistics of summary.md: paired intervals against dense, against the budget-matched
dense baseline and between methods, the interval rule for winning tickets, AF sensitivity
and PPV, and where the dense_equal_steps baseline is placed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import plot_results
import train as tr
from metrics import classification_metrics

CLASSES = "NAO~"


def _run(exp: Path, folder: str, labels: np.ndarray, predicted: np.ndarray, **row: object) -> dict:
    """One run: predictions.csv with the same predictions on val and test, and its row."""
    (exp / folder).mkdir(parents=True, exist_ok=True)
    names = [f"R{i:03d}" for i in range(len(labels))]
    pd.concat([pd.DataFrame({"record": names, "split": split, "label": labels, "predicted": predicted})
               for split in ("val", "test")]).to_csv(exp / folder / tr.PREDICTIONS, index=False)
    f1 = classification_metrics(pd.Series(labels).map(CLASSES.index).to_numpy(),
                                pd.Series(predicted).map(CLASSES.index).to_numpy())["challenge_f1"]
    return {"folder": folder, "control": "none", "val_challenge_f1": f1, "test_challenge_f1": f1, **row}


def _noisy(labels: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    return np.where(rng.random(len(labels)) < share, rng.choice(list(CLASSES), len(labels)), labels)


@pytest.fixture
def experiment(tmp_path: Path) -> pd.DataFrame:
    """2 seeds; dense right on 90 % of the records. lr_rewind: 2x as good as dense (the
    same predictions), 4x much worse, 8x as good again. finetune: 2x worse. The baseline:
    the dense predictions at rounds 1-2."""
    rng = np.random.default_rng(0)
    labels = rng.choice(list(CLASSES), 200, p=[0.5, 0.2, 0.2, 0.1])
    rows = []
    for seed in (0, 1):
        dense = _noisy(labels, 0.1, rng)
        for method in ("lr_rewind", "finetune", "dense_equal_steps"):
            rows.append(_run(tmp_path, f"seed{seed}/dense", labels, dense, method=method, seed=seed, round=0,
                             compression=1.0))
        for r, ratio, predicted in ((1, 2.0, dense), (2, 4.0, _noisy(labels, 0.6, rng)), (3, 8.0, dense)):
            rows.append(_run(tmp_path, f"seed{seed}/lr_rewind/round_{r:02d}", labels, predicted,
                             method="lr_rewind", seed=seed, round=r, compression=ratio))
        rows.append(_run(tmp_path, f"seed{seed}/finetune/round_01", labels, _noisy(labels, 0.5, rng),
                         method="finetune", seed=seed, round=1, compression=2.0))
        for r in (1, 2):
            rows.append(_run(tmp_path, f"seed{seed}/dense_equal_steps/round_{r:02d}", labels, dense,
                             method="dense_equal_steps", seed=seed, round=r, compression=1.0))
    table = pd.DataFrame(rows).assign(accepted=True)
    return plot_results.place_baselines(table)


def _lv(ratio: float) -> float:
    return plot_results.level(pd.Series([ratio]))[0]


def _cell(line: str, column: int) -> str:
    return line.split("|")[column + 1].strip()


def _interval(text: str) -> tuple[float, float]:
    low, high = text.split("(")[1].split(")")[0].split(";")[0].split(",")[0].split(" to ")
    return float(low), float(high)


def test_baseline_rounds_sit_at_lr_rewinds_level_of_the_same_round(experiment: pd.DataFrame) -> None:
    base = experiment[experiment["method"] == "dense_equal_steps"].sort_values(["seed", "round"])
    assert base["compression"].tolist() == [1.0, 2.0, 4.0] * 2
    # a baseline round with no lr_rewind round of that number is left out
    extra = experiment.iloc[[0]].assign(method="dense_equal_steps", round=9)
    assert 9 not in plot_results.place_baselines(pd.concat([experiment, extra]))["round"].tolist()


def test_paired_difference_against_dense(tmp_path: Path, experiment: pd.DataFrame) -> None:
    dense = plot_results.dense_rows(experiment)
    same = plot_results.paired(tmp_path, "test", plot_results.level_rows(experiment, "lr_rewind", _lv(2.0)), dense)
    assert {k: v for k, v in same.items() if k != "diffs"} == {
        "seeds": 2, "seed_list": [0, 1], "diff": 0.0, "low": 0.0, "high": 0.0, "t_low": 0.0, "t_high": 0.0,
        "min": 0.0, "max": 0.0, "mine": same["theirs"], "theirs": pytest.approx(dense["test_challenge_f1"].mean())}
    worse = plot_results.paired(tmp_path, "test", plot_results.level_rows(experiment, "lr_rewind", _lv(4.0)),
                                dense)
    assert worse["high"] < 0 and worse["low"] < worse["diff"] < worse["high"]
    assert worse["min"] <= worse["diff"] <= worse["max"]
    lines = plot_results.versus_dense_table(tmp_path, experiment)
    assert lines[0] == ("| compression | finetune - dense | lr_rewind - dense | dense_equal_steps - dense | "
                        "finetune - dense, equal steps | lr_rewind - dense, equal steps |")
    two = next(line for line in lines if line.startswith("| 2.0x"))
    assert _cell(two, 2).startswith("+0.000 (+0.000 to +0.000; t, 1 df +0.000 to +0.000)")  # lr_rewind 2x = dense
    assert _cell(two, 3).startswith("+0.000 (+0.000 to +0.000; t, 1 df +0.000 to +0.000)")  # baseline = dense here
    assert _cell(two, 5).startswith("+0.000 (+0.000 to +0.000; t, 1 df +0.000 to +0.000)")
    assert _interval(_cell(two, 1))[1] < 0  # finetune is worse
    eight = next(line for line in lines if line.startswith("| 8.0x"))
    assert _cell(eight, 2).startswith("+0.000") and _cell(eight, 5) == ""  # no baseline at 8x


def test_methods_table_pairs_methods_level_by_level(tmp_path: Path, experiment: pd.DataFrame) -> None:
    lines = plot_results.methods_table(tmp_path, experiment)
    assert lines[0] == "| compression | finetune - lr_rewind |"
    two = next(line for line in lines if line.startswith("| 2.0x"))
    assert _interval(_cell(two, 1))[1] < 0
    assert _cell(next(line for line in lines if line.startswith("| 4.0x")), 1) == ""  # finetune never got there


def test_a_difference_over_fewer_seeds_than_the_experiment_says_so(tmp_path: Path,
                                                                    experiment: pd.DataFrame) -> None:
    """A grid still running: seed 1's finetune not there yet; its differences say they are
    over 1 of 2 seeds, the complete ones say nothing."""
    fewer = experiment[~((experiment["method"] == "finetune") & (experiment["seed"] == 1))]
    two = next(line for line in plot_results.versus_dense_table(tmp_path, fewer) if line.startswith("| 2.0x"))
    assert _cell(two, 1).endswith(", 1 of 2 seeds") and "seeds" not in _cell(two, 1)[:-len(", 1 of 2 seeds")]
    assert _cell(two, 2).endswith(", seeds +0.000..+0.000")  # lr_rewind: both seeds
    two = next(line for line in plot_results.methods_table(tmp_path, fewer) if line.startswith("| 2.0x"))
    assert _cell(two, 1).endswith(", 1 of 2 seeds")


def test_a_curve_over_fewer_seeds_says_so_in_the_legend(experiment: pd.DataFrame) -> None:
    fewer = experiment[~((experiment["method"] == "finetune") & (experiment["seed"] == 1))]
    curves = {m: c for (m, _), c in plot_results.curves(fewer, "test_challenge_f1").groupby(["method", "control"])}
    assert plot_results.curve_label("finetune", "", curves["finetune"], 2).endswith(" (1 of 2 seeds)")
    assert "seeds" not in plot_results.curve_label("lr_rewind", "", curves["lr_rewind"], 2)


def test_interval_rule_stops_at_the_first_level_that_fails(tmp_path: Path, experiment: pd.DataFrame) -> None:
    """lr_rewind holds at 2x, fails at 4x: its interval winner is 2x although 8x holds again;
    finetune fails at its first level."""
    lines = plot_results.interval_winners(tmp_path, experiment, tolerance=0.01)
    rows = {_cell(line, 0): line for line in lines[2:]}
    assert _cell(rows["lr_rewind"], 2).startswith("2.0x")
    assert _cell(rows["lr_rewind"], 3) == "+0.000 (+0.000 to +0.000, bootstrap), n = 2 seeds"
    assert _cell(rows["finetune"], 2).startswith("none")
    assert "dense_equal_steps" not in rows  # a baseline is no ticket


def test_af_sensitivity_and_ppv_match_a_plain_count() -> None:
    labels = np.array([1, 1, 1, 1, 0, 0, 2, 3])  # A = index 1
    predicted = np.array([1, 1, 1, 0, 1, 0, 2, 1])
    metrics = {s: classification_metrics(labels, predicted) for s in ("val", "test")}
    metrics.update(epochs_run=1, steps=1, train_seconds=0.0)
    row = tr.row_for(Path("x"), 0, "lr_rewind", "none", 1, 0, 0.5, {"w": torch.ones(4, dtype=torch.bool)},
                     metrics, True, 10, flops=123)
    assert row["test_sensitivity_A"] == pytest.approx(3 / 4) and row["test_ppv_A"] == pytest.approx(3 / 5)
    table = pd.DataFrame([{**row, "round": r, "compression": c, "seed": 0} for r, c in ((0, 1.0), (1, 2.0))])
    lines = plot_results.af_table(table)
    assert lines[0] == "| compression | lr_rewind |"
    assert lines[3].endswith("| 0.75 / 0.60 |")


@pytest.fixture
def goal_experiment(tmp_path: Path) -> Path:
    """LTH-ECG's schedule (--goal) on 2 seeds: seed 0 has round 2 rejected, then accepted
    at a smaller rate (1.9x, the dense predictions); seed 1 has round 2 rejected twice and
    stops at round 1 (1.43x). Every accepted ticket predicts as its dense network does."""
    rng = np.random.default_rng(1)
    labels = rng.choice(list(CLASSES), 200, p=[0.5, 0.2, 0.2, 0.1])
    rows = []
    for seed, tries in ((0, [(2, 0, 0.3, 2.04, False), (2, 1, 0.27, 1.9, True)]),
                        (1, [(2, 0, 0.3, 2.04, False), (2, 1, 0.27, 1.9, False)])):
        dense = _noisy(labels, 0.1, rng)
        rows.append(_run(tmp_path, f"seed{seed}/dense", labels, dense, method="weight_rewind", seed=seed, round=0,
                         attempt=0, fraction=0.0, compression=1.0, accepted=True))
        rows.append(_run(tmp_path, f"seed{seed}/weight_rewind/round_01", labels, dense, method="weight_rewind",
                         seed=seed, round=1, attempt=0, fraction=0.3, compression=1 / 0.7, accepted=True))
        for r, attempt, fraction, ratio, ok in tries:
            folder = f"seed{seed}/weight_rewind/round_{r:02d}" + (f"_try{attempt}" if attempt else "")
            rows.append(_run(tmp_path, folder, labels, dense if ok else _noisy(labels, 0.6, rng),
                             method="weight_rewind", seed=seed, round=r, attempt=attempt, fraction=fraction,
                             compression=ratio, accepted=ok))
    table = pd.DataFrame(rows)
    table = table.assign(prunable=1000, remaining=(1000 / table["compression"]).round(),
                         test_accuracy=0.9, val_accuracy=0.9)
    table.assign(nonzero_parameters=table["remaining"] + 10).to_csv(tmp_path / "results.csv", index=False)
    return tmp_path


def test_goal_table_reads_each_seeds_last_accepted_ticket(goal_experiment: Path) -> None:
    everything, table = plot_results.load_all(goal_experiment), plot_results.load(goal_experiment)
    assert plot_results.goal_methods(everything) == {"weight_rewind"}
    lines = plot_results.goal_table(goal_experiment, everything, table)
    rows = {_cell(line, 1): line for line in lines[2:]}
    assert _cell(rows["0"], 2) == "3 (1)" and _cell(rows["0"], 3) == "accepted"
    assert _cell(rows["0"], 4).startswith("1.9x")
    assert _cell(rows["1"], 2) == "3 (2)" and _cell(rows["1"], 3) == "rejected (p = 0.270)"
    assert _cell(rows["1"], 4).startswith("1.4x")  # seed 1 stopped at its round 1
    for seed in ("0", "1"):  # each final ticket predicts exactly as its dense network
        assert _cell(rows[seed], 7) == "+0.000 (+0.000 to +0.000)"
    both = rows["all 2"]
    assert _cell(both, 4).startswith(f"{np.sqrt(1.9 / 0.7):.1f}x geometric mean (1.4-1.9x)")
    assert _cell(both, 7).startswith("+0.000 (+0.000 to +0.000; t, 1 df +0.000 to +0.000)")
    text = plot_results.summary(table, plot_results.winners(table, 0.01), 0.01, goal_experiment)
    assert "Over-pruning guard" in text


def test_a_grid_without_rejected_tries_has_no_goal_table(tmp_path: Path, experiment: pd.DataFrame) -> None:
    assert plot_results.goal_methods(experiment) == set()
    assert plot_results.goal_table(tmp_path, experiment, experiment) == []


def test_goal_chains_are_drawn_seed_by_seed(goal_experiment: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Seeds that stop at different levels get a line each, through their own accepted
    tickets, not a mean that jumps between seeds."""
    figures = []
    monkeypatch.setattr(plot_results.plt, "close", figures.append)
    table = plot_results.load(goal_experiment)
    plot_results.plot_compression(table, "test", goal_experiment, per_seed={"weight_rewind"})
    lines = [ln for ln in figures[0].axes[0].lines if ln.get_color() == plot_results.COLORS["weight_rewind"]]
    assert [list(np.round(ln.get_xdata(), 2)) for ln in lines] == [[1.0, 1.43, 1.9], [1.0, 1.43]]
    assert lines[0].get_label().endswith(", each seed") and lines[1].get_label().startswith("_")


def test_round_ticks_label_a_log_axis_at_one_two_five() -> None:
    """A FLOPs axis of 23 M to 830 M gets 20M ... 1G (each within a factor 1.5 of the data),
    no minor labels; weight counts read in k."""
    fig, ax = plot_results.plt.subplots()
    ax.set_xscale("log")
    plot_results.round_ticks(ax, 2.3e7, 8.3e8)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["20M", "50M", "100M", "200M", "500M", "1G"]
    assert not ax.xaxis.get_minor_ticks() or not any(t.label1.get_visible() for t in ax.xaxis.get_minor_ticks())
    plot_results.round_ticks(ax, 4_603, 20_428)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["5k", "10k", "20k"]
    plot_results.plt.close(fig)


# ---------------------------------------------------------------- intervals over seeds, Holm (issue 32 item 4)


def test_t_interval_matches_a_hand_computed_one() -> None:
    """diffs 0.01, 0.03, 0.05: mean 0.03, sd 0.02, se 0.02 / sqrt 3 = 0.011547; t(0.975, 2 df)
    = 4.302653 (tables), half-width 0.049683."""
    low, high = plot_results.t_interval([0.01, 0.03, 0.05])
    assert low == pytest.approx(0.03 - 0.049683, abs=1e-6) and high == pytest.approx(0.03 + 0.049683, abs=1e-6)
    assert plot_results.t_interval([0.02]) is None  # one seed: no interval over seeds
    # "loses 0.01 or more": t = (0.03 + 0.01) / 0.011547 = 3.4641; with 2 df the tail is
    # 0.5 (1 - t / sqrt(t^2 + 2)) = 0.037090
    assert plot_results.noninferiority_p([0.01, 0.03, 0.05], 0.01) == pytest.approx(0.037090, abs=1e-5)
    assert np.isnan(plot_results.noninferiority_p([0.01], 0.01))


def test_holm_on_known_p_values() -> None:
    """p = 0.01, 0.04, 0.03, 0.005: sorted 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06,
    0.04 x 1 = 0.04 -> 0.06 (monotone); nan stays out of the family (m = 4, not 5)."""
    adjusted = plot_results.holm([0.01, 0.04, np.nan, 0.03, 0.005])
    assert adjusted[[0, 1, 3, 4]] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert np.isnan(adjusted[2])
    assert plot_results.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_a_verdict_reads_the_wider_interval_and_names_the_seeds() -> None:
    d = {"diff": 0.03, "low": 0.0, "high": 0.05, "t_low": -0.02, "t_high": 0.08, "seeds": 3}
    assert plot_results.wider(d) == (-0.02, 0.08, "t")
    assert plot_results.verdict_text(d) == "+0.030 (-0.020 to +0.080, t), n = 3 seeds"
    narrow_t = {**d, "t_low": 0.01, "t_high": 0.04}
    assert plot_results.verdict_text(narrow_t) == "+0.030 (+0.000 to +0.050, bootstrap), n = 3 seeds"
    one = {**d, "t_low": np.nan, "t_high": np.nan, "seeds": 1}
    assert plot_results.verdict_text(one) == "+0.030 (+0.000 to +0.050, bootstrap), n = 1 seed"


def test_the_interval_rule_fails_a_level_whose_t_interval_crosses_the_bar(tmp_path: Path,
                                                                           experiment: pd.DataFrame) -> None:
    """lr_rewind at 2x equals dense on seed 0 and is much worse on seed 1: the bootstrap over
    2 seeds may still clear the bar on some draws, the t interval (1 df) cannot."""
    rng = np.random.default_rng(5)
    at2 = (experiment["method"] == "lr_rewind") & (experiment["round"] == 1) & (experiment["seed"] == 1)
    labels = pd.read_csv(tmp_path / "seed1/dense" / tr.PREDICTIONS).query("split == 'test'")["label"].to_numpy()
    worse = pd.concat([experiment[~at2], pd.DataFrame([_run(
        tmp_path, "seed1/lr_rewind/round_01_worse", labels, _noisy(labels, 0.3, rng), method="lr_rewind", seed=1,
        round=1, compression=2.0, accepted=True)])], ignore_index=True)
    d = plot_results.paired(tmp_path, "val", plot_results.level_rows(worse, "lr_rewind", _lv(2.0)),
                            plot_results.dense_rows(worse))
    assert d["t_low"] == pytest.approx(plot_results.t_interval(d["diffs"])[0])
    assert plot_results.wider(d) == (d["t_low"], d["t_high"], "t")
    rows = {_cell(line, 0): line for line in plot_results.interval_winners(tmp_path, worse, 0.01)[2:]}
    assert _cell(rows["lr_rewind"], 2).startswith("none")
    assert "n = 2 seeds" not in rows["lr_rewind"]


def test_the_claim_family_is_holm_corrected_and_split_when_seeds_are_exploratory(
        tmp_path: Path, experiment: pd.DataFrame) -> None:
    family = plot_results.claim_family(tmp_path, experiment, 0.01)
    assert list(zip(family["method"], family["level"], strict=True)) == [
        ("finetune", _lv(2.0)), ("lr_rewind", _lv(2.0)), ("lr_rewind", _lv(4.0)), ("lr_rewind", _lv(8.0))]
    assert family["holm"].to_numpy() == pytest.approx(plot_results.holm(family["p"].to_numpy()), nan_ok=True)
    assert plot_results.claim_section(tmp_path, experiment, 0.01)[3].startswith("| method | compression | seeds")
    (tmp_path / plot_results.EXPLORATORY).write_text('{"seeds": [1], "why": "added after the test"}')
    text = "\n".join(plot_results.claim_section(tmp_path, experiment, 0.01))
    assert "Confirmatory: the pre-registered seeds only (seed 1 left out)" in text
    assert "n/a (one seed)" in text.split("Exploratory")[0]  # seed 0 alone: no t test
    assert "Exploratory: every seed, seed 1 included (added after the test)" in text
    assert plot_results.seeds_text([3, 4]) == "seeds 3, 4"
    (tmp_path / plot_results.EXPLORATORY).write_text('{"seeds": "x"}')
    with pytest.raises(SystemExit, match="exploratory.json"):
        plot_results.exploratory(tmp_path)


def test_a_retry_budget_stops_a_goal_chain_where_its_round_needed_more_redos(goal_experiment: Path) -> None:
    """Seed 0's round 2 was accepted at its first redo: a budget of 1 keeps it (1.9x), a
    budget of 0 would stop at round 1; seed 1 never passed round 2 (1.43x either way)."""
    everything, table = plot_results.load_all(goal_experiment), plot_results.load(goal_experiment)
    assert plot_results.under_budget(everything, "weight_rewind", 0, 1)["compression"] == pytest.approx(1.9)
    assert plot_results.under_budget(everything, "weight_rewind", 0, 0)["compression"] == pytest.approx(1 / 0.7)
    assert plot_results.under_budget(everything, "weight_rewind", 1, 5)["compression"] == pytest.approx(1 / 0.7)
    lines = plot_results.budget_table(goal_experiment, everything, table, 1)
    assert lines[2].startswith("| weight_rewind | 0 | 1.9x | 1.9x | +0.000 (+0.000 to +0.000)")
    assert lines[3].startswith("| weight_rewind | 1 | 1.4x | 1.4x | +0.000")
    assert lines[4].startswith("| weight_rewind | all 2 | | | +0.000")
