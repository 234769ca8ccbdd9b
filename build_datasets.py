"""Build the 200 Hz training data: CinC 2017 .mat/.hea records (or synthetic ECGs) -> data/.

Reads the official PhysioNet/CinC Challenge 2017 layout (a folder of ``A00001.mat`` +
``A00001.hea`` ... and a label file), resamples every record from its header's rate (300 Hz)
to 200 Hz with an anti-aliased polyphase filter (``scipy.signal.resample_poly``), draws a
seeded, stratified, record-level train/validation/test split, and writes a dataset folder:

    records.csv       record, label, length (samples at 200 Hz), split
    samples.i16d.xz   all records' int16 samples (1 unit = 1 uV, the original ADC gain of
                      1000 per mV) concatenated in records.csv order, stored as wrapping
                      int16 first differences and lzma-compressed (~3x smaller than raw)
    build_info.json   the exact flags, code version, source checksum and summary

``load_dataset`` reads it back in about a second as zero-padded tensors whose common length
is a multiple of 256 (the network's output stride), with each record's true length kept so
training can cut batches to the lengths actually present.

``--download`` fetches ``training2017.zip`` and ``REFERENCE-v3.csv`` from PhysioNet with
resume and a sha256 check; ``--synthetic N`` writes a built-in synthetic data set in the
same four classes instead (the default data of the demo and of most tests).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import lzma
import math
import os
import re
import shutil
import sys
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.io
from scipy.signal import resample_poly
from tqdm import tqdm

from model import CLASSES
from run_folders import TableError, atomic_write, code_version, read_table, script_errors, sha256_of

FS = 200
"""Sampling rate of the built data (the rate Hannun et al.'s network expects)."""
PAD_MULTIPLE = 256
"""Padded length is a multiple of this (the full network's output stride)."""
SPLITS = ("train", "val", "test")
PHYSIONET_URL = "https://physionet.org/files/challenge-2017/1.0.0/"
ZIP_NAME = "training2017.zip"
ZIP_SHA256 = "25fdbab36bb6724b66a4d2c26ff89f6b9d6ff87e6aed714d24cf5bf071cd1255"
LABELS_V3_SHA256 = "ae517e474b0bc89a7517ad876b5b4dadc6c94f680d0665c04746db9432df855b"
"""sha256 of the official REFERENCE-v3.csv (8,528 labels), checked when it comes from PhysioNet."""
LABELS_V3 = "REFERENCE-v3.csv"
LABELS_V1 = "REFERENCE.csv"
CINC_SAMPLES_SHA256 = "8a257fb08210697a26833c6fdff5205f4e29f89aa25f02d984f2d2052309705b"
"""sha256 of all 8,528 official records' 300 Hz samples (little-endian int16, in order)."""
CINC_FS = 300
"""The rate every official CinC 2017 header states: with the official samples, another is a wrong header."""
SAMPLES_FILE = "samples.i16d.xz"
RECORDS_FILE = "records.csv"
RECORDS_SCHEMA = {"record": "str", "label": "str", "length": "int", "split": "str"}
"""The columns of records.csv (label and split also checked against CLASSES and SPLITS)."""
INFO_FILE = "build_info.json"
INT16 = np.iinfo(np.int16)
XZ_CHUNKS = 16
MIN_SECONDS, MAX_SECONDS = 5.0, 120.0
"""Plausible record durations (CinC 2017: 9-61 s). Shorter ones hold too few beats to
classify; a longer one alone would grow every row of the padded array that training keeps
in memory (one 10-minute record: 0.21 -> 2.05 GB for the real set). Outside them a record is
bad: an error naming it, or skipped and listed with --skip-bad."""
BUILD_FORMAT = 2
"""Version of what a build holds for the same flags: 2 = duplicate records kept in one split.
A folder of an older format is rebuilt (its split may put duplicates on both sides)."""


class DatasetError(Exception):
    """Bad input data; the message names the record or file at fault."""


# --------------------------------------------------------------------------- reading


def find_label_file(source: Path, labels: Path | None) -> Path:
    """The label file to use: ``labels`` if given, else REFERENCE-v3.csv beside or inside
    ``source``, else REFERENCE.csv (first-release labels, with a warning)."""
    if labels is not None:
        if not labels.is_file():
            raise DatasetError(f"label file not found: {labels}")
        return labels
    for folder in (source, source.parent):
        if (folder / LABELS_V3).is_file():
            return folder / LABELS_V3
    for folder in (source, source.parent):
        if (folder / LABELS_V1).is_file():
            warnings.warn(f"{LABELS_V3} not found; falling back to {folder / LABELS_V1}, the "
                          "first-release labels (about 10% differ from the final v3 labels)",
                          stacklevel=2)
            return folder / LABELS_V1
    raise DatasetError(f"no {LABELS_V3} or {LABELS_V1} in {source} or {source.parent}; "
                       "pass --labels")


def read_labels(path: Path) -> dict[str, str]:
    """Record name -> class letter from a two-column CSV without header (CinC format)."""
    try:
        table = pd.read_csv(path, header=None, names=["record", "label"], dtype=str)
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read label file {path}: {e}") from e
    bad = table[~table["label"].isin(CLASSES)]
    if len(bad):
        row = bad.iloc[0]
        raise DatasetError(f"label file {path}: record {row['record']} has unknown label "
                           f"{row['label']!r} (expected one of {', '.join(CLASSES)})")
    dup = table["record"][table["record"].duplicated()]
    if len(dup):
        raise DatasetError(f"label file {path}: record {dup.iloc[0]} is listed twice")
    return dict(zip(table["record"], table["label"], strict=True))


def read_header(path: Path) -> tuple[float, int]:
    """(sampling rate, number of samples) from a single-signal WFDB header whose signal is
    stored as this build stores it: 1000 ADC units per mV, baseline 0 (CinC 2017's layout).
    Another gain, baseline or unit would be read as wrong microvolts, so it is refused
    (predict.py reads such records through the ``wfdb`` package)."""
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
        fields = lines[0].split()
        n_signals, fs, n_samples = int(fields[1]), float(fields[2].split("/")[0]), int(fields[3])
    except (OSError, UnicodeDecodeError, IndexError, ValueError) as e:
        raise DatasetError(f"{path.stem}: unreadable header {path} ({e})") from e
    if n_signals != 1:
        raise DatasetError(f"{path.stem}: header {path} has {n_signals} signals, expected 1")
    if not (math.isfinite(fs) and fs > 0) or n_samples <= 0:
        raise DatasetError(f"{path.stem}: header {path} has fs={fs}, samples={n_samples}")
    gain, baseline, units = signal_scale(lines[1] if len(lines) > 1 else "", path)
    if (gain, baseline, units) != (1000.0, 0, "mV"):
        raise DatasetError(f"{path.stem}: header {path} stores {gain:g} ADC units per {units} with baseline "
                           f"{baseline}; this reader takes CinC 2017's 1000/mV with baseline 0 (predict.py reads "
                           "other records through the wfdb package)")
    return fs, n_samples


def signal_scale(line: str, path: Path) -> tuple[float, int, str]:
    """(gain, baseline, units) of a WFDB header's signal line (``file format gain(baseline)/units
    resolution zero ...``), with the WFDB defaults: gain 200, baseline = ADC zero, mV."""
    fields = line.split()
    spec = fields[2] if len(fields) > 2 else "200"
    zero = fields[4] if len(fields) > 4 else "0"
    found = re.fullmatch(r"([-+0-9.eE]+)(?:\(([-+0-9]+)\))?(?:/(\S+))?", spec)
    try:
        if found is None:
            raise ValueError(f"gain field {spec!r}")
        gain = float(found.group(1)) or 200.0
        baseline = int(found.group(2) if found.group(2) is not None else zero)
    except ValueError as e:
        raise DatasetError(f"{path.stem}: unreadable signal line in header {path} ({e})") from e
    return gain, baseline, found.group(3) or "mV"


def check_int16(values: np.ndarray, name: str, source: object) -> np.ndarray:
    """``values`` as int16, refused (naming ``name`` and ``source``) when not whole numbers or
    outside int16: a cast would wrap them silently (73680 becomes 8144)."""
    values = np.asarray(values)
    if not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)):
        raise DatasetError(f"{name}: {source} holds {values.dtype} values, expected integers")
    if values.size and np.issubdtype(values.dtype, np.floating) and not (
            np.isfinite(values).all() and (values == np.round(values)).all()):
        raise DatasetError(f"{name}: {source} holds non-integer or non-finite samples, expected int16")
    if values.size and (values.min() < INT16.min or values.max() > INT16.max):
        bad = int(np.count_nonzero((values < INT16.min) | (values > INT16.max)))
        raise DatasetError(f"{name}: {source} holds {bad} sample(s) outside int16 ({values.min():g} to "
                           f"{values.max():g}); int16 microvolts cannot hold them: the file is not CinC-scaled")
    return values.astype(np.int16)


