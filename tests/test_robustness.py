"""robustness.py: the corruptions, the paired bootstrap of sums of F1 terms, and a whole run
on tiny synthetic data with untrained networks written as tickets (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import export_ticket as et
import prune as pm
import robustness as rb
import run_folders as rf
from build_datasets import FS, synthetic_record
from model import HannunConfig, HannunNet


def _record(seconds: float = 20) -> np.ndarray:
    from build_datasets import resample  # noqa: PLC0415

    return resample(synthetic_record("N", np.random.default_rng(3), fs=300, seconds=(seconds, seconds)), 300)


def test_corruptions_do_what_they_say() -> None:
    x = _record()
    rng = lambda: np.random.default_rng(0)  # noqa: E731
    assert np.array_equal(rb.corrupt(x, "clean", rng()), x)
    assert np.array_equal(rb.corrupt(x, "gain-2", rng()), np.clip(2 * x.astype(int), -32768, 32767))
    noise = rb.corrupt(x, "emg-100", rng()).astype(float) - x
    assert noise.std() == pytest.approx(100, rel=0.05) and abs(noise.mean()) < 10
    wander = rb.corrupt(x, "wander-1", rng()).astype(float) - x
    assert np.abs(wander).max() == pytest.approx(1000, rel=0.05)
    assert np.abs(np.diff(wander)).max() < 1000 * 2 * np.pi * 0.3 / FS + 1  # slow: at most 0.3 Hz
    for fs in (250, 500):
        y = rb.corrupt(x, f"fs-{fs}", rng())
        assert len(y) == len(x) and np.abs(y.astype(float) - x)[50:-50].max() < 0.05 * np.ptp(x)
    assert not np.array_equal(rb.corrupt(x, "emg-100", rng()), rb.corrupt(x, "emg-100", np.random.default_rng(1)))


def test_paired_bootstrap_of_a_difference_with_itself_is_zero() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 300)
    preds = [np.where(rng.random(300) < 0.3, rng.integers(0, 4, 300), labels) for _ in range(2)]
    assert rb.paired_bootstrap(labels, [(1.0, preds), (-1.0, preds)], replicates=200) == (0.0, 0.0, 0.0)
    point, low, high = rb.paired_bootstrap(labels, [(1.0, preds)], replicates=200)
    assert point == pytest.approx(np.mean([rb.challenge_f1(labels, p) for p in preds]))
    assert low <= point <= high
    with pytest.raises(ValueError, match="same seeds"):
        rb.paired_bootstrap(labels, [(1.0, preds), (-1.0, preds[:1])])


def _ticket(path: Path, seed: int, prune: float, data: Path) -> Path:
    """An untrained width-0.125 network (magnitude-pruned by ``prune``) as a ticket file that
    records ``data`` as its data set (robustness.py evaluates a ticket only on its own)."""
    torch.manual_seed(seed)
    cfg = HannunConfig(width=0.125, blocks=4)
    model = HannunNet(cfg).eval()
    masks = pm.magnitude_prune(model, pm.full_masks(model), prune, "global", {}) if prune else None
    et.save_ticket(et.ticket_arrays(cfg, model.state_dict(), masks, {"mean": 0.0, "std": 300.0}, "fp32", "test",
                                    {"data_fingerprint": rf.data_fingerprint(data)}), path)
    return path


def test_a_run_on_tiny_data_pairs_each_ticket_with_dense(tiny_data: Path, tmp_path: Path) -> None:
    """Two seeds of dense, of a copy of dense (it changes exactly as dense does: 0 with a
    zero interval) and of a pruned network; every output written, the F1 of clean equal to
    a plain count."""
    nets = []
    for seed in (0, 1):
        dense = _ticket(tmp_path / f"dense{seed}.npz", seed, 0.0, tiny_data)
        nets += ["--net", f"dense:{seed}={dense}", "--net", f"copy:{seed}={dense}",
                 "--net", f"pruned 4x:{seed}={_ticket(tmp_path / f'p{seed}.npz', seed, 0.75, tiny_data)}"]
    out = tmp_path / "rob"
    table = rb.main(["--data", str(tiny_data), "--out", str(out), "--conditions", "gain-3,emg-200",
                     "--replicates", "100", *nets])
    assert {p.name for p in out.iterdir()} >= {"predictions.csv", "robustness.md", "robustness.json", "robustness.png"}
    copy = table[(table["network"] == "copy") & (table["condition"] != "clean")]
    assert (copy[["vs_dense", "vs_dense_low", "vs_dense_high"]] == 0).all().all()
    assert (copy["paired_seeds"] == 2).all()
    pruned = table[(table["network"] == "pruned 4x") & (table["condition"] == "emg-200")].iloc[0]
    assert pruned["vs_dense_low"] <= pruned["vs_dense"] <= pruned["vs_dense_high"]
    preds = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    clean = preds[preds["condition"] == "clean"]
    f1 = np.mean([rb.challenge_f1(clean["label"].map("NAO~".index).to_numpy(),
                                  clean[f"dense seed{s}"].map("NAO~".index).to_numpy()) for s in (0, 1)])
    row = table[(table["network"] == "dense") & (table["condition"] == "clean")].iloc[0]
    assert row["f1"] == pytest.approx(f1)
    assert json.loads((out / "robustness.json").read_text())[0]["network"] == "dense"
    text = (out / "robustness.md").read_text()
    assert "Does the ticket break first?" in text and "called noise" in text
    (out / "robustness.md").write_text(text.replace("| gain-3 |", "| edited |"))
    again = rb.main(["--out", str(out), "--tables-only", "--conditions", "gain-3,emg-200", "--replicates", "100"])
    pd.testing.assert_frame_equal(again, table)  # the same tables from predictions.csv alone
    assert (out / "robustness.md").read_text() == text


def test_bad_flags_are_named(tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for argv, message in ((["--conditions", "snow-3"], "unknown"), (["--conditions", "fs-10"], "50-5000"),
                          (["--net", "x:0=/nonexistent"], "NAME:SEED=PATH"), ([], "no dense network")):
        with pytest.raises(SystemExit):
            rb.parse_args(["--data", str(tiny_data), "--out", str(tmp_path), *argv])
        assert message in capsys.readouterr().err


def test_agreement_with_a_runs_recorded_predictions(tmp_path: Path) -> None:
    pd.DataFrame({"record": ["a", "b", "c", "d"], "split": ["test", "test", "test", "val"],
                  "label": list("NANN"), "predicted": list("NAON")}).to_csv(tmp_path / "predictions.csv", index=False)
    names = np.array(["c", "a", "b"])
    assert rb.recorded_agreement(tmp_path, "test", names, np.array([2, 0, 1])) == 1.0
    assert rb.recorded_agreement(tmp_path, "test", names, np.array([0, 0, 1])) == pytest.approx(2 / 3)
