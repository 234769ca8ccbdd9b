"""window_eval.py: records scored as windows of the training length, beside whole records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import export_ticket as et
import train as tr
import window_eval


def test_a_record_is_the_mean_over_its_windows_valid_steps(reference: Path) -> None:
    """2,600 samples in windows of 1,024: pieces of 1,024, 1,024 and 552 (4, 4 and 2 valid
    steps of 256); a last piece shorter than one step is dropped; a record shorter than one
    window is the whole-record pass over its valid steps."""
    cfg, state, _, _, _ = et.read_run(reference / "seed0" / "dense")
    model = et.build_model(cfg, state)
    x = np.random.default_rng(0).normal(size=2600).astype(np.float32)

    def steps(piece: np.ndarray, n: int) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.from_numpy(np.pad(piece, (0, 1024 - len(piece))))[None, None])[0, :n]

    want = torch.cat([steps(x[:1024], 4), steps(x[1024:2048], 4), steps(x[2048:], 2)]).mean(0)
    got = window_eval.window_logits(model, x, 1024, 256, bf16=False)
    assert torch.allclose(got, want, atol=1e-5), (got, want)
    got = window_eval.window_logits(model, x[:2048 + 100], 1024, 256, bf16=False)  # 100 samples: no step
    assert torch.allclose(got, torch.cat([steps(x[:1024], 4), steps(x[1024:2048], 4)]).mean(0), atol=1e-5)
    with torch.no_grad():
        whole = model(torch.from_numpy(np.pad(x[:1000], (0, 24)))[None, None])[0, :3].mean(0)
    assert torch.allclose(window_eval.window_logits(model, x[:1000], 1024, 256, bf16=False), whole, atol=1e-5)


def test_windows_csv_for_every_run_with_its_weights(reference: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    exp = tmp_path / "exp"
    shutil.copytree(reference, exp)
    window_eval.main([str(exp), "--only", "seed1/weight_rewind/*", "--splits", "test"])
    only = pd.read_csv(exp / window_eval.OUT)
    assert list(only["folder"]) == ["seed1/weight_rewind/round_01", "seed1/weight_rewind/round_02"]
    assert only["windowed_minus_dense"].notna().all()  # the seed's dense run scored for the pairing, unrecorded
    window_eval.main([str(exp)])  # the rest; the rows above kept
    table = pd.read_csv(exp / window_eval.OUT)
    assert table.iloc[:2].equals(only)
    folders = sorted(str(p.parent.relative_to(exp)) for p in exp.glob(f"seed*/**/{tr.METRICS}"))
    assert sorted(set(table["folder"])) == folders and len(table) == 2 * len(folders)
    for _, row in table.iterrows():
        recorded = json.loads((exp / row["folder"] / tr.METRICS).read_text())[row["split"]]["challenge_f1"]
        assert row["whole_challenge_f1"] == pytest.approx(recorded, abs=1e-6)
        assert 0 <= row["windowed_challenge_f1"] <= 1
        if row["folder"].endswith("/dense"):
            assert np.isnan(row["windowed_minus_dense"])
        else:
            seed_dense = row["folder"].split("/")[0] + "/dense"
            dense = table[(table["folder"] == seed_dense) & (table["split"] == row["split"])]
            diff = row["windowed_challenge_f1"] - dense["windowed_challenge_f1"].item()
            assert row["windowed_minus_dense"] == pytest.approx(diff, abs=1e-5)
            assert row["low"] - 1e-9 <= diff <= row["high"] + 1e-9

    window_eval.main([str(exp)])  # nothing new
    assert "0 row(s) added" in capsys.readouterr().out
    round_dir = exp / "seed1" / "lr_rewind" / "round_02"
    kept = table[table["folder"] != "seed1/lr_rewind/round_02"]
    kept.to_csv(exp / window_eval.OUT, index=False)
    (round_dir / tr.FINAL).unlink()  # a fresh clone: no weights
    window_eval.main([str(exp)])
    assert "round_02: no model.pt here" in capsys.readouterr().out
    assert len(pd.read_csv(exp / window_eval.OUT)) == len(kept)
    with pytest.raises(SystemExit):
        window_eval.main([str(exp), "--splits", "train"])
    assert "--splits: 'train' is not val or test" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        window_eval.main([str(exp), "--only", "seed9/*"])
    assert "no finished run matching 'seed9/*'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        window_eval.main([str(tmp_path / "nowhere")])
    assert "nowhere is not a folder" in capsys.readouterr().err