def read_record(folder: Path, name: str) -> tuple[np.ndarray, float]:
    """One record's int16 samples and sampling rate, checked against its header: the
    header's gain and units (1000/mV), its sample count and rate (the duration must be
    plausible), and the samples' type and range (never wrapped into int16)."""
    mat, hea = folder / f"{name}.mat", folder / f"{name}.hea"
    for path in (mat, hea):
        if not path.is_file():
            raise DatasetError(f"{name}: missing file {path}")
    fs, n_header = read_header(hea)
    try:
        val = scipy.io.loadmat(str(mat))["val"]
    except Exception as e:  # scipy raises many types on truncated or corrupt files
        raise DatasetError(f"{name}: unreadable .mat file {mat} ({type(e).__name__}: {e})") from e
    if val.ndim != 2 or val.shape[0] != 1 or not np.issubdtype(val.dtype, np.number):
        raise DatasetError(f"{name}: {mat} holds {val.dtype} {val.shape}, expected int (1, N)")
    x = check_int16(val[0], name, mat)
    if len(x) != n_header:
        raise DatasetError(f"{name}: header says {n_header} samples, {mat} has {len(x)}")
    seconds = len(x) / fs
    if not MIN_SECONDS <= seconds <= MAX_SECONDS:
        raise DatasetError(f"{name}: {seconds:.2f} s long, outside the {MIN_SECONDS:g}-{MAX_SECONDS:g} s this build "
                           f"accepts (CinC 2017 records are 9-61 s; at the {fs:g} Hz its header states: check it)")
    if x.min() == x.max():
        raise DatasetError(f"{name}: flat: every one of its {len(x)} samples is {x[0]} (no signal recorded)")
    return x, fs


