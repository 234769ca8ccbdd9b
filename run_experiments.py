"""Run a lottery-ticket comparison: retraining methods x seeds x controls, then one table.

Every cell is ``train.py --retrain METHOD [--control CONTROL] --seed S --out EXP/seedS`` with
the same forwarded flags (any flag this script does not know goes to train.py: --data,
--width, --epochs, --prune-fraction, ...). The data set is loaded once. Finished rounds are
read back, never redone, and an interrupted round resumes, so re-running the same command
after Ctrl-C, ``kill -9`` or a power cut continues where it stopped; flags that differ from
those an existing run folder was made with are refused.

The table ``EXP/results.csv`` has one row per seed x method x control x round: remaining
weights, compression ratio, sparsity, validation and test challenge F1, macro F1, accuracy,
per-class F1, steps and training time, and the ticket's size in bytes (ticket_bytes.py: the dense
checkpoint with and without Adam's state, the compact export). ``EXP/experiment.json`` keeps the commands run.

Example (the demo of run.sh):
    python run_experiments.py --exp results/demo --seeds 0,1 --data data/synthetic --width 0.125

The grid's cells (a seed's dense run, each method's rounds, each control) can also run
apart: ``--list`` prints one train.py command per cell with the cells it needs first;
``--cell 3,4`` or ``--shard 0/4`` runs some of them, so that several workers (xargs -P,
GNU parallel, SLURM arrays) share a grid; ``--executor slurm`` submits the whole grid as
SLURM array jobs with dependencies (dense runs, then methods, then controls). Every run
folder is trained under its own lock, so concurrent workers never train the same cell,
and one killed mid-cell leaves it resumable by the next.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from tqdm import tqdm

import prune as pm
import ticket_bytes
import train
from build_datasets import DatasetError, load_dataset
from run_folders import (
    LOCK,
    REUSED_FROM,
    STATE,
    Busy,
    atomic_write_text,
    code_version,
    locked,
    locked_by_other,
    reused_from,
    script_errors,
    update_json,
)

BUSY_PAUSE = (0.5, 8.0)
"""Seconds a worker whose every remaining cell is busy sleeps before it looks again: the
first, doubling per idle pass up to the second (a cell freed late waits at most that long)."""
DENSE = train.DENSE
"""The cell that trains a seed's dense network (every method of the seed starts from it)."""


def _link_or_copy(a: str, b: str) -> None:
    try:
        os.link(a, b)
    except OSError:  # another file system
        shutil.copy2(a, b)


