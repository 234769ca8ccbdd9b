"""stability.py: the linear path between two networks, its barrier, and a run on tiny data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_FLAGS

import run_experiments
import stability
import train as tr
from build_datasets import load_dataset


@pytest.fixture(scope="module")
def tiny_exp(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    exp = tmp_path_factory.mktemp("stab") / "exp"
    run_experiments.main(["--exp", str(exp), "--methods", "weight_rewind", "--seeds", "0", "--controls", "",
                          "--rounds", "1", "--prune-fraction", "0.5", "--rewind-to", "2it", "--data", str(tiny_data),
                          *TINY_FLAGS])
    return exp


def test_the_path_between_identical_networks_is_flat_and_its_ends_are_the_networks(tiny_exp: Path) -> None:
    """The barrier of two identical networks is 0; the path's ends are the two networks'
    own evaluation (under the same BatchNorm re-estimation)."""
    args = tr.dense_args(tiny_exp / "seed0")
    ctx = tr.Context.make(load_dataset(args.data), args)
    a = ctx.load(tiny_exp / "seed0" / "dense" / tr.FINAL)
    b = ctx.load(tiny_exp / "seed0" / "weight_rewind" / "round_01" / tr.FINAL)
    flat, flat_predicted = stability.linear_path(ctx, a, a, 3, 2)
    assert flat["val_error"].nunique() == 1 and stability.barriers(flat) == {"error_barrier": 0.0, "f1_barrier": 0.0}
    assert stability.barrier_interval(flat_predicted) == (0.0, 0.0)
    path, predicted = stability.linear_path(ctx, a, b, 3, 2)
    for end, state in ((0, a), (-1, b)):
        own = stability.evaluate_point(ctx, state, 2)
        assert path.iloc[end][["val_error", "val_challenge_f1"]].tolist() == [own["val_error"], own["val_challenge_f1"]]
        assert predicted[predicted.columns[2:][end]].tolist() == own["predicted"].tolist()
    # the kept predictions are the path's: their error at every point is the path's error
    wrong = predicted.drop(columns=["record", "label"]).to_numpy() != predicted[["label"]].to_numpy()
    assert wrong.mean(axis=0).tolist() == pytest.approx(path["val_error"].tolist())
    assert len(predicted) == len(ctx.ds.indices("val")) and predicted["record"].is_unique
    low, high = stability.barrier_interval(predicted)
    assert low <= stability.barriers(path)["error_barrier"] <= high
    middle = stability.interpolate(a, b, 0.5)
    floats = [k for k in a if a[k].is_floating_point()]
    assert all(torch.allclose(middle[k], (a[k] + b[k]) / 2, rtol=1e-6, atol=1e-7) for k in floats)


def _path_table(wrong_at: list[set[int]], n: int = 400) -> pd.DataFrame:
    """A path_predictions table of ``n`` records, all labelled 0: at point i the records in
    wrong_at[i] are predicted 1."""
    alphas = np.linspace(0, 1, len(wrong_at))
    return pd.DataFrame({"record": [f"R{i}" for i in range(n)], "label": 0,
                         **{f"{a:.4f}": [int(r in w) for r in range(n)]
                            for a, w in zip(alphas, wrong_at, strict=True)}})


def test_the_barrier_interval_tells_a_real_bump_from_record_noise() -> None:
    """The interval is over the records, of the excess at the worst point: a bump on 60 more
    records of 400 excludes 0; the same error on other records than the ends' does not;
    the columns' order does not matter."""
    ends = set(range(40))
    bump = _path_table([ends, ends | set(range(100, 160)), ends])  # barrier 0.15
    low, high = stability.barrier_interval(bump)
    assert 0.1 < low < 0.15 < high < 0.2
    ends_b = set(range(40, 84))
    noise = _path_table([ends, set(range(200, 246)), ends_b])  # 40, 46, 44 wrong: barrier 0.01, other records
    low, high = stability.barrier_interval(noise)
    assert low < 0 < 0.01 < high
    shuffled = noise[["label", "1.0000", "record", "0.0000", "0.5000"]]
    assert stability.barrier_interval(shuffled) == (low, high)


