"""Scoring on windows of the training length: train.predict_windows (Batcher.windows), the
scores train.py records, and window_eval.py's backfill and table."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT

import export_ticket as et
import predict
import train as tr
import window_eval
from batching import Batcher, Normalizer
from build_datasets import ECGDataset
from model import CLASSES


def one_split(records: list[np.ndarray]) -> ECGDataset:
    """Test records (already z-scored: the Normalizer below is the identity) in one split."""
    width = 256 * -(-max(len(r) for r in records) // 256)
    signals = np.stack([np.pad(r, (0, width - len(r))) for r in records])
    n = len(records)
    return ECGDataset(names=np.array([f"r{i}" for i in range(n)]), labels=np.zeros(n, dtype=np.int64),
                      lengths=np.array([len(r) for r in records]), split=np.array(["test"] * n),
                      signals=signals, fs=200, info={})


def test_a_record_is_the_mean_over_its_windows_valid_steps(reference: Path) -> None:
    """2,600 samples in windows of 1,024: pieces of 1,024, 1,024 and 552 (4, 4 and 2 valid
    steps of 256); a last piece shorter than one step is dropped; a record shorter than one
    window is the whole-record pass over its valid steps. Records of other lengths batched
    together give each record's own answer. predict.py --windows reads a record the same way."""
    cfg, state, _, _, _ = et.read_run(reference / "seed0" / "dense")
    model = et.build_model(cfg, state).double()
    torch.set_default_dtype(torch.float64)
    try:
        x = np.random.default_rng(0).normal(size=2600)

        def steps(piece: np.ndarray, n: int) -> torch.Tensor:
            with torch.no_grad():
                return model(torch.from_numpy(np.pad(piece, (0, 1024 - len(piece))))[None, None])[0, :n]

        want = [torch.cat([steps(x[:1024], 4), steps(x[1024:2048], 4), steps(x[2048:], 2)]).mean(0),
                torch.cat([steps(x[:1024], 4), steps(x[1024:2048], 4)]).mean(0),  # + 100 samples: no step
                steps(x[:1000], 3).mean(0)]
        ds = one_split([x, x[:2048 + 100], x[:1000]])
        batcher = Batcher(ds, Normalizer(0.0, 1.0), 256, torch.device("cpu"))
        xs, n, owner = batcher.windows(ds.indices("test"), 1024)
        assert xs.shape == (6, 1, 1024) and n.tolist() == [4, 4, 2, 4, 4, 3] and owner.tolist() == [0, 0, 0, 1, 1, 2]
        for batch in (3, 1):  # all records in one forward pass, or one at a time: the same classes
            got = tr.predict_windows(model, batcher, ds.indices("test"), 1024, batch, bf16=False)
            assert got.tolist() == [int(w.argmax()) for w in want]
        meta = {"normalizer": {"mean": 0.0, "std": 1.0}, "classes": list(CLASSES), "window": 1024}
        for record, w, segments in zip([x, x[:2148], x[:1000]], want, [10, 8, 3], strict=True):
            out = predict.classify(model, meta, record, windows=True)  # predict.py --windows: the same rule
            assert list(out["probabilities"].values()) == pytest.approx(torch.softmax(w, 0).tolist(), abs=1e-4)
            assert len(out["segments"]) == segments
        whole = predict.classify(model, meta, x)  # without --windows: one pass over the whole record
        with torch.no_grad():
            one_pass = model(torch.from_numpy(np.pad(x, (0, 2816 - 2600)))[None, None])[0, :10].mean(0)
        assert list(whole["probabilities"].values()) == pytest.approx(torch.softmax(one_pass, 0).tolist(), abs=1e-4)
    finally:
        torch.set_default_dtype(torch.float32)


