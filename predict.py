"""Classify single-lead ECG files with an exported ticket (export_ticket.py).

Reads any WFDB record (``X.hea`` with its ``X.dat`` or ``X.mat``: any signal format, gain,
baseline, physical unit, and the sampling rate from the header) through the optional
``wfdb`` package (requirements-export.txt); without it, CinC 2017's own layout (``A00001.mat``
+ ``.hea``, 1000 per mV) through build_datasets' reader. A record of several leads needs
``--lead`` (a name or an index from 0). Plain samples: ``.npy`` (a 1-D array) or
``.csv``/``.txt`` (one row or one column, or ``--lead`` for a column; an optional header
line; values separated by ``;``, tabs, ``,`` or spaces, and a decimal comma where it cannot be
the separator) with ``--fs``. Plain samples are expected in microvolts (``--units mV``
multiplies by 1000). Every record is resampled to the network's 200 Hz (polyphase,
anti-aliased, as in build_datasets.py) and z-scored with the training set's statistics
stored in the ticket.

Prints, per file, the class (from the mean of the per-segment logits, as in training), the
four class probabilities and the class of every 256-sample segment (1.28 s); and, when the
ticket holds an AF operating point (export_ticket.OPTIONAL_META; the shipped one does), whether
the record is flagged AF at it (P(A) >= its threshold, chosen on validation for a PPV: a
wearable's alarm, which may differ from the argmax class). ``--windows`` reads each record in
consecutive windows of the length the ticket was trained on (tickets of runs trained with
``--crop`` record it), as train.py's ``*_windows`` scores do: the network's receptive field is
longer than those windows, so a ticket trained on them can read a whole record differently
(no AF flag there: its threshold was chosen on whole records). ``--json`` for machine-readable
output (``af_flag``). A file that cannot be used (unreadable, no or implausible sampling
rate, several leads and no --lead, too short, not finite, beyond the int16 microvolts the
network was trained on, or an amplitude, heart rate or spectrum that says the units or the
rate are wrong: see MIN_SPAN_UV, MIN_BPM and MIN_QRS_SHARE; ``--no-checks`` to classify
anyway) gets an error naming it and how to fix the flags, the other files are still
classified, and the exit status is 1.

Without ``--ticket`` it uses the shipped CinC 2017 ticket (SHIPPED_TICKET, made by
ship_ticket.py; its report is results/ticket-cinc2017/README.md), so a real record is
classified in one command without training.

Example:
    python predict.py ../shared/data/cinc2017/training2017/A00001
    python predict.py --ticket tickets/demo/ticket-int8.npz --fs 250 --units mV my_ecg.csv
    python predict.py --ticket tickets/demo/ticket-int8.npz --lead II holter.hea
    python predict.py --windows --ticket results/cinc2017-cpu-full/export-seed0-weight_rewind-142x/ticket-fp32.npz \
        ../shared/data/cinc2017/training2017/A00001
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import scipy.io
import torch
from scipy.signal import butter, find_peaks, sosfiltfilt

from batching import window_cuts
from build_datasets import FS, INT16, DatasetError, check_int16, read_record, resample
from export_ticket import TicketError, load_ticket
from run_folders import script_errors

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


MIN_QRS_SHARE = 0.009
"""Least share of an ECG's power (0.5-25 Hz) that lies in the QRS band (5-25 Hz), at 200 Hz:
the 8,528 CinC 2017 records at their true rate have 0.0094 or more (median 0.40). A rate
given k times too low squeezes the QRS below 5 Hz. With the heart-rate check, of 300 random
CinC records given a rate k times too low, 1 % are refused at k = 2, 54 % at 3, 83 % at 4,
89 % at 5, 92 % at 6; at their true rate 1 of the 8,528 is refused (its heart rate,
23.9 bpm). Measured on the 200 Hz build: ``benchmarks/rate_check.py``."""


def qrs_share(x: np.ndarray, fs: float) -> float:
    """Share of the power in 0.5-25 Hz that lies in 5-25 Hz (the QRS complexes)."""
    band = lambda lo: sosfiltfilt(butter(3, [lo, 25], btype="band", fs=fs, output="sos"), x)  # noqa: E731
    return float((band(5) ** 2).sum() / max((band(0.5) ** 2).sum(), 1e-12))


class PredictError(Exception):
    """An input file that cannot be classified; the message names it."""


UNITS_TO_UV = {"uV": 1.0, "µV": 1.0, "mV": 1000.0, "V": 1e6}
"""Physical units a WFDB header may state, and their factor to microvolts."""


def read_samples(path: Path, fs: float | None, units: str, lead: str | None = None) -> tuple[np.ndarray, float]:
    """(samples in microvolts as float64, sampling rate) of one file, or of a WFDB record named
    without its extension (``A00001`` for ``A00001.hea``, as WFDB tools name records)."""
    if not path.exists() and path.with_name(path.name + ".hea").is_file():
        path = path.with_name(path.name + ".hea")
    if path.is_dir():
        raise PredictError(f"{path}: a folder; give the ECG files in it (e.g. {path}/*.mat)")
    if not path.is_file():
        raise PredictError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".mat", ".hea", ".dat"):
        x, file_fs = read_wfdb(path, lead)
        if fs is not None and fs != file_fs:
            raise PredictError(f"{path}: its header says {file_fs:g} Hz but --fs is {fs:g}; drop --fs for WFDB files")
        return x, file_fs
    if fs is None:
        raise PredictError(f"{path}: plain samples need their sampling rate: pass --fs (e.g. --fs 300)")
    try:
        if suffix == ".npy":
            x = np.asarray(np.load(path, allow_pickle=False))
            if x.dtype.kind not in "iuf":
                raise PredictError(f"{path}: holds {x.dtype} values, expected numbers")
            x = x.astype(np.float64)
        elif suffix in (".csv", ".txt"):
            x = read_text_samples(path, lead)
        else:
            raise PredictError(f"{path}: unknown file type {suffix!r} (use .hea/.mat/.dat, .npy, .csv or .txt)")
    except PredictError:
        raise
    except (OSError, EOFError, ValueError, TypeError) as e:
        raise PredictError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
    if x.ndim == 2 and 1 in x.shape:
        x = x.ravel()
    if x.ndim != 1:
        raise PredictError(f"{path}: holds an array of shape {x.shape}; give one lead (a single row or column)")
    return x * (1000.0 if units == "mV" else 1.0), fs


def read_wfdb(path: Path, lead: str | None) -> tuple[np.ndarray, float]:
    """One lead of a WFDB record in microvolts, and the header's rate. Read through the
    ``wfdb`` package (any signal format, gain, baseline and physical unit); without it, only
    CinC 2017's own layout (.mat, 1000/mV) through build_datasets' reader."""
    record = path.with_suffix("")
    try:
        import wfdb  # noqa: PLC0415 - optional (requirements-export.txt)
    except ImportError:
        try:
            x, fs = read_record(path.parent, path.stem)
        except DatasetError as e:
            raise PredictError(f"{path}: not a CinC 2017 .mat record ({e}); other WFDB records are read through "
                               "the wfdb package: pip install -r requirements-export.txt") from e
        return pick_lead(x[:, None].astype(np.float64), ["ECG"], lead, path), fs
    if not record.with_suffix(".hea").is_file():
        raise PredictError(f"{path}: its header {record.with_suffix('.hea')} is missing")
    mat = record.with_suffix(".mat")
    if mat.is_file():  # wfdb reads a .mat's bytes as the header's format says: int32 values would be garbage
        try:
            check_int16(scipy.io.loadmat(str(mat))["val"], record.name, mat)
        except DatasetError as e:
            raise PredictError(str(e)) from e
        except Exception as e:  # scipy raises many types on truncated or corrupt files
            raise PredictError(f"{path}: unreadable .mat file {mat} ({type(e).__name__}: {e})") from e
    try:
        rec = wfdb.rdrecord(str(record), physical=True)
    except Exception as e:  # wfdb raises many types on a malformed header or signal file
        raise PredictError(f"{path}: unreadable WFDB record ({type(e).__name__}: {e})") from e
    if rec.p_signal is None or rec.n_sig < 1 or not rec.fs:
        raise PredictError(f"{path}: the record holds no signal or no sampling rate")
    names = list(rec.sig_name or [str(i) for i in range(rec.n_sig)])
    i = lead_index(names, lead, path)
    unit = (rec.units or ["mV"] * rec.n_sig)[i]
    if unit not in UNITS_TO_UV:
        raise PredictError(f"{path}: lead {names[i]!r} is in {unit!r}; expected one of {', '.join(UNITS_TO_UV)} "
                           "(is it an ECG lead?)")
    return rec.p_signal[:, i].astype(np.float64) * UNITS_TO_UV[unit], float(rec.fs)


def lead_index(names: list[str], lead: str | None, path: Path) -> int:
    """The column of the lead asked for (``--lead``: a name, or an index from 0); a single
    lead needs no choice, several do."""
    listed = ", ".join(f"{i}: {n}" for i, n in enumerate(names))
    if lead is None:
        if len(names) == 1:
            return 0
        raise PredictError(f"{path}: holds {len(names)} leads ({listed}); choose one with --lead NAME or INDEX")
    if lead in names:
        return names.index(lead)
    if lead.lstrip("-").isdigit() and 0 <= int(lead) < len(names):
        return int(lead)
    raise PredictError(f"{path}: no lead {lead!r}; it holds {listed}")


def pick_lead(table: np.ndarray, names: list[str], lead: str | None, path: Path) -> np.ndarray:
    return table[:, lead_index(names, lead, path)]


def read_text_samples(path: Path, lead: str | None) -> np.ndarray:
    """The samples of a .csv/.txt file, read as written: values separated by ';', tabs, ','
    or spaces (in that order of precedence), '.' or ',' as the decimal mark (',' only where
    it cannot be the separator), an optional header line. One row or one column is one
    lead; several columns need --lead. What cannot be read unambiguously is refused with a
    sentence about the format."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise PredictError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from e
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise PredictError(f"{path}: empty: no samples")
    body = "\n".join(lines[1:] if len(lines) > 1 else lines)
    if ";" in body:
        sep, decimal = ";", ","
    elif "\t" in body:
        sep, decimal = "\t", ","
    elif "," in body and not re.search(r"\d,\d+[ ]+[-+]?\d", body):
        sep, decimal = ",", "."
    else:
        sep, decimal = None, ","  # spaces between values; a comma can only be a decimal mark
    rows = [[f.strip() for f in (line.rstrip(sep).split(sep) if sep else line.split())] for line in lines]

    def number(field: str) -> float:
        if decimal == "," and "," in field:
            if "." in field:
                raise ValueError(field)  # 1.234,5: a thousands mark, not a sample
            field = field.replace(",", ".")
        return float(field)

    def parse(row: list[str]) -> list[float] | None:
        try:
            return [number(f) for f in row]
        except ValueError:
            return None

    header = None
    if len(rows) > 1 and parse(rows[0]) is None:  # a single line is samples, never a header
        header, rows = rows[0], rows[1:]
    values = []
    for n, row in enumerate(rows, start=2 if header else 1):
        parsed = parse(row)
        if parsed is None:
            raise PredictError(f"{path}: line {n} ({' '.join(row)[:40]!r}) is not numbers separated by "
                               f"{'spaces' if sep is None else repr(sep)}; give one number per value, '.' or ',' as "
                               "decimal mark, ';' between values when ',' is the decimal mark")
        values.append(parsed)
    if not values:
        raise PredictError(f"{path}: only a header line, no samples")
    widths = {len(v) for v in values}
    if len(widths) > 1:
        raise PredictError(f"{path}: its lines hold different numbers of values ({sorted(widths)}) with "
                           f"{'spaces' if sep is None else repr(sep)} as separator; give one row or one column")
    table = np.asarray(values, dtype=np.float64)
    if len(values) > 1 and table.shape[1] > 1:
        if sep == "," and table.shape[1] == 2 and all(re.fullmatch(r"\d+", r[-1]) for r in rows[:50]):
            raise PredictError(f"{path}: every line holds two ','-separated numbers: if ',' is the decimal mark "
                               "(1,25 for 1.25), separate values by ';' or use '.' decimals; if these are two "
                               "leads, choose one with --lead")
        names = header if header is not None and len(header) == table.shape[1] else [
            str(i) for i in range(table.shape[1])]
        return pick_lead(table, names, lead, path)
    return table.ravel()


