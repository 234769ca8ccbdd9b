"""The GPU sitting end to end on the CPU: smoke test, benchmark step, the seed against its
deadline, the packed results, and the merge back (gpu_sitting.py)."""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pandas as pd
import pytest
import torch

import gpu_sitting as gs
import run_folders as rf
import train

ROOT = Path(__file__).resolve().parents[1]


def config(tmp: Path, data: Path, epochs: int, exp: Path, fraction: float = 0.5, target: float = 4) -> Path:
    path = tmp / "sitting.sh"
    path.write_text(f"""DATASET=synthetic
DATA_DIR={data}
WIDTH=0.125
BLOCKS=2
CROP=512
EPOCHS={epochs}
BATCH=16
MILESTONES=0.5
FRACTION={fraction}
TARGET={target}
REWIND_TO=1ep
METHODS=weight_rewind,lr_rewind
CONTROL_METHODS=weight_rewind
CONTROL_EVERY=2
SEEDS=0,1
DEVICE=cuda
EXTRA="--eval-batch-size 128"
EXP={exp}
""")
    return path


def sitting(cfg: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "gpu_sitting.py", "run", "--config", str(cfg), "--out", str(out),
                           "--device", "cpu", *extra], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_grid_command_comes_from_run_sh(tmp_path: Path, tiny_data: Path) -> None:
    argv = gs.grid_command(config(tmp_path, tiny_data, 2, tmp_path / "exp"))
    assert argv[0] == "run_experiments.py"
    assert gs.flag(argv, "--seeds") == "0,1" and gs.flag(argv, "--data") == str(tiny_data)
    assert gs.flag(argv, "--eval-batch-size") == "128" and gs.flag(argv, "--methods") == "weight_rewind,lr_rewind"


def test_next_seed_skips_seeds_with_a_dense_run(tmp_path: Path) -> None:
    assert gs.next_seed(tmp_path, [0, 1, 2]) == 0
    for s in (0, 2):
        (tmp_path / f"seed{s}" / "dense").mkdir(parents=True)
        (tmp_path / f"seed{s}" / "dense" / "metrics.json").write_text("{}")
    (tmp_path / "seed1" / "dense").mkdir(parents=True)  # started, nothing finished: still free
    assert gs.next_seed(tmp_path, [0, 1, 2]) == 1
    (tmp_path / "seed1" / "dense" / "metrics.json").write_text("{}")
    assert gs.next_seed(tmp_path, [0, 1, 2]) == 3


def in_process(cfg: Path, out: Path, *extra: str) -> None:
    """The sitting run in this process (its smoke test, benchmark and grid are still child
    processes), so that the test can hand it a clock."""
    gs.main(["run", "--config", str(cfg), "--out", str(out), "--device", "cpu", *extra])