def test_train_py_records_windowed_scores(reference: Path) -> None:
    """A run trained on windows (the tiny grid's --crop 1024) has windowed scores in its
    metrics.json, its predictions.csv and its rounds.csv row; they are the classes'
    scores (recomputed here from predictions.csv)."""
    from metrics import classification_metrics
    from model import CLASSES

    run = reference / "seed0" / "weight_rewind" / "round_01"
    metrics = json.loads((run / tr.METRICS).read_text())
    preds = pd.read_csv(run / tr.PREDICTIONS, keep_default_na=False)
    rounds = pd.read_csv(run.parent / "rounds.csv").set_index("round")
    for split in ("val", "test"):
        part = preds[preds["split"] == split]
        labels, pred = part["label"].map(CLASSES.index), part[tr.WINDOWS_COLUMN].map(CLASSES.index)
        scores = classification_metrics(labels.to_numpy(), pred.to_numpy())
        assert metrics[split]["windows"]["window"] == 1024
        assert metrics[split]["windows"]["challenge_f1"] == pytest.approx(scores["challenge_f1"])
        assert rounds.loc[1, f"{split}_challenge_f1{tr.WINDOWS_SUFFIX}"] == pytest.approx(scores["challenge_f1"],
                                                                                            abs=1e-5)
        assert rounds.loc[1, f"{split}_accuracy{tr.WINDOWS_SUFFIX}"] == pytest.approx(scores["accuracy"], abs=1e-5)


