"""One GPU sitting: a whole seed of a lottery grid in one command, and its merge back here.

A lent GPU machine runs one command of at most 10 minutes, copies only the working tree
(with a built data/ carried along), and returns at most 8 files of 16 MiB from the folder
$OUT; no checkpoint survives to the next sitting. So one command does everything, and
whatever it finished is already in $OUT when the limit strikes:

    # on the GPU machine (carry data/cinc2017):
    python gpu_sitting.py run --config configs/cinc2017-gpu-sitting.sh --out "$OUT" --limit 570

      a. checks the GPU and prints the versions               -> $OUT/sitting.json
      b. smoke test (<= 60 s): a tiny synthetic grid on the device through every method and
         control; if the CUDA-graph step fails it, the seed runs eager
      c. GPU benchmark rows (<= 90 s, benchmarks/run_benchmarks.py --only gpu)
                                                               -> $OUT/bench/results.json
      d. the next seed of the configuration not yet in its results, against the deadline:
         after every finished training the small text files of the experiment (configs,
         metrics, histories, predictions, sparsity and rounds tables, logs) are packed
         into $OUT/results.tar.gz; at the deadline the grid is stopped and packed once more
                                                               -> $OUT/results.tar.gz, seed.log

    # back here, on the folder the files came back to:
    python gpu_sitting.py merge FILES_AT

merge unpacks the experiment files into results/ (refusing to overwrite a file that
differs), keeps the sitting's record under EXP/sittings/, rebuilds EXP/results.csv and adds
the GPU rows to benchmarks/results.json, so plot_results.py and the docs include them. A seed
cut short comes back with its finished rounds only (plots mark it partial); it cannot be
resumed (no checkpoints), so the next sitting runs the next seed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from run_folders import atomic_write, atomic_write_text

ROOT = Path(__file__).resolve().parent
SMALL_FILES = {"config.json", "metrics.json", "history.csv", "predictions.csv", "sparsity.csv", "rounds.csv",
               "train.log", "results.csv", "experiment.json"}
"""What comes back of a run folder: every text file that a table, plot or the docs read."""
SMOKE_SECONDS = 60
BENCH_SECONDS = 90


clock: Callable[[], float] = time.time
"""The clock every deadline of a sitting is measured on (wall time; a test replaces it, so
that no test of the deadlines passes or fails by the host's speed)."""


def log(msg: str) -> None:
    print(f"[sitting {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_json(obj: dict, path: Path) -> None:
    atomic_write_text(json.dumps(obj, indent=2) + "\n", path)


# --------------------------------------------------------------------------- the grid command


def grid_command(config: Path) -> list[str]:
    """The run_experiments.py command that ``bash run.sh CONFIG`` would run (run.sh is the one
    place where a configuration becomes flags)."""
    out = subprocess.run(["bash", str(ROOT / "run.sh"), str(config), "--dry-run"], capture_output=True,
                         text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"error: bash run.sh {config} --dry-run failed: {out.stderr.strip()}")
    for line in out.stdout.splitlines():  # the first worker's command (a sitting runs one)
        argv = shlex.split(line)
        if "run_experiments.py" in argv:
            argv = argv[argv.index("run_experiments.py"):]
            return argv[:-2] if argv[-2:] == ["--busy", "skip"] else argv
    raise SystemExit(f"error: run.sh {config} --dry-run printed no run_experiments.py command")


def flag(argv: list[str], name: str) -> str:
    """The last value of ``name`` in ``argv`` (argparse semantics)."""
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]
    if not values:
        raise SystemExit(f"error: the grid command has no {name}")
    return values[-1]


def next_seed(exp: Path, seeds: list[int]) -> int:
    """The first configured seed whose dense run is not in the results, else the next integer."""
    have = {int(p.name[4:]) for p in exp.glob("seed*")
            if p.name[4:].isdigit() and (p / "dense" / "metrics.json").is_file()}
    free = [s for s in seeds if s not in have]
    return free[0] if free else max(have | set(seeds)) + 1


def pack(exp: Path, dest: Path) -> int:
    """The experiment's small text files as a tar.gz, named from the experiment folder
    (written atomically); returns their count."""
    files = sorted(p for p in exp.rglob("*") if p.is_file() and p.name in SMALL_FILES)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for p in files:
            tar.add(p, arcname=p.relative_to(exp).as_posix())
    atomic_write(dest, buffer.getvalue())
    return len(files)


def run_until(argv: list[str], deadline: float, log_path: Path, on_poll: Callable[[], None] | None = None,
              poll: float = 5.0) -> tuple[int | None, bool]:
    """Run the Python script ``argv`` (script, flags...) in its own process group until it ends or ``deadline``
    (clock()); calls ``on_poll`` every ``poll`` seconds. Returns (exit code or None when
    stopped, stopped by the deadline)."""
    with open(log_path, "ab") as out:
        proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while proc.poll() is None:
                if clock() >= deadline:
                    return None, True
                time.sleep(min(poll, max(deadline - clock(), 0.05)))
                if on_poll is not None:
                    try:
                        on_poll()
                    except (OSError, tarfile.TarError) as e:  # a failed pack must not stop the run
                        log(f"packing failed ({e}); the run goes on")
        finally:  # however this ends (deadline, an error here), the child's whole group stops
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    return proc.returncode, False


# --------------------------------------------------------------------------- the sitting


def environment(device: str) -> dict:
    import torch  # noqa: PLC0415 - after argument checks: the import takes seconds

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "device": device, "host": platform.node(), "cpus": os.cpu_count()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    bf16=torch.cuda.is_bf16_supported())
        try:
            info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm",
                                                 "--format=csv,noheader"], capture_output=True, text=True,
                                                timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            info["nvidia_smi"] = None
    return info


