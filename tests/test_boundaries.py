"""Issue 34's faults, one test per numbered item: each input boundary (record reader, ticket
loader, records.csv and results.csv readers, run-folder flags and lock, the data a ticket is
evaluated on, CSV locales, file-system errors) refuses what it cannot use, naming the file,
record or flag; and the ``--busy skip`` wait of run_experiments.py is cheap. The timing tests
of item 11 are in test_gpu_sitting.py."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
from conftest import ROOT, SHARED_CINC, TINY_FLAGS, tiny_train_args, write_wfdb

import build_datasets as bd
import export_c
import export_ticket as et
import plot_results
import predict
import robustness
import run_experiments as rx
import run_folders as rf
import train as tr
from model import CLASSES, HannunConfig, HannunNet

CFG = HannunConfig(width=0.125, blocks=2)


def make_ticket(path: Path, change: dict | None = None) -> Path:
    """A ticket of an untrained small network (no training needed to test the loader),
    its metadata changed by ``change`` (key -> new value)."""
    state = HannunNet(CFG).state_dict()
    arrays = et.ticket_arrays(CFG, state, None, {"mean": 1.0, "std": 300.0}, "fp32", "test")
    meta = json.loads(arrays["meta"].tobytes())
    meta.update(change or {})
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    et.save_ticket(arrays, path)
    return path


def ecg(seconds: float = 12.0, fs: int = 300, seed: int = 3) -> np.ndarray:
    """A synthetic normal-rhythm ECG in int16 microvolts at ``fs``."""
    return bd.synthetic_record("N", np.random.default_rng(seed), fs=fs, seconds=(seconds, seconds))


def run_predict(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, list[dict], str]:
    code = predict.main([*argv, "--json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out.strip() else [], captured.err


# --------------------------------------------------------------------------- 1: two trainings on one new folder


def test_1_two_runs_starting_one_new_folder_never_mix(tiny_data: Path, tmp_path: Path) -> None:
    """Another process holds the new folder's lock, about to write its config.json (its
    flags: lr 0.01); this one starts the same folder with lr 0.001 meanwhile. It must wait
    for the lock and then be refused, never write its own flags beside the other's run."""
    run_dir = tmp_path / "seed0" / "dense"
    run_dir.mkdir(parents=True)
    theirs, mine = {"lr": 0.01, "seed": 0}, {"lr": 0.001, "seed": 0}
    fingerprint = rf.prepare_run(tmp_path / "scratch", theirs, tiny_data)["data_fingerprint"]
    outcome: dict = {}

    def start() -> None:
        try:
            outcome["record"] = rf.prepare_run(run_dir, mine, tiny_data)
        except SystemExit as e:
            outcome["refused"] = str(e)

    with open(run_dir / rf.LOCK, "a+") as lock:  # the other process, inside its locked write
        fcntl.flock(lock, fcntl.LOCK_EX)
        worker = threading.Thread(target=start)
        worker.start()
        worker.join(2)  # on the old code it wrote its config.json here, unlocked
        rf.atomic_write_text(json.dumps({"flags": theirs, "data_fingerprint": fingerprint}), run_dir / rf.CONFIG)
        fcntl.flock(lock, fcntl.LOCK_UN)
    worker.join(60)
    assert "record" not in outcome, "the second run went ahead in a folder started with other flags"
    assert "--lr 0.01 (now 0.001)" in outcome["refused"]
    assert json.loads((run_dir / rf.CONFIG).read_text())["flags"] == theirs


# --------------------------------------------------------------------------- 2: a ticket evaluated on other data


def test_2_export_on_another_build_or_split_is_refused(tiny_data: Path, tmp_path: Path) -> None:
    seed_dir = tmp_path / "exp" / "seed0"
    tr.main(tiny_train_args(tiny_data, seed_dir, "--epochs", "1", "--max-steps", "1"))
    ds = bd.load_dataset(tiny_data)
    other = tmp_path / "other_split"  # the same records, split with another seed
    labels = [CLASSES[i] for i in ds.labels]
    bd.write_dataset(other, list(ds.names), labels, [s[:n] for s, n in zip(ds.signals, ds.lengths, strict=True)],
                     bd.stratified_split(labels, seed=1, val_fraction=0.2, test_fraction=0.2),
                     {"fs": bd.FS, "flags": {}})
    out = tmp_path / "ticket"
    with pytest.raises(SystemExit, match=r"trained on another data set .*other_split"):
        et.main(["--run", str(seed_dir / "dense"), "--out", str(out), "--data", str(other),
                 "--latency-seconds", "0.01", "--threads", "1", "--dtypes", "fp32"])
    assert not (out / "report.json").exists()
    copy = tmp_path / "copy_of_the_same_build"  # the same data under another path is the same data
    shutil.copytree(tiny_data, copy)
    report = et.main(["--run", str(seed_dir / "dense"), "--out", str(out), "--data", str(copy) + "/",
                      "--latency-seconds", "0.01", "--threads", "1", "--dtypes", "fp32"])
    assert "f1" in report


