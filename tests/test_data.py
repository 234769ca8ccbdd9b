"""build_datasets.py: reading, bad input, download, resampling, split and storage."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_CINC, write_wfdb

import build_datasets as bd

# --------------------------------------------------------------------------- real and synthetic records


@pytest.mark.skipif(not SHARED_CINC.is_dir(), reason=f"real CinC 2017 copy not found at {SHARED_CINC}")
def test_reads_real_cinc_records() -> None:
    x, fs = bd.read_record(SHARED_CINC, "A00001")
    assert fs == 300 and x.dtype == np.int16 and len(x) == 9000
    y = bd.resample(x, fs)
    assert len(y) == 6000
    labels = bd.read_labels(bd.find_label_file(SHARED_CINC, None))
    assert len(labels) == 8528
    counts = {c: sum(v == c for v in labels.values()) for c in "NAO~"}
    assert counts == {"N": 5076, "A": 758, "O": 2415, "~": 279}
    assert labels["A00001"] == "N"


def test_synthetic_is_deterministic_and_covers_all_classes() -> None:
    names, labels, signals = bd.synthesize(40, seed=5)
    names2, labels2, signals2 = bd.synthesize(40, seed=5)
    assert names == names2 and labels == labels2
    assert all(np.array_equal(a, b) for a, b in zip(signals, signals2, strict=True))
    assert set(labels) == set(bd.CLASSES)
    assert all(9 * 300 <= len(x) <= 30 * 300 and x.dtype == np.int16 for x in signals)
    _, _, other = bd.synthesize(3, seed=6)
    assert not np.array_equal(other[0], signals[0])
    # a larger set extends a smaller one
    assert bd.synthesize(3, seed=5)[1] == labels[:3]


def test_reads_written_records(cinc_folder: Path) -> None:
    names, labels, signals, bad, facts = bd.read_cinc(cinc_folder, None, skip_bad=False)
    assert len(names) == 12 and not bad
    assert all(len(s) == 2000 for s in signals)  # 3000 samples at 300 Hz -> 200 Hz
    assert facts["label_file"].endswith("REFERENCE-v3.csv")
    assert facts["matches_official_cinc2017"] is False


# --------------------------------------------------------------------------- bad input


def _read(folder: Path, **kw: object) -> tuple:
    return bd.read_cinc(folder, None, skip_bad=kw.get("skip_bad", False))


@pytest.mark.parametrize("suffix", [".mat", ".hea"])
def test_missing_file_names_the_record(cinc_folder: Path, suffix: str) -> None:
    (cinc_folder / f"S00004{suffix}").unlink()
    with pytest.raises(bd.DatasetError, match=rf"S00004: missing file .*S00004\{suffix}"):
        _read(cinc_folder)


def test_truncated_mat_names_the_record(cinc_folder: Path) -> None:
    path = cinc_folder / "S00002.mat"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(bd.DatasetError, match="S00002: unreadable .mat file"):
        _read(cinc_folder)


def test_garbage_header_names_the_record(cinc_folder: Path) -> None:
    (cinc_folder / "S00003.hea").write_text("S00003\n")
    with pytest.raises(bd.DatasetError, match="S00003: unreadable header"):
        _read(cinc_folder)


def test_header_length_mismatch_names_the_record(cinc_folder: Path) -> None:
    x = np.arange(3000, dtype=np.int16)
    write_wfdb(cinc_folder, "S00005", x, header_samples=3100)
    with pytest.raises(bd.DatasetError, match="S00005: header says 3100 samples, .* has 3000"):
        _read(cinc_folder)


def test_label_file_missing_a_record(cinc_folder: Path) -> None:
    write_wfdb(cinc_folder, "S09999", np.zeros(3000, dtype=np.int16))
    with pytest.raises(bd.DatasetError, match="label file .* is missing record S09999"):
        _read(cinc_folder)


def test_unknown_label_is_refused(cinc_folder: Path) -> None:
    ref = cinc_folder / "REFERENCE-v3.csv"
    ref.write_text(ref.read_text().replace(",N\n", ",X\n", 1))
    with pytest.raises(bd.DatasetError, match="unknown label 'X'"):
        _read(cinc_folder)


def test_skip_bad_skips_and_lists(cinc_folder: Path) -> None:
    (cinc_folder / "S00004.mat").unlink()
    write_wfdb(cinc_folder, "S00005", np.arange(3000, dtype=np.int16), header_samples=10)
    names, _, _, bad, _ = _read(cinc_folder, skip_bad=True)
    assert [n for n, _ in bad] == ["S00004", "S00005"]
    assert len(names) == 10 and "S00004" not in names


@pytest.mark.parametrize(("samples", "message"), [
    (np.ones(1, np.int16), r"S00003: 0.00 s long, outside the 5-120 s"),
    (np.arange(1200, dtype=np.int16), r"S00003: 4.00 s long"),
    (np.zeros(3000, np.int16), r"S00003: flat: every one of its 3000 samples is 0"),
    (np.tile(np.arange(-500, 500, dtype=np.int16), 180), r"S00003: 600.00 s long")])
def test_implausible_records_are_named(cinc_folder: Path, samples: np.ndarray, message: str) -> None:
    write_wfdb(cinc_folder, "S00003", samples)
    with pytest.raises(bd.DatasetError, match=message):
        _read(cinc_folder)
    names, _, _, bad, _ = _read(cinc_folder, skip_bad=True)
    assert [n for n, _ in bad] == ["S00003"] and len(names) == 11


def test_a_changed_record_or_label_rebuilds_under_the_same_flags(cinc_folder: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "built"
    argv = ["--source", str(cinc_folder), "--out", str(out), "--val-fraction", "0.3", "--test-fraction", "0.3"]
    bd.main(argv)
    bd.main(argv)
    assert "nothing to do" in capsys.readouterr().out
    labels = cinc_folder / "REFERENCE-v3.csv"
    first = labels.read_text().splitlines()[0].split(",")[0]
    labels.write_text(labels.read_text().replace(f"{first},N", f"{first},O").replace(f"{first},A", f"{first},O")
                      .replace(f"{first},~", f"{first},O"))
    bd.main(argv)
    assert "changed since" in capsys.readouterr().out
    ds = bd.load_dataset(out)
    assert ds.labels[list(ds.names).index(first)] == bd.CLASSES.index("O")
    row = list(ds.names).index(first)
    write_wfdb(cinc_folder, first, np.arange(-1500, 1500, dtype=np.int16))  # a fixed record
    bd.main(argv)
    assert "changed since" in capsys.readouterr().out
    fixed = bd.load_dataset(out)
    assert not np.array_equal(fixed.signals[row], ds.signals[row])
    assert np.array_equal(fixed.signals[row, :2000], bd.resample(np.arange(-1500, 1500, dtype=np.int16), 300))


def test_a_failed_rebuild_keeps_the_previous_build(cinc_folder: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk during --overwrite: the old build stays loadable, no debris blocks the next."""
    out = tmp_path / "built"
    argv = ["--source", str(cinc_folder), "--out", str(out), "--val-fraction", "0.3", "--test-fraction", "0.3"]
    bd.main(argv)
    before = bd.load_dataset(out).signals.copy()
    real = bd.atomic_write

    def full_disk(path: Path, data: bytes) -> None:
        if path.name == bd.RECORDS_FILE:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(bd, "atomic_write", full_disk)
    with pytest.raises(SystemExit, match=r"No space left on device.*built is unchanged"):
        bd.main([*argv, "--seed", "1", "--overwrite"])
    assert np.array_equal(bd.load_dataset(out).signals, before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["built", "training2017"]
    monkeypatch.setattr(bd, "atomic_write", real)
    bd.main([*argv, "--seed", "1", "--overwrite"])
    assert json.loads((out / bd.INFO_FILE).read_text())["flags"]["seed"] == 1
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="holds other files than a data set"):
        bd.main([*argv, "--seed", "2", "--overwrite"])