def smoke(out: Path, device: str, step_mode: str, deadline: float) -> dict:
    """A tiny synthetic grid on the device: dense, every method and every control, one round."""
    t0 = clock()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        build = [sys.executable, "build_datasets.py", "--synthetic", "96", "--out", str(data)]
        with open(out / "smoke.log", "ab") as smoke_log:
            code = subprocess.run(build, cwd=ROOT, stdout=smoke_log, stderr=subprocess.STDOUT).returncode
        argv = ["run_experiments.py", "--exp", f"{tmp}/exp", "--seeds", "0", "--control-methods", "all",
                "--data", str(data), "--width", "0.125", "--blocks", "4", "--crop", "512", "--epochs", "2",
                "--batch-size", "8", "--milestones", "0.5", "--prune-fraction", "0.5", "--rounds", "1",
                "--rewind-to", "1ep", "--device", device, "--step-mode", step_mode, "--quiet"]
        if code == 0:
            code, late = run_until(argv, deadline, out / "smoke.log")
        else:
            late = False
    return {"step_mode": step_mode, "passed": code == 0, "seconds": round(clock() - t0, 1),
            "stopped_by_deadline": late}


def run_sitting(args: argparse.Namespace) -> None:
    t_start = clock()
    end = t_start + args.limit
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    argv = grid_command(args.config)
    exp = ROOT / flag(argv, "--exp")
    seeds = [int(s) for s in flag(argv, "--seeds").split(",") if s.strip()]
    record: dict = {"config": str(args.config), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "limit_s": args.limit, "exp": flag(argv, "--exp")}

    def save() -> None:
        write_json(record, out / "sitting.json")

    if not (ROOT / flag(argv, "--data")).is_dir():
        raise SystemExit(f"error: {flag(argv, '--data')} is missing: build it here and carry it to the sitting")
    import torch  # noqa: PLC0415

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "none")
    if device == "none":
        raise SystemExit("error: no CUDA device here; a sitting is for a GPU machine (--device cpu to test it)")
    record["environment"] = environment(device)
    log(json.dumps(record["environment"]))
    save()

    step_mode = "auto"
    if not args.skip_smoke:
        record["smoke"] = [smoke(out, device, "auto", min(clock() + SMOKE_SECONDS, end))]
        failed = lambda: not record["smoke"][-1]["passed"] and not record["smoke"][-1]["stopped_by_deadline"]  # noqa: E731
        if failed() and device == "cuda":
            log("smoke test failed with the CUDA-graph step; trying eager (see smoke.log)")
            step_mode = "eager"
            record["smoke"].append(smoke(out, device, "eager", min(clock() + SMOKE_SECONDS, end)))
        log(f"smoke: {record['smoke']}")
        save()
        if failed():
            raise SystemExit(f"error: the smoke test failed; see {out / 'smoke.log'}")
        # a smoke test cut by its deadline is inconclusive (a cold start is slow): carry on

    if not args.skip_bench:
        t0 = clock()
        shape = f"{flag(argv, '--batch-size')}x{flag(argv, '--crop')}"
        code, _ = run_until(["benchmarks/run_benchmarks.py", "--only", "gpu", "--seconds", "3",
                             "--gpu-shape", shape, "--data", flag(argv, "--data"), "--out", str(out / "bench")],
                            min(t0 + BENCH_SECONDS, end), out / "bench.log")
        record["bench"] = {"exit_code": code, "seconds": round(clock() - t0, 1)}
        rows = (json.loads((out / "bench" / "results.json").read_text())["rows"]
                if (out / "bench" / "results.json").is_file() else [])
        speed = {r["label"].rsplit(", ", 1)[-1]: r["records_per_s"] for r in rows
                 if "masked step" in r["label"] and "records_per_s" in r}
        if step_mode == "auto" and speed.get("bf16 CUDA graph", 1e9) < speed.get("bf16 eager", 0):
            step_mode = "eager"  # the graph measured slower on this machine
        record["bench"]["records_per_s"] = speed
        checks = [r for r in rows if r["label"].startswith("CUDA graph = eager")]
        if step_mode == "auto" and device == "cuda" and (
                "bf16 CUDA graph" not in speed or (checks and checks[0].get("agrees") != "yes")):
            step_mode = "eager"  # the graph step failed, or does not reproduce the eager step here
        record["bench"]["graph_check"] = checks[0] if checks else None
        log(f"bench: {record['bench']}")
        save()

    seed = next_seed(exp, seeds)
    grid = [*argv, "--seeds", str(seed), "--device", device, "--step-mode", step_mode]
    record.update(seed=seed, step_mode=step_mode, command=shlex.join(grid))
    log(f"seed {seed}: {shlex.join(grid)}")
    save()
    t0 = clock()
    finished = {"n": -1}

    def on_poll() -> None:
        n = len(list(exp.glob(f"seed{seed}/**/metrics.json")))
        if n != finished["n"]:
            finished["n"] = n
            pack(exp, out / "results.tar.gz")
            record.update(trainings_finished=n, seed_seconds=round(clock() - t0, 1))
            save()

    code, stopped = run_until(grid, end - args.margin, out / "seed.log", on_poll)
    if code not in (0, None) and step_mode != "eager" and device == "cuda" and end - args.margin - clock() > 60:
        log(f"the grid exited with {code} under --step-mode {step_mode}; resuming it eager (see seed.log)")
        step_mode = "eager"
        grid = [*grid, "--step-mode", "eager"]
        record.update(step_mode=step_mode, command=shlex.join(grid), first_exit_code=code)
        code, stopped = run_until(grid, end - args.margin, out / "seed.log", on_poll)
    on_poll()
    record.update(exit_code=code, stopped_by_deadline=stopped, seed_seconds=round(clock() - t0, 1),
                  files=pack(exp, out / "results.tar.gz"), sitting_seconds=round(clock() - t_start, 1))
    save()
    log(f"seed {seed}: {'stopped at the deadline' if stopped else f'exit code {code}'} after "
        f"{record['seed_seconds']} s, {record['trainings_finished']} trainings; {record['files']} files packed")
    if code not in (0, None):
        raise SystemExit(f"error: the grid exited with {code}; see {out / 'seed.log'}")