def resample(x: np.ndarray, fs_in: float, fs_out: int = FS) -> np.ndarray:
    """Anti-aliased polyphase resampling of int16 samples, rounded back to int16."""
    ratio = Fraction(fs_out) / Fraction(fs_in).limit_denominator(1000)
    if ratio == 1:
        return x.astype(np.int16)
    y = resample_poly(x.astype(np.float64), ratio.numerator, ratio.denominator)
    return np.clip(np.round(y), INT16.min, INT16.max).astype(np.int16)


def read_cinc(source: Path, labels_path: Path | None, skip_bad: bool
              ) -> tuple[list[str], list[str], list[np.ndarray], list[tuple[str, str]], dict]:
    """Read every record of a CinC-2017-layout folder at 200 Hz.

    Returns names, labels, 200 Hz signals, the skipped (name, reason) pairs and facts about
    the source (label file, sha256 of the raw samples).
    """
    if not source.is_dir():
        raise DatasetError(f"source folder not found: {source} (use --download, or --source "
                           "pointing at the unpacked training2017/ folder)")
    label_file = find_label_file(source, labels_path)
    labels = read_labels(label_file)
    on_disk = {p.stem for p in source.glob("*.mat")} | {p.stem for p in source.glob("*.hea")}
    if not on_disk:
        raise DatasetError(f"no .mat/.hea records in {source}")
    names, ys, signals, bad = [], [], [], []
    rates: dict[str, float] = {}
    digest = hashlib.sha256()
    for name in tqdm(sorted(on_disk | set(labels)), desc="reading records", unit="rec", disable=None):
        try:
            if name not in labels:
                raise DatasetError(f"{name}: label file {label_file} is missing record {name}")
            x, fs = read_record(source, name)
        except DatasetError as e:
            if not skip_bad:
                raise DatasetError(f"{e} (use --skip-bad to skip bad records)") from e
            bad.append((name, str(e)))
            continue
        digest.update(x.astype("<i2").tobytes())
        rates[name] = fs
        names.append(name)
        ys.append(labels[name])
        signals.append(resample(x, fs))
    if not names:
        raise DatasetError(f"no readable records in {source}")
    sha = digest.hexdigest()
    wrong_rate = sorted(n for n, fs in rates.items() if fs != CINC_FS)
    if sha == CINC_SAMPLES_SHA256 and wrong_rate:  # the samples are the official ones, recorded at 300 Hz
        raise DatasetError(f"the samples are the official CinC 2017 set (recorded at {CINC_FS} Hz), but the "
                           f"header(s) of {', '.join(wrong_rate[:5])} state {rates[wrong_rate[0]]:g} Hz: "
                           f"restore {wrong_rate[0]}.hea from training2017.zip")
    facts = {"source": str(source.resolve()), "label_file": str(label_file.resolve()),
             "raw_samples_sha256": sha, "header_rates_hz": sorted(set(rates.values())),
             "matches_official_cinc2017": sha == CINC_SAMPLES_SHA256}
    return names, ys, signals, bad, facts


# --------------------------------------------------------------------------- download