def test_the_barrier_plot_takes_an_interval_that_misses_its_point(tmp_path: Path) -> None:
    """A seed's interval need not contain its barrier (a percentile interval, the barrier
    read back rounded): the plot draws it all the same."""
    table = pd.DataFrame([{"seed": 0, "masks": "dense", "compression": 1.0, "k": 0, "error_barrier": 0.010,
                           "error_barrier_low": 0.012, "error_barrier_high": 0.02, "copies_test_f1": 0.7},
                          {"seed": 1, "masks": "dense", "compression": 1.0, "k": 0, "error_barrier": 0.0,
                           "error_barrier_low": np.nan, "error_barrier_high": np.nan, "copies_test_f1": 0.7}])
    stability.plot_summary(table, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 0


def test_weights_at_k_replay_the_dense_run(tiny_exp: Path, tmp_path: Path) -> None:
    """Replaying the dense training's first k steps gives its weights at step k exactly."""
    seed_dir = tiny_exp / "seed0"
    args = tr.dense_args(seed_dir)
    ctx = tr.Context.make(load_dataset(args.data), args)
    saved = ctx.load(seed_dir / "dense" / "rewind_2.pt")
    copy = tmp_path / "seed0"
    (copy / "dense").mkdir(parents=True)
    (copy / "dense" / tr.INIT).write_bytes((seed_dir / "dense" / tr.INIT).read_bytes())  # no rewind_2.pt
    replayed = stability.weights_at(ctx, copy, 2, tmp_path / "work")
    assert all(torch.equal(saved[k], replayed[k]) for k in saved)


def test_a_stability_run_writes_its_tables_and_resumes(tiny_exp: Path) -> None:
    argv = ["--exp", str(tiny_exp), "--seed", "0", "--masks", "dense,weight_rewind/round_01",
            "--rewind-to", "0,2it,3it", "--points", "3", "--bn-batches", "2"]
    stability.main(argv)
    work = tiny_exp / "stability" / "seed0"
    table = pd.read_csv(work / "stability.csv")
    assert len(table) == 6 and table["compression"].round(1).tolist() == [1.0] * 3 + [2.0] * 3
    assert table["k"].tolist() == [0, 2, 3] * 2 and table["error_barrier"].notna().all()
    assert (work / "stability.png").stat().st_size > 0
    copies = [json.loads((work / "weight_rewind_round_01_k2" / f"copy{c}" / tr.METRICS).read_text()) for c in (1, 2)]
    row = table[(table["masks"] == "weight_rewind/round_01") & (table["k"] == 2)].iloc[0]
    assert row["copies_test_f1"] == pytest.approx(np.mean([m["test"]["challenge_f1"] for m in copies]), abs=1e-6)
    assert (work.parent / "stability.md").is_file() and (work.parent / "stability.png").stat().st_size > 0
    assert (row["error_barrier_low"] <= row["error_barrier"] <= row["error_barrier_high"])
    stamps = {p: p.stat().st_mtime_ns for p in work.rglob("path.csv")}
    stability.main(argv)  # finished pairs are read back, not retrained
    assert {p: p.stat().st_mtime_ns for p in work.rglob("path.csv")} == stamps
    # a pair whose path was made before the predictions were kept: its path is evaluated
    # again from the copies, which are not retrained
    pair = work / "weight_rewind_round_01_k2"
    (pair / stability.PREDICTED).unlink()
    trained = {p: p.stat().st_mtime_ns for p in pair.rglob(tr.METRICS)}
    stability.main(argv)
    assert (pair / stability.PREDICTED).is_file() and (pair / "path.csv").stat().st_mtime_ns > stamps[pair / "path.csv"]
    assert {p: p.stat().st_mtime_ns for p in pair.rglob(tr.METRICS)} == trained
    pd.testing.assert_frame_equal(pd.read_csv(work / "stability.csv"), table, rtol=1e-3)  # path.csv: 6 digits
    # a run of fewer pairs (the finished ones, say) keeps the others' rows in the seed's table
    stability.main([*argv[:6], "--rewind-to", "2it", *argv[8:]])
    again = pd.read_csv(work / "stability.csv")
    pairs = lambda t: sorted(zip(t["masks"], t["k"], strict=True))  # noqa: E731
    assert len(again) == 6 and pairs(again) == pairs(table)
    with pytest.raises(SystemExit):
        stability.main([*argv[:6], "--rewind-to", "99ep"])


def test_the_summary_averages_seeds_per_mask_and_k(tmp_path: Path) -> None:
    """stability.md and the summary table: one row per (mask, k), the barrier's mean over the
    seeds and each seed's value, whatever order the seeds' tables hold."""
    rows = {0: [("dense", 1.0, 0, 0.10), ("dense", 1.0, 5, 0.00), ("m", 4.0, 0, 0.30)],
            1: [("dense", 1.0, 5, 0.04), ("dense", 1.0, 0, 0.20), ("m", 4.0, 0, 0.10)]}
    for seed, rs in rows.items():
        (tmp_path / f"seed{seed}").mkdir()
        pd.DataFrame([{"seed": seed, "masks": m, "compression": c, "k": k, "rewind_to": str(k),
                       "error_barrier": b, "f1_barrier": b / 2, "copies_test_f1": 0.7 + b}
                      for m, c, k, b in rs]).to_csv(tmp_path / f"seed{seed}" / "stability.csv", index=False)
    summary = stability.summarise(tmp_path).set_index(["masks", "k"])
    assert summary.loc[("dense", 0), "error_barrier"] == pytest.approx(0.15)
    assert summary.loc[("dense", 5), "error_barrier"] == pytest.approx(0.02)
    assert summary.loc[("m", 0), "copies_test_f1"] == pytest.approx(0.9)
    assert summary.loc[("m", 0), "barrier_per_seed"] == "s0 +0.300 / s1 +0.100" and (summary["seeds"] == 2).all()
    assert "| m | 4.0x | 0 | 0 | 2 | +0.200 |" in (tmp_path / "stability.md").read_text()
    assert summary.index.tolist() == [("dense", 0), ("dense", 5), ("m", 0)]
    # a seed run later spells k otherwise, and its table has the copies' AF scores the others lack
    (tmp_path / "seed2").mkdir()
    pd.DataFrame([{"seed": 2, "masks": "dense", "compression": 1.0, "k": 5, "rewind_to": "5it", "error_barrier": 0.0,
                   "f1_barrier": 0.0, "copies_test_f1": 0.7, "copies_test_sensitivity_A": 0.8,
                   "copies_test_ppv_A": 0.9}]).to_csv(tmp_path / "seed2" / "stability.csv", index=False)
    summary = stability.summarise(tmp_path).set_index(["masks", "k"])
    assert summary.loc[("dense", 5), "seeds"] == 3 and summary.loc[("dense", 5), "rewind_to"] == "5/5it"
    md = (tmp_path / "stability.md").read_text()
    assert "| m | 4.0x | 0 | 0 | 2 | +0.200 | s0 +0.300 / s1 +0.100 | +0.100 | 0.900 | n/a |" in md
    assert "nan" not in md
    # a seed with the barrier's interval over the records: shown next to its value
    (tmp_path / "seed3").mkdir()
    pd.DataFrame([{"seed": 3, "masks": "m", "compression": 4.0, "k": 0, "rewind_to": "0", "error_barrier": 0.05,
                   "error_barrier_low": 0.01, "error_barrier_high": 0.09, "f1_barrier": 0.0,
                   "copies_test_f1": 0.7}]).to_csv(tmp_path / "seed3" / "stability.csv", index=False)
    summary = stability.summarise(tmp_path).set_index(["masks", "k"])
    assert summary.loc[("m", 0), "barrier_per_seed"] == "s0 +0.300 / s1 +0.100 / s3 +0.050 (+0.010 to +0.090)"
    assert "nan" not in (tmp_path / "stability.md").read_text()


def test_the_summary_reads_from_dense_to_sparse_whatever_order_the_runs_came_in(tmp_path: Path) -> None:
    """A later run adds the dense pairs after the sparse ones: the rows still go by compression
    (dense, 4x, 16x), k ascending within each mask (the plot's colours use the same order)."""
    (tmp_path / "seed0").mkdir()
    pd.DataFrame([{"seed": 0, "masks": m, "compression": c, "k": k, "rewind_to": str(k), "error_barrier": 0.01,
                   "f1_barrier": 0.0, "copies_test_f1": 0.7}
                  for m, c, k in [("r4", 16.0, 0), ("r2", 4.0, 5), ("dense", 1.0, 5), ("r2", 4.0, 0),
                                  ("dense", 1.0, 0)]]).to_csv(tmp_path / "seed0" / "stability.csv", index=False)
    summary = stability.summarise(tmp_path)
    assert list(zip(summary["masks"], summary["k"], strict=True)) == [
        ("dense", 0), ("dense", 5), ("r2", 0), ("r2", 5), ("r4", 0)]
    md = (tmp_path / "stability.md").read_text()
    assert md.index("| dense |") < md.index("| r2 |") < md.index("| r4 |")


def test_the_random_pruning_control_keeps_each_layers_survivors_but_not_their_places(tiny_exp: Path) -> None:
    """'random:<round>' trains the pair under a random mask with the round's survivors per
    layer (the control that tells sparsity from IMP's choice of weights), the same mask at
    every k; a round without a mask is a clear error naming it."""
    seed_dir = tiny_exp / "seed0"
    ctx = tr.Context.make(load_dataset(tr.dense_args(seed_dir).data), tr.dense_args(seed_dir))
    imp = stability.masks_from(ctx, seed_dir, "weight_rewind/round_01", 0)
    rand = stability.masks_from(ctx, seed_dir, "random:weight_rewind/round_01", 0)
    again = stability.masks_from(ctx, seed_dir, "random:weight_rewind/round_01", 0)
    assert {n: int(m.sum()) for n, m in rand.items()} == {n: int(m.sum()) for n, m in imp.items()}
    assert any(not torch.equal(rand[n], imp[n]) for n in imp)
    assert all(torch.equal(rand[n], again[n]) for n in rand)
    stability.main(["--exp", str(tiny_exp), "--seed", "0", "--masks", "random:weight_rewind/round_01",
                    "--rewind-to", "0,2it", "--points", "3", "--bn-batches", "2"])
    table = pd.read_csv(tiny_exp / "stability" / "seed0" / "stability.csv")
    rows = table[table["masks"] == "random:weight_rewind/round_01"]
    assert rows["k"].tolist() == [0, 2] and rows["compression"].round(1).tolist() == [2.0, 2.0]
    final = ctx.load(tiny_exp / "stability" / "seed0" / "random_weight_rewind_round_01_k2" / "copy1" / tr.FINAL)
    w = {n: final[f"{n}.weight"] for n in rand}
    assert all(w[n][~rand[n]].abs().sum() == 0 and w[n][rand[n]].abs().sum() > 0 for n in rand)
    with pytest.raises(SystemExit, match="weight_rewind/round_07"):
        stability.main(["--exp", str(tiny_exp), "--seed", "0", "--masks", "random:weight_rewind/round_07"])
