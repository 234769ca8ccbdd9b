"""Classify single-lead ECG files with an exported ticket (export_ticket.py).

Reads WFDB records as in CinC 2017 (``A00001.mat`` with its ``A00001.hea`` beside it; the
header gives the sampling rate) and plain samples: ``.npy`` (a 1-D array) or ``.csv``/``.txt``
(one column or one row, an optional header line) with ``--fs``. Every record is resampled to
the network's 200 Hz (polyphase, anti-aliased, as in build_datasets.py) and z-scored with
the training set's statistics stored in the ticket. Samples are expected in microvolts, as
the CinC 2017 int16 values are (``--units mV`` multiplies by 1000); WFDB files are read as
CinC 2017 stores them (int16 at 1000 per mV, baseline 0), other gains are not converted.

Prints, per file, the class (from the mean of the per-segment logits, as in training), the
four class probabilities and the class of every 256-sample segment (1.28 s); ``--json`` for
machine-readable output. A file that cannot be used (unreadable, no or implausible sampling
rate, several leads, too short, not finite, or an amplitude or heart rate that says the
units or the rate are wrong: see MIN_SPAN_UV and MIN_BPM; ``--no-checks`` to classify anyway)
gets an error naming it and how to fix the flags, the other files are still classified,
and the exit status is 1.

Without ``--ticket`` it uses the shipped CinC 2017 ticket (SHIPPED_TICKET, made by
ship_ticket.py; its report is results/ticket-cinc2017/README.md), so a real record is
classified in one command without training.

Example:
    python predict.py ../shared/data/cinc2017/training2017/A00001.mat
    python predict.py --ticket tickets/demo/ticket-int8.npz --fs 250 --units mV my_ecg.csv
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.signal import butter, find_peaks, sosfiltfilt

from build_datasets import FS, DatasetError, read_record, resample
from export_ticket import TicketError, load_ticket

MIN_FS, MAX_FS = 50.0, 5000.0
"""Plausible ECG sampling rates; anything outside is most likely a wrong --fs."""
MIN_SPAN_UV, MAX_SPAN_UV = 50.0, 20000.0
"""Plausible span of an ECG (0.5th to 99.5th percentile of its samples) in microvolts: the
8,528 CinC 2017 records span 251-10,921 uV. Below, the file is most likely in mV read as uV;
above, in uV read as mV (or not an ECG)."""
MIN_BPM, MAX_BPM = 25.0, 240.0
"""Plausible heart rate (median RR of the detected beats, which are at least 0.24 s apart,
so the detector saturates at 250 bpm). The 8,528 CinC 2017 records at their true rate
measure 23.9-235.3 bpm; one (a noisy record) falls outside 25-240 (measured with this
function on the 200 Hz build). A rate outside points to a wrong --fs. The check is coarse: it
catches a rate given several times too low (the beats then look too slow); a rate given too
high moves the QRS out of the detector's 5-25 Hz band and is seldom caught, so it cannot
prove a rate right."""


SHIPPED_TICKET = Path(__file__).resolve().parent / "results" / "ticket-cinc2017" / "ticket-fp32.npz"
"""The default ticket: the CinC 2017 grid's winning ticket (ship_ticket.py), kept in git."""


class PredictError(Exception):
    """An input file that cannot be classified; the message names it."""