def reuse_dense(exp: Path, source: Path, seeds: list[int]) -> None:
    """Link each seed's finished dense run from the experiment ``source`` into ``exp`` (files
    hard-linked where the file system allows, else copied; every later write replaces a file
    atomically, so the source is never changed). The link is recorded in the folder's
    reused_from.json (naming the folder that trained it, if the source was itself linked) and
    the carried state.npz is not copied: each dense network's weights are committed once.
    A seed whose dense run finished here keeps it; an unfinished one of its own is refused.
    Whether the flags and data match is checked by train.py when it reads the folder back
    (``run_folders.prepare_run``), before any method trains from it."""
    for seed in seeds:
        dst = exp / f"seed{seed}" / DENSE
        if (dst / train.METRICS).is_file():
            continue  # finished here already (linked before, or trained)
        if dst.is_dir() and any(f.name != LOCK for f in dst.iterdir()):
            sys.exit(f"error: --dense-from {source}: {dst} holds an unfinished dense run of its own; finish it "
                     f"without --dense-from, or delete {dst} to link {source}'s")
        src = source / f"seed{seed}" / DENSE
        origin = reused_from(src) or src  # a source linked in turn: record the folder that trained it
        missing = [f for f in (train.METRICS, train.INIT, train.FINAL) if not (src / f).is_file()]
        if missing:  # checkpoints are not kept in git: a clone has the metrics but no weights
            sys.exit(f"error: --dense-from {source}: {src} holds no finished dense run with its weights "
                     f"(missing {', '.join(missing)}; checkpoints stay on the machine that trained them)")
        if dst.is_dir():  # empty, or holding only a lock file
            (dst / LOCK).unlink(missing_ok=True)
            try:
                dst.rmdir()
            except OSError:
                pass  # another worker linked it meanwhile
        tmp = dst.with_name(f".{DENSE}-{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, copy_function=_link_or_copy, ignore=shutil.ignore_patterns(LOCK, STATE, REUSED_FROM))
        atomic_write_text(json.dumps({"source": os.path.relpath(origin, dst)}) + "\n", tmp / REUSED_FROM)
        try:
            tmp.rename(dst)  # atomic: a concurrent worker either sees the whole folder or none
        except OSError:  # another worker linked it first
            shutil.rmtree(tmp)
            if not (dst / train.METRICS).is_file():
                sys.exit(f"error: --dense-from {source}: could not link {src} to {dst}")
            continue
        print(f"seed {seed}: dense network reused from {src}", flush=True)


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
    p.add_argument("--dense-from", default="",
                   help="another experiment whose finished dense runs this one reuses (hard-linked, not retrained): "
                        "for a variant of a grid (another pruning scope, one-shot); its data and dense flags must "
                        "match, which is checked")
    w = p.add_argument_group("workers (run parts of the grid, or submit it to SLURM)")
    w.add_argument("--list", action="store_true",
                   help="print the grid, one line per cell: index, the cells it needs first, its train.py command")
    w.add_argument("--cell", default="", help="run only these cells (comma-separated indices of --list), in the "
                   "order given: several workers given one order split it between them, first cells first")
    w.add_argument("--shard", default="", help="run only shard i of n ('i/n': every n-th cell from cell i)")
    w.add_argument("--collect", action="store_true", help="only rebuild EXP/results.csv from the finished cells")
    w.add_argument("--executor", default="local", choices=["local", "slurm"],
                   help="slurm: submit the grid as SLURM array jobs (dense, then methods, then controls)")
    w.add_argument("--sbatch", default="", help="slurm: options for every sbatch call, e.g. "
                   "'--partition=gpu --gres=gpu:1 --time=04:00:00 --mem=32G'")
    w.add_argument("--slurm-wait", action="store_true",
                   help="slurm: wait until the jobs end, then check that every cell finished")
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
    try:
        args.cell = [int(c) for c in split(args.cell)]
        args.shard = tuple(int(v) for v in args.shard.split("/")) if args.shard else None
    except ValueError:
        p.error(f"--cell takes comma-separated indices and --shard 'i/n', got {args.cell!r} and {args.shard!r}")
    if args.shard is not None and not (len(args.shard) == 2 and 0 <= args.shard[0] < args.shard[1]):
        p.error(f"--shard must be 'i/n' with 0 <= i < n, got {'/'.join(map(str, args.shard))}")
    return args, forwarded


def cells(args: argparse.Namespace) -> list[tuple[int, str, str | None]]:
    """(seed, method, control) in the order they run: per seed, its dense run, then each
    method in the order given, followed at once by its controls. A control needs the
    method's masks and weights, which are checkpoints (not kept in git), so a method and its
    controls finish in the same sitting and a grid cut short leaves only whole, committed
    cells behind."""
    out = []
    for seed in args.seeds:
        out.append((seed, DENSE, None))
        for m in args.methods:
            out.append((seed, m, None))
            out += [(seed, m, c) for c in args.controls if m in args.control_methods]
    return out


def needs(grid: list[tuple[int, str, str | None]], i: int) -> list[int]:
    """The cells that cell ``i`` needs finished first: a seed's dense run before its methods,
    a method's rounds before its controls. (A cell started early is still right: it trains
    what it needs itself, under that folder's lock, or waits for the worker that does.)"""
    seed, method, control = grid[i]
    if method == DENSE:
        return []
    return [grid.index((seed, DENSE, None) if control is None else (seed, method, None))]


def cell_argv(forwarded: list[str], exp: Path, seed: int, method: str, control: str | None) -> list[str]:
    """train.py's arguments for one cell."""
    argv = [*forwarded, "--seed", str(seed), "--out", str(exp / f"seed{seed}")]
    if method != DENSE:
        argv += ["--retrain", method]
    if control:
        argv += ["--control", control]
    return argv


def label(cell: tuple[int, str, str | None]) -> str:
    seed, method, control = cell
    return f"seed {seed} {method}" + (f" + {control}" if control else "")


def expected_trainings(args: argparse.Namespace, flags: argparse.Namespace) -> int:
    """Trainings the whole grid runs (a dense run per seed, each method's rounds, the
    controls' rounds): the progress bar's total, exact for a fixed fraction per round; under
    --goal each redone round adds one."""
    rounds = min(flags.rounds, pm.rounds_to_reach(flags.target_ratio, flags.prune_fraction))
    controls = sum(1 for r in range(1, rounds + 1) if r % flags.control_every == 0 or r == rounds)
    per_seed = 1 + len(args.methods) * rounds + len(args.control_methods) * len(args.controls) * controls
    return len(args.seeds) * per_seed


def collect(exp: Path) -> pd.DataFrame:
    """All rounds.csv tables under ``exp`` in one (method rows and control rows), with each
    row's size in bytes (ticket_bytes.BYTE_COLUMNS: dense checkpoints, compact export)."""
    tables = [pd.read_csv(p) for p in sorted(exp.glob("seed*/*/rounds.csv"))]
    if not tables:
        raise SystemExit(f"error: no rounds.csv under {exp}; nothing has finished yet")
    table = pd.concat(tables, ignore_index=True).sort_values(["method", "control", "seed", "round", "attempt"])
    table = window_columns(exp, table)
    return ticket_bytes.add_byte_columns(exp, table)  # the ticket in bytes beside its ratio of weights


def window_columns(exp: Path, table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with each row's scores on windows of the training length (train.score_columns,
    names ending in train.WINDOWS_SUFFIX) read from its run's metrics.json, the one record of
    them: a run finished before train.py scored windows has them once window_eval.py has
    added them there; NaN until then, and for a run trained on whole records."""
    rows = []
    for folder in table["folder"]:
        path = exp / folder / train.METRICS
        try:
            metrics = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: {path} is unreadable ({type(e).__name__}: {e})") from None
        rows.append({k: v for split in ("val", "test")
                     for k, v in train.score_columns(metrics.get(split, {}).get(train.WINDOWS), split,
                                                     train.WINDOWS_SUFFIX).items()})
    ours = pd.DataFrame(rows, index=table.index)
    return table.drop(columns=[c for c in ours if c in table]).join(ours)


def write_results(exp: Path) -> pd.DataFrame | None:
    """Rebuild EXP/results.csv from every finished table, under the experiment's lock (so
    concurrent workers never interleave their writes); None while nothing has finished."""
    with locked(exp):
        if not list(exp.glob("seed*/*/rounds.csv")):
            return None
        table = collect(exp)
        atomic_write_text(table.to_csv(index=False, float_format="%.6g"), exp / "results.csv")
    return table


def grid_argv(args: argparse.Namespace, forwarded: list[str]) -> list[str]:
    """run_experiments.py's arguments for this grid, without the worker flags."""
    return ["--exp", str(args.exp), "--seeds", ",".join(map(str, args.seeds)), "--methods", ",".join(args.methods),
            "--controls", ",".join(args.controls), "--control-methods", ",".join(args.control_methods),
            *forwarded]