def test_falls_back_to_first_release_labels_with_a_warning(cinc_folder: Path) -> None:
    (cinc_folder / "REFERENCE-v3.csv").rename(cinc_folder / "REFERENCE.csv")
    with pytest.warns(UserWarning, match="first-release labels"):
        assert bd.find_label_file(cinc_folder, None).name == "REFERENCE.csv"


def test_missing_source_and_labels_are_clear(tmp_path: Path) -> None:
    with pytest.raises(bd.DatasetError, match="source folder not found"):
        bd.read_cinc(tmp_path / "nope", None, skip_bad=False)
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(bd.DatasetError, match="no REFERENCE-v3.csv or REFERENCE.csv"):
        bd.read_cinc(tmp_path / "empty", None, skip_bad=False)


def test_cli_reports_error_and_exit_code(cinc_folder: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    (cinc_folder / "S00007.hea").unlink()
    with pytest.raises(SystemExit) as exc:
        bd.main(["--source", str(cinc_folder), "--out", str(tmp_path / "out")])
    assert "S00007" in str(exc.value) and "--skip-bad" in str(exc.value)
    assert not (tmp_path / "out" / bd.INFO_FILE).exists()


# --------------------------------------------------------------------------- download


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``files`` with HTTP Range support (what PhysioNet's server does)."""

    files: dict[str, bytes] = {}
    cut: dict[str, int] = {}  # name -> bytes sent before the connection is dropped (once)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        name = self.path.rsplit("/", 1)[-1]
        body = self.files.get(name)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if (rng := self.headers.get("Range")) and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if name in self.cut:  # a server that drops the connection mid-file
            self.wfile.write(body[start:start + self.cut.pop(name)])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(cinc_folder: Path) -> Iterator[tuple[str, bytes]]:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in sorted(cinc_folder.iterdir()):
            if p.suffix in (".mat", ".hea"):
                z.write(p, f"training2017/{p.name}")
    archive = buf.getvalue()
    _RangeHandler.files = {bd.ZIP_NAME: archive,
                           bd.LABELS_V3: (cinc_folder / "REFERENCE-v3.csv").read_bytes()}
    _RangeHandler.cut = {}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/files/", archive
    httpd.shutdown()


def test_download_resumes_checks_and_extracts(server: tuple[str, bytes], tmp_path: Path) -> None:
    url, archive = server
    sha = hashlib.sha256(archive).hexdigest()
    dest = tmp_path / "raw"
    dest.mkdir()
    (dest / (bd.ZIP_NAME + ".part")).write_bytes(archive[:len(archive) // 3])  # interrupted
    source = bd.download_cinc(dest, url, sha)
    assert (dest / bd.ZIP_NAME).read_bytes() == archive
    assert len(list(source.glob("*.mat"))) == 12
    out = tmp_path / "built"
    bd.main(["--download", "--download-dir", str(dest), "--url", url, "--sha256", sha,
             "--out", str(out)])
    info = json.loads((out / bd.INFO_FILE).read_text())
    assert info["records"] == 12 and info["label_file"].endswith("REFERENCE-v3.csv")


def test_download_with_wrong_checksum_stops_and_keeps_file(server: tuple[str, bytes],
                                                           tmp_path: Path) -> None:
    url, archive = server
    with pytest.raises(bd.DatasetError, match="sha256 mismatch .*expected 0+, got"):
        bd.download_cinc(tmp_path, url, "0" * 64)
    assert (tmp_path / (bd.ZIP_NAME + ".bad")).read_bytes() == archive
    assert not (tmp_path / bd.ZIP_NAME).exists()


def test_a_dropped_connection_is_resumed_not_condemned(server: tuple[str, bytes], tmp_path: Path) -> None:
    url, archive = server
    sha = hashlib.sha256(archive).hexdigest()
    _RangeHandler.cut = {bd.ZIP_NAME: len(archive) // 2}
    with pytest.raises(bd.DatasetError, match=r"cut short: .* bytes arrived .*run the same command again to resume"):
        bd.download_cinc(tmp_path, url, sha)
    part = tmp_path / (bd.ZIP_NAME + ".part")
    assert part.stat().st_size == len(archive) // 2 and not (tmp_path / (bd.ZIP_NAME + ".bad")).exists()
    bd.download_cinc(tmp_path, url, sha)  # resumes from the half that arrived
    assert (tmp_path / bd.ZIP_NAME).read_bytes() == archive


def test_a_truncated_label_file_is_fetched_again(server: tuple[str, bytes], tmp_path: Path) -> None:
    url, archive = server
    good = _RangeHandler.files[bd.LABELS_V3]
    (tmp_path / bd.LABELS_V3).write_bytes(good[: len(good) // 2].rsplit(b"\n", 1)[0] + b"\n")  # cached, cut
    source = bd.download_cinc(tmp_path, url, hashlib.sha256(archive).hexdigest())
    assert (tmp_path / bd.LABELS_V3).read_bytes() == good and len(list(source.glob("*.mat"))) == 12
    _RangeHandler.files[bd.LABELS_V3] = good[: len(good) // 2].rsplit(b"\n", 1)[0] + b"\n"  # the server's too
    (tmp_path / bd.LABELS_V3).write_bytes(_RangeHandler.files[bd.LABELS_V3])
    with pytest.raises(bd.DatasetError, match=r"lacks labels for \d+ of the 12 records"):
        bd.download_cinc(tmp_path, url, hashlib.sha256(archive).hexdigest())


def test_a_corrupt_member_is_named_and_leaves_no_half_folder(server: tuple[str, bytes], tmp_path: Path) -> None:
    url, archive = server
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        member = next(m for m in z.infolist() if m.filename.endswith(".mat"))
    start = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra)
    broken = bytearray(archive)
    broken[start + 20] ^= 0xFF  # inside the member's data: its CRC no longer matches
    _RangeHandler.files[bd.ZIP_NAME] = bytes(broken)
    raw = tmp_path / "raw"
    with pytest.raises(bd.DatasetError, match=f"member {member.filename} is corrupt"):
        bd.download_cinc(raw, url, hashlib.sha256(bytes(broken)).hexdigest())
    assert sorted(p.name for p in raw.iterdir()) == [bd.LABELS_V3, bd.ZIP_NAME]  # no half-extracted folder


def test_download_of_a_missing_file_names_the_url(server: tuple[str, bytes], tmp_path: Path) -> None:
    url, _ = server
    with pytest.raises(bd.DatasetError, match=r"missing\.zip failed: HTTP 404"):
        bd.download_file(url + "missing.zip", tmp_path / "missing.zip")


# --------------------------------------------------------------------------- resampling, split, storage


def test_resampling_keeps_a_sine() -> None:
    t300 = np.arange(3000) / 300
    x = np.round(1000 * np.sin(2 * np.pi * 7.0 * t300)).astype(np.int16)
    y = bd.resample(x, 300)
    t200 = np.arange(len(y)) / 200
    expected = 1000 * np.sin(2 * np.pi * 7.0 * t200)
    assert len(y) == 2000
    inner = slice(100, -100)  # away from the filter's edge transients
    assert np.max(np.abs(y[inner] - expected[inner])) < 5  # uV, of a 1000 uV sine


def test_resampling_removes_what_200_hz_cannot_hold() -> None:
    t = np.arange(3000) / 300
    x = np.round(1000 * np.sin(2 * np.pi * 130.0 * t)).astype(np.int16)  # above 100 Hz Nyquist
    assert np.abs(bd.resample(x, 300)[100:-100]).max() < 50  # not aliased down to 70 Hz


def test_split_is_stratified_and_stable() -> None:
    labels = ["N"] * 500 + ["A"] * 80 + ["O"] * 240 + ["~"] * 30
    split = bd.stratified_split(labels, seed=1, val_fraction=0.1, test_fraction=0.1)
    arr = np.array(labels)
    for c, n in [("N", 500), ("A", 80), ("O", 240), ("~", 30)]:
        assert (split[arr == c] == "val").sum() == round(n * 0.1)
        assert (split[arr == c] == "test").sum() == round(n * 0.1)
    assert np.array_equal(split, bd.stratified_split(labels, 1, 0.1, 0.1))
    assert not np.array_equal(split, bd.stratified_split(labels, 2, 0.1, 0.1))


def test_duplicate_records_stay_in_one_split(cinc_folder: Path, tmp_path: Path) -> None:
    """Identical samples under two names (as A00227/A01176 in CinC 2017) land in one split,
    whatever split their own class's permutation gave the second; the rest is unchanged."""
    labels = ["N"] * 50 + ["A"] * 50
    plain = bd.stratified_split(labels, 0, 0.2, 0.2)
    first, second = 0, next(i for i in range(50, 100) if plain[i] != plain[0])  # across classes too
    grouped = bd.stratified_split(labels, 0, 0.2, 0.2, [[first, second]])
    assert grouped[second] == grouped[first] == plain[first]
    assert np.array_equal(np.delete(grouped, second), np.delete(plain, second))
    x = np.arange(900, dtype=np.int16)
    assert bd.duplicate_groups([x, x[::-1], x.copy(), x[:-1], x.copy()]) == [[0, 2, 4]]
    # the build finds them in real files and records them
    names = sorted(p.stem for p in cinc_folder.glob("*.mat"))
    (cinc_folder / f"{names[5]}.mat").write_bytes((cinc_folder / f"{names[0]}.mat").read_bytes())
    (cinc_folder / f"{names[5]}.hea").write_text((cinc_folder / f"{names[0]}.hea").read_text()
                                                 .replace(names[0], names[5]))
    out = tmp_path / "built"
    bd.main(["--source", str(cinc_folder), "--out", str(out), "--val-fraction", "0.3", "--test-fraction", "0.3"])
    ds = bd.load_dataset(out)
    assert ds.info["duplicate_groups"] == [[names[0], names[5]]]
    assert ds.split[list(ds.names).index(names[0])] == ds.split[list(ds.names).index(names[5])]


def test_a_split_with_an_empty_part_is_refused_at_build_time(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="leaves val and test empty"):
        bd.main(["--synthetic", "4", "--out", str(tmp_path / "syn")])
    assert not (tmp_path / "syn" / bd.INFO_FILE).exists()


def test_a_build_of_an_older_format_is_rebuilt(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "syn"
    bd.main(["--synthetic", "40", "--out", str(out)])
    info = json.loads((out / bd.INFO_FILE).read_text())
    del info["format"]  # as build_datasets.py wrote it before duplicates were grouped
    (out / bd.INFO_FILE).write_text(json.dumps(info))
    capsys.readouterr()
    bd.main(["--synthetic", "40", "--out", str(out)])
    assert "older build_datasets.py" in capsys.readouterr().out
    assert json.loads((out / bd.INFO_FILE).read_text())["format"] == bd.BUILD_FORMAT


def test_write_and_load_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    signals = [rng.integers(-32768, 32767, size=n, dtype=np.int16) for n in (300, 1000, 257)]
    signals[1][:2] = [32767, -32768]  # a wrapping difference
    split = np.array(["train", "val", "test"])
    bd.write_dataset(tmp_path, ["a", "b", "c"], ["N", "A", "~"], signals, split, {"fs": 200})
    ds = bd.load_dataset(tmp_path)
    assert ds.signals.shape == (3, 1024) and ds.signals.shape[1] % bd.PAD_MULTIPLE == 0
    for i, x in enumerate(signals):
        assert np.array_equal(ds.signals[i, :len(x)], x)
        assert not ds.signals[i, len(x):].any()
    assert ds.labels.tolist() == [0, 1, 3] and ds.lengths.tolist() == [300, 1000, 257]
    assert ds.indices("val").tolist() == [1]


def test_load_refuses_incomplete_or_corrupt_data(tmp_path: Path) -> None:
    with pytest.raises(bd.DatasetError, match="no complete data set"):
        bd.load_dataset(tmp_path)
    bd.write_dataset(tmp_path, ["a"], ["N"], [np.ones(10, np.int16)], np.array(["train"]), {"fs": 200})
    (tmp_path / bd.SAMPLES_FILE).write_bytes(b"not xz")
    with pytest.raises(bd.DatasetError, match="unreadable"):
        bd.load_dataset(tmp_path)


def test_build_skips_same_flags_and_refuses_other_flags(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    out = str(tmp_path / "syn")
    bd.main(["--synthetic", "40", "--out", out])
    assert "all" in capsys.readouterr().out
    bd.main(["--synthetic", "40", "--out", out])
    assert "nothing to do" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="built with other flags"):
        bd.main(["--synthetic", "41", "--out", out])
    bd.main(["--synthetic", "41", "--out", out, "--overwrite"])
    assert bd.load_dataset(out).signals.shape[0] == 41


@pytest.mark.parametrize("argv", [["--synthetic", "-1"], ["--val-fraction", "0.6", "--test-fraction", "0.5"],
                                  ["--synthetic", "3", "--download"]])
def test_bad_flags_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bd.parse_args(argv)
    assert exc.value.code == 2


def test_atomic_write_replaces_the_leftover_of_a_killed_write(tmp_path: Path) -> None:
    """Leftovers of killed writers (a dead pid, or the older fixed name) go; a live writer's
    temporary file is left alone."""
    target = tmp_path / "checkpoint.pt"
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f"checkpoint.pt.{dead.pid}.tmp").write_bytes(b"half a file from a kill -9")
    (tmp_path / "checkpoint.pt.tmp").write_bytes(b"the same, from an older version")
    live = tmp_path / f"checkpoint.pt.{os.getppid()}.tmp"
    live.write_bytes(b"another process, still writing")
    bd.atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", live.name]


def test_two_writers_of_one_file_never_collide(tmp_path: Path) -> None:
    target = tmp_path / "results.csv"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import build_datasets as bd, pathlib\n"
            "for i in range(2000): bd.atomic_write(pathlib.Path(sys.argv[2]), str(i).encode() * 1000)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).parents[1]), str(target)],
                              stderr=subprocess.PIPE) for _ in range(3)]
    errors = [p.communicate()[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    assert target.read_bytes() == b"1999" * 1000 and sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]
