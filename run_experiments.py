"""Run a lottery-ticket comparison: retraining methods x seeds x controls, then one table.

Every cell is ``train.py --retrain METHOD [--control CONTROL] --seed S --out EXP/seedS`` with
the same forwarded flags (any flag this script does not know goes to train.py: --data,
--width, --epochs, --prune-fraction, ...). The data set is loaded once. Finished rounds are
read back, never redone, and an interrupted round resumes, so re-running the same command
after Ctrl-C, ``kill -9`` or a power cut continues where it stopped; flags that differ from
those an existing run folder was made with are refused.

The table ``EXP/results.csv`` has one row per seed x method x control x round: remaining
weights, compression ratio, sparsity, validation and test challenge F1, macro F1, accuracy,
per-class F1, steps and training time. ``EXP/experiment.json`` keeps the commands run.

Example (the demo of run.sh):
    python run_experiments.py --exp results/demo --seeds 0,1 --data data/synthetic --width 0.125
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd
from tqdm import tqdm

import prune as pm
import train
from build_datasets import DatasetError, code_version, load_dataset


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", required=True, help="experiment folder (one sub-folder per seed)")
    p.add_argument("--methods", default=",".join(train.METHODS + train.BASELINES),
                   help="comma-separated retraining methods, run in this order, and baselines (dense_equal_steps: "
                   "the dense network retrained round after round as lr_rewind retrains its tickets)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    p.add_argument("--controls", default=",".join(train.CONTROLS),
                   help="comma-separated controls ('' for none)")
    p.add_argument("--control-methods", default="weight_rewind",
                   help="methods whose tickets get the controls (comma-separated, or 'all')")
    args, forwarded = p.parse_known_args(argv)
    split = lambda text: [v.strip() for v in text.split(",") if v.strip()]  # noqa: E731
    args.methods, args.controls = split(args.methods), split(args.controls)
    pruned = [m for m in args.methods if m not in train.BASELINES]
    args.control_methods = pruned if args.control_methods == "all" else split(args.control_methods)
    if not args.controls:  # no controls: which methods would get them does not matter
        args.control_methods = []
    for name, values, allowed in [("methods", args.methods, train.METHODS + train.BASELINES),
                                  ("controls", args.controls, train.CONTROLS),
                                  ("control-methods", args.control_methods, pruned)]:
        bad = [v for v in values if v not in allowed]
        if bad:
            p.error(f"--{name}: unknown {', '.join(bad)} (choose from {', '.join(allowed)})")
    if not args.methods:
        p.error("--methods is empty")
    try:
        args.seeds = [int(s) for s in split(args.seeds)]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    for flag in ("--retrain", "--control", "--seed", "--out"):
        if any(f == flag or f.startswith(flag + "=") for f in forwarded):
            p.error(f"{flag} is set per cell by run_experiments.py; do not pass it")
    return args, forwarded


def cells(args: argparse.Namespace) -> list[tuple[int, str, str | None]]:
    """(seed, method, control) in the order they run: per seed, each method in the order
    given, followed at once by its controls. A control needs the method's masks and weights,
    which are checkpoints (not kept in git), so a method and its controls finish in the same
    sitting and a grid cut short leaves only whole, committed cells behind."""
    out = []
    for seed in args.seeds:
        for m in args.methods:
            out.append((seed, m, None))
            out += [(seed, m, c) for c in args.controls if m in args.control_methods]
    return out


def expected_trainings(args: argparse.Namespace, flags: argparse.Namespace) -> int:
    """Trainings the whole grid runs (a dense run per seed, each method's rounds, the
    controls' rounds): the progress bar's total, exact for a fixed fraction per round; under
    --goal each redone round adds one."""
    rounds = min(flags.rounds, pm.rounds_to_reach(flags.target_ratio, flags.prune_fraction))
    controls = sum(1 for r in range(1, rounds + 1) if r % flags.control_every == 0 or r == rounds)
    per_seed = 1 + len(args.methods) * rounds + len(args.control_methods) * len(args.controls) * controls
    return len(args.seeds) * per_seed


def collect(exp: Path) -> pd.DataFrame:
    """All rounds.csv tables under ``exp`` in one (method rows and control rows)."""
    tables = [pd.read_csv(p) for p in sorted(exp.glob("seed*/*/rounds.csv"))]
    if not tables:
        raise SystemExit(f"error: no rounds.csv under {exp}; nothing has finished yet")
    return pd.concat(tables, ignore_index=True).sort_values(["method", "control", "seed", "round", "attempt"])


def main(argv: list[str] | None = None) -> None:
    args, forwarded = parse_args(argv)
    exp = Path(args.exp)
    exp.mkdir(parents=True, exist_ok=True)
    log = exp / "experiment.json"
    history = json.loads(log.read_text())["commands"] if log.is_file() else []
    history.append({"argv": sys.argv[1:] if argv is None else argv, "code_version": code_version(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "finished_cells": 0})
    train.atomic_write_text(json.dumps({"commands": history}, indent=2) + "\n", log)
    first = train.parse_args(forwarded)
    try:
        ds = load_dataset(first.data)
    except DatasetError as e:
        sys.exit(f"error: {e}")
    grid = cells(args)
    t0 = time.perf_counter()
    done = sum(len(list((exp / f"seed{s}").rglob(train.METRICS))) for s in args.seeds)
    bar = tqdm(total=max(expected_trainings(args, first), done), initial=done, unit="training", desc="grid",
               disable=None, smoothing=0.1)
    train.ON_TRAINED = lambda run_dir: bar.update()
    for i, (seed, method, control) in enumerate(grid, 1):
        label = f"seed {seed} {method}" + (f" + {control}" if control else "")
        bar.set_postfix_str(f"cell {i}/{len(grid)}: {label}")
        tqdm.write(f"[{i}/{len(grid)}] {label}")
        cell = forwarded + ["--seed", str(seed), "--retrain", method, "--out", str(exp / f"seed{seed}")]
        train.run(train.parse_args(cell + (["--control", control] if control else [])), ds)
        # after every cell, so an interrupted grid can be plotted (marked partial) and nothing finished is lost
        table = collect(exp)
        train.atomic_write_text(table.to_csv(index=False, float_format="%.6g"), exp / "results.csv")
        history[-1].update(cells=len(grid), finished_cells=i)
        train.atomic_write_text(json.dumps({"commands": history}, indent=2) + "\n", log)
    train.ON_TRAINED = None
    bar.close()
    print(f"{len(grid)} cells in {time.perf_counter() - t0:.0f} s; {len(table)} rows -> {exp / 'results.csv'}")


if __name__ == "__main__":
    main()