def _other_split(data: Path, out: Path) -> Path:
    """The records of ``data`` split with another seed: a build whose test records include
    ones a network of ``data`` was trained on."""
    ds = bd.load_dataset(data)
    labels = [CLASSES[i] for i in ds.labels]
    bd.write_dataset(out, list(ds.names), labels, [s[:n] for s, n in zip(ds.signals, ds.lengths, strict=True)],
                     bd.stratified_split(labels, seed=1, val_fraction=0.2, test_fraction=0.2),
                     {"fs": bd.FS, "flags": {}})
    return out


def test_2_a_ticket_file_is_evaluated_only_on_the_data_it_records(tiny_data: Path, tmp_path: Path) -> None:
    """A ticket records the fingerprint and split of its data (export_ticket.made_with);
    robustness.py and export_c.py refuse to evaluate it on another split, naming both
    fingerprints, and on the data it was made with they run. A ticket that records no data
    (exported before) still loads, but is refused on --data: it cannot be checked."""
    table = pd.read_csv(tiny_data / "records.csv", keep_default_na=False, dtype=str)
    mine = rf.data_fingerprint(tiny_data)
    ticket = make_ticket(tmp_path / "t.npz", {"data_fingerprint": mine,
                                              "split": et.split_of(table["record"], table["split"])})
    other = _other_split(tiny_data, tmp_path / "other_split")
    theirs = rf.data_fingerprint(other)
    robust = ["--out", str(tmp_path / "rob"), "--conditions", "clean", "--replicates", "10",
              "--net", f"dense:0={ticket}"]
    with pytest.raises(SystemExit, match=rf"t.npz was made with .*{mine}.*{theirs}: another split"):
        robustness.main(["--data", str(other), *robust])
    assert not (tmp_path / "rob").exists()
    with pytest.raises(SystemExit, match=rf"{mine}.*{theirs}"):
        export_c.main(["--run", str(ticket), "--out", str(tmp_path / "c"), "--dtypes", "fp32", "--data", str(other),
                       "--check", "2", "--seconds", "2.56"])
    assert len(robustness.main(["--data", str(tiny_data), *robust])) > 0
    old = make_ticket(tmp_path / "old.npz")
    assert "data_fingerprint" not in et.load_ticket(old)[1]  # an old ticket loads
    with pytest.raises(SystemExit, match="old.npz does not record the data set"):
        robustness.main(["--data", str(tiny_data), *robust[:-1], f"dense:0={old}"])


# --------------------------------------------------------------------------- 3: samples outside int16