def heart_rate(x: np.ndarray, fs: float) -> float:
    """Beats per minute from the median interval between R peaks (5-25 Hz band envelope,
    peaks at least 0.24 s apart); NaN with fewer than 2 beats."""
    y = np.abs(sosfiltfilt(butter(3, [5, 25], btype="band", fs=fs, output="sos"), x))
    peaks, _ = find_peaks(y, height=0.35 * np.percentile(y, 99), distance=max(1, int(0.24 * fs)))
    return float(60 * fs / np.median(np.diff(peaks))) if len(peaks) > 1 else float("nan")


def check_amplitude(x: np.ndarray, name: str) -> None:
    """Refuse input whose amplitude says the units are wrong: such a file would still get a
    confident class, and a wrong one."""
    low, high = np.percentile(x, [0.5, 99.5])
    span = high - low
    if span < MIN_SPAN_UV:
        raise PredictError(f"{name}: spans only {span:.3g} uV, too little for an ECG ({MIN_SPAN_UV:g}-"
                           f"{MAX_SPAN_UV:g} uV expected): if it is in mV, pass --units mV")
    if span > MAX_SPAN_UV:
        raise PredictError(f"{name}: spans {span / 1000:.3g} mV, too much for an ECG: if it is in uV, drop "
                           "--units mV (or --no-checks if it is right)")


