"""The shipped CinC 2017 ticket: ship_ticket.py's choice on hand-made grids, the committed
ticket file, and predict.py using it when no --ticket is given."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import SHARED_CINC, tiny_train_args, write_wfdb
from test_summary import experiment  # noqa: F401 - a fixture: 2 seeds, lr_rewind holds at 2x only

import export_ticket
import operating_point
import predict
import prune as pm
import run_state as rs
import ship_ticket
import train as tr
from build_datasets import synthetic_record
from export_ticket import load_ticket
from model import CLASSES

SHIPPED = predict.SHIPPED_TICKET


def _grid(exp: Path, table: pd.DataFrame, carried: tuple[int, ...]) -> None:
    """Write the fixture's results.csv and a state.npz (content unread by choose) for the
    lr_rewind chain and dense run of each seed in ``carried``."""
    table.assign(remaining=1, val_accuracy=0.9, test_accuracy=0.9).to_csv(exp / "results.csv", index=False)
    for seed in carried:
        for folder in ("lr_rewind", "dense"):
            (exp / f"seed{seed}" / folder / "state.npz").write_bytes(b"")


def test_choice_is_the_interval_rule_winner_of_a_carried_seed(tmp_path: Path,
                                                              experiment: pd.DataFrame) -> None:  # noqa: F811
    """lr_rewind holds at 2x by the interval rule (finetune at no level): the choice is its
    2x round, of the carried seed with the higher validation F1; a grid whose winning chain
    no seed carries is refused."""
    _grid(tmp_path, experiment, carried=())
    with pytest.raises(SystemExit, match="no seed of lr_rewind"):
        ship_ticket.choose(tmp_path, 0.01)
    _grid(tmp_path, experiment, carried=(1,))
    choice = ship_ticket.choose(tmp_path, 0.01)
    assert (choice["method"], choice["round"], choice["seed"]) == ("lr_rewind", 1, 1)
    assert choice["methods"]["finetune"]["level"] is None and "dense_equal_steps" not in choice["methods"]
    _grid(tmp_path, experiment, carried=(0, 1))
    rows = experiment[(experiment["method"] == "lr_rewind") & (experiment["round"] == 1)]
    best = int(rows.sort_values("val_challenge_f1", ascending=False)["seed"].iloc[0])
    assert ship_ticket.choose(tmp_path, 0.01)["seed"] == best


def test_retrain_re_makes_a_carried_ticket_from_its_state(tiny_data: Path, tmp_path: Path) -> None:
    """A 2-round lr_rewind chain carried only by its state.npz files (no *.pt, as in a fresh
    clone) is re-made round by round; on the machine and thread count that ran it, the
    re-made round 2 repeats the recorded one exactly (its predictions and losses)."""
    exp = tmp_path / "exp"
    chain = ["--seed", "0", "--retrain", "lr_rewind", "--prune-fraction", "0.5", "--target-ratio", "4",
             "--rewind-to", "1ep"]
    tr.run(tr.parse_args(tiny_train_args(tiny_data, exp / "seed0", *chain)), report=False)
    rs.main(["save", "--masks", "--dense", str(exp)])
    recorded = exp / "seed0" / "lr_rewind" / "round_02"
    for p in exp.rglob("*.pt"):
        p.unlink()
    run_dir = ship_ticket.retrain({"exp": str(exp), "seed": 0, "method": "lr_rewind", "round": 2}, tmp_path / "out")
    assert run_dir == tmp_path / "out" / ship_ticket.RETRAINED / "seed0" / "lr_rewind" / "round_02"
    assert (run_dir.parent / "round_01" / tr.FINAL).is_file()  # lr_rewind starts each round from the last
    assert (run_dir / tr.PREDICTIONS).read_bytes() == (recorded / tr.PREDICTIONS).read_bytes()
    losses = ["step", "lr", "train_loss", "val_loss"]
    assert pd.read_csv(run_dir / tr.HISTORY)[losses].equals(pd.read_csv(recorded / tr.HISTORY)[losses])


def test_af_interval_point_is_a_plain_count() -> None:
    labels = np.array([1, 1, 1, 1, 0, 0, 2, 1])  # A = 1
    preds = np.array([1, 1, 0, 0, 1, 0, 2, 1])
    out = ship_ticket.af_interval(labels, preds)
    assert out["sensitivity"][0] == pytest.approx(3 / 5) and out["ppv"][0] == pytest.approx(3 / 4)
    for point, low, high in out.values():
        assert 0 <= low <= point <= high <= 1


def test_the_shipped_ticket_is_a_small_real_data_ticket() -> None:
    """The committed file: under the 1 MB limit, a pruned CinC 2017 network of the grid
    (not the synthetic demo's), as its choice.json says."""
    assert SHIPPED.is_file(), f"{SHIPPED} is not in the checkout"
    assert SHIPPED.stat().st_size < 1_000_000
    ignored = subprocess.run(["git", "check-ignore", "-q", str(SHIPPED)], cwd=SHIPPED.parent, check=False)
    assert ignored.returncode != 0, f"{SHIPPED} is ignored by git: a fresh clone would lack it"
    model, meta = load_ticket(SHIPPED)
    choice = json.loads((SHIPPED.parent / "choice.json").read_text())
    assert f"seed{choice['seed']}/{choice['method']}/round_{choice['round']:02d}" in meta["source"]
    weights = list(pm.prunable_weights(model).values())
    total, alive = sum(w.numel() for w in weights), sum(int((w != 0).sum()) for w in weights)
    assert total / alive == pytest.approx(choice["compression"], rel=0.01)
    assert meta["fs"] == 200 and meta["model"]["width"] == 0.25


def test_the_shipped_ticket_holds_its_af_operating_point() -> None:
    """The threshold in the shipped ticket is operating_point's choice on the validation
    probabilities of the ticket's own evaluation (the committed predictions.csv, whose
    classes repeat the retrained run's), with the test figures at it; the ticket records the
    data set and split the run was trained on, and its reports show the threshold."""
    meta = load_ticket(SHIPPED)[1]
    op = meta["af_operating_point"]
    assert op == operating_point.shipped_threshold(SHIPPED.parent, "ppv", 0.9)
    assert op["chosen_on"] == "val" and op["threshold"] is not None and op["val_ppv"] >= 0.9
    run = Path(meta["source"])
    assert meta["data_fingerprint"] == json.loads((run.parent / "config.json").read_text())["data_fingerprint"]
    assert meta["split"] == export_ticket.made_with(run)["split"]
    ours = pd.read_csv(SHIPPED.parent / tr.PREDICTIONS, keep_default_na=False).set_index("record")
    recorded = pd.read_csv(run / tr.PREDICTIONS, keep_default_na=False).set_index("record")
    assert ours["predicted"].sort_index().equals(recorded["predicted"].sort_index())
    assert json.loads((SHIPPED.parent / "report.json").read_text())["af_operating_point"] == op
    for name in ("README.md", "report.md"):
        assert f"p_A >= {op['threshold']:.5g}" in (SHIPPED.parent / name).read_text(), name


def _predict_json(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, list[dict]]:
    code = predict.main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_predict_uses_the_shipped_ticket_by_default(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """No --ticket: the shipped ticket classifies (the same output as naming it); a WFDB
    record may be named without its extension."""
    x = synthetic_record("N", np.random.default_rng(1), fs=300, seconds=(12, 12))
    np.save(tmp_path / "r.npy", x)
    code, default = _predict_json(capsys, "--fs", "300", str(tmp_path / "r.npy"))
    assert code == 0 and default[0]["class"] in CLASSES
    assert default[0]["af_flag"]["chosen_for"] == "validation PPV >= 0.9"  # the shipped operating point
    assert _predict_json(capsys, "--ticket", str(SHIPPED), "--fs", "300", str(tmp_path / "r.npy")) == (0, default)
    write_wfdb(tmp_path, "R1", x)  # a WFDB record named as WFDB tools name it, without extension
    code, bare = _predict_json(capsys, str(tmp_path / "R1"))
    named = _predict_json(capsys, str(tmp_path / "R1.mat"))[1]
    assert code == 0 and {**bare[0], "file": ""} == {**named[0], "file": ""}


@pytest.mark.skipif(not (SHARED_CINC / "REFERENCE-v3.csv").is_file(),
                    reason=f"real CinC 2017 records not found at {SHARED_CINC}")
def test_predict_classifies_real_records_with_the_shipped_ticket(capsys: pytest.CaptureFixture) -> None:
    """The first 40 CinC records (most of them in the ticket's training split: a check that
    the default is a real-data ticket, not a measurement of it): at least 75 % right, where
    the synthetic demo's ticket or an untrained network would not be."""
    labels = pd.read_csv(SHARED_CINC / "REFERENCE-v3.csv", header=None, names=["name", "label"]).head(40)
    code, out = _predict_json(capsys, *(str(SHARED_CINC / f"{n}.mat") for n in labels["name"]))
    assert code == 0 and len(out) == 40
    right = np.mean([o["class"] == label for o, label in zip(out, labels["label"], strict=True)])
    assert right >= 0.75, f"{right:.0%} of 40 real records right"
