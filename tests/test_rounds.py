"""Pruning rounds: each method's starting point, the over-pruning rule, controls, resume
after kill -9, refusing mismatched flags, and the plots of a small finished run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_FLAGS, tiny_train_args

import export_ticket
import plot_results
import run_experiments
import run_folders as rf
import train as tr
from metrics import bootstrap, class_f1, classification_metrics, confusion

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Records what every retraining starts from, then runs it for real."""
    calls: list[dict] = []
    real = tr.retrain

    def recording(ctx, run_dir, start, masks, lr_fn, steps, extra):  # noqa: ANN001, ANN202
        calls.append({"dir": run_dir, "start": {k: v.clone() for k, v in start.items()}, "masks": masks,
                      "lr": [lr_fn(i) for i in range(steps)], "steps": steps})
        return real(ctx, run_dir, start, masks, lr_fn, steps, extra)

    monkeypatch.setattr(tr, "retrain", recording)
    return calls


def _equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", tr.METHODS + tr.BASELINES)
def test_each_method_starts_where_it_should(method: str, tiny_data: Path, tmp_path: Path, spy: list[dict]) -> None:
    seed_dir = tmp_path / "seed0"
    # 6 steps per epoch, T = 12 steps (LR 1e-3, x0.1 from step 6), k = 3
    tr.main(tiny_train_args(tiny_data, seed_dir, "--retrain", method, "--rewind-to", "3it", "--rounds", "2",
                            "--prune-fraction", "0.5", "--milestones", "0.5"))
    dense = seed_dir / "dense"
    load = lambda p: torch.load(p, weights_only=True)  # noqa: E731
    init, early, trained = load(dense / "init.pt"), load(dense / "rewind_3.pt"), load(dense / "model.pt")
    assert len(spy) == 2
    first, second = spy
    expected = {"weight_rewind": init, "late_reset": early}.get(method, trained)
    assert _equal(first["start"], expected)
    if method in ("lr_rewind", "finetune", "dense_equal_steps"):  # round 2 starts from round 1's weights
        assert _equal(second["start"], load(seed_dir / method / "round_01" / "model.pt"))
    else:
        assert _equal(second["start"], expected)
    # budget and LR per step: Frankle & Carbin replay the whole schedule [0, 12); the others
    # replay [3, 12) (finetune at the final LR throughout)
    lr = {"weight_rewind": [1e-3] * 6 + [1e-4] * 6, "finetune": [1e-4] * 9}.get(method, [1e-3] * 3 + [1e-4] * 6)
    for call in spy:
        assert call["steps"] == len(lr) and call["lr"] == pytest.approx(lr)
    table = pd.read_csv(seed_dir / method / "rounds.csv")
    assert table["round"].tolist() == [0, 1, 2]
    assert table["steps"].tolist()[1:] == [len(lr)] * 2
    # FLOPs per 30-s record of each round's network: the dense count (export_ticket's helper on
    # the dense weights), then fewer as weights go
    dense_flops, _ = export_ticket.flops_per_record(tr.HannunNet(tr.parse_args(TINY_FLAGS).model),
                                                    export_ticket.record_input(stride=256))
    assert table["flops"].iloc[0] == dense_flops
    if method == "dense_equal_steps":  # nothing pruned, ever
        assert table["flops"].tolist() == [dense_flops] * 3
        assert table["compression"].tolist() == [1.0] * 3
        assert all(m.all() for call in spy for m in call["masks"].values())
        return
    assert table["compression"].tolist() == pytest.approx([1.0, 2.0, 4.0], rel=1e-3)
    assert table["flops"].is_monotonic_decreasing and table["flops"].nunique() == 3
    params = table["nonzero_parameters"] + table["prunable"] - table["remaining"]  # all parameters
    assert table["compression_all"].tolist() == pytest.approx((params / table["nonzero_parameters"]).tolist(), rel=1e-5)
    assert (table["compression_all"] < table["compression"]).tolist() == [False, True, True]
    # round 2's mask only shrinks round 1's
    m1, m2 = first["masks"], second["masks"]
    assert all(not (m2[n] & ~m1[n]).any() for n in m1)