def download_file(url: str, dest: Path, sha256: str | None = None, chunk: int = 1 << 20) -> Path:
    """Download ``url`` to ``dest`` with a progress bar, resuming a partial ``dest.part``.

    A finished file whose sha256 is right is not fetched again. A wrong checksum stops with
    an error and keeps the file (renamed ``*.bad``) so nothing is silently lost.
    """
    if dest.is_file() and (sha256 is None or sha256_of(dest) == sha256):
        print(f"{dest} already downloaded")
        return dest
    part = dest.with_name(dest.name + ".part")
    done = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and done:  # the partial file already holds everything
            response = None
        else:
            raise DatasetError(f"download of {url} failed: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError) as e:
        raise DatasetError(f"download of {url} failed: {e}") from e
    if response is not None:
        with response:
            resumed = response.status == 206
            start = response.headers.get("Content-Range", f"bytes {done}-").removeprefix("bytes ").split("-")[0]
            if resumed and start != str(done):  # not the range we asked for
                raise DatasetError(f"download of {url}: asked to resume at byte {done}, server sent "
                                   f"'Content-Range: {response.headers.get('Content-Range')}'; delete {part} and retry")
            if done and not resumed:
                print(f"server ignored the resume request; restarting {dest.name}")
                done = 0
            size = response.headers.get("Content-Length")
            total = done + int(size) if size is not None else None
            with open(part, "ab" if resumed else "wb") as f, tqdm(
                    total=total, initial=done, unit="B", unit_scale=True, desc=dest.name) as bar:
                try:
                    while block := response.read(chunk):
                        f.write(block)
                        bar.update(len(block))
                except (OSError, http.client.HTTPException) as e:  # connection dropped: what arrived stays
                    raise DatasetError(f"download of {url} interrupted after {bar.n} bytes ({type(e).__name__}); "
                                       "run the same command again to resume") from e
                if total is not None and bar.n < total:  # the server closed the connection early
                    raise DatasetError(f"download of {url} was cut short: {bar.n:,} of {total:,} bytes arrived "
                                       f"(kept in {part}); run the same command again to resume")
    if sha256 is not None:
        got = sha256_of(part)
        if got != sha256:
            bad = dest.with_name(dest.name + ".bad")
            os.replace(part, bad)
            raise DatasetError(f"sha256 mismatch for {url}: expected {sha256}, got {got}; "
                               f"the file was kept as {bad} (delete it and retry)")
    os.replace(part, dest)
    return dest


def download_cinc(folder: Path, base_url: str = PHYSIONET_URL, sha256: str = ZIP_SHA256) -> Path:
    """Fetch and unpack the official training set into ``folder``; returns training2017/."""
    folder.mkdir(parents=True, exist_ok=True)
    base_url = base_url if base_url.endswith("/") else base_url + "/"
    archive = download_file(base_url + ZIP_NAME, folder / ZIP_NAME, sha256)
    labels_sha = LABELS_V3_SHA256 if base_url == PHYSIONET_URL else None
    labels = download_file(base_url + LABELS_V3, folder / LABELS_V3, labels_sha)
    source = folder / "training2017"
    records = extract(archive, source)
    for attempt in (1, 2):  # a truncated or stale label file is fetched again, once
        missing = records - set(read_labels(labels))
        if not missing:
            return source
        os.replace(labels, labels.with_name(labels.name + ".bad"))
        if attempt == 1:
            print(f"{labels} lacks {len(missing)} of the {len(records)} records in {archive.name}; fetching it again")
            labels = download_file(base_url + LABELS_V3, labels, labels_sha)
    raise DatasetError(f"{base_url + LABELS_V3} lacks labels for {len(missing)} of the {len(records)} records in "
                       f"{archive.name} (e.g. {min(missing)}); kept as {labels.name}.bad")


def extract(archive: Path, dest: Path) -> set[str]:
    """Unpack the archive's training2017/ into ``dest`` through a temporary folder moved into
    place only when every member is out and intact; returns the record names it holds."""
    tmp = dest.with_name(dest.name + ".extracting")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as z:
            members = [m for m in z.infolist() if m.filename.startswith("training2017/") and not m.is_dir()]
            if not members:
                raise DatasetError(f"{archive} holds no training2017/ folder")
            tmp.mkdir(parents=True)
            for m in members:
                try:
                    with z.open(m) as src, open(tmp / Path(m.filename).name, "wb") as out:
                        shutil.copyfileobj(src, out)
                except (zipfile.BadZipFile, zlib.error, EOFError) as e:
                    raise DatasetError(f"{archive}: member {m.filename} is corrupt ({e}); delete {archive} and "
                                       "download it again") from e
    except zipfile.BadZipFile as e:
        raise DatasetError(f"{archive} is not a valid zip file ({e})") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return {Path(m.filename).stem for m in members if m.filename.endswith(".mat")}


# --------------------------------------------------------------------------- synthetic


def _wave(n: int, fs: float, center: float, width: float, amp: float) -> np.ndarray:
    t = (np.arange(n) - center) / fs
    return amp * np.exp(-0.5 * (t / width) ** 2)


def _beat(fs: float, rng: np.random.Generator, p_wave: bool, ectopic: bool) -> np.ndarray:
    """A 1.2-s beat template in mV with the R peak at 0.4 s (sum of Gaussian waves)."""
    n, r = int(1.2 * fs), 0.4 * fs
    j = lambda s: 1 + s * rng.standard_normal()  # noqa: E731 - amplitude jitter
    if ectopic:  # premature ventricular beat: no P, wide tall QRS, inverted T
        return (_wave(n, fs, r, 0.035, 1.4 * j(0.1)) + _wave(n, fs, r + 0.06 * fs, 0.04, -0.6)
                + _wave(n, fs, r + 0.3 * fs, 0.07, -0.35 * j(0.1)))
    beat = (_wave(n, fs, r - 0.025 * fs, 0.008, -0.1 * j(0.2)) + _wave(n, fs, r, 0.011, 1.0 * j(0.05))
            + _wave(n, fs, r + 0.03 * fs, 0.01, -0.25 * j(0.2))
            + _wave(n, fs, r + 0.26 * fs, 0.045, 0.3 * j(0.15)))
    if p_wave:
        beat += _wave(n, fs, r - 0.17 * fs, 0.022, 0.14 * j(0.15))
    return beat


def _place(signal: np.ndarray, template: np.ndarray, at: int, r: int) -> None:
    lo, hi = at - r, at - r + len(template)
    a, b = max(lo, 0), min(hi, len(signal))
    if a < b:
        signal[a:b] += template[a - lo:b - lo]


def synthetic_record(label: str, rng: np.random.Generator, fs: int = 300,
                     seconds: tuple[float, float] = (9.0, 30.0)) -> np.ndarray:
    """One single-lead ECG in int16 uV at ``fs``, drawn from ``rng``, of class ``label``.

    N: sinus rhythm 55-95 bpm with P waves and small respiratory RR variation.
    A: irregularly irregular RR (log-normal, CV ~20%), no P waves, 4-9 Hz fibrillatory waves.
    O: sinus rhythm with premature ventricular beats and compensatory pauses, or
       bradycardia (35-50 bpm), or tachycardia (110-160 bpm).
    ~: heavy muscle noise, baseline jumps and motion spikes over faint or missing beats.
    """
    n = int(rng.uniform(*seconds) * fs)
    t = np.arange(n) / fs
    x = np.zeros(n)
    r = int(0.4 * fs)
    p_wave, ectopic_rate, beat_amp = True, 0.0, 1.0
    if label == "N":
        rr_mean, rr_cv = 60 / rng.uniform(55, 95), 0.025
    elif label == "A":
        rr_mean, rr_cv, p_wave = 60 / rng.uniform(75, 150), 0.2, False
    elif label == "O":
        kind = rng.integers(3)
        if kind == 0:
            rr_mean, rr_cv, ectopic_rate = 60 / rng.uniform(60, 95), 0.025, rng.uniform(0.15, 0.35)
        else:
            rr_mean, rr_cv = 60 / (rng.uniform(35, 50) if kind == 1 else rng.uniform(110, 160)), 0.02
    elif label == "~":
        rr_mean, rr_cv, beat_amp = 60 / rng.uniform(50, 120), 0.1, rng.uniform(0.0, 0.4)
    else:
        raise ValueError(f"unknown class {label!r}")
    normal, pvc = _beat(fs, rng, p_wave, False), _beat(fs, rng, False, True)
    resp = 2 * np.pi * rng.uniform(0.15, 0.35)
    when = rng.uniform(0, rr_mean)
    while when < n / fs:
        if rng.random() < ectopic_rate:
            _place(x, beat_amp * pvc, int((when - 0.35 * rr_mean) * fs), r)
            when += 1.65 * rr_mean  # early beat, then a compensatory pause
            continue
        _place(x, beat_amp * normal, int(when * fs), r)
        if label == "A":
            when += rr_mean * float(np.exp(rr_cv * rng.standard_normal()))
        else:
            when += rr_mean * (1 + rr_cv * rng.standard_normal() + 0.03 * np.sin(resp * when))
    if label == "A":  # fibrillatory waves with a wandering frequency
        f = rng.uniform(4, 9) + 0.5 * np.cumsum(rng.standard_normal(n)) / np.sqrt(n)
        x += rng.uniform(0.04, 0.12) * np.sin(2 * np.pi * np.cumsum(f) / fs)
    x += rng.uniform(0, 0.3) * np.sin(2 * np.pi * rng.uniform(0.05, 0.3) * t + rng.uniform(0, 6.3))
    x += rng.uniform(0.005, 0.03) * rng.standard_normal(n)
    if label == "~":
        x += rng.uniform(0.2, 0.8) * rng.standard_normal(n)  # muscle noise
        steps = rng.integers(0, n, size=rng.integers(2, 8))
        for s in steps:  # electrode motion: baseline jumps and spikes
            x[s:] += rng.uniform(-1.5, 1.5)
            x[s:s + fs // 20] += rng.uniform(-3, 3)
    x *= rng.uniform(0.5, 2.0) * (-1 if rng.random() < 0.1 else 1)
    return np.clip(np.round(1000 * x), INT16.min, INT16.max).astype(np.int16)


def synthesize(n: int, seed: int, fs: int = 300, class_weights: tuple[float, ...] = (0.4, 0.2, 0.25, 0.15)
               ) -> tuple[list[str], list[str], list[np.ndarray]]:
    """``n`` synthetic records (names S00001..., labels, int16 signals at ``fs``).

    Record ``i`` depends only on (seed, i), so a larger set extends a smaller one.
    """
    if n < 1:
        raise ValueError(f"--synthetic needs at least 1 record, got {n}")
    names, labels, signals = [], [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        label = CLASSES[rng.choice(len(CLASSES), p=np.asarray(class_weights) / sum(class_weights))]
        names.append(f"S{i + 1:05d}")
        labels.append(label)
        signals.append(synthetic_record(label, rng, fs))
    return names, labels, signals


# --------------------------------------------------------------------------- split and storage


def duplicate_groups(signals: list[np.ndarray]) -> list[list[int]]:
    """Groups (indices, in record order) of records whose samples are identical.

    CinC 2017 holds two such pairs (A00227 = A01176, A02656 = A03123): a split that put
    them on both sides would test on training data. Found by the sha256 of the samples.
    """
    seen: dict[str, list[int]] = {}
    for i, x in enumerate(signals):
        seen.setdefault(hashlib.sha256(np.ascontiguousarray(x, dtype="<i2").tobytes()).hexdigest(), []).append(i)
    return [g for g in seen.values() if len(g) > 1]


def stratified_split(labels: list[str], seed: int, val_fraction: float, test_fraction: float,
                     groups: list[list[int]] = ()) -> np.ndarray:
    """'train'/'val'/'test' per record: within each class, a seeded permutation cut into
    the requested fractions (rounded), so every split has each class's share of records.
    Each of ``groups`` (e.g. duplicate records) then goes whole into the split of its first
    member, so no group crosses splits (only the other members move).

    The result depends only on the labels in their given order, the groups and the seed.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"bad split fractions: val {val_fraction}, test {test_fraction}")
    labels_arr = np.asarray(labels)
    split = np.full(len(labels_arr), "train", dtype=object)
    rng = np.random.default_rng(seed)
    for c in sorted(set(labels_arr)):
        idx = rng.permutation(np.flatnonzero(labels_arr == c))
        n_val, n_test = round(len(idx) * val_fraction), round(len(idx) * test_fraction)
        split[idx[:n_val]] = "val"
        split[idx[n_val:n_val + n_test]] = "test"
    for group in groups:
        split[list(group)] = split[group[0]]
    return split.astype(str)


def write_dataset(out: Path, names: list[str], labels: list[str], signals: list[np.ndarray],
                  split: np.ndarray, info: dict) -> None:
    """Write records.csv, the compressed samples and build_info.json (last, as the marker
    of a complete build); every file goes through a temporary name and ``os.replace``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / INFO_FILE).unlink(missing_ok=True)
    table = pd.DataFrame({"record": names, "label": labels,
                          "length": [len(s) for s in signals], "split": split})
    concat = np.concatenate(signals).astype("<i2")
    deltas = np.diff(concat, prepend=np.int16(0)).astype("<i2")  # wraps mod 2**16: exact
    # Independent xz streams, one per chunk: `xz -d` still reads the file as one, and
    # load_dataset decodes the chunks on all cores (lzma releases the GIL).
    chunks = np.array_split(deltas, min(XZ_CHUNKS, len(deltas)))
    with ThreadPoolExecutor() as pool:
        streams = list(pool.map(lambda c: lzma.compress(c.tobytes(), preset=6), chunks))
    info = {**info, "xz_stream_bytes": [len(b) for b in streams]}
    atomic_write(out / SAMPLES_FILE, b"".join(streams))
    atomic_write(out / RECORDS_FILE, table.to_csv(index=False).encode())
    atomic_write(out / INFO_FILE, (json.dumps(info, indent=2) + "\n").encode())


@dataclass
class ECGDataset:
    """A built data set in memory. ``signals[i, :lengths[i]]`` is record i in uV at ``fs``;
    the rest of each row is zero padding up to a multiple of 256 samples."""

    names: np.ndarray
    labels: np.ndarray  # class index into model.CLASSES
    lengths: np.ndarray
    split: np.ndarray  # 'train' / 'val' / 'test'
    signals: np.ndarray  # int16 [records, padded length]
    fs: int
    info: dict

    def indices(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return np.flatnonzero(self.split == split)


def load_dataset(folder: Path | str) -> ECGDataset:
    """Load a folder written by this script (see the module docstring for the format)."""
    folder = Path(folder)
    if not (folder / INFO_FILE).is_file():
        raise DatasetError(f"{folder} holds no complete data set ({INFO_FILE} missing); "
                           "build it with build_datasets.py")
    try:
        info = json.loads((folder / INFO_FILE).read_text())
        if not isinstance(info, dict) or not isinstance(info.get("fs"), int) or info["fs"] <= 0:
            raise ValueError(f"'fs' is {info.get('fs') if isinstance(info, dict) else info!r}, expected Hz")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DatasetError(f"{folder / INFO_FILE} is unreadable ({e}); rebuild the data set") from e
    try:
        table = read_table(folder / RECORDS_FILE, RECORDS_SCHEMA, key=("record",),
                           allowed={"label": CLASSES, "split": SPLITS})
    except TableError as e:
        raise DatasetError(f"{e}; fix it or rebuild the data set with build_datasets.py") from e
    if (table["length"] <= 0).any():
        bad = table[table["length"] <= 0].iloc[0]
        raise DatasetError(f"{folder / RECORDS_FILE}: record {bad['record']} has length {bad['length']}; "
                           "rebuild the data set")
    try:
        blob = (folder / SAMPLES_FILE).read_bytes()
        ends = np.cumsum(info.get("xz_stream_bytes", [len(blob)]))
        parts = [blob[a:b] for a, b in zip(np.r_[0, ends[:-1]], ends, strict=True)]
        with ThreadPoolExecutor() as pool:
            raw = b"".join(pool.map(lzma.decompress, parts))
    except (OSError, lzma.LZMAError) as e:
        raise DatasetError(f"{folder / SAMPLES_FILE} is unreadable ({e}); rebuild the data set") from e
    lengths = table["length"].to_numpy(np.int64)
    concat = np.cumsum(np.frombuffer(raw, "<i2"), dtype=np.int16)
    if len(concat) != lengths.sum():
        raise DatasetError(f"{folder / SAMPLES_FILE} holds {len(concat)} samples, "
                           f"{RECORDS_FILE} lists {lengths.sum()}; rebuild the data set")
    padded = PAD_MULTIPLE * math.ceil(lengths.max() / PAD_MULTIPLE)
    signals = np.zeros((len(lengths), padded), dtype=np.int16)
    for row, start, n in zip(signals, np.r_[0, np.cumsum(lengths)[:-1]], lengths, strict=True):
        row[:n] = concat[start:start + n]
    labels = np.array([CLASSES.index(c) for c in table["label"]], dtype=np.int64)
    return ECGDataset(table["record"].to_numpy(), labels, lengths, table["split"].to_numpy(),
                      signals, int(info["fs"]), info)


def summarize(table: pd.DataFrame, fs: int) -> str:
    """Records per class and split, and durations, as printable text."""
    counts = pd.crosstab(table["label"], table["split"], margins=True, margins_name="all")
    counts = counts.reindex(index=[c for c in CLASSES if c in counts.index] + ["all"],
                            columns=[s for s in SPLITS if s in counts.columns] + ["all"])
    seconds = table["length"] / fs
    return (f"{counts.to_string()}\n\ndurations: {seconds.min():.2f}-{seconds.max():.2f} s, "
            f"mean {seconds.mean():.2f} s, total {seconds.sum() / 3600:.2f} h")


# --------------------------------------------------------------------------- command line


def inputs_fingerprint(source: Path, labels: Path | None) -> str | None:
    """sha256 of every record file (.mat, .hea) and the label file a build reads, so that a
    fixed record or a corrected label rebuilds the data even under the same flags. None when
    the inputs cannot be found (the build itself then says what is missing)."""
    try:
        label_file = find_label_file(source, labels)
    except DatasetError:
        return None
    digest = hashlib.sha256()
    for path in sorted([*source.glob("*.mat"), *source.glob("*.hea")]) + [label_file]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


PATH_FLAGS = ("out", "source", "labels", "download_dir")
"""Flags naming paths: compared by the place they name, not by their spelling."""


def normal_flags(flags: dict | None) -> dict | None:
    """``flags`` with every path flag resolved (an absolute path, ./ or a trailing slash
    names the same folder), so that the same build is not taken for another."""
    if flags is None:
        return None
    return {k: (str(Path(v).resolve()) if k in PATH_FLAGS and isinstance(v, str) else v) for k, v in flags.items()}


def build(args: argparse.Namespace) -> Path:
    """Run the build described by the parsed flags; returns the output folder.

    Skipped when ``out`` holds a build with the same flags, format and inputs. The new build
    is written beside the old one and swapped in only when complete, so a failure (a full
    disk, a bad record) leaves the previous build as it was."""
    out = Path(args.out) if args.out else Path("data") / ("synthetic" if args.synthetic else "cinc2017")
    flags = {k: v for k, v in sorted(vars(args).items()) if k not in ("overwrite",)}
    flags["out"] = str(out)
    if out.is_dir():  # the swap below replaces the whole folder: only ever a data set's own files
        foreign = sorted(p.name for p in out.iterdir()
                         if p.name not in (SAMPLES_FILE, RECORDS_FILE, INFO_FILE) and not p.name.endswith(".tmp"))
        if foreign:
            raise DatasetError(f"{out} holds other files than a data set ({', '.join(foreign[:3])}); "
                               "choose another --out")
    source = None if args.synthetic else (Path(args.download_dir) / "training2017" if args.download
                                          else Path(args.source))
    inputs = None if source is None or not source.is_dir() else inputs_fingerprint(
        source, Path(args.labels) if args.labels else None)
    if (out / INFO_FILE).is_file():
        old_info = json.loads((out / INFO_FILE).read_text())
        old = normal_flags(old_info.get("flags"))
        same_inputs = source is None or (inputs is not None and old_info.get("inputs_sha256") == inputs)
        same = old == normal_flags(flags)
        if same and old_info.get("format", 1) == BUILD_FORMAT and same_inputs:
            print(f"{out} is already built with these flags from the same inputs; nothing to do")
            return out
        if same and old_info.get("format", 1) != BUILD_FORMAT:
            print(f"{out} was made by an older build_datasets.py (format {old_info.get('format', 1)}, now "
                  f"{BUILD_FORMAT}: duplicate records kept in one split); rebuilding it")
        elif same and "inputs_sha256" not in old_info:
            print(f"{out} does not record a fingerprint of its inputs (an older build); rebuilding it")
        elif same:
            print(f"the records or labels in {source} changed since {out} was built; rebuilding it")
        elif not args.overwrite:
            old = old or {}
            diff = ", ".join(f"--{k.replace('_', '-')} {old.get(k)} (now {v})"
                             for k, v in flags.items() if old.get(k) != normal_flags(flags)[k])
            raise DatasetError(f"{out} was built with other flags: {diff}; pass --overwrite to "
                               "replace it or --out for a new folder")
    if args.synthetic:
        names, labels, raw = synthesize(args.synthetic, args.seed)
        signals = [resample(x, 300) for x in raw]
        bad: list[tuple[str, str]] = []
        facts = {"source": f"synthetic ({args.synthetic} records, seed {args.seed}, 300 Hz)"}
    else:
        source = Path(args.source)
        if args.download:
            source = download_cinc(Path(args.download_dir), args.url, args.sha256)
            inputs = inputs_fingerprint(source, Path(args.labels) if args.labels else None)
        names, labels, signals, bad, facts = read_cinc(source, Path(args.labels) if args.labels
                                                       else None, args.skip_bad)
        facts["inputs_sha256"] = inputs
    duplicates = duplicate_groups(signals)
    split = stratified_split(labels, args.seed, args.val_fraction, args.test_fraction, duplicates)
    table = pd.DataFrame({"record": names, "label": labels,
                          "length": [len(s) for s in signals], "split": split})
    empty = [s for s in SPLITS if not (split == s).any()]
    if empty:  # training needs validation records, and reports the test split
        raise DatasetError(f"the split of {len(names)} records leaves {' and '.join(empty)} empty "
                           f"(--val-fraction {args.val_fraction:g}, --test-fraction {args.test_fraction:g}, "
                           "rounded per class): use more records or larger fractions")
    info = {"flags": flags, "format": BUILD_FORMAT, "code_version": code_version(), "fs": FS, "records": len(names),
            "skipped": [{"record": n, "reason": r} for n, r in bad], **facts,
            "duplicate_groups": [[names[i] for i in g] for g in duplicates],
            "counts": {s: table[table["split"] == s]["label"].value_counts().to_dict()
                       for s in SPLITS}}
    # a symlinked --out keeps its link: the swap happens in the folder it points to
    dest = Path(os.path.realpath(out)) if out.is_symlink() else out
    building, previous = dest.with_name(dest.name + ".building"), dest.with_name(dest.name + ".previous")
    try:
        shutil.rmtree(building, ignore_errors=True)  # the leftover of a build that failed
        write_dataset(building, names, labels, signals, split, info)
    except OSError as e:
        shutil.rmtree(building, ignore_errors=True)
        raise DatasetError(f"writing the data set to {building} failed ({e.strerror or e}); {out} is unchanged: "
                           "free space or choose a writable --out") from e
    try:
        shutil.rmtree(previous, ignore_errors=True)
        if dest.exists():
            os.replace(dest, previous)
        os.replace(building, dest)
        shutil.rmtree(previous, ignore_errors=True)
    except OSError as e:
        raise DatasetError(f"swapping the new build into {dest} failed ({e.strerror or e}); the new build is in "
                           f"{building}, the old one in {previous if previous.exists() else dest}") from e
    print(summarize(table, FS))
    if bad:
        print(f"\nskipped {len(bad)} bad record(s):")
        for name, reason in bad:
            print(f"  {name}: {reason}")
    print(f"\n{len(duplicates)} group(s) of records with identical samples, each kept in one split"
          + (": " + "; ".join(" = ".join(names[i] for i in g) for g in duplicates) if duplicates else ""))
    if "matches_official_cinc2017" in facts:
        print(f"\nraw samples sha256 {facts['raw_samples_sha256']}"
              + (" (the official 8,528-record set)" if facts["matches_official_cinc2017"] else ""))
    size = sum((out / f).stat().st_size for f in (SAMPLES_FILE, RECORDS_FILE, INFO_FILE))
    print(f"wrote {out}/ ({size / 1e6:.1f} MB)")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Example: python build_datasets.py --source "
                                "../shared/data/cinc2017/training2017",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--source", default="data/raw/training2017",
                   help="folder with the CinC 2017 .mat/.hea records")
    p.add_argument("--labels", default=None,
                   help="label CSV (default: REFERENCE-v3.csv in or beside --source, "
                   "else REFERENCE.csv with a warning)")
    p.add_argument("--out", default=None,
                   help="output folder (default data/cinc2017, or data/synthetic)")
    p.add_argument("--synthetic", type=int, default=0, metavar="N",
                   help="build N synthetic records instead of reading --source")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (and synthetic data)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="validation share per class")
    p.add_argument("--test-fraction", type=float, default=0.1, help="test share per class")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip and list bad records instead of stopping at the first")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an --out folder built with other flags")
    g = p.add_argument_group("download")
    g.add_argument("--download", action="store_true",
                   help="fetch training2017.zip + REFERENCE-v3.csv into --download-dir first")
    g.add_argument("--download-dir", default="data/raw", help="where the download goes")
    g.add_argument("--url", default=PHYSIONET_URL, help="base URL of the files")
    g.add_argument("--sha256", default=ZIP_SHA256, help="expected sha256 of training2017.zip")
    args = p.parse_args(argv)
    if args.synthetic < 0:
        p.error(f"--synthetic must be >= 0, got {args.synthetic}")
    if not (0 <= args.val_fraction < 1 and 0 <= args.test_fraction < 1
            and args.val_fraction + args.test_fraction < 1):
        p.error("--val-fraction and --test-fraction must be in [0, 1) and sum to < 1")
    if args.synthetic and args.download:
        p.error("--synthetic and --download exclude each other")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        with script_errors():
            build(args)
    except DatasetError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