def read_samples(path: Path, fs: float | None, units: str) -> tuple[np.ndarray, float]:
    """(samples in microvolts as float64, sampling rate) of one file."""
    if path.is_dir():
        raise PredictError(f"{path}: a folder; give the ECG files in it (e.g. {path}/*.mat)")
    if not path.is_file():
        raise PredictError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".mat", ".hea"):
        try:
            x, file_fs = read_record(path.parent, path.stem)
        except DatasetError as e:
            raise PredictError(f"{path}: {e}") from e
        if fs is not None and fs != file_fs:
            raise PredictError(f"{path}: its header says {file_fs:g} Hz but --fs is {fs:g}; drop --fs for WFDB files")
        return x.astype(np.float64), file_fs
    if fs is None:
        raise PredictError(f"{path}: plain samples need their sampling rate: pass --fs (e.g. --fs 300)")
    try:
        if suffix == ".npy":
            x = np.load(path, allow_pickle=False)
        elif suffix in (".csv", ".txt"):
            table = pd.read_csv(path, header=None, sep=r"[,;\s]+", engine="python")
            if not all(pd.api.types.is_numeric_dtype(t) for t in table.dtypes):  # a header line
                table = pd.read_csv(path, sep=r"[,;\s]+", engine="python")
            x = table.to_numpy()
        else:
            raise PredictError(f"{path}: unknown file type {suffix!r} (use .mat/.hea, .npy, .csv or .txt)")
        x = np.asarray(x, dtype=np.float64)
    except PredictError:
        raise
    except (OSError, EOFError, ValueError, TypeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise PredictError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
    if x.ndim == 2 and 1 in x.shape:
        x = x.ravel()
    if x.ndim != 1:
        raise PredictError(f"{path}: holds an array of shape {x.shape}; give one lead (a single row or column)")
    return x * (1000.0 if units == "mV" else 1.0), fs


def heart_rate(x: np.ndarray, fs: float) -> float:
    """Beats per minute from the median interval between R peaks (5-25 Hz band envelope,
    peaks at least 0.24 s apart); NaN with fewer than 2 beats."""
    y = np.abs(sosfiltfilt(butter(3, [5, 25], btype="band", fs=fs, output="sos"), x))
    peaks, _ = find_peaks(y, height=0.35 * np.percentile(y, 99), distance=max(1, int(0.24 * fs)))
    return float(60 * fs / np.median(np.diff(peaks))) if len(peaks) > 1 else float("nan")


def check_plausible(x: np.ndarray, fs: float, name: str) -> None:
    """Refuse input whose amplitude or heart rate says the units or the rate are wrong:
    such a file would still get a confident class, and a wrong one."""
    low, high = np.percentile(x, [0.5, 99.5])
    span = high - low
    if span < MIN_SPAN_UV:
        raise PredictError(f"{name}: spans only {span:.3g} uV, too little for an ECG ({MIN_SPAN_UV:g}-"
                           f"{MAX_SPAN_UV:g} uV expected): if it is in mV, pass --units mV")
    if span > MAX_SPAN_UV:
        raise PredictError(f"{name}: spans {span / 1000:.3g} mV, too much for an ECG: if it is in uV, drop "
                           "--units mV (or --no-checks if it is right)")
    if fs > 60:  # the 5-25 Hz band needs a rate above 50 Hz
        bpm = heart_rate(x, fs)
        if not MIN_BPM <= bpm <= MAX_BPM:
            raise PredictError(f"{name}: its beats give {bpm:.0f} bpm at --fs {fs:g}, outside {MIN_BPM:g}-"
                               f"{MAX_BPM:g}: check --fs (a wrong rate scales the heart rate), or --no-checks")


def prepare(x: np.ndarray, fs: float, name: str, min_seconds: float, checks: bool = True) -> np.ndarray:
    """Samples at 200 Hz as int16 microvolts (the training data's form), checked."""
    if not MIN_FS <= fs <= MAX_FS:
        raise PredictError(f"{name}: sampling rate {fs:g} Hz is outside {MIN_FS:g}-{MAX_FS:g} Hz; check --fs")
    if not np.isfinite(x).all():
        raise PredictError(f"{name}: holds {int((~np.isfinite(x)).sum())} NaN or infinite samples")
    seconds = len(x) / fs
    if seconds < min_seconds:
        raise PredictError(f"{name}: {seconds:.2f} s long; at least {min_seconds:g} s are needed "
                           "(--min-seconds)")
    if checks:
        check_plausible(x, fs, name)
    y = resample(np.clip(np.round(x), -32768, 32767).astype(np.int16), fs, FS)
    return y


@torch.no_grad()
def classify(model: torch.nn.Module, meta: dict, samples: np.ndarray) -> dict:
    """Class, probabilities and per-segment classes of one 200 Hz record."""
    stride = model.cfg.stride
    n = len(samples)
    length = stride * -(-n // stride)
    x = torch.zeros(1, 1, length)
    norm = meta["normalizer"]
    x[0, 0, :n] = (torch.from_numpy(samples.astype(np.float32)) - norm["mean"]) / norm["std"]
    logits = model(x)[0, :max(1, n // stride)].float()
    probs = torch.softmax(logits.mean(0), dim=0)
    classes = meta["classes"]
    return {"class": classes[int(probs.argmax())],
            "probabilities": {c: round(float(p), 4) for c, p in zip(classes, probs, strict=True)},
            "seconds": round(n / FS, 2), "segment_seconds": stride / FS,
            "segments": [classes[i] for i in logits.argmax(1).tolist()]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path, help="ECG files: .mat (+ .hea), .npy, .csv or .txt")
    p.add_argument("--ticket", type=Path, default=SHIPPED_TICKET,
                   help="ticket file from export_ticket.py (.npz); default: the shipped CinC 2017 ticket")
    p.add_argument("--fs", type=float, default=None, help="sampling rate in Hz of .npy/.csv/.txt files")
    p.add_argument("--units", default="uV", choices=["uV", "mV"], help="units of .npy/.csv/.txt samples")
    p.add_argument("--min-seconds", type=float, default=5.0, help="shortest record accepted")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of text")
    p.add_argument("--no-checks", action="store_true",
                   help="classify even when the amplitude or heart rate looks implausible for the given "
                   "--units/--fs")
    args = p.parse_args(argv)
    if args.fs is not None and args.fs <= 0:
        p.error(f"--fs must be positive, got {args.fs:g}")
    if args.min_seconds * FS < 256:
        p.error(f"--min-seconds must be at least {256 / FS:g} (one 256-sample segment)")
    if args.ticket == SHIPPED_TICKET and not SHIPPED_TICKET.is_file():
        print(f"error: the shipped ticket {SHIPPED_TICKET} is missing (it is in git: git checkout -- "
              f"{SHIPPED_TICKET.relative_to(SHIPPED_TICKET.parents[2])}); or pass --ticket", file=sys.stderr)
        return 2
    try:
        model, meta = load_ticket(args.ticket)
    except TicketError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model.eval()
    results, failed = [], 0
    for path in args.files:
        try:
            x, fs = read_samples(path, args.fs, args.units)
            out = {"file": str(path), **classify(model, meta, prepare(x, fs, str(path), args.min_seconds,
                                                                 not args.no_checks))}
        except PredictError as e:
            failed += 1
            print(f"error: {e}", file=sys.stderr)
            results.append({"file": str(path), "error": str(e)})
            continue
        results.append(out)
        if not args.json:
            probs = ", ".join(f"{c} {v:.2f}" for c, v in out["probabilities"].items())
            print(f"{path}: {out['class']}  ({probs})  {out['seconds']:g} s")
            print(f"  segments of {out['segment_seconds']:g} s: {' '.join(out['segments'])}")
    if args.json:
        print(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
