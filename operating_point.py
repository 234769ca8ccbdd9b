"""An AF operating point (issue 33 item 6): AF sensitivity at a fixed PPV, PPV at a fixed
sensitivity, the threshold on P(AF) chosen on the validation split, its figures on test.

A wearable that flags atrial fibrillation is judged by how many AF records it finds
(sensitivity) at a bearable share of false alarms (PPV), not by the challenge F1 of its
argmax. Each run's predictions.csv holds the per-record class probabilities (the softmax of
the mean logits, train.PROBABILITY_COLUMNS) for runs made from 2026-12-05 on; a record is
flagged when P(AF) >= the threshold. Runs made before have no probabilities: every function
here says so (None) instead of failing.

``shipped_threshold(run)`` gives the threshold and its validation and test figures for one
run folder, for export_ticket.py to store in a shipped ticket's report.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from train import PREDICTIONS, PROBABILITY_COLUMNS

AF = "A"
SCORE = f"p_{AF}"
assert SCORE in PROBABILITY_COLUMNS


def read_scores(run: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(records, is AF, P(AF)) of ``split`` in ``run``'s predictions.csv, records sorted by
    name; None when the file is missing or has no probabilities (a run made before them)."""
    path = run / PREDICTIONS
    if not path.is_file():
        return None
    table = pd.read_csv(path, keep_default_na=False)
    if SCORE not in table:
        return None
    rows = table[table["split"] == split].sort_values("record")
    scores = pd.to_numeric(rows[SCORE], errors="coerce").to_numpy(dtype=float)
    if np.isnan(scores).any() or ((scores < 0) | (scores > 1)).any():
        raise SystemExit(f"error: {path}: column {SCORE} must hold probabilities in [0, 1]; "
                         "the file is damaged: retrain the run or restore the file from git")
    return rows["record"].to_numpy(), (rows["label"] == AF).to_numpy(), scores


def sensitivity_ppv(is_af: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float, float]:
    """AF sensitivity and PPV when records with P(AF) >= ``threshold`` are flagged (PPV nan
    when nothing is flagged, sensitivity nan when there is no AF record)."""
    flagged = scores >= threshold
    hits = float((flagged & is_af).sum())
    sens = hits / is_af.sum() if is_af.sum() else float("nan")
    ppv = hits / flagged.sum() if flagged.sum() else float("nan")
    return sens, ppv


def threshold_at_ppv(is_af: np.ndarray, scores: np.ndarray, ppv: float) -> float | None:
    """The lowest threshold (most AF found) whose PPV is at least ``ppv``; None when no
    threshold reaches it."""
    best = None
    for t in np.unique(scores)[::-1]:  # from the highest score down: more flagged each step
        if sensitivity_ppv(is_af, scores, t)[1] >= ppv:
            best = float(t)
    return best


def threshold_at_sensitivity(is_af: np.ndarray, scores: np.ndarray, sensitivity: float) -> float | None:
    """The highest threshold (fewest false alarms) whose sensitivity is at least
    ``sensitivity``; None when there is no AF record."""
    if not is_af.any():
        return None
    for t in np.unique(scores)[::-1]:
        if sensitivity_ppv(is_af, scores, t)[0] >= sensitivity:
            return float(t)
    return None


def choose(is_af: np.ndarray, scores: np.ndarray, target: str, value: float) -> float | None:
    """The threshold for ``target`` ('ppv' or 'sensitivity') = ``value`` on these records."""
    if target == "ppv":
        return threshold_at_ppv(is_af, scores, value)
    if target == "sensitivity":
        return threshold_at_sensitivity(is_af, scores, value)
    raise ValueError(f"target must be 'ppv' or 'sensitivity', got {target!r}")


def operating_point(runs: list[Path], target: str, value: float, replicates: int = 1000,
                    seed: int = 0) -> dict | None:
    """Over the runs (one per seed, evaluated on the same records): each run's threshold
    chosen on its validation records, then test sensitivity and PPV at it, mean over runs,
    with 95 % two-level bootstrap intervals (test records and runs resampled, as
    metrics.bootstrap). None when a run has no probabilities; ``reached`` counts the
    runs whose validation records reach the target at all (the others are left out)."""
    found = [(read_scores(r, "val"), read_scores(r, "test")) for r in runs]
    if not found or any(v is None or t is None for v, t in found):
        return None
    thresholds = [choose(v[1], v[2], target, value) for v, _ in found]
    kept = [(th, t) for th, (_, t) in zip(thresholds, found, strict=True) if th is not None]
    out = {"target": target, "value": value, "runs": len(runs), "reached": len(kept),
           "thresholds": thresholds}
    if not kept:
        return out
    records = kept[0][1][0]
    if any(not np.array_equal(records, t[0]) for _, t in kept):
        raise SystemExit("error: the runs were tested on different records: they must share the data split")
    is_af = kept[0][1][1]
    flagged = np.stack([t[2] >= th for th, t in kept])  # (runs, records)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(is_af), (replicates, len(is_af)))
    which = rng.integers(0, len(kept), (replicates, len(kept)))
    af = is_af[picks]  # (replicates, records)
    hits = (flagged[:, picks] & af).sum(2)  # (runs, replicates)
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = hits / af.sum(1)
        ppv = hits / flagged[:, picks].sum(2)
    for name, per_run in (("sensitivity", sens), ("ppv", ppv)):
        point = [sensitivity_ppv(is_af, t[2], th)[0 if name == "sensitivity" else 1] for th, t in kept]
        with warnings.catch_warnings():  # a replicate with no AF record (or none flagged) has no figure
            warnings.simplefilter("ignore", RuntimeWarning)
            draws = np.nanmean(per_run[which, np.arange(replicates)[:, None]], axis=1)
        low, high = np.nanpercentile(draws, [2.5, 97.5])
        out[name] = {"mean": float(np.nanmean(point)), "low": float(low), "high": float(high)}
    return out


def text(d: dict | None) -> str:
    """'sens. 0.81 (0.72-0.89) / PPV 0.90 (0.83-0.96)', with the runs that reached the target."""
    if d is None:
        return "no probabilities"
    if not d["reached"]:
        return f"target not reached on validation ({d['runs']} runs)"
    cell = " / ".join(f"{'sens.' if k == 'sensitivity' else 'PPV'} {d[k]['mean']:.2f} "
                      f"({d[k]['low']:.2f}-{d[k]['high']:.2f})" for k in ("sensitivity", "ppv"))
    return cell + (f", {d['reached']} of {d['runs']} runs" if d["reached"] < d["runs"] else "")


def shipped_threshold(run: Path, target: str = "ppv", value: float = 0.9) -> dict | None:
    """The AF threshold of one run (a shipped ticket) for ``target`` = ``value``, chosen on
    its validation records, with the validation and test sensitivity and PPV at it (test with
    its 95 % bootstrap interval over records): what export_ticket.py stores in the ticket's
    report and predict.py applies. None when the run has no probabilities; threshold None
    when validation never reaches the target."""
    val, test = read_scores(run, "val"), read_scores(run, "test")
    if val is None or test is None:
        return None
    threshold = choose(val[1], val[2], target, value)
    out: dict = {"class": AF, "score": SCORE, "target": target, "value": value, "threshold": threshold,
                 "chosen_on": "val"}
    if threshold is None:
        return out
    out["val_sensitivity"], out["val_ppv"] = sensitivity_ppv(val[1], val[2], threshold)
    point = operating_point([run], target, value)
    out["test_sensitivity"], out["test_ppv"] = point["sensitivity"], point["ppv"]
    return out
