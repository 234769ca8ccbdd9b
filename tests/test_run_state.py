"""run_state.py: a chain carried to a fresh clone goes on exactly as if it had never stopped,
and a dense run rebuilt from its flags is kept only when it repeats the recorded run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

import run_folders as rf
import run_state as rs
import train as tr
from tests.conftest import tiny_train_args

CHAIN = ["--seed", "0", "--retrain", "lr_rewind", "--prune-fraction", "0.5", "--target-ratio", "8",
         "--rewind-to", "1ep"]


def chain(data: Path, out: Path) -> pd.DataFrame:
    return tr.run(tr.parse_args(tiny_train_args(data, out, *CHAIN)), report=False)


def drop_weights(exp: Path) -> None:
    """What a fresh clone of the repository holds: no *.pt file."""
    for p in exp.rglob("*.pt"):
        p.unlink()


@pytest.fixture(scope="module")
def finished(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-round lr_rewind chain (2x, 4x, 8x) run without a stop: the reference."""
    exp = tmp_path_factory.mktemp("ref") / "exp"
    chain(tiny_data, exp / "seed0")
    return exp


def stopped_after_round_2(finished: Path, dest: Path) -> Path:
    """The chain as it was when round 2 had finished (rounds.csv is rewritten after each round)."""
    shutil.copytree(finished, dest)
    method = dest / "seed0" / "lr_rewind"
    shutil.rmtree(method / "round_03")
    table = pd.read_csv(method / tr.ROUNDS)
    table[table["round"] <= 2].to_csv(method / tr.ROUNDS, index=False)
    return dest


def test_tensors_round_trip_exactly() -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 3, 5)
    w[w.abs() < 0.5] = 0
    w[0, 0, :2] = -0.0  # a pruned negative weight times its 0 mask
    tensors = {"w": w, "mask": w != 0, "steps": torch.tensor(7), "empty": torch.zeros(0)}
    arrays: dict = {}
    rs.pack_tensors("p", tensors, arrays)
    back = rs.unpack_tensors("p", arrays)
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
        assert rs.state_digest({name: back[name]}) == rs.state_digest({name: t}), name  # signs of zeros too


def test_carried_chain_continues_exactly(finished: Path, tiny_data: Path, tmp_path: Path) -> None:
    exp = stopped_after_round_2(finished, tmp_path / "exp")
    method = exp / "seed0" / "lr_rewind"
    assert rs.unfinished(method)
    rs.main(["save", str(exp)])
    assert (method / rs.STATE).is_file()
    drop_weights(exp)

    with pytest.raises(SystemExit, match="init.pt is missing|model.pt is missing"):
        chain(tiny_data, exp / "seed0")  # a fresh clone without the state cannot go on

    rs.main(["restore", str(exp)])
    assert (exp / "seed0" / "dense" / tr.INIT).is_file() and (method / "round_02" / tr.FINAL).is_file()
    assert not (exp / "seed0" / "dense" / tr.FINAL).is_file()  # only what the next rounds need
    table = chain(tiny_data, exp / "seed0")
    reference = pd.read_csv(finished / "seed0" / "lr_rewind" / tr.ROUNDS)
    pd.testing.assert_frame_equal(table.drop(columns="train_seconds").reset_index(drop=True),
                                  reference.drop(columns="train_seconds"), check_dtype=False)
    assert ((method / "round_03" / tr.PREDICTIONS).read_bytes()
            == (finished / "seed0" / "lr_rewind" / "round_03" / tr.PREDICTIONS).read_bytes())
    assert (rs.state_digest(torch.load(method / "round_03" / tr.FINAL))  # bit for bit, signs of zeros too
            == rs.state_digest(torch.load(finished / "seed0" / "lr_rewind" / "round_03" / tr.FINAL)))


