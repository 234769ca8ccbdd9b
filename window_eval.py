"""Score finished runs on consecutive windows of the training length, beside whole records.

Why: the CPU-scale recipe trains on random windows of ``--crop`` samples (2,048, 10.24 s),
but train.py scored every record whole (9-61 s), and the network's receptive field is about
19,000 samples (95 s at 200 Hz, measured by the gradient of one output step): larger than
any record, so every output step sees the record's edges through zero padding. A training
window shows a step at most 2,048 samples of signal; a whole record up to 12,200. A network
that has not learnt to ignore that difference scores badly on whole records although it
classifies the windows it was trained on well. train.py now scores both ways
(``train.predict_windows``: each record cut into consecutive windows of the crop length, the
class the argmax of the mean logits over all windows' valid steps); this script does the
same for runs finished before it did, on the machine that holds their weights, and tabulates
both scores for every run.

    python window_eval.py results/cinc2017-cpu-full            # every run of the experiment
    python window_eval.py results/cinc2017-cpu-full --only 'seed0/weight_rewind/*'

A run without windowed scores gets them where its model.pt is here: ``windows`` in each
split of its metrics.json (with ``added_by``: this script and its code version) and a
``predicted_windows`` column in its predictions.csv, exactly what train.py writes today (then
``run_experiments.py --exp EXP --collect`` carries them into results.csv, and
``plot_results.py --score windows`` draws and tests them). A run without weights here (a fresh
clone keeps none) and without scores is skipped, saying so. Each run's files are written as
soon as it is scored, so a stopped call loses at most the run it was scoring.

Writes ``EXP/windows.csv`` from the runs' files alone (no weights needed): one row per run
and split with the whole-record and the windowed challenge F1 and, for pruned rounds,
windowed ticket - dense with a 95 % bootstrap interval over the split's records, paired with
the seed's dense run.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from pathlib import Path

import pandas as pd
import torch

import export_ticket as et
import run_folders as rf
import train as tr
from batching import Batcher, Normalizer
from build_datasets import DatasetError, ECGDataset, load_dataset
from metrics import bootstrap, classification_metrics
from model import CLASSES

OUT = "windows.csv"


TABLE_COLUMNS = ["folder", "split", "records", "whole_challenge_f1", "windowed_challenge_f1", "windowed_accuracy",
                 "windowed_minus_dense", "low", "high"]


def run_folders(exp: Path) -> list[Path]:
    """Every finished run folder of ``exp``: each seed's dense run, then its rounds."""
    return sorted(p.parent for p in exp.glob(f"seed*/**/{tr.METRICS}"))