def test_runs_made_under_older_method_definitions_are_refused(tiny_data: Path, tmp_path: Path) -> None:
    """weight_rewind meant [k, T) before version 2: such a folder must not be resumed silently."""
    seed_dir = tmp_path / "seed0"
    argv = tiny_train_args(tiny_data, seed_dir, "--retrain", "weight_rewind", "--rounds", "1", "--max-steps", "1")
    tr.main(argv)
    config = seed_dir / "weight_rewind" / rf.CONFIG
    record = json.loads(config.read_text())
    del record["flags"]["definitions_version"]  # as a version-1 folder has it
    config.write_text(json.dumps(record))
    (seed_dir / "weight_rewind" / tr.ROUNDS).unlink()  # unfinished, so it would resume
    # the shared dense run (whose flags never held the version) passes; the method folder is refused
    with pytest.raises(SystemExit, match="weight_rewind was started with other flags: --definitions-version 1 "
                       "\\(now 2\\)"):
        tr.main(argv)


def test_control_of_a_baseline_is_refused() -> None:
    with pytest.raises(SystemExit):
        tr.parse_args(["--retrain", "dense_equal_steps", "--control", "random_prune"])


def test_controls_use_the_tickets_masks(tiny_data: Path, tmp_path: Path, spy: list[dict]) -> None:
    seed_dir = tmp_path / "seed0"
    common = ("--retrain", "weight_rewind", "--rounds", "2", "--prune-fraction", "0.5")
    tr.main(tiny_train_args(tiny_data, seed_dir, *common, "--control", "random_reinit"))
    tr.main(tiny_train_args(tiny_data, seed_dir, *common, "--control", "random_prune"))
    ticket = [c for c in spy if c["dir"].parent.name == "weight_rewind"]
    reinit = [c for c in spy if c["dir"].parent.name == "weight_rewind+random_reinit"]
    rprune = [c for c in spy if c["dir"].parent.name == "weight_rewind+random_prune"]
    assert len(ticket) == len(reinit) == len(rprune) == 2  # the method ran once, not again
    init = torch.load(seed_dir / "dense" / "init.pt", weights_only=True)
    for t, a, b in zip(ticket, reinit, rprune, strict=True):
        assert all(torch.equal(t["masks"][n], a["masks"][n]) for n in t["masks"])
        assert not _equal(a["start"], init)  # fresh random weights
        assert _equal(b["start"], init)
        assert all(t["masks"][n].sum() == b["masks"][n].sum() for n in t["masks"])
        assert any(not torch.equal(t["masks"][n], b["masks"][n]) for n in t["masks"])
    rows = pd.read_csv(seed_dir / "weight_rewind+random_prune" / "rounds.csv")
    assert rows["control"].unique().tolist() == ["random_prune"] and rows["round"].tolist() == [1, 2]