def cell_finished(forwarded: list[str], exp: Path, cell: tuple[int, str, str | None]) -> bool:
    targs = train.parse_args(cell_argv(forwarded, exp, *cell))
    if cell[1] == DENSE:
        return (targs.out / DENSE / train.METRICS).is_file()
    return train.finished_table(targs, targs.out / cell[1]) is not None


def grid_progress(exp: Path) -> tuple[int, int] | None:
    """(finished, total) cells of the grid that the latest command recorded in
    ``exp/experiment.json`` belongs to: its whole grid, whichever part of it (``--cell``,
    ``--shard``, one of several workers) that command ran, each cell counted as finished on
    disk, so every worker's and every earlier sitting's cells count. None when no command is
    recorded (an experiment not made by this script), or when this code no longer reads that
    command's flags (made by an older version: its progress is unknown, not an error)."""
    log = exp / "experiment.json"
    if not log.is_file():
        return None
    commands = json.loads(log.read_text()).get("commands", [])
    if not commands:
        return None
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # argparse's usage message is not ours to show
            args, forwarded = parse_args(commands[-1]["argv"])
            grid = cells(args)
            return sum(cell_finished(forwarded, exp, c) for c in grid), len(grid)
    except SystemExit:
        return None


def submit_slurm(args: argparse.Namespace, forwarded: list[str], grid: list[tuple[int, str, str | None]]) -> None:
    """The grid as three SLURM array jobs: the dense runs, then (afterok) the method cells,
    then (afterok) the control cells; each task is ``run_experiments.py ... --cell INDEX``.
    With --slurm-wait: wait for them, then check that every cell finished."""
    exp = Path(args.exp).resolve()
    logs = exp / "slurm"
    logs.mkdir(parents=True, exist_ok=True)
    base = shlex.join([sys.executable, str(Path(__file__).resolve()), *grid_argv(args, forwarded), "--quiet"])
    groups = [("dense", [i for i, c in enumerate(grid) if c[1] == DENSE]),
              ("methods", [i for i, c in enumerate(grid) if c[1] != DENSE and c[2] is None]),
              ("controls", [i for i, c in enumerate(grid) if c[2] is not None])]
    jobs: list[str] = []
    for name, idx in groups:
        if not idx:
            continue
        cmd = ["sbatch", "--parsable", f"--array={','.join(map(str, idx))}", f"--job-name=lth-{name}",
               f"--output={logs}/%x-%A_%a.out", f"--chdir={Path(__file__).resolve().parent}",
               *shlex.split(args.sbatch)]
        if jobs:
            cmd.append(f"--dependency=afterok:{jobs[-1]}")
        cmd += ["--wrap", f"{base} --cell $SLURM_ARRAY_TASK_ID"]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        except FileNotFoundError:
            raise SystemExit("error: --executor slurm: sbatch is not on PATH (is this a SLURM login node?)") from None
        except subprocess.CalledProcessError as e:
            raise SystemExit(f"error: sbatch refused the {name} job: {e.stderr.strip()}") from None
        jobs.append(out.strip().split(";")[0])
        print(f"submitted {name}: job {jobs[-1]}, array {','.join(map(str, idx))}")
    print(f"logs: {logs}; results.csv is rebuilt by every finished cell; then "
          f"python plot_results.py --exp {args.exp}")
    if not args.slurm_wait:
        return
    while True:
        out = subprocess.run(["squeue", "-h", "-j", ",".join(jobs), "-o", "%i %T %r"], capture_output=True,
                             text=True).stdout.split("\n")
        rows = [line.split() for line in out if line.strip()]
        stuck = [r[0] for r in rows if len(r) > 2 and r[2] == "DependencyNeverSatisfied"]
        if stuck:
            subprocess.run(["scancel", *jobs], capture_output=True)
            raise SystemExit(f"error: a job failed, so {', '.join(stuck)} can never start (cancelled); see {logs}")
        if not rows:
            break
        time.sleep(2)
    missing = [label(c) for c in grid if not cell_finished(forwarded, exp, c)]
    if missing:
        raise SystemExit(f"error: the SLURM jobs ended with {len(missing)} cell(s) unfinished "
                         f"({', '.join(missing[:4])}); see {logs}")
    write_results(exp)
    print(f"all {len(grid)} cells finished -> {exp / 'results.csv'}")