def read_metrics(run: Path) -> dict:
    try:
        return json.loads((run / tr.METRICS).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {run / tr.METRICS} is unreadable ({type(e).__name__}: {e})") from None


def backfill(run: Path, ds: ECGDataset, data: Path, splits: list[str]) -> list[str]:
    """Score ``run`` on windows of its training length for those of ``splits`` its
    metrics.json lacks, and write them where train.py would have: predictions.csv's
    ``predicted_windows`` column first, then metrics.json (the run's marker) last. Returns the
    splits scored."""
    metrics = read_metrics(run)
    todo = [s for s in splits if tr.WINDOWS not in metrics[s]]
    if not todo:
        return []
    try:
        cfg, state, _, norm, full = et.read_run(run)
    except et.TicketError as e:
        raise SystemExit(f"error: {e}") from e
    crop = int(full["flags"]["crop"])
    if crop <= 0:
        raise SystemExit(f"error: {run} trained on whole records (--crop 0): there is no training window to score")
    rf.check_same_data(data, full["data_fingerprint"], str(run))
    model = et.build_model(cfg, state)
    batcher = Batcher(ds, Normalizer(**norm), cfg.stride, torch.device("cpu"))
    batch = int(full["flags"].get("eval_batch_size", tr.TrainConfig.eval_batch_size))
    added_by = f"window_eval.py {rf.code_version()}"
    preds = {s: tr.predict_windows(model, batcher, ds.indices(s), crop, batch, bool(metrics.get("bf16")))
             for s in todo}
    path = run / tr.PREDICTIONS
    if path.is_file():
        table = pd.read_csv(path, keep_default_na=False)
        if tr.WINDOWS_COLUMN not in table:
            table[tr.WINDOWS_COLUMN] = ""
        for s, pred in preds.items():
            by_name = pd.Series([CLASSES[i] for i in pred], index=ds.names[ds.indices(s)])
            rows = table["split"] == s
            table.loc[rows, tr.WINDOWS_COLUMN] = by_name.reindex(table.loc[rows, "record"]).to_numpy()
        rf.atomic_write_text(table.to_csv(index=False, float_format="%.5f"), path)
    for s, pred in preds.items():
        scores = classification_metrics(ds.labels[ds.indices(s)], pred)
        metrics[s][tr.WINDOWS] = {"window": crop, **scores, "added_by": added_by}
    rf.atomic_write_text(json.dumps(metrics, indent=2) + "\n", run / tr.METRICS)
    return todo


def windowed_classes(run: Path, split: str) -> pd.DataFrame | None:
    """(label, windowed class) per record of ``split`` from ``run``'s predictions.csv, by
    record name; None where the run has no such column."""
    path = run / tr.PREDICTIONS
    if not path.is_file():
        return None
    table = pd.read_csv(path, keep_default_na=False)
    if tr.WINDOWS_COLUMN not in table:
        return None
    part = table[(table["split"] == split) & (table[tr.WINDOWS_COLUMN] != "")].set_index("record").sort_index()
    return pd.DataFrame({"label": part["label"].map(CLASSES.index), "pred": part[tr.WINDOWS_COLUMN].map(CLASSES.index)})


def table_rows(exp: Path, splits: list[str]) -> list[dict]:
    """windows.csv's rows: every run with windowed scores, from its files alone."""
    rows = []
    for run in run_folders(exp):
        metrics = read_metrics(run)
        seed_dense = exp / run.relative_to(exp).parts[0] / tr.DENSE
        for split in splits:
            if tr.WINDOWS not in metrics[split]:
                continue
            w = metrics[split][tr.WINDOWS]
            row = {"folder": str(run.relative_to(exp)), "split": split, "records": metrics[split]["records"],
                   "whole_challenge_f1": metrics[split]["challenge_f1"],
                   "windowed_challenge_f1": w["challenge_f1"], "windowed_accuracy": w["accuracy"]}
            mine, ref = windowed_classes(run, split), windowed_classes(seed_dense, split)
            if run != seed_dense and mine is not None and ref is not None:
                if not mine.index.equals(ref.index):
                    raise SystemExit(f"error: {run} and {seed_dense} were scored on other {split} records: "
                                     "the runs of one seed must share the data split")
                labels = mine["label"].to_numpy()
                low, high = bootstrap(labels, [mine["pred"].to_numpy()], [ref["pred"].to_numpy()])
                dense_f1 = classification_metrics(labels, ref["pred"].to_numpy())["challenge_f1"]
                row.update(windowed_minus_dense=w["challenge_f1"] - dense_f1, low=low, high=high)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("exp", type=Path, help="experiment folder of run_experiments.py")
    p.add_argument("--splits", default="val,test", help="comma-separated, from val and test")
    p.add_argument("--data", type=Path, default=None, help="data set folder (default: the one the runs name)")
    p.add_argument("--only", default="*", help="score only run folders matching this pattern (fnmatch, relative "
                   "to EXP, e.g. 'seed0/weight_rewind/*'); default every run. windows.csv lists every run scored")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    splits = args.splits.split(",")
    if not args.exp.is_dir():
        p.error(f"{args.exp} is not a folder")
    if bad := [s for s in splits if s not in ("val", "test")]:
        p.error(f"--splits: {bad[0]!r} is not val or test")
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    runs = [r for r in run_folders(args.exp) if fnmatch.fnmatch(str(r.relative_to(args.exp)), args.only)]
    if not runs:
        p.error(f"{args.exp} holds no finished run matching {args.only!r} (no {tr.METRICS} under seed*/)")
    todo = [r for r in runs if any(tr.WINDOWS not in read_metrics(r)[s] for s in splits)]
    scored = 0
    if todo:
        data = args.data or Path(tr.dense_args(args.exp / todo[0].relative_to(args.exp).parts[0]).data)
        try:
            ds = load_dataset(data)
        except DatasetError as e:
            raise SystemExit(f"error: {e}") from e
        for run in todo:
            if not (run / tr.FINAL).is_file():
                print(f"{run}: no {tr.FINAL} here (weights stay on the machine that trained them): skipped")
                continue
            for split in backfill(run, ds, data, splits):
                scored += 1
                m = read_metrics(run)[split]
                print(f"{run.relative_to(args.exp)} {split}: whole records {m['challenge_f1']:.3f}, windows of the "
                      f"training length {m[tr.WINDOWS]['challenge_f1']:.3f}", flush=True)
    rows = table_rows(args.exp, splits)
    out = args.exp / OUT
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    rf.atomic_write_text(table.to_csv(index=False, float_format="%.6g"), out)
    print(f"{scored} split(s) scored here; {len(rows)} row(s) -> {out}")


if __name__ == "__main__":
    sys.exit(main())