def test_save_skips_finished_chains_and_keeps_a_state_without_weights(finished: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    exp = tmp_path / "exp"
    shutil.copytree(finished, exp)
    method = exp / "seed0" / "lr_rewind"
    assert not rs.unfinished(method)
    rs.main(["save", str(exp)])
    assert not (method / rs.STATE).exists()

    exp2 = stopped_after_round_2(finished, tmp_path / "exp2")
    rs.main(["save", str(exp2)])
    state = (exp2 / "seed0" / "lr_rewind" / rs.STATE).read_bytes()
    drop_weights(exp2)
    rs.main(["save", str(exp2)])  # a fresh clone: nothing to save from, the saved state stays
    assert (exp2 / "seed0" / "lr_rewind" / rs.STATE).read_bytes() == state
    assert "weights are not here (kept its earlier state.npz)" in capsys.readouterr().out


def test_restore_refuses_other_flags_and_other_initial_weights(finished: Path, tmp_path: Path) -> None:
    exp = stopped_after_round_2(finished, tmp_path / "exp")
    method = exp / "seed0" / "lr_rewind"
    rs.main(["save", str(exp)])
    drop_weights(exp)
    config = json.loads((exp / "seed0" / "dense" / "config.json").read_text())
    config["flags"]["seed"] = 1  # the seed's init would differ from the saved digest
    (exp / "seed0" / "dense" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match="initial weights .* differ"):
        rs.main(["restore", str(exp)])
    flags = json.loads((method / "config.json").read_text())
    flags["flags"]["prune_fraction"] = 0.3
    (method / "config.json").write_text(json.dumps(flags))
    with pytest.raises(SystemExit, match="saved with other flags"):
        rs.main(["restore", str(exp)])


def test_rebuild_dense_repeats_the_run_or_refuses(finished: Path, tmp_path: Path) -> None:
    exp, other = tmp_path / "exp", tmp_path / "other"
    shutil.copytree(finished, exp)
    shutil.copytree(finished / "seed0" / "dense", other / "seed0" / "dense")  # linked by --dense-from
    drop_weights(exp)
    drop_weights(other)
    rs.main(["rebuild-dense", str(exp), str(other)])
    ref = finished / "seed0" / "dense"
    for d in (exp / "seed0" / "dense", other / "seed0" / "dense"):
        for name in (tr.INIT, tr.FINAL, "rewind_6.pt"):  # 1ep = 6 steps of the tiny data
            assert rs.state_digest(torch.load(d / name)) == rs.state_digest(torch.load(ref / name)), (d, name)
    assert not (exp / "seed0" / ".dense-rebuild").exists()

    drop_weights(exp)
    history = exp / "seed0" / "dense" / tr.HISTORY
    table = pd.read_csv(history)
    table.loc[0, "train_loss"] += 1e-5  # a run that went otherwise, with the same predictions
    table.to_csv(history, index=False)
    with pytest.raises(SystemExit, match="does not repeat the recorded run"):
        rs.main(["rebuild-dense", str(exp)])
    assert not (exp / "seed0" / "dense" / tr.FINAL).exists()  # nothing taken from a run that differs


def test_rebuild_dense_accepts_a_run_recorded_before_probabilities(finished: Path, tmp_path: Path) -> None:
    """A dense run recorded before predictions.csv held class probabilities is compared on its
    own columns: rebuilt, it repeats; a changed predicted class is still refused."""
    exp = tmp_path / "exp"
    shutil.copytree(finished, exp)
    drop_weights(exp)
    path = exp / "seed0" / "dense" / tr.PREDICTIONS
    old = pd.read_csv(path, keep_default_na=False).drop(columns=list(tr.PROBABILITY_COLUMNS))
    old.to_csv(path, index=False)
    rs.main(["rebuild-dense", str(exp)])
    assert (exp / "seed0" / "dense" / tr.FINAL).is_file()

    drop_weights(exp)
    old.loc[0, "predicted"] = "A" if old.loc[0, "predicted"] != "A" else "N"
    old.to_csv(path, index=False)
    with pytest.raises(SystemExit, match="predictions.csv differs"):
        rs.main(["rebuild-dense", str(exp)])


def test_dense_weights_carried_on_request(finished: Path, tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    shutil.copytree(finished, exp)
    rs.main(["save", str(exp)])
    assert not (exp / "seed0" / "dense" / rs.STATE).exists()  # nothing unfinished needs it
    rs.main(["save", "--dense", str(exp)])
    drop_weights(exp)
    rs.main(["restore", str(exp)])
    for name in (tr.INIT, tr.FINAL, "rewind_6.pt"):
        assert (rs.state_digest(torch.load(exp / "seed0" / "dense" / name))
                == rs.state_digest(torch.load(finished / "seed0" / "dense" / name))), name


def test_a_linked_dense_run_is_carried_once_by_its_source(finished: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    """A dense folder linked by --dense-from keeps no state.npz of its own: restore reads the
    source's, save --dense leaves the link alone, and a link to a source with another
    config.json, or one that carries nothing, is named rather than restored from."""
    exp, variant = tmp_path / "exp", tmp_path / "variant"
    shutil.copytree(finished, exp)
    rs.main(["save", "--dense", str(exp)])
    linked = variant / "seed0" / "dense"
    shutil.copytree(exp / "seed0" / "dense", linked, ignore=shutil.ignore_patterns(rs.STATE, "*.pt"))
    (linked / rf.REUSED_FROM).write_text(json.dumps({"source": "../../../exp/seed0/dense"}))
    drop_weights(exp)
    rs.main(["save", "--dense", str(variant)])
    assert not (linked / rs.STATE).exists()
    assert "carries its weights (there)" in capsys.readouterr().out
    rs.main(["restore", str(variant)])
    for name in (tr.INIT, tr.FINAL, "rewind_6.pt"):
        assert (rs.state_digest(torch.load(linked / name))
                == rs.state_digest(torch.load(finished / "seed0" / "dense" / name))), name
    assert not (exp / "seed0" / "dense" / tr.FINAL).exists()  # the source is read, never written

    drop_weights(variant)
    (exp / "seed0" / "dense" / rs.STATE).unlink()
    capsys.readouterr()
    rs.main(["restore", str(variant)])
    assert "which carries no state.npz: nothing restored" in capsys.readouterr().out
    config = json.loads((exp / "seed0" / "dense" / rf.CONFIG).read_text())
    config["flags"]["epochs"] += 1
    (exp / "seed0" / "dense" / rf.CONFIG).write_text(json.dumps(config))
    with pytest.raises(SystemExit, match=r"reused_from.json names .*exp/seed0/dense, whose config.json differs"):
        rs.main(["restore", str(variant)])


def test_a_finished_chain_is_carried_while_its_controls_are_pending(finished: Path, tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    shutil.copytree(finished, exp)
    method = exp / "seed0" / "lr_rewind"
    argv = ["--exp", str(exp), "--methods", "lr_rewind", "--controls", "random_prune", "--control-methods", "all"]
    (exp / "experiment.json").write_text(json.dumps({"commands": [{"argv": argv}]}))
    assert rs.unfinished(method)
    control = exp / "seed0" / "lr_rewind+random_prune"
    control.mkdir()
    pd.DataFrame({"round": [2]}).to_csv(control / tr.ROUNDS, index=False)
    assert rs.unfinished(method)  # a row for an earlier round only
    pd.DataFrame({"round": [3]}).to_csv(control / tr.ROUNDS, index=False)
    assert not rs.unfinished(method)


def test_masks_of_a_finished_chain_carried_on_request(finished: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    """save --masks keeps every round's mask of a finished chain (and no weights), restore
    writes them back bit for bit, and a save where they are gone keeps the saved ones."""
    exp = tmp_path / "exp"
    shutil.copytree(finished, exp)
    method = exp / "seed0" / "lr_rewind"
    rs.main(["save", "--masks", str(exp)])
    drop_weights(exp)
    rs.main(["save", "--masks", str(exp)])  # a fresh clone before restore: the state stays
    assert "finished, but its masks are not here (kept its earlier state.npz)" in capsys.readouterr().out
    rs.main(["restore", str(exp)])
    for r in (1, 2, 3):
        ref = torch.load(finished / "seed0" / "lr_rewind" / f"round_{r:02d}" / tr.MASK)
        back = torch.load(method / f"round_{r:02d}" / tr.MASK)
        assert set(back) == set(ref) and all(torch.equal(back[k], ref[k]) for k in ref), r
    assert not list(method.glob("round_*/" + tr.FINAL))
    state = (method / rs.STATE).read_bytes()
    rs.main(["save", str(exp)])  # a later save without --masks keeps them
    assert (method / rs.STATE).read_bytes() == state


def test_a_carried_chain_keeps_one_round_of_weights_unless_a_control_needs_two(finished: Path, tmp_path: Path,
                                                                                  monkeypatch) -> None:
    """A full-width round's weights are ~21 MB: the state keeps the last round's, and the one
    before only while a weight-keeping method's controls of the last round wait for it."""
    exp = stopped_after_round_2(finished, tmp_path / "exp")
    method = exp / "seed0" / "lr_rewind"
    files = rs.chain_files(method)
    assert [f.parent.name for f in files if f.name == tr.FINAL] == ["round_02"]
    monkeypatch.setattr(rs, "controls_pending", lambda method_dir, last_round: last_round == 2)
    files = rs.chain_files(method)
    assert [f.parent.name for f in files if f.name == tr.FINAL] == ["round_01", "round_02"]
    monkeypatch.setattr(rs, "REWINDING", ("lr_rewind",))  # a rewinding method: its controls start from early weights
    assert [f.parent.name for f in rs.chain_files(method) if f.name == tr.FINAL] == ["round_02"]


FULL_WIDTH = ["--width", "1", "--blocks", "16", "--epochs", "2", "--crop", "1024", "--batch-size", "4",
              "--max-steps", "2", "--quiet", "--seed", "0", "--prune-fraction", "0.5", "--target-ratio", "4",
              "--rewind-to", "1it"]
"""The published 10,466,148-parameter network, two steps a training: the carry of a full-width
chain (its state's size and an exact resume) without its hours of training."""


def test_a_full_width_chain_is_carried_to_a_fresh_clone_bit_for_bit(tiny_data: Path, tmp_path: Path) -> None:
    def run(out: Path, method: str) -> pd.DataFrame:
        return tr.run(tr.parse_args(["--data", str(tiny_data), "--out", str(out), *FULL_WIDTH,
                                     "--retrain", method]), report=False)

    reference = tmp_path / "ref" / "seed0"
    for method in ("finetune", "late_reset"):
        run(reference, method)
    exp = tmp_path / "exp"
    shutil.copytree(reference.parent, exp)
    for method in ("finetune", "late_reset"):  # stopped after round 1 of 2
        shutil.rmtree(exp / "seed0" / method / "round_02")
        table = pd.read_csv(exp / "seed0" / method / tr.ROUNDS)
        table[table["round"] <= 1].to_csv(exp / "seed0" / method / tr.ROUNDS, index=False)
    rs.main(["save", "--dense", str(exp)])
    sizes = {p.parent.name: p.stat().st_size for p in exp.rglob(rs.STATE)}
    # dense: trained + rewind weights, fp32 (41.9 MB each, compressed to 78 MB); a round-1
    # chain: half the weights and its mask (22 MB); late_reset carries its rewind weights too
    assert 75e6 < sizes["dense"] < 82e6 and 20e6 < sizes["finetune"] < 24e6, sizes
    assert 58e6 < sizes["late_reset"] < 64e6, sizes
    drop_weights(exp)
    rs.main(["restore", str(exp)])
    for method in ("finetune", "late_reset"):
        run(exp / "seed0", method)
        ref, new = reference / method / "round_02", exp / "seed0" / method / "round_02"
        assert (new / tr.PREDICTIONS).read_bytes() == (ref / tr.PREDICTIONS).read_bytes()
        assert rs.state_digest(torch.load(new / tr.FINAL)) == rs.state_digest(torch.load(ref / tr.FINAL))