def main(argv: list[str] | None = None) -> None:
    with script_errors():
        run_grid(argv)


def run_grid(argv: list[str] | None = None) -> None:
    args, forwarded = parse_args(argv)
    exp = Path(args.exp)
    grid = cells(args)
    if args.list:
        for i, cell in enumerate(grid):
            after = ",".join(map(str, needs(grid, i))) or "-"
            print(f"{i}\t{after}\t{shlex.join(['python', 'train.py', *cell_argv(forwarded, exp, *cell)])}")
        return
    if args.collect:
        table = write_results(exp)
        print(f"{0 if table is None else len(table)} rows -> {exp / 'results.csv'}")
        return
    bad = [c for c in args.cell if not 0 <= c < len(grid)]
    if bad:
        sys.exit(f"error: --cell {bad[0]} is not a cell of this grid (0-{len(grid) - 1}; see --list)")
    first = train.parse_args(forwarded)  # flag errors before any work
    if args.dense_from:
        reuse_dense(exp, Path(args.dense_from), args.seeds)
    if args.executor == "slurm":
        submit_slurm(args, forwarded, grid)
        return
    exp.mkdir(parents=True, exist_ok=True)
    worker = f"{socket.gethostname()}:{os.getpid()}:{time.time():.0f}"
    command = {"argv": sys.argv[1:] if argv is None else argv, "code_version": code_version(), "worker": worker,
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "finished_cells": 0}

    def record(**changes: object) -> None:
        def change(old: dict) -> dict:
            commands = old.get("commands", [])
            mine = [c for c in commands if c.get("worker") == worker]
            if mine:
                mine[0].update(changes)
            else:
                commands.append({**command, **changes})
            return {"commands": commands}
        update_json(exp / "experiment.json", change)

    record()
    try:
        ds = load_dataset(first.data)
    except DatasetError as e:
        sys.exit(f"error: {e}")
    todo = [i for i in (dict.fromkeys(args.cell) if args.cell else range(len(grid)))
            if args.shard is None or i % args.shard[1] == args.shard[0]]
    t0 = time.perf_counter()
    done = sum(len(list((exp / f"seed{s}").rglob(train.METRICS))) for s in args.seeds)
    bar = tqdm(total=max(expected_trainings(args, first), done), initial=done, unit="training", desc="grid",
               disable=None, smoothing=0.1)

    def trained(run_dir: Path) -> None:  # counted on disk: other workers' trainings count too
        bar.n = max(bar.n + 1, sum(len(list((exp / f"seed{s}").rglob(train.METRICS))) for s in args.seeds))
        bar.refresh()

    train.ON_TRAINED = trained
    finished, table, said_busy = 0, None, set()
    busy: dict[int, Path] = {}  # cell -> the folder another worker held when it was last tried
    pause = BUSY_PAUSE[0]
    while todo:
        moved = False
        for i in list(todo):
            if i in busy and locked_by_other(busy[i]):  # still held: a probe, not a rebuilt training
                continue
            bar.set_postfix_str(f"cell {i + 1}/{len(grid)}: {label(grid[i])}")
            if i not in said_busy:
                tqdm.write(f"[{i + 1}/{len(grid)}] {label(grid[i])}")
            try:
                train.run(train.parse_args(cell_argv(forwarded, exp, *grid[i])), ds, report=False)
            except Busy as e:  # --busy skip: another worker holds it; come back later (said once)
                if e.folder is not None:
                    busy[i] = e.folder
                if i not in said_busy:
                    tqdm.write(f"  busy ({e}); moving on")
                    said_busy.add(i)
                continue
            busy.pop(i, None)
            todo.remove(i)
            moved, finished = True, finished + 1
            # after every cell, so an interrupted grid can be plotted (marked partial) and nothing finished is lost
            table = write_results(exp)
            record(cells=len(grid), finished_cells=finished)
        if todo and not moved:  # every cell left is another worker's: wait, longer each idle pass
            time.sleep(pause)
            pause = min(2 * pause, BUSY_PAUSE[1])
        else:
            pause = BUSY_PAUSE[0]
    train.ON_TRAINED = None
    bar.close()
    rows = 0 if table is None else len(table)
    print(f"{finished} cells in {time.perf_counter() - t0:.0f} s; {rows} rows -> {exp / 'results.csv'}")


if __name__ == "__main__":
    main()
