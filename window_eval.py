"""Score finished runs on consecutive windows of the training length, beside whole records.

Why: the CPU-scale recipe trains on random windows of ``--crop`` samples (2,048, 10.24 s),
but train.py scores every record whole (9-61 s), and the network's receptive field is about
19,000 samples (95 s at 200 Hz, measured by the gradient of one output step): larger than
any record, so every output step sees the record's edges through zero padding. A training
window shows a step at most 2,048 samples of signal; a whole record up to 12,200. A network
that has not learnt to ignore that difference scores badly on whole records although it
classifies the windows it was trained on well. This script tells the two apart: each record
is cut into consecutive windows of the run's crop length (a last piece shorter than one
output step is dropped, a shorter last window is zero-padded as in training), every
window's valid steps are scored, and the record's class is the argmax of their mean logits
(train.py's ``mean`` aggregate, over windows instead of one pass). Numerics are the run's:
bf16 autocast where it trained in bf16, as train.py scored it.

    python window_eval.py results/cinc2017-cpu-full            # every run with its weights here
    python window_eval.py results/cinc2017-cpu-full --splits val

Writes ``EXP/windows.csv``: one row per run folder and split with the whole-record challenge
F1 recorded in its metrics.json, the windowed one, and (pruned rounds) windowed ticket -
dense with a 95 % bootstrap interval over the split's records, paired with the seed's dense
run. Rows of runs scored before are kept (a run's weights need only be on the machine once);
runs without weights here (a fresh clone keeps none) are skipped, saying so. The file is
rewritten after every row, so a stopped call loses at most the run it was scoring.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import export_ticket as et
import run_folders as rf
import train as tr
from build_datasets import DatasetError, ECGDataset, load_dataset
from metrics import bootstrap, classification_metrics

OUT = "windows.csv"
KEY = ["folder", "split"]


def window_logits(model: torch.nn.Module, x: np.ndarray, window: int, stride: int, bf16: bool) -> torch.Tensor:
    """Mean logits over the valid output steps of ``x`` (one z-scored record) read as
    consecutive windows of ``window`` samples, all windows in one batch."""
    pieces = [x[s:s + window] for s in range(0, len(x), window)]
    pieces = [p for i, p in enumerate(pieces) if i == 0 or len(p) >= stride]
    steps = [max(1, len(p) // stride) for p in pieces]
    batch = torch.from_numpy(np.stack([np.pad(p, (0, window - len(p))) for p in pieces]))[:, None, :]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(batch).float()
    return torch.cat([logits[i, :n] for i, n in enumerate(steps)]).mean(0)


def windowed_predictions(run: Path, ds: ECGDataset, splits: list[str]) -> tuple[dict[str, np.ndarray], dict]:
    """({split: predicted class per record}, the run's metrics.json) for one run folder, its
    network loaded once for all ``splits``."""
    try:
        cfg, state, _, norm, metrics = et.read_run(run)
    except et.TicketError as e:
        raise SystemExit(f"error: {e}") from e
    model = et.build_model(cfg, state)
    window = int(metrics["flags"]["crop"])
    if window <= 0:
        raise SystemExit(f"error: {run} trained on whole records (--crop 0): there is no training window to score")
    bf16 = bool(metrics.get("bf16", False))
    preds = {}
    for split in splits:
        records = [(ds.signals[i, :ds.lengths[i]].astype(np.float32) - norm["mean"]) / norm["std"]
                   for i in ds.indices(split)]
        preds[split] = np.array([int(window_logits(model, x, window, cfg.stride, bf16).argmax()) for x in records])
    return preds, metrics


def run_folders(exp: Path) -> list[Path]:
    """Every finished run folder of ``exp``: each seed's dense run, then its rounds."""
    return sorted(p.parent for p in exp.glob(f"seed*/**/{tr.METRICS}"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("exp", type=Path, help="experiment folder of run_experiments.py")
    p.add_argument("--splits", default="val,test", help="comma-separated, from val and test")
    p.add_argument("--data", type=Path, default=None, help="data set folder (default: the one the runs name)")
    p.add_argument("--only", default="*", help="score only run folders matching this pattern (fnmatch, relative "
                   "to EXP, e.g. 'seed0/weight_rewind/*'); default every run")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    splits = args.splits.split(",")
    if not args.exp.is_dir():
        p.error(f"{args.exp} is not a folder")
    if bad := [s for s in splits if s not in ("val", "test")]:
        p.error(f"--splits: {bad[0]!r} is not val or test")
    torch.set_num_threads(args.threads)
    out = args.exp / OUT
    old = pd.read_csv(out) if out.is_file() else pd.DataFrame(columns=KEY)
    done = set(zip(old["folder"], old["split"], strict=True))
    runs = [r for r in run_folders(args.exp) if fnmatch.fnmatch(str(r.relative_to(args.exp)), args.only)]
    if not runs:
        p.error(f"{args.exp} holds no finished run matching {args.only!r} (no {tr.METRICS} under seed*/)")
    data = args.data or Path(tr.dense_args(args.exp / runs[0].relative_to(args.exp).parts[0]).data)
    try:
        ds = load_dataset(data)
    except DatasetError as e:
        raise SystemExit(f"error: {e}") from e
    rows, dense = [], {}
    for run in runs:
        folder = str(run.relative_to(args.exp))
        todo = [s for s in splits if (folder, s) not in done]
        if not todo:
            continue
        if not (run / tr.FINAL).is_file():
            print(f"{run}: no {tr.FINAL} here (weights stay on the machine that trained them): skipped")
            continue
        seed_dense = args.exp / run.relative_to(args.exp).parts[0] / tr.DENSE
        preds, metrics = windowed_predictions(run, ds, todo)
        if run == seed_dense:
            dense.update({(run, s): pred for s, pred in preds.items()})
        elif (seed_dense / tr.FINAL).is_file() and (missing := [s for s in todo if (seed_dense, s) not in dense]):
            # scored before this call: scored again for the pairing, not recorded twice
            again = windowed_predictions(seed_dense, ds, missing)[0]
            dense.update({(seed_dense, s): pred for s, pred in again.items()})
        for split in todo:
            labels, pred = ds.labels[ds.indices(split)], preds[split]
            scores = classification_metrics(labels, pred)
            row = {"folder": folder, "split": split, "records": len(labels),
                   "whole_challenge_f1": metrics[split]["challenge_f1"],
                   "windowed_challenge_f1": scores["challenge_f1"], "windowed_accuracy": scores["accuracy"]}
            if run != seed_dense and (seed_dense, split) in dense:
                ref = dense[(seed_dense, split)]
                low, high = bootstrap(labels, [pred], [ref])
                row.update(windowed_minus_dense=scores["challenge_f1"] - classification_metrics(labels, ref)[
                    "challenge_f1"], low=low, high=high)
            rows.append(row)
            table = pd.concat([old, pd.DataFrame(rows)], ignore_index=True)
            rf.atomic_write_text(table.to_csv(index=False, float_format="%.6g"), out)  # kept if stopped later
            print(f"{folder} {split}: whole records {row['whole_challenge_f1']:.3f}, windows of the training "
                  f"length {row['windowed_challenge_f1']:.3f}", flush=True)
    print(f"{len(rows)} row(s) added -> {out}")


if __name__ == "__main__":
    sys.exit(main())