def test_whole_sitting_then_merge(tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exp, out = tmp_path / "exp", tmp_path / "out"
    # the test's clock stands still: no deadline (of the sitting, its smoke test or its benchmark)
    # can strike, however slow the host; the sitting is judged by what it does, not how fast
    monkeypatch.setattr(gs, "clock", lambda: 1000.0)
    in_process(config(tmp_path, tiny_data, 2, exp), out, "--limit", "280")
    record = json.loads((out / "sitting.json").read_text())
    assert record["smoke"][-1]["passed"] and record["environment"]["torch"] == torch.__version__
    assert record["bench"]["exit_code"] == 0  # the gpu section skips itself without CUDA
    assert record["seed"] == 0 and record["exit_code"] == 0 and not record["stopped_by_deadline"]
    # dense + 2 methods x 2 rounds + 2 controls at round 2
    assert record["trainings_finished"] == 7
    with tarfile.open(out / "results.tar.gz") as tar:
        names = set(tar.getnames())
    assert "seed0/dense/metrics.json" in names and "seed0/weight_rewind+random_prune/rounds.csv" in names
    assert all(Path(n).name in gs.SMALL_FILES for n in names) and not any(n.endswith(".pt") for n in names)

    merged = tmp_path / "merged"
    gs.main(["merge", str(out), "--exp", str(merged), "--bench-out", str(tmp_path / "bench")])
    for name in names - {"results.csv", "experiment.json"}:
        assert (merged / name).read_bytes() == (exp / name).read_bytes(), name
    ours, theirs = pd.read_csv(merged / "results.csv"), pd.read_csv(exp / "results.csv")
    f1 = [c for c in ours.columns if c.endswith("challenge_f1")]
    pd.testing.assert_frame_equal(ours[f1].reset_index(drop=True), theirs[f1].reset_index(drop=True))
    assert len(list((merged / "sittings").glob("seed0-*.json"))) == 2  # the record and the grid's commands
    # a second merge of the same files changes nothing; a differing file is refused, naming it
    gs.main(["merge", str(out), "--exp", str(merged), "--bench-out", str(tmp_path / "bench")])
    victim = merged / "seed0" / "dense" / "metrics.json"
    victim.write_text("{}")
    with pytest.raises(SystemExit, match="differ"):
        gs.main(["merge", str(out), "--exp", str(merged), "--bench-out", str(tmp_path / "bench")])


def test_deadline_stops_the_seed_and_keeps_finished_rounds(tmp_path: Path, tiny_data: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    exp, out = tmp_path / "exp", tmp_path / "out"
    (exp / "seed0" / "dense").mkdir(parents=True)  # seed 0 is done: the sitting takes seed 1
    (exp / "seed0" / "dense" / "metrics.json").write_text("{}")
    # The deadline is measured against the sitting's own first training: the test's clock stands
    # still until seed 1's dense run has finished, then jumps past the deadline. The next cell's
    # folder is held locked (as another worker would), so the grid cannot finish first, however
    # fast the host: the deadline, not the host's speed, ends the seed.
    dense = exp / "seed1" / "dense" / "metrics.json"
    monkeypatch.setattr(gs, "clock", lambda: 1000.0 + (1e6 if dense.is_file() else 0.0))
    held = exp / "seed1" / "weight_rewind"
    held.mkdir(parents=True)
    with open(held / rf.LOCK, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        in_process(config(tmp_path, tiny_data, 2, exp), out, "--skip-smoke", "--skip-bench", "--limit", "3600",
                   "--margin", "10")
    record = json.loads((out / "sitting.json").read_text())
    assert record["seed"] == 1 and record["stopped_by_deadline"] and record["exit_code"] is None
    assert record["trainings_finished"] == 1  # the dense run; the method waited on its folder
    with tarfile.open(out / "results.tar.gz") as tar:
        names = set(tar.getnames())
    assert "seed1/dense/metrics.json" in names and "seed1/dense/history.csv" in names
    assert len([n for n in names if n.endswith("metrics.json")]) == record["trainings_finished"] + 1
    merged = tmp_path / "merged"  # what came back of a cut seed merges too (seed 1 only: seed 0 was ours)
    gs.main(["merge", str(out), "--exp", str(merged), "--bench-out", str(tmp_path / "bench")])
    dense_rel = Path("seed1") / "dense" / "metrics.json"
    assert (merged / dense_rel).read_bytes() == (exp / dense_rel).read_bytes()


def test_sitting_refuses_a_missing_data_set_and_a_cpu_machine(tmp_path: Path, tiny_data: Path) -> None:
    cfg = config(tmp_path, tmp_path / "nowhere", 2, tmp_path / "exp")
    done = sitting(cfg, tmp_path / "out", "--skip-smoke", "--skip-bench")
    assert done.returncode != 0 and "nowhere is missing" in done.stderr
    if not torch.cuda.is_available():
        cfg = config(tmp_path, tiny_data, 2, tmp_path / "exp")
        done = subprocess.run([sys.executable, "gpu_sitting.py", "run", "--config", str(cfg), "--out",
                               str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and "no CUDA device" in done.stderr


def test_cuda_paths_fall_back_on_the_cpu() -> None:
    cpu = torch.device("cpu")
    assert not train.graph_step_wanted("graph", cpu, 512) and not train.graph_step_wanted("auto", cpu, 512)
    model = torch.nn.Linear(3, 2)
    opt = train.make_optimizer(model, train.TrainConfig(lr=3e-3), cpu, graph=False)
    assert not opt.param_groups[0].get("fused") and opt.param_groups[0]["lr"] == 3e-3
    train.set_lr(opt, 1e-4)
    assert opt.param_groups[0]["lr"] == 1e-4


def test_run_sh_starts_workers_side_by_side_and_the_sitting_takes_one(tmp_path: Path, tiny_data: Path) -> None:
    cfg = config(tmp_path, tiny_data, 2, tmp_path / "exp")
    cfg.write_text(cfg.read_text() + "WORKERS=3\n")
    out = subprocess.run(["bash", str(ROOT / "run.sh"), str(cfg), "--dry-run"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    workers = [shlex.split(line) for line in out.splitlines() if "run_experiments.py" in line]
    threads = max(1, len(os.sched_getaffinity(0)) // 3)  # what nproc counts
    assert len(workers) == 3 and all(w[:3] == ["env", f"OMP_NUM_THREADS={threads}", "python"] for w in workers)
    assert all(w[-2:] == ["--busy", "skip"] for w in workers)
    argv = gs.grid_command(cfg)
    assert argv[0] == "run_experiments.py" and "--busy" not in argv