def test_goal_schedule_redoes_a_round_at_a_smaller_fraction(tiny_data: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Round 2 falls below dense - 1 % twice: it is redone at 0.5/2, then 0.5/4, then accepted."""
    real = tr.retrain
    verdicts = iter([True, False, False, True, True])

    def scripted(ctx, run_dir, start, masks, lr_fn, steps, extra):  # noqa: ANN001, ANN202
        metrics = real(ctx, run_dir, start, masks, lr_fn, steps, extra)
        dense = json.loads((run_dir.parents[1] / "dense" / tr.METRICS).read_text())
        metrics["val"]["challenge_f1"] = dense["val"]["challenge_f1"] * (1.0 if next(verdicts) else 0.9)
        (run_dir / tr.METRICS).write_text(json.dumps(metrics))
        return metrics

    monkeypatch.setattr(tr, "retrain", scripted)
    seed_dir = tmp_path / "seed0"
    tr.main(tiny_train_args(tiny_data, seed_dir, "--retrain", "lr_rewind", "--goal", "--prune-fraction", "0.5",
                            "--rounds", "3", "--alpha", "2", "--epochs", "1"))
    rows = pd.read_csv(seed_dir / "lr_rewind" / "rounds.csv")
    got = list(zip(rows["round"], rows["attempt"], rows["fraction"].round(4), rows["accepted"], strict=True))
    assert got == [(0, 0, 0.0, True), (1, 0, 0.5, True), (2, 0, 0.5, False), (2, 1, 0.25, False),
                   (2, 2, 0.125, True), (3, 0, 0.125, True)]
    assert (seed_dir / "lr_rewind" / "round_02_try2" / "mask.pt").is_file()
    accepted = rows[rows["accepted"]]
    assert accepted["compression"].tolist() == pytest.approx([1.0, 2.0, 2 / 0.875, 2 / 0.875**2], rel=1e-3)


def test_goal_schedule_stops_when_a_round_used_up_its_retries(tiny_data: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """--max-retries 1: round 2 is rejected, redone once, rejected again: the chain stops there
    (the floor, 0.5 / 4 = 0.125 > --min-fraction, would have allowed more), the run counts as
    finished (a second call trains nothing) and the accepted ticket is round 1's."""
    real = tr.retrain
    verdicts = iter([True, False, False])
    calls = []

    def scripted(ctx, run_dir, start, masks, lr_fn, steps, extra):  # noqa: ANN001, ANN202
        calls.append(run_dir.name)
        metrics = real(ctx, run_dir, start, masks, lr_fn, steps, extra)
        dense = json.loads((run_dir.parents[1] / "dense" / tr.METRICS).read_text())
        metrics["val"]["challenge_f1"] = dense["val"]["challenge_f1"] * (1.0 if next(verdicts) else 0.9)
        (run_dir / tr.METRICS).write_text(json.dumps(metrics))
        return metrics

    monkeypatch.setattr(tr, "retrain", scripted)
    seed_dir = tmp_path / "seed0"
    argv = tiny_train_args(tiny_data, seed_dir, "--retrain", "lr_rewind", "--goal", "--prune-fraction", "0.5",
                           "--rounds", "3", "--alpha", "2", "--epochs", "1", "--max-retries", "1")
    tr.main(argv)
    rows = pd.read_csv(seed_dir / "lr_rewind" / "rounds.csv")
    got = list(zip(rows["round"], rows["attempt"], rows["fraction"].round(4), rows["accepted"], strict=True))
    assert got == [(0, 0, 0.0, True), (1, 0, 0.5, True), (2, 0, 0.5, False), (2, 1, 0.25, False)]
    assert calls == ["round_01", "round_02", "round_02_try1"]
    tr.main(argv)  # finished: nothing is retrained
    assert len(calls) == 3
    with pytest.raises(SystemExit):
        tr.main([*argv, "--max-retries", "-1"])


def test_schedule_stops_at_the_target_ratio(tiny_data: Path, tmp_path: Path) -> None:
    seed_dir = tmp_path / "seed0"
    tr.main(tiny_train_args(tiny_data, seed_dir, "--retrain", "finetune", "--prune-fraction", "0.6",
                            "--target-ratio", "5", "--epochs", "1"))
    rows = pd.read_csv(seed_dir / "finetune" / "rounds.csv")
    assert rows["compression"].tolist() == pytest.approx([1.0, 2.5, 5.0], rel=1e-3)  # last round cut to hit 5x


GRID = ["--methods", "weight_rewind,lr_rewind", "--seeds", "0", "--controls", "random_prune",
        "--prune-fraction", "0.5", "--rounds", "3", "--checkpoint-minutes", "0"]


def test_experiment_resumes_after_kill_9_without_redoing_rounds(tiny_data: Path, tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    cmd = [sys.executable, str(ROOT / "run_experiments.py"), "--exp", str(exp), *GRID, "--data", str(tiny_data),
           *TINY_FLAGS]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = exp / "seed0" / "weight_rewind" / "round_02" / tr.CHECKPOINT
    deadline = time.monotonic() + 300
    while not target.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed mid-round"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = exp / "seed0" / "weight_rewind" / "round_01" / tr.METRICS
    assert done.is_file() and not (target.parent / tr.METRICS).exists()
    stamp = done.stat().st_mtime_ns
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    assert done.stat().st_mtime_ns == stamp  # the finished round was not redone
    table = pd.read_csv(exp / "results.csv")
    assert len(table) == 2 * 4 + 3  # two methods x rounds 0-3, and the control at rounds 1-3
    assert not list(exp.rglob("*.tmp")) and not list(exp.rglob(tr.CHECKPOINT))
    # and the plots of this small finished run
    plot_results.main(["--exp", str(exp)])
    plots = exp / "plots"
    for name in ("compression.png", "compression.svg", "layers.png", "summary.md"):
        assert (plots / name).stat().st_size > 0, name
    text = (plots / "summary.md").read_text()
    assert "| method | control | compression |" in text and "weight_rewind" in text


def test_an_interrupted_grid_keeps_its_finished_cells_and_plots_them_as_partial(
        tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exp = tmp_path / "exp"
    argv = ["--exp", str(exp), "--methods", "lr_rewind,finetune", "--seeds", "0", "--controls", "", "--rounds", "1",
            "--prune-fraction", "0.5", "--data", str(tiny_data), *TINY_FLAGS]
    real, calls = tr.run, []

    def interrupted(args, ds, **kw):  # noqa: ANN001, ANN003, ANN202
        calls.append(args.retrain)
        if args.retrain == "finetune":
            raise KeyboardInterrupt  # Ctrl-C in the last cell (after the dense cell and lr_rewind)
        return real(args, ds, **kw)

    monkeypatch.setattr(tr, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_experiments.main(argv)
    table = pd.read_csv(exp / "results.csv")
    assert set(table["method"]) == {"lr_rewind"} and len(table) == 2  # the finished cell, saved
    assert plot_results.partial(exp) == "partial: 2 of 3 cells finished"
    run_experiments.main(argv + ["--cell", "1"])  # a worker that ran a finished part: the grid is still partial
    assert plot_results.partial(exp) == "partial: 2 of 3 cells finished"
    plot_results.main(["--exp", str(exp)])
    assert (exp / "plots" / "summary.md").read_text().startswith("**Partial: 2 of 3 cells finished**")
    monkeypatch.setattr(tr, "run", real)
    run_experiments.main(argv)  # the rest, then nothing is partial
    assert set(pd.read_csv(exp / "results.csv")["method"]) == {"lr_rewind", "finetune"}
    assert plot_results.partial(exp) == ""
    log = json.loads((exp / "experiment.json").read_text())
    log["commands"][-1]["argv"] += ["--a-flag-of-an-older-version", "1"]
    (exp / "experiment.json").write_text(json.dumps(log))
    assert plot_results.partial(exp) == ""  # progress unknown: no claim, no crash


def test_mismatched_flags_are_refused(tiny_data: Path, tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    base = ["--exp", str(exp), "--methods", "finetune", "--seeds", "0", "--controls", "", "--rounds", "1",
            "--data", str(tiny_data), "--width", "0.125", "--epochs", "1", "--crop", "1024", "--batch-size", "16",
            "--quiet"]
    run_experiments.main(base)
    with pytest.raises(SystemExit, match=r"other flags: --prune-fraction 0.2 \(now 0.5\)"):
        run_experiments.main(base + ["--prune-fraction", "0.5"])
    with pytest.raises(SystemExit, match=r"other flags: --epochs 1 \(now 2\)"):
        run_experiments.main(base[:-1] + ["--epochs", "2", "--quiet"])


def test_a_variant_reuses_the_dense_runs_of_another_experiment(tiny_data: Path, tmp_path: Path) -> None:
    """--dense-from links the finished dense run instead of retraining it (same files, same
    results), leaves the source untouched, and refuses a source with other
    dense flags or without a finished dense run."""
    base = ["--methods", "finetune", "--seeds", "0", "--controls", "", "--rounds", "1", "--data", str(tiny_data),
            "--width", "0.125", "--crop", "1024", "--batch-size", "16", "--quiet", "--epochs", "1"]
    run_experiments.main(["--exp", str(tmp_path / "a"), *base])
    source = tmp_path / "a" / "seed0" / "dense"
    before = {f.name: f.read_bytes() for f in source.iterdir() if f.is_file()}
    run_experiments.main(["--exp", str(tmp_path / "b"), "--dense-from", str(tmp_path / "a"), *base,
                          "--prune-scope", "fanin"])
    dense = tmp_path / "b" / "seed0" / "dense"
    assert (dense / "model.pt").samefile(source / "model.pt")  # linked, not retrained
    assert json.loads((dense / "reused_from.json").read_text()) == {"source": "../../../a/seed0/dense"}
    assert not (dense / "state.npz").exists()  # the weights are carried once, by the source
    a, b = (pd.read_csv(tmp_path / e / "results.csv") for e in "ab")
    assert a.loc[a["round"] == 0, "test_challenge_f1"].item() == b.loc[b["round"] == 0, "test_challenge_f1"].item()
    assert (tmp_path / "b" / "seed0" / "finetune" / "round_01" / "metrics.json").is_file()
    assert {f.name: f.read_bytes() for f in source.iterdir() if f.is_file()} == before
    run_experiments.main(["--exp", str(tmp_path / "g"), "--dense-from", str(tmp_path / "b"), *base])
    # a variant of a variant names the folder that trained it
    assert json.loads((tmp_path / "g" / "seed0" / "dense" / "reused_from.json").read_text()) == {
        "source": "../../../a/seed0/dense"}
    with pytest.raises(SystemExit, match=r"seed0/dense was started with other flags: --epochs 1 \(now 2\)"):
        run_experiments.main(["--exp", str(tmp_path / "c"), "--dense-from", str(tmp_path / "a"),
                              *base[:-1], "2"])
    with pytest.raises(SystemExit, match="holds no finished dense run"):
        run_experiments.main(["--exp", str(tmp_path / "d"), "--dense-from", str(tmp_path / "nowhere"), *base])
    clone = tmp_path / "clone" / "seed0" / "dense"  # as in a git clone: metrics kept, checkpoints not
    shutil.copytree(source, clone, ignore=shutil.ignore_patterns("*.pt"))
    with pytest.raises(SystemExit, match=r"with its weights \(missing init.pt, model.pt"):
        run_experiments.main(["--exp", str(tmp_path / "e"), "--dense-from", str(tmp_path / "clone"), *base])
    (tmp_path / "f" / "seed0" / "dense").mkdir(parents=True)
    (tmp_path / "f" / "seed0" / "dense" / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="holds an unfinished dense run of its own"):
        run_experiments.main(["--exp", str(tmp_path / "f"), "--dense-from", str(tmp_path / "a"), *base])


def test_a_variant_refuses_a_dense_run_made_from_other_data(tiny_data: Path, tmp_path: Path) -> None:
    """The data set rebuilt at the same path after the source's dense run (here two records
    swap splits): the linked dense run is refused before any method trains from it, naming
    the folder and both fingerprints, and nothing is written into the source."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    base = ["--methods", "finetune", "--seeds", "0", "--controls", "", "--rounds", "1", "--data", str(data),
            "--width", "0.125", "--crop", "1024", "--batch-size", "16", "--quiet", "--epochs", "1"]
    run_experiments.main(["--exp", str(tmp_path / "a"), *base])
    records = pd.read_csv(data / "records.csv")
    i, j = records.index[records["split"] == "train"][0], records.index[records["split"] == "test"][0]
    records.loc[[i, j], "split"] = records.loc[[j, i], "split"].to_numpy()
    records.to_csv(data / "records.csv", index=False)
    source = tmp_path / "a" / "seed0"
    before = sorted(p.relative_to(source) for p in source.rglob("*"))
    with pytest.raises(SystemExit, match=r"seed0/dense was trained on other data than .*data \("):
        run_experiments.main(["--exp", str(tmp_path / "b"), "--dense-from", str(tmp_path / "a"), *base,
                              "--prune-scope", "fanin"])
    assert not (tmp_path / "b" / "seed0" / "finetune" / "round_01" / "metrics.json").exists()
    assert sorted(p.relative_to(source) for p in source.rglob("*")) == before


def test_grid_runs_each_method_then_its_controls() -> None:
    """A control needs its method's checkpoints, so it runs right after it; 'all' means the
    pruning methods, never the unpruned baseline."""
    args, _ = run_experiments.parse_args(["--exp", "x", "--seeds", "0,1", "--methods",
                                          "lr_rewind,dense_equal_steps,finetune", "--controls", "random_prune",
                                          "--control-methods", "all"])
    grid = run_experiments.cells(args)
    assert grid[:5] == [(0, "dense", None), (0, "lr_rewind", None), (0, "lr_rewind", "random_prune"),
                        (0, "dense_equal_steps", None), (0, "finetune", None)]
    assert len(grid) == 12
    assert [run_experiments.needs(grid, i) for i in range(6)] == [[], [0], [1], [0], [0], [4]]


@pytest.mark.parametrize("argv", [["--methods", "magic"], ["--controls", "nope"], ["--seeds", "a"],
                                  ["--control-methods", "lr_rewind", "--methods", "finetune"], ["--retrain", "x"],
                                  ["--control-methods", "dense_equal_steps"]])
def test_bad_grid_flags(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        run_experiments.parse_args(["--exp", "x", *argv])
    assert exc.value.code == 2


@pytest.mark.parametrize("argv", [["--retrain", "finetune", "--schedule", "plateau"], ["--control", "random_prune"],
                                  ["--rewind-to", "3 epochs"], ["--prune-fraction", "1"], ["--alpha", "1"],
                                  ["--layer-fraction", "head"]])
def test_bad_pruning_flags(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        tr.parse_args(argv)
    assert exc.value.code == 2


def test_winners_need_every_seed_and_a_pruned_round() -> None:
    """Tolerance bar 0.8 * 0.99 = 0.792. weight_rewind: 4x holds on both seeds, 8x only on
    one seed (as under --goal), so 4x wins; finetune never holds after round 0: no winner."""
    rows = []
    for seed in (0, 1):
        for method, f1s in [("weight_rewind", [0.80, 0.80, 0.795]), ("finetune", [0.80, 0.70, 0.60])]:
            for r, (ratio, f1) in enumerate(zip([1.0, 2.0, 4.0], f1s, strict=True)):
                rows.append({"method": method, "control": "none", "seed": seed, "round": r,
                             "compression": ratio, "val_challenge_f1": f1, "test_challenge_f1": f1,
                             "test_accuracy": f1, "remaining": 100 / ratio})
        rows.append({"method": "weight_rewind", "control": "none", "seed": seed, "round": 3,
                     "compression": 8.0 if seed == 0 else 6.0, "val_challenge_f1": 0.80,
                     "test_challenge_f1": 0.80, "test_accuracy": 0.80, "remaining": 12})
    table = pd.DataFrame(rows)
    best = plot_results.winners(table, tolerance=0.01)
    assert best[["method", "compression_val"]].values.tolist() == [["weight_rewind", 4.0]]
    text = plot_results.summary(table, best, 0.01)
    assert "| finetune | none | 0,1 | none within tolerance |" in text


def test_a_method_with_fewer_seeds_is_judged_against_its_own_seeds_dense() -> None:
    """Seeds 0-1 ran both methods, seed 2 (a higher dense validation F1) weight_rewind only.
    finetune holds 2x against the dense of seeds 0-1 (bar 0.792) and is not asked for seed
    2; weight_rewind's bar is the mean over its three seeds (0.84 x 0.99 = 0.8316)."""
    rows = []
    for seed, dense in ((0, 0.80), (1, 0.80), (2, 0.92)):
        methods = [("weight_rewind", [dense, 0.83, 0.80])] + ([("finetune", [dense, 0.80, 0.60])] if seed < 2 else [])
        for method, f1s in methods:
            for r, (ratio, f1) in enumerate(zip([1.0, 2.0, 4.0], f1s, strict=True)):
                rows.append({"method": method, "control": "none", "seed": seed, "round": r, "compression": ratio,
                             "val_challenge_f1": f1, "test_challenge_f1": f1, "test_accuracy": f1,
                             "remaining": 100 / ratio})
    table = pd.DataFrame(rows)
    best = plot_results.winners(table, tolerance=0.01).set_index("method")
    assert best.loc["finetune", "compression_val"] == 2.0
    assert best.loc["finetune", "dense_val"] == pytest.approx(0.80)
    assert "weight_rewind" not in best.index  # 0.83 < 0.8316
    text = plot_results.summary(table, plot_results.winners(table, 0.01), 0.01)
    assert "| finetune | none | 0,1 | 2.0x |" in text and "| weight_rewind | none | 0,1,2 | none within" in text


def test_bootstrap_interval_of_the_test_f1(tmp_path: Path) -> None:
    """Perfect predictions give [1, 1]; a noisy ticket's interval holds its observed F1 and
    is wider with one seed's 40 records than nothing at all."""
    rng = np.random.default_rng(0)
    labels = rng.choice(list("NAO~"), 40)
    rows = []
    for seed, noise in ((0, 0.0), (1, 0.3)):
        folder = f"seed{seed}/weight_rewind/round_01"
        (tmp_path / folder).mkdir(parents=True)
        predicted = np.where(rng.random(40) < noise, rng.choice(list("NAO~"), 40), labels)
        pd.DataFrame({"record": [f"R{i:03d}" for i in range(40)], "split": "test", "label": labels,
                      "predicted": predicted}).to_csv(tmp_path / folder / tr.PREDICTIONS, index=False)
        rows.append({"method": "weight_rewind", "control": "none", "seed": seed, "round": 1,
                     "compression": 2.0, "folder": folder})
    table = pd.DataFrame(rows)
    best = pd.Series({"method": "weight_rewind", "control": "none", "level": plot_results.level(pd.Series([2.0]))[0]})
    assert plot_results.bootstrap_interval(tmp_path, table[table["seed"] == 0], best) == (1.0, 1.0)
    low, high = plot_results.bootstrap_interval(tmp_path, table, best)
    observed = np.mean([classification_metrics(
        pd.Series(labels).map("NAO~".index).to_numpy(),
        pd.read_csv(tmp_path / f / tr.PREDICTIONS, keep_default_na=False)["predicted"].map("NAO~".index).to_numpy()
    )["challenge_f1"] for f in table["folder"]])
    assert low < observed < high <= 1.0 and high - low > 0.02
    (tmp_path / table["folder"][1] / tr.PREDICTIONS).unlink()
    assert plot_results.bootstrap_interval(tmp_path, table, best) is None


def test_bootstrap_covers_the_seeds_as_well_as_the_records() -> None:
    """Two identical seeds give the one-seed interval (the seed level adds nothing); a seed
    that is right and one that is always wrong give an interval reaching towards both (a
    records-only interval of their mean would stay near 0.5), and a paired difference whose
    every seed agrees stays narrow however far the seeds lie apart."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 200)
    noisy = np.where(rng.random(200) < 0.3, rng.integers(0, 4, 200), labels)
    one = bootstrap(labels, [noisy])
    picks = np.random.default_rng(0).integers(0, 200, (1000, 200))  # the records-only bootstrap, by hand
    scores = class_f1(confusion(labels[picks], noisy[picks]))[:, :3].mean(1)
    assert one == tuple(np.percentile(scores, [2.5, 97.5]))
    assert bootstrap(labels, [noisy, noisy.copy()]) == one
    wrong = (labels + 1) % 4
    low, high = bootstrap(labels, [labels, wrong])
    assert low < 0.25 and high > 0.75
    worse = np.where(rng.random(200) < 0.1, wrong, labels)  # 10 % of the records made wrong
    low, high = bootstrap(labels, [labels, noisy], [worse, np.where(worse == labels, noisy, worse)])
    spread = np.subtract(*bootstrap(labels, [labels, noisy])[::-1])
    assert 0 < low < high and high - low < 0.1 < 0.25 < spread


def _run_with_predictions(exp: Path, folder: str, labels: np.ndarray, predicted: np.ndarray, **row) -> dict:
    """Write one run's predictions.csv and return its results.csv row."""
    (exp / folder).mkdir(parents=True)
    pd.DataFrame({"record": [f"R{i:03d}" for i in range(len(labels))], "split": "test", "label": labels,
                  "predicted": predicted}).to_csv(exp / folder / tr.PREDICTIONS, index=False)
    f1 = classification_metrics(pd.Series(labels).map("NAO~".index).to_numpy(),
                                pd.Series(predicted).map("NAO~".index).to_numpy())["challenge_f1"]
    return {"folder": folder, "test_challenge_f1": f1, **row}


def test_controls_table_pairs_tickets_with_their_controls(tmp_path: Path) -> None:
    """A ticket that predicts every record right beats a control that guesses: the paired
    interval lies above 0. A control identical to the ticket gives exactly 0. A control at a
    level the ticket lacks is listed as such; a missing predictions.csv drops the interval."""
    rng = np.random.default_rng(0)
    labels = rng.choice(list("NAO~"), 60)
    rows = []
    for seed in (0, 1):
        for control, predicted in (("none", labels), ("random_prune", rng.choice(list("NAO~"), 60)),
                                   ("random_reinit", labels)):
            rows.append(_run_with_predictions(
                tmp_path, f"seed{seed}/weight_rewind{'' if control == 'none' else '+' + control}/round_02", labels,
                predicted, method="weight_rewind", control=control, seed=seed, round=2, compression=4.0))
        rows.append({"method": "weight_rewind", "control": "none", "seed": seed, "round": 0, "compression": 1.0,
                     "folder": f"seed{seed}/dense", "test_challenge_f1": 0.5})
    rows.append(_run_with_predictions(tmp_path, "seed0/weight_rewind+random_prune/round_03", labels, labels,
                                      method="weight_rewind", control="random_prune", seed=0, round=3,
                                      compression=8.0))
    lines = plot_results.controls_table(tmp_path, pd.DataFrame(rows))
    prune_row = next(line for line in lines if "random_prune | 4.0x" in line)
    reinit_row = next(line for line in lines if "random_reinit | 4.0x" in line)
    low, high = (float(x) for x in prune_row.split("(")[1].rstrip(") |").split(" to "))
    assert 0 < low < high and "| 2 | 1.000 |" in prune_row
    assert reinit_row.endswith("| +0.000 (+0.000 to +0.000) |")
    assert any("random_prune | 8.0x | 0 | no ticket at this level | 1.000" in line for line in lines)
    (tmp_path / "seed1/weight_rewind+random_reinit/round_02" / tr.PREDICTIONS).unlink()
    lines = plot_results.controls_table(tmp_path, pd.DataFrame(rows))
    assert next(line for line in lines if "random_reinit | 4.0x" in line).endswith("+0.000 (no predictions.csv) |")


def test_compression_table_has_one_column_per_curve() -> None:
    """Mean ± sd over seeds; one seed has no sd; a cell with fewer seeds says so; a level a
    curve never reached stays empty."""
    rows = [{"method": m, "control": "none", "seed": s, "round": r, "compression": c, "val_challenge_f1": f + s / 10}
            for m in ("finetune", "lr_rewind") for s in (0, 1)
            for r, (c, f) in enumerate([(1.0, 0.5), (2.0, 0.6 if m == "lr_rewind" else 0.4)])]
    rows.append({"method": "lr_rewind", "control": "none", "seed": 0, "round": 2, "compression": 4.0,
                 "val_challenge_f1": 0.3})
    lines = plot_results.compression_table(pd.DataFrame(rows), "val_challenge_f1")
    assert lines[0] == "| compression | finetune | lr_rewind |"
    assert lines[2] == "| 1.0x | 0.550 ± 0.071 | 0.550 ± 0.071 |"
    assert lines[3] == "| 2.0x | 0.450 ± 0.071 | 0.650 ± 0.071 |"
    assert lines[4] == "| 4.0x |  | 0.300 (n=1) |"
    one_seed = pd.DataFrame(rows).query("seed == 0")
    assert plot_results.compression_table(one_seed, "val_challenge_f1")[3] == "| 2.0x | 0.400 | 0.600 |"


def test_finished_runs_need_no_checkpoints(tiny_data: Path, tmp_path: Path) -> None:
    """A finished seed is read back from its tables even when its *.pt files are gone (they
    are not kept in git), so a later seed can be added to a committed experiment."""
    exp = tmp_path / "exp"
    argv = ["--exp", str(exp), "--methods", "late_reset", "--seeds", "0", "--controls", "random_prune",
            "--control-methods", "late_reset",
            "--prune-fraction", "0.5", "--rounds", "2", "--rewind-to", "2it", "--data", str(tiny_data), *TINY_FLAGS]
    run_experiments.main(argv)
    before = pd.read_csv(exp / "results.csv")
    args, forwarded = run_experiments.parse_args(argv)  # the progress bar's total is the real count
    assert len(list(exp.rglob(tr.METRICS))) == run_experiments.expected_trainings(args, tr.parse_args(forwarded)) == 5
    for pt in exp.rglob("*.pt"):
        pt.unlink()
    run_experiments.main(argv)
    pd.testing.assert_frame_equal(pd.read_csv(exp / "results.csv"), before)
    assert not list(exp.rglob("*.pt"))  # nothing was retrained
    with pytest.raises(SystemExit, match="other flags"):
        run_experiments.main([*argv, "--lr", "0.01"])