def check_rate(x: np.ndarray, fs: float, name: str) -> None:
    """Refuse input whose heart rate says the declared rate ``fs`` is wrong. ``x`` is the
    record resampled to 200 Hz from ``fs``, so the heart rate is measured the same way
    whatever rate was declared (a rate several times too low, e.g. --fs 50 for a 300 Hz
    record, makes the beats too slow)."""
    share = qrs_share(x.astype(np.float64), FS)
    if share < MIN_QRS_SHARE:
        raise PredictError(f"{name}: at --fs {fs:g} only {100 * share:.2g} % of its power lies in the QRS band "
                           f"(5-25 Hz; ECGs at their true rate have at least {100 * MIN_QRS_SHARE:g} %): the rate is "
                           "most likely given too low: check --fs (or --no-checks)")
    bpm = heart_rate(x.astype(np.float64), FS)
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
        check_amplitude(x, name)
    outside = int(np.count_nonzero(np.abs(x) > INT16.max))
    if outside and checks:  # the network knows int16 microvolts only: clipping would change the record
        raise PredictError(f"{name}: {outside} sample(s) beyond +-{INT16.max / 1000:g} mV (largest "
                           f"{np.abs(x).max() / 1000:.3g} mV), outside the int16 microvolts the network was "
                           "trained on: check --units (or --no-checks to clip them)")
    y = resample(np.clip(np.round(x), INT16.min, INT16.max).astype(np.int16), fs, FS)
    if checks:
        check_rate(y, fs, name)
    return y