def strip_windows(run: Path) -> None:
    """Make ``run`` look like a run finished before train.py scored windows."""
    metrics = json.loads((run / tr.METRICS).read_text())
    for split in ("val", "test"):
        metrics[split].pop("windows")
    (run / tr.METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
    preds = pd.read_csv(run / tr.PREDICTIONS, keep_default_na=False)
    preds.drop(columns=tr.WINDOWS_COLUMN).to_csv(run / tr.PREDICTIONS, index=False)


def test_backfill_gives_what_train_py_records_and_the_table(reference: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    exp = tmp_path / "exp"
    shutil.copytree(reference, exp)
    runs = [exp / "seed1" / "dense", exp / "seed1" / "weight_rewind" / "round_02"]
    recorded = {r: (json.loads((r / tr.METRICS).read_text()), pd.read_csv(r / tr.PREDICTIONS, keep_default_na=False))
                for r in runs}
    for r in runs:
        strip_windows(r)
    window_eval.main([str(exp), "--only", "seed1/weight_rewind/*"])  # the dense run is not asked for
    assert "windows" not in json.loads((runs[0] / tr.METRICS).read_text())["test"]
    window_eval.main([str(exp)])
    out = capsys.readouterr().out
    assert "2 split(s) scored here" in out and "4 split(s) scored here" not in out
    for r, (metrics, preds) in recorded.items():
        again = json.loads((r / tr.METRICS).read_text())
        for split in ("val", "test"):
            assert again[split]["windows"].pop("added_by").startswith("window_eval.py")
            assert again[split]["windows"] == pytest.approx(metrics[split]["windows"])
        assert pd.read_csv(r / tr.PREDICTIONS, keep_default_na=False)[tr.WINDOWS_COLUMN].equals(
            preds[tr.WINDOWS_COLUMN])

    table = pd.read_csv(exp / window_eval.OUT)
    folders = sorted(str(p.parent.relative_to(exp)) for p in exp.glob(f"seed*/**/{tr.METRICS}"))
    assert sorted(set(table["folder"])) == folders and len(table) == 2 * len(folders)
    for _, row in table.iterrows():
        recorded_f1 = json.loads((exp / row["folder"] / tr.METRICS).read_text())[row["split"]]
        assert row["whole_challenge_f1"] == pytest.approx(recorded_f1["challenge_f1"], abs=1e-6)
        assert row["windowed_challenge_f1"] == pytest.approx(recorded_f1["windows"]["challenge_f1"], abs=1e-6)
        if row["folder"].endswith("/dense"):
            assert np.isnan(row["windowed_minus_dense"])
        else:
            seed_dense = row["folder"].split("/")[0] + "/dense"
            dense = table[(table["folder"] == seed_dense) & (table["split"] == row["split"])]
            diff = row["windowed_challenge_f1"] - dense["windowed_challenge_f1"].item()
            assert row["windowed_minus_dense"] == pytest.approx(diff, abs=1e-5)
            assert row["low"] - 1e-9 <= diff <= row["high"] + 1e-9

    window_eval.main([str(exp)])  # nothing to score: the table from the files alone
    assert "0 split(s) scored here" in capsys.readouterr().out
    assert pd.read_csv(exp / window_eval.OUT).equals(table)


def test_runs_without_weights_or_window_are_said(reference: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    exp = tmp_path / "exp"
    shutil.copytree(reference, exp)
    run = exp / "seed1" / "lr_rewind" / "round_02"
    strip_windows(run)
    (run / tr.FINAL).unlink()  # a fresh clone: no weights
    window_eval.main([str(exp)])
    assert "round_02: no model.pt here" in capsys.readouterr().out
    assert "seed1/lr_rewind/round_02" not in set(pd.read_csv(exp / window_eval.OUT)["folder"])

    whole = exp / "seed0" / "dense"  # a run trained on whole records has no training window
    strip_windows(whole)
    cfg_path = next(p for p in (whole / "config.json", whole.parent / "config.json") if p.is_file())
    config = json.loads(cfg_path.read_text())
    config["flags"]["crop"] = 0
    cfg_path.write_text(json.dumps(config))
    with pytest.raises(SystemExit, match="trained on whole records"):
        window_eval.main([str(exp), "--only", "seed0/dense"])


def test_bad_arguments_name_the_culprit(reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for argv, message in (([str(reference), "--splits", "train"], "--splits: 'train' is not val or test"),
                          ([str(reference), "--only", "seed9/*"], "no finished run matching 'seed9/*'"),
                          ([str(tmp_path / "nowhere")], "nowhere is not a folder"),
                          ([str(reference), "--threads", "0"], "--threads must be >= 1")):
        with pytest.raises(SystemExit):
            window_eval.main(argv)
        assert message in capsys.readouterr().err


def test_results_and_plots_read_windowed_scores(reference: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    """run_experiments --collect takes the windowed scores from metrics.json (a run without
    them: NaN, whatever its rounds.csv says); plot_results --score windows reads them in place
    of the whole-record scores, and names a run that lacks them."""
    import plot_results
    import run_experiments

    exp = tmp_path / "exp"
    shutil.copytree(reference, exp)
    table = run_experiments.write_results(exp)
    col = f"test_challenge_f1{tr.WINDOWS_SUFFIX}"
    for _, row in table.iterrows():
        metrics = json.loads((exp / row["folder"] / tr.METRICS).read_text())
        assert row[col] == pytest.approx(metrics["test"]["windows"]["challenge_f1"])
    plot_results.main(["--exp", str(exp), "--score", "windows"])
    summary = (exp / "plots-windows" / "summary.md").read_text()
    assert "Every score below is on windows of the training length" in summary
    windowed = plot_results.load(exp)
    assert (windowed["test_challenge_f1"] == windowed[col]).all()
    # across widths too, run as a user runs it: as a script plot_results is __main__, another
    # module object than the plot_results that plot_widths imports (the scoring once got lost there)
    out = tmp_path / "widths"
    subprocess.run([sys.executable, "plot_results.py", "--widths", str(exp), "--score", "windows", "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    text = (out / "widths.md").read_text()
    assert "Every score below is on windows of the training length" in text and "--score windows" in text
    raw = pd.read_csv(exp / "results.csv").query("accepted")

    def differences(column: str) -> pd.Series:  # ticket - dense, test, per method and compression
        dense = raw[raw["round"] == 0].drop_duplicates("seed").set_index("seed")[column]
        tickets = raw[(raw["round"] > 0) & (raw["control"] == "none") & ~raw["method"].isin(tr.BASELINES)]
        return tickets.assign(d=tickets[column].to_numpy() - dense[tickets["seed"]].to_numpy()
                              ).groupby(["method", "compression"])["d"].mean().map("{:+.3f}".format)

    wins, holes = differences(col), differences("test_challenge_f1")
    (method, ratio), want = next((k, v) for k, v in wins.items() if v != holes[k])  # a level the scorings part
    row = next(line for line in text.splitlines() if line.startswith(f"| {method} | ") and f"| {ratio:.1f}x |" in line)
    assert f"| {want} (" in row, row
    plot_results.main(["--exp", str(exp)])  # whole records again: the same table as before
    whole = plot_results.load(exp)
    assert not (whole["test_challenge_f1"] == whole[col]).all()
    assert "Every score below" not in (exp / "plots" / "summary.md").read_text()

    strip_windows(exp / "seed1" / "lr_rewind" / "round_02")
    table = run_experiments.write_results(exp)
    assert table.loc[table["folder"] == "seed1/lr_rewind/round_02", col].isna().all()
    with pytest.raises(SystemExit, match="seed1/lr_rewind/round_02: score them with python window_eval.py"):
        plot_results.main(["--exp", str(exp), "--score", "windows"])
    capsys.readouterr()