# --------------------------------------------------------------------------- the merge


def merge(args: argparse.Namespace) -> None:
    src = args.files
    tarball = src / "results.tar.gz"
    if not tarball.is_file():
        raise SystemExit(f"error: {tarball} is missing: nothing finished in that sitting, or the wrong folder")
    record = json.loads((src / "sitting.json").read_text()) if (src / "sitting.json").is_file() else {}
    if args.exp is None and "exp" not in record:
        raise SystemExit(f"error: {src / 'sitting.json'} is missing or names no experiment; give --exp")
    exp = args.exp if args.exp is not None else args.root / record["exp"]
    rebuilt = {"results.csv", "experiment.json"}  # rebuilt from the rounds tables / kept per sitting
    with tarfile.open(tarball) as tar:
        members = tar.getmembers()
        files = {}
        for m in members:
            path = Path(m.name)
            if not m.isfile() or path.is_absolute() or ".." in path.parts or path.name not in SMALL_FILES:
                raise SystemExit(f"error: {tarball}: unexpected member {m.name!r}; nothing merged")
            files[m.name] = tar.extractfile(m).read()
    conflicts = [name for name, data in files.items() if Path(name).name not in rebuilt
                 and (exp / name).is_file() and (exp / name).read_bytes() != data]
    if conflicts:
        raise SystemExit(f"error: {len(conflicts)} file(s) differ from those in {exp} (first: {conflicts[0]}); "
                         "nothing merged. Move the old run away or merge into another --exp")
    written = 0
    for name, data in files.items():
        if Path(name).name in rebuilt:
            continue
        (exp / name).parent.mkdir(parents=True, exist_ok=True)
        (exp / name).write_bytes(data)
        written += 1
    import run_experiments  # noqa: PLC0415

    (exp / "sittings").mkdir(parents=True, exist_ok=True)
    stamp = record.get("started", time.strftime("%Y-%m-%dT%H%M%S")).replace(":", "")
    write_json(record, exp / "sittings" / f"seed{record.get('seed', 'unknown')}-{stamp}.json")
    if "experiment.json" in files:
        (exp / "sittings" / f"seed{record.get('seed', 'unknown')}-{stamp}-experiment.json").write_bytes(
            files["experiment.json"])
    table = run_experiments.write_results(exp)
    bench = src / "bench" / "results.json"
    if bench.is_file() and args.bench_out is not None:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import run_benchmarks  # noqa: PLC0415

        rows = [r for r in json.loads(bench.read_text())["rows"] if r["section"] == "gpu"]
        if rows:
            run_benchmarks.write(args.bench_out, rows)
    rows = 0 if table is None else len(table)
    print(f"merged {written} files of seed {record.get('seed', '?')} into {exp}; {rows} rows in "
          f"{exp / 'results.csv'}" + (" (cut short at the deadline: partial)" if record.get("stopped_by_deadline")
                                      else ""))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="the sitting, on the GPU machine")
    r.add_argument("--config", type=Path, required=True, help="a run.sh configuration (configs/...)")
    r.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "sitting-out")),
                   help="where the results go (default $OUT)")
    r.add_argument("--limit", type=float, default=570, help="seconds this command may take in all")
    r.add_argument("--margin", type=float, default=20, help="seconds kept after stopping the grid, to pack")
    r.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="auto: CUDA, else refuse; cpu only to test the sitting itself")
    r.add_argument("--skip-smoke", action="store_true", help="no smoke test (b)")
    r.add_argument("--skip-bench", action="store_true", help="no benchmark rows (c), e.g. once measured")
    m = sub.add_parser("merge", help="here: merge what a sitting brought back")
    m.add_argument("files", type=Path, help="the folder with results.tar.gz and sitting.json")
    m.add_argument("--root", type=Path, default=ROOT, help="repository root to merge into")
    m.add_argument("--exp", type=Path, default=None,
                   help="experiment folder to merge into (default: ROOT / the sitting's experiment)")
    m.add_argument("--bench-out", type=Path, default=ROOT / "benchmarks",
                   help="where the GPU benchmark rows are added (results.json/.md)")
    args = p.parse_args(argv)
    if args.command == "run":
        if not args.config.is_file():
            p.error(f"--config {args.config} does not exist")
        if args.limit <= args.margin + 30:
            p.error(f"--limit {args.limit} leaves no time for the seed (margin {args.margin})")
        run_sitting(args)
    else:
        merge(args)


if __name__ == "__main__":
    main()