@torch.no_grad()
def classify(model: torch.nn.Module, meta: dict, samples: np.ndarray, windows: bool = False) -> dict:
    """Class, probabilities and per-segment classes of one 200 Hz record: in one pass over
    the whole record, or with ``windows`` on consecutive windows of the ticket's training
    length (batching.window_cuts, as train.py scores ``*_windows``), each segment classified
    by the window that holds it and the record by the mean logits over all of them."""
    stride = model.cfg.stride
    n = len(samples)
    window = meta["window"] if windows else stride * -(-n // stride)
    _, starts, pieces = window_cuts(np.array([n]), window, stride)
    norm = meta["normalizer"]
    z = (torch.from_numpy(samples.astype(np.float32)) - norm["mean"]) / norm["std"]
    x = torch.zeros(len(starts), 1, window)
    for row, (start, piece) in enumerate(zip(starts, pieces, strict=True)):
        x[row, 0, :piece] = z[start:start + piece]
    out_steps = model(x).float()
    logits = torch.cat([out_steps[row, :max(1, piece // stride)] for row, piece in enumerate(pieces)])
    probs = torch.softmax(logits.mean(0), dim=0)
    classes = meta["classes"]
    out = {"class": classes[int(probs.argmax())],
           "probabilities": {c: round(float(p), 4) for c, p in zip(classes, probs, strict=True)},
           "seconds": round(n / FS, 2), "segment_seconds": stride / FS,
           "segments": [classes[i] for i in logits.argmax(1).tolist()]}
    if windows:  # no AF flag: its threshold was chosen on whole-record probabilities
        return {**out, "scored_on": f"windows of {window} samples"}
    op = meta.get("af_operating_point")  # tickets exported before it have none: argmax only, as before
    if op is not None and op["threshold"] is not None:
        p_af = float(probs[classes.index(op["class"])])
        target = "PPV" if op["target"] == "ppv" else op["target"]
        out["af_flag"] = {"flagged": p_af >= op["threshold"], "threshold": op["threshold"],
                          "chosen_for": f"validation {target} >= {op['value']:g}"}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path, help="ECG files: WFDB .hea/.dat/.mat, .npy, .csv or .txt")
    p.add_argument("--ticket", type=Path, default=SHIPPED_TICKET,
                   help="ticket file from export_ticket.py (.npz); default: the shipped CinC 2017 ticket")
    p.add_argument("--fs", type=float, default=None, help="sampling rate in Hz of .npy/.csv/.txt files")
    p.add_argument("--units", default="uV", choices=["uV", "mV"], help="units of .npy/.csv/.txt samples")
    p.add_argument("--lead", default=None,
                   help="the lead of a multi-lead WFDB record or multi-column .csv: its name or index (from 0)")
    p.add_argument("--min-seconds", type=float, default=5.0, help="shortest record accepted")
    p.add_argument("--windows", action="store_true",
                   help="score each record on consecutive windows of the length the ticket was trained on "
                   "(tickets trained with --crop; how train.py's *_windows scores read a record) instead of in one "
                   "pass; no AF flag (its threshold was chosen on whole records)")
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
    if args.windows and "window" not in meta:
        print(f"error: --windows: {args.ticket} records no training window (trained on whole records, or exported "
              "before tickets stored it: export it again with export_ticket.py); leave out --windows",
              file=sys.stderr)
        return 2
    model.eval()
    results, failed = [], 0
    for path in args.files:
        try:
            x, fs = read_samples(path, args.fs, args.units, args.lead)
            out = {"file": str(path), **classify(model, meta, prepare(x, fs, str(path), args.min_seconds,
                                                                 not args.no_checks), args.windows)}
        except PredictError as e:
            failed += 1
            print(f"error: {e}", file=sys.stderr)
            results.append({"file": str(path), "error": str(e)})
            continue
        results.append(out)
        if not args.json:
            probs = ", ".join(f"{c} {v:.2f}" for c, v in out["probabilities"].items())
            print(f"{path}: {out['class']}  ({probs})  {out['seconds']:g} s"
                  + (f", scored on {out['scored_on']}" if args.windows else ""))
            print(f"  segments of {out['segment_seconds']:g} s: {' '.join(out['segments'])}")
            if "af_flag" in out:
                flag = out["af_flag"]
                print(f"  AF at the ticket's operating point (P(A) >= {flag['threshold']:.4g}, chosen for "
                      f"{flag['chosen_for']}): {'yes' if flag['flagged'] else 'no'}")
    if args.json:
        print(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    with script_errors():
        sys.exit(main())