def test_3_samples_outside_int16_are_refused_not_wrapped(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    x = ecg().astype(np.int32)
    x[100] = 73680  # as int16 it would wrap to 8144
    scipy.io.savemat(tmp_path / "R1.mat", {"val": x[None, :]}, format="4")
    (tmp_path / "R1.hea").write_text(f"R1 1 300 {len(x)} 05:05:15 1/05/2000\n"
                                     f"R1.mat 16+24 1000/mV 16 0 {x[0]} 0 0 ECG\n")
    with pytest.raises(bd.DatasetError, match=r"R1: .*R1.mat holds 1 sample\(s\) outside int16 .*73680"):
        bd.read_record(tmp_path, "R1")
    code, _, err = run_predict(capsys, "--ticket", str(make_ticket(tmp_path / "t.npz")), str(tmp_path / "R1.mat"))
    assert code == 1 and "outside int16" in err
    np.save(tmp_path / "big.npy", x.astype(np.float64))  # plain samples beyond +-32.767 mV: not clipped silently
    code, _, err = run_predict(capsys, "--ticket", str(tmp_path / "t.npz"), "--fs", "300", str(tmp_path / "big.npy"))
    assert code == 1 and "big.npy" in err and "beyond +-32.767 mV" in err


# --------------------------------------------------------------------------- 4: ticket metadata


@pytest.mark.parametrize("change, message", [
    ({"classes": ["A", "N", "O", "~"]}, r"classes \['A', 'N', 'O', '~'\], expected exactly"),
    ({"classes": ["N", "A", "O"]}, "classes"),
    ({"classes": None}, "'classes' is None"),
    ({"normalizer": {"mean": 1.0, "std": 0.0}}, "std > 0"),
    ({"normalizer": {"mean": float("nan"), "std": 1.0}}, "finite"),
    ({"fs": 300}, "input rate 300"),
    ({"model": {**vars(CFG), "num_classes": 3}}, "num_classes 3"),
    ({"layers": "x"}, "'layers' is 'x'"),
    ({"data_fingerprint": "abc"}, "data_fingerprint 'abc'"),
    ({"split": {"val": -1, "test": 3, "digest": "x"}}, "split"),
    ({"af_operating_point": {"class": "A", "target": "ppv", "value": 0.9, "threshold": 1.5}}, "af_operating_point"),
    ({"af_operating_point": {"class": "N", "target": "ppv", "value": 0.9, "threshold": 0.5}}, "af_operating_point"),
    ({"window": 512.0}, "'window' is 512.0"),
    ({"window": 3}, "window 3, expected a positive multiple of the network's output stride"),
    ({"window": 0}, "window 0"),
    ({"window": True}, "window True"),
])
def test_4_ticket_metadata_is_checked_against_its_schema(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                         change: dict, message: str) -> None:
    ticket = make_ticket(tmp_path / "t.npz", change)
    with pytest.raises(et.TicketError, match=message):
        et.load_ticket(ticket)
    np.save(tmp_path / "r.npy", ecg().astype(np.float64))
    code = predict.main(["--ticket", str(ticket), "--fs", "300", str(tmp_path / "r.npy")])
    err = capsys.readouterr().err
    assert code == 2 and "t.npz" in err and "export it again" in err


def test_4_windows_need_a_ticket_that_records_its_training_window(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """predict.py --windows on a ticket without a training window is refused, naming the
    ticket; with one, every record is read in windows of that length and carries no AF flag
    (its threshold was chosen on whole-record probabilities), while the whole-record
    reading of the same ticket is as before."""
    np.save(tmp_path / "r.npy", ecg().astype(np.float64))
    record = ["--fs", "300", str(tmp_path / "r.npy")]
    code, out, err = run_predict(capsys, "--ticket", str(make_ticket(tmp_path / "old.npz")), "--windows", *record)
    assert code == 2 and out == [] and "old.npz records no training window" in err
    op = {"class": "A", "score": "p_A", "target": "ppv", "value": 0.9, "chosen_on": "val", "threshold": 0.0}
    ticket = str(make_ticket(tmp_path / "w.npz", {"window": 512, "af_operating_point": op}))
    code, whole, _ = run_predict(capsys, "--ticket", ticket, *record)
    assert code == 0 and whole[0]["af_flag"]["flagged"] and "scored_on" not in whole[0]
    code, windows, _ = run_predict(capsys, "--ticket", ticket, "--windows", *record)
    assert code == 0 and windows[0]["scored_on"] == "windows of 512 samples" and "af_flag" not in windows[0]
    assert len(windows[0]["segments"]) == len(whole[0]["segments"])  # 2,400 samples: 4 full windows + 352
    assert predict.main(["--ticket", ticket, "--windows", *record]) == 0
    assert "scored on windows of 512 samples" in capsys.readouterr().out


# --------------------------------------------------------------------------- 5: sampling rate


def test_5_a_rate_given_too_low_is_caught_also_at_60_hz_and_below(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """The old check skipped every rate <= 60 Hz: a 300 Hz record given --fs 50 was read as a
    record 6x as long and classified. The check now runs on the 200 Hz signal for every rate
    (it cannot prove a rate right: see predict.MIN_QRS_SHARE for how often it catches one)."""
    ticket = str(make_ticket(tmp_path / "t.npz"))
    np.save(tmp_path / "r.npy", ecg(60, seed=2).astype(np.float64))  # a minute at 300 Hz
    code, _, err = run_predict(capsys, "--ticket", ticket, "--fs", "50", str(tmp_path / "r.npy"))
    assert code == 1 and "at --fs 50" in err and "check --fs" in err, err
    code, out, _ = run_predict(capsys, "--ticket", ticket, "--fs", "300", str(tmp_path / "r.npy"))
    assert code == 0 and out[0]["seconds"] == pytest.approx(60, abs=0.01)
    real = SHARED_CINC / "A00001.mat"
    if real.is_file():  # a real record (300 Hz) given 50 or 60 Hz
        x = scipy.io.loadmat(real)["val"][0].astype(np.float64)
        np.save(tmp_path / "a.npy", x)
        for wrong in ("50", "60"):
            code, _, err = run_predict(capsys, "--ticket", ticket, "--fs", wrong, str(tmp_path / "a.npy"))
            assert code == 1 and f"at --fs {wrong}" in err, err


def test_5_a_header_with_a_wrong_rate_or_gain_is_refused_by_the_build(cinc_folder: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    names, _, signals, _, facts = bd.read_cinc(cinc_folder, None, False)
    # the samples of this folder stand for the official set: its headers must all say 300 Hz
    monkeypatch.setattr(bd, "CINC_SAMPLES_SHA256", facts["raw_samples_sha256"])
    hea = cinc_folder / f"{names[2]}.hea"
    hea.write_text(hea.read_text().replace(" 300 ", " 250 ", 1))
    with pytest.raises(bd.DatasetError, match=f"header\\(s\\) of {names[2]} state 250 Hz"):
        bd.read_cinc(cinc_folder, None, False)
    hea.write_text(hea.read_text().replace(" 250 ", " 300 ", 1).replace("1000/mV", "200(12)/mV"))
    with pytest.raises(bd.DatasetError, match=f"{names[2]}: header .* stores 200 ADC units per mV with baseline 12"):
        bd.read_record(cinc_folder, names[2])


# --------------------------------------------------------------------------- 6: CSV in other locales


def test_6_csv_in_other_locales_is_read_as_written_or_refused_by_format(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    ticket = str(make_ticket(tmp_path / "t.npz"))
    mv = ecg() / 1000.0
    np.save(tmp_path / "ref.npy", mv)
    _, ref, _ = run_predict(capsys, "--ticket", ticket, "--fs", "300", "--units", "mV", str(tmp_path / "ref.npy"))
    comma = [f"{v:.3f}".replace(".", ",") for v in mv]
    (tmp_path / "row_semicolon.csv").write_text(";".join(comma) + "\n")  # one row, ';' and decimal commas
    (tmp_path / "header_row.csv").write_text("lead I\n" + ",".join(f"{v:.3f}" for v in mv) + "\n")
    (tmp_path / "tabs.txt").write_text("\t".join(comma) + "\n")
    for name in ("row_semicolon.csv", "header_row.csv", "tabs.txt"):
        code, out, err = run_predict(capsys, "--ticket", ticket, "--fs", "300", "--units", "mV", str(tmp_path / name))
        assert code == 0, (name, err)
        assert out[0]["seconds"] == ref[0]["seconds"] and out[0]["probabilities"] == ref[0]["probabilities"], name
    (tmp_path / "column_comma.csv").write_text("\n".join(comma) + "\n")  # a column with decimal commas
    code, _, err = run_predict(capsys, "--ticket", ticket, "--fs", "300", "--units", "mV",
                               str(tmp_path / "column_comma.csv"))
    assert code == 1 and "column_comma.csv" in err and "decimal mark" in err
    (tmp_path / "thousands.csv").write_text("1.234,5;2.345,6;" * 2000 + "\n")
    code, _, err = run_predict(capsys, "--ticket", ticket, "--fs", "300", str(tmp_path / "thousands.csv"))
    assert code == 1 and "thousands.csv" in err and "decimal mark" in err


# --------------------------------------------------------------------------- 7: results.csv


def test_7_a_truncated_or_empty_results_table_is_named_not_summarised(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    exp.mkdir()
    row = {"folder": "seed0/dense", "seed": 0, "method": "lr_rewind", "control": "none", "round": 0, "attempt": 0,
           "fraction": 0.0, "accepted": True, "remaining": 100, "compression": 1.0, "val_challenge_f1": 0.8123,
           "test_challenge_f1": 0.7911, "val_accuracy": 0.9, "test_accuracy": 0.85}
    text = pd.DataFrame([row, {**row, "folder": "seed0/lr_rewind/round_01", "round": 1, "remaining": 50,
                               "compression": 2.0}]).to_csv(index=False)
    path = exp / "results.csv"
    path.write_text(text)
    assert len(plot_results.load_all(exp)) == 2
    path.write_text(text[:text.rindex(",0.7") + 3])  # half a last line: the cut falls inside a number
    with pytest.raises(SystemExit, match="results.csv: its last line is cut off"):
        plot_results.load_all(exp)
    path.write_text(text[:text.index("\n") + 1])
    with pytest.raises(SystemExit, match="results.csv: a header and no rows"):
        plot_results.load_all(exp)
    path.write_text("")
    with pytest.raises(SystemExit, match="results.csv: empty"):
        plot_results.load_all(exp)
    path.write_text(text.replace("lr_rewind,none,1", "lr_rewnd,none,1"))
    with pytest.raises(SystemExit, match="row 3 .*'method' is 'lr_rewnd'"):
        plot_results.load_all(exp)


# --------------------------------------------------------------------------- 8: the same data, another spelling


def test_8_the_same_data_under_another_spelling_is_the_same(tiny_data: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"
    monkeypatch.chdir(tiny_data.parent)
    flags = {"lr": 0.001, "data": tiny_data.name}
    rf.prepare_run(run_dir, flags, Path(tiny_data.name))
    for spelling in (str(tiny_data), str(tiny_data) + "/", f"./{tiny_data.name}"):
        rf.prepare_run(run_dir, {**flags, "data": spelling}, Path(spelling))
    with pytest.raises(SystemExit, match="other flags: --lr"):
        rf.prepare_run(run_dir, {**flags, "lr": 0.01}, tiny_data)
    # a build addressed by another spelling of its --out is the same build, not "other flags"
    built = tmp_path / "syn"
    bd.main(["--synthetic", "24", "--out", str(built), "--val-fraction", "0.25", "--test-fraction", "0.25"])
    monkeypatch.chdir(tmp_path)
    bd.main(["--synthetic", "24", "--out", "syn/", "--val-fraction", "0.25", "--test-fraction", "0.25"])


# --------------------------------------------------------------------------- 9: records.csv


def test_9_a_hand_edited_records_table_names_the_record(tiny_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    good = (data / bd.RECORDS_FILE).read_text()
    first = good.splitlines()[1].split(",")[0]
    cases = {good.replace(",train\n", ",trian\n", 1): "'split' is 'trian', expected one of train, val, test",
             good.replace(f"{first},N,", f"{first},X,", 1): f"'{first},X,.*'label' is 'X'",
             good + good.splitlines()[1] + "\n": f"repeats record={first}",
             good[:-4]: "last line is cut off",
             good.splitlines()[0] + "\n": "a header and no rows"}
    for text, message in cases.items():
        (data / bd.RECORDS_FILE).write_text(text)
        with pytest.raises(bd.DatasetError, match=f"records.csv.*{message}"):
            bd.load_dataset(data)


# --------------------------------------------------------------------------- 10: file-system errors


def test_10_a_full_disk_during_a_checkpoint_is_one_sentence_and_loses_nothing(
        tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fsync = os.fsync

    def full(fd: int) -> None:
        if "checkpoint.pt" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    argv = tiny_train_args(tiny_data, tmp_path / "seed0", "--checkpoint-minutes", "0")
    monkeypatch.setattr(rf.os, "fsync", full)
    with pytest.raises(SystemExit, match=r"checkpoint.pt: No space left on device .*the disk is full"):
        tr.main(argv)
    assert not list((tmp_path / "seed0" / "dense").glob("*.tmp"))
    monkeypatch.setattr(rf.os, "fsync", fsync)
    tr.main(argv)  # space freed: the same command finishes
    assert (tmp_path / "seed0" / "dense" / tr.METRICS).is_file()


def test_10_a_read_only_results_folder_is_named(tiny_data: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    mkdir = os.mkdir

    def read_only(path: object, *args: object, **kwargs: object) -> None:
        if "results_ro" in str(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    with pytest.raises(SystemExit, match="results_ro.*Read-only file system; the file system is read-only"):
        tr.main(tiny_train_args(tiny_data, tmp_path / "results_ro" / "seed0"))


def test_10_a_non_utf8_folder_name_trains(tiny_data: Path, tmp_path: Path) -> None:
    out = os.fsencode(tmp_path) + b"/caf\xe9"  # latin-1, not UTF-8
    done = subprocess.run([sys.executable, "train.py", "--data", str(tiny_data), "--out", out, *TINY_FLAGS,
                           "--epochs", "1", "--max-steps", "1"], cwd=ROOT, capture_output=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert os.path.isfile(out + b"/dense/" + tr.METRICS.encode())


def test_10_a_symlinked_build_out_stays_a_link(tmp_path: Path) -> None:
    real, link = tmp_path / "real", tmp_path / "link"
    flags = ["--synthetic", "24", "--val-fraction", "0.25", "--test-fraction", "0.25"]
    bd.main([*flags, "--out", str(real)])
    link.symlink_to(real)
    bd.main([*flags, "--out", str(link), "--seed", "1", "--overwrite"])
    assert link.is_symlink() and json.loads((real / bd.INFO_FILE).read_text())["flags"]["seed"] == 1
    assert bd.load_dataset(link).info["flags"]["seed"] == 1


# --------------------------------------------------------------------------- issue 33, item 2: any WFDB record


def test_any_wfdb_record_is_read_through_wfdb(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    wfdb = pytest.importorskip("wfdb")
    ticket = str(make_ticket(tmp_path / "t.npz"))
    x = ecg(12, fs=250)
    write_wfdb(tmp_path, "cinc", x, fs=250)  # CinC's layout: .mat, 1000/mV
    _, ref, _ = run_predict(capsys, "--ticket", ticket, str(tmp_path / "cinc.mat"))
    mv = (x / 1000.0)[:, None]
    # format 212 (12 bit) with a gain and baseline, and format 16 in uV, two leads in one record
    wfdb.wrsamp("two", fs=250, units=["mV", "uV"], sig_name=["I", "II"], p_signal=np.hstack([mv, 1000 * mv]),
                fmt=["212", "16"], adc_gain=[200.0, 1.0], baseline=[1024, 0], write_dir=str(tmp_path))
    for lead in ("I", "0", "II", "1"):
        code, out, err = run_predict(capsys, "--ticket", ticket, "--lead", lead, str(tmp_path / "two.hea"))
        assert code == 0, err
        assert out[0]["seconds"] == ref[0]["seconds"]
        assert out[0]["probabilities"] == pytest.approx(ref[0]["probabilities"], abs=0.02)  # 212: 5 uV steps
    code, _, err = run_predict(capsys, "--ticket", ticket, str(tmp_path / "two.hea"))
    assert code == 1 and "holds 2 leads (0: I, 1: II); choose one with --lead" in err
    code, _, err = run_predict(capsys, "--ticket", ticket, "--lead", "V1", str(tmp_path / "two.hea"))
    assert code == 1 and "no lead 'V1'" in err
    code, _, err = run_predict(capsys, "--ticket", ticket, "--fs", "300", "--lead", "0", str(tmp_path / "two.hea"))
    assert code == 1 and "header says 250 Hz but --fs is 300" in err


def test_without_wfdb_only_cinc_records_are_read(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wfdb", None)  # import wfdb fails, as where it is not installed
    ticket = str(make_ticket(tmp_path / "t.npz"))
    write_wfdb(tmp_path, "cinc", ecg(), fs=300)
    code, out, _ = run_predict(capsys, "--ticket", ticket, str(tmp_path / "cinc.mat"))
    assert code == 0 and out[0]["seconds"] == pytest.approx(12, abs=0.01)
    (tmp_path / "other.hea").write_text("other 1 250 3000\nother.dat 212 200/mV 12 0 0 0 0 I\n")
    (tmp_path / "other.dat").write_bytes(bytes(4500))
    code, _, err = run_predict(capsys, "--ticket", ticket, str(tmp_path / "other.hea"))
    assert code == 1 and "other.hea" in err and "pip install -r requirements-export.txt" in err


# --------------------------------------------------------------------------- the --busy skip wait


def test_a_worker_waiting_on_a_busy_cell_does_not_rebuild_it(tiny_data: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Another worker holds the dense cell's folder for 6 of this worker's idle passes: the
    cell's training is set up once (Busy), then only its lock is probed, with a growing
    pause; once free, it is trained. Sleeps are counted, not slept: no timing involved."""
    exp = tmp_path / "exp"
    dense = exp / "seed0" / "dense"
    grid = ["--exp", str(exp), "--seeds", "0", "--methods", "weight_rewind", "--cell", "0", "--data", str(tiny_data),
            *TINY_FLAGS, "--busy", "skip"]
    # the other worker started the folder (its config.json: the same cell's, made here elsewhere), then took its lock
    scratch = tmp_path / "scratch"
    tr.main(rx.cell_argv(rx.parse_args(grid)[1], scratch, 0, rx.DENSE, None))
    dense.mkdir(parents=True)
    shutil.copy(scratch / "seed0" / "dense" / rf.CONFIG, dense / rf.CONFIG)
    holder = open(dense / rf.LOCK, "a+")  # noqa: SIM115 - released inside the fake sleep
    fcntl.flock(holder, fcntl.LOCK_EX)
    pauses: list[float] = []
    calls: list[str] = []
    real_run = tr.run

    def sleep(seconds: float) -> None:
        pauses.append(seconds)
        if len(pauses) == 6:
            fcntl.flock(holder, fcntl.LOCK_UN)

    def counted(args: object, *rest: object, **kw: object) -> object:
        calls.append(str(args.out))
        return real_run(args, *rest, **kw)

    monkeypatch.setattr(rx.time, "sleep", sleep)
    monkeypatch.setattr(tr, "run", counted)
    rx.main(grid)
    holder.close()
    assert (dense / tr.METRICS).is_file()
    assert len(calls) == 2  # once to find it busy, once to train it: not once per idle pass
    assert pauses == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]


# --------------------------------------------------------------------------- issue 33, item 6: the AF operating point


def test_predict_flags_af_at_the_tickets_threshold(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A ticket's threshold on P(A) is read and applied: a record whose P(A) lies just above
    it is flagged, just below it is not, whatever the argmax class; the text names the PPV
    it was chosen for. A ticket without one (older, or whose target validation never
    reached) prints as before."""
    np.save(tmp_path / "r.npy", ecg().astype(np.float64))
    record = ["--fs", "300", str(tmp_path / "r.npy")]
    code, plain, _ = run_predict(capsys, "--ticket", str(make_ticket(tmp_path / "old.npz")), *record)
    assert code == 0 and set(plain[0]) == {"file", "class", "probabilities", "seconds", "segment_seconds", "segments"}
    p_af = plain[0]["probabilities"]["A"]  # rounded to 4 decimals: the thresholds below keep clear of it
    op = {"class": "A", "score": "p_A", "target": "ppv", "value": 0.9, "chosen_on": "val"}
    for threshold, flagged in ((p_af - 0.001, True), (p_af + 0.001, False)):
        shutil.copy(tmp_path / "old.npz", tmp_path / "t.npz")  # the same weights, the threshold added
        et.restamp(tmp_path / "t.npz", {"af_operating_point": {**op, "threshold": threshold}})
        ticket = str(tmp_path / "t.npz")
        code, out, _ = run_predict(capsys, "--ticket", ticket, *record)
        assert code == 0 and out[0]["af_flag"] == {"flagged": flagged, "threshold": threshold,
                                                   "chosen_for": "validation PPV >= 0.9"}
        assert {**out[0], "af_flag": None} == {**plain[0], "af_flag": None}  # the rest as before
        assert predict.main(["--ticket", ticket, *record]) == 0
        text = capsys.readouterr().out
        assert f"AF at the ticket's operating point (P(A) >= {threshold:.4g}, chosen for validation PPV >= 0.9): " \
            f"{'yes' if flagged else 'no'}" in text
    et.restamp(tmp_path / "t.npz", {"af_operating_point": {**op, "threshold": None}})
    assert run_predict(capsys, "--ticket", str(tmp_path / "t.npz"), *record)[1] == plain
    assert predict.main(["--ticket", str(tmp_path / "old.npz"), *record]) == 0
    assert "operating point" not in capsys.readouterr().out
