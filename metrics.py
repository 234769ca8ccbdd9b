"""Scores of a classifier's record-level predictions, shared by every script that reports them.

The CinC 2017 challenge score (mean F1 of N, A and O), the F1 of each class, macro F1,
accuracy and the confusion matrix (``classification_metrics``); the AF class's sensitivity
and PPV (``af_scores``); and the two-level percentile bootstrap of the mean challenge F1
over records and seeds (``bootstrap``). Plain numpy on label arrays, so the analysis
scripts (plot_results.py, stability.py, compare_variants.py) score without a network.
"""

from __future__ import annotations

import numpy as np

from model import CLASSES


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int = len(CLASSES)) -> np.ndarray:
    """Confusion matrices ``[..., true, predicted]`` of label arrays ``[..., n]``: one
    ``bincount`` for any number of leading dimensions (e.g. 1000 bootstrap resamples)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"labels {y_true.shape} and predictions {y_pred.shape} differ in shape")
    if y_true.size and (min(y_true.min(), y_pred.min()) < 0 or max(y_true.max(), y_pred.max()) >= num_classes):
        raise ValueError(f"class indices must lie in [0, {num_classes})")
    batch = int(np.prod(y_true.shape[:-1], dtype=int))
    offset = (num_classes ** 2) * np.arange(batch).reshape(*y_true.shape[:-1], 1)
    counts = np.bincount((offset + num_classes * y_true + y_pred).ravel(), minlength=batch * num_classes ** 2)
    return counts.reshape(*y_true.shape[:-1], num_classes, num_classes)


def class_f1(cm: np.ndarray) -> np.ndarray:
    """Per-class F1 ``2 TP / (true count + predicted count)`` of confusion matrices
    ``[..., C, C]``, 0 when both counts are 0."""
    tp = np.diagonal(cm, axis1=-2, axis2=-1).astype(float)
    denom = cm.sum(-1) + cm.sum(-2)
    return np.divide(2 * tp, denom, out=np.zeros(tp.shape), where=denom > 0)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray,
                           num_classes: int = len(CLASSES)) -> dict:
    """Challenge F1 (mean F1 of N, A, O as scored in CinC 2017), per-class F1, macro F1,
    accuracy and the confusion matrix (rows: true class, columns: predicted class).

    A class's F1 is ``2 TP / (true count + predicted count)``, 0 when both are 0.
    """
    cm = confusion(y_true, y_pred, num_classes)
    f1 = class_f1(cm)
    out = {"challenge_f1": float(f1[:3].mean()), "macro_f1": float(f1.mean()),
           "accuracy": float(np.trace(cm) / max(cm.sum(), 1))}
    out.update({f"f1_{c}": float(v) for c, v in zip(CLASSES, f1, strict=False)})
    out["confusion"] = cm.tolist()
    return out


def af_scores(confusion: list) -> tuple[float, float]:
    """The AF class's sensitivity and PPV from a confusion matrix (rows true, columns
    predicted): what a cardiologist asks first, AF found and AF alarms right."""
    cm = np.asarray(confusion, dtype=float)
    af = CLASSES.index("A")
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(cm[af, af] / cm[af].sum()), float(cm[af, af] / cm[:, af].sum())


def bootstrap(labels: np.ndarray, preds: list[np.ndarray], minus: list[np.ndarray] | None = None,
              replicates: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the mean challenge F1 of ``preds`` (one array per
    seed), less that of ``minus`` (the same seeds in the same order) when given.

    Two levels, so that the interval covers both sources of doubt: each replicate draws the
    test records with replacement (the same records for every seed and both sides, so a
    difference is paired record by record) and, with several seeds, the seeds with
    replacement (the same seeds on both sides, so seed s's ticket is compared with seed s's
    dense). With one seed it covers the records only; with three, the seed level can take
    only ten distinct draws, so it is coarse: the per-seed differences are reported beside it.
    """
    if minus is not None and len(minus) != len(preds):
        raise ValueError(f"a paired difference needs the same seeds on both sides, got {len(preds)} and {len(minus)}")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(labels), (replicates, len(labels)))
    which = rng.integers(0, len(preds), (replicates, len(preds)))  # seeds drawn per replicate

    def f1(group: list[np.ndarray]) -> np.ndarray:  # (seeds, replicates)
        return np.stack([class_f1(confusion(labels[picks], p[picks]))[:, :3].mean(1) for p in group])

    per_seed = f1(preds) - (f1(minus) if minus else 0.0)
    scores = per_seed[which, np.arange(replicates)[:, None]].mean(1)
    low, high = np.percentile(scores, [2.5, 97.5])
    return float(low), float(high)
