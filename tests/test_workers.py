"""Several workers on one grid: run-folder locks, the cell list, concurrent workers and a
worker killed mid-cell (run_folders.py, run_experiments.py --list/--cell/--busy)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import grid_argv, results, worker

import run_experiments
import run_folders as rf
import train as tr

ROOT = Path(__file__).resolve().parents[1]


def starts(exp: Path) -> dict[str, int]:
    """How often each run folder's training was started (headers in its train.log)."""
    return {str(p.parent.relative_to(exp)): sum(line.startswith("=== ") for line in p.read_text().splitlines())
            for p in exp.rglob("train.log")}


def test_lock_is_exclusive_and_dies_with_its_holder(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, pathlib, run_folders as rf\n"
                               "with rf.locked(pathlib.Path(sys.argv[1])):\n    print('held', flush=True)\n"
                               "    time.sleep(60)", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(rf.Busy, match="locked by another worker"):
        with rf.locked(tmp_path, wait=False):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with rf.locked(tmp_path, wait=False):  # the kernel dropped the dead holder's lock
        with rf.locked(tmp_path, wait=False):  # re-entrant within a process
            pass


def test_code_version_is_dirty_for_code_edits_only(tmp_path: Path) -> None:
    """A run rewriting its committed results files must not mark the code it runs as edited."""
    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                       check=True, capture_output=True)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "experiment.json").write_text("{}")
    (tmp_path / "train.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "start")
    clean = rf._git_version(tmp_path)
    assert len(clean) == 12 and not clean.endswith("+dirty")
    (tmp_path / "results" / "experiment.json").write_text('{"cells": 1}')
    assert rf._git_version(tmp_path) == clean
    (tmp_path / "train.py").write_text("x = 2\n")
    assert rf._git_version(tmp_path) == clean + "+dirty"


def test_concurrent_json_updates_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "counter.json"
    code = ("import sys, pathlib, run_folders as rf\n"
            "for _ in range(25): rf.update_json(pathlib.Path(sys.argv[1]), lambda d: {'n': d.get('n', 0) + 1})")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=ROOT) for _ in range(3)]
    assert all(p.wait(60) == 0 for p in procs)
    assert json.loads(path.read_text())["n"] == 75


def test_list_gives_a_train_command_per_cell(tmp_path: Path, tiny_data: Path, capsys: pytest.CaptureFixture) -> None:
    run_experiments.main([*grid_argv(tmp_path / "exp", tiny_data), "--list"])
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [line[0] for line in lines] == [str(i) for i in range(8)]
    assert [line[1] for line in lines[:4]] == ["-", "0", "1", "0"]  # dense; its methods; the control after its method
    assert lines[0][2].startswith("python train.py ") and "--retrain" not in lines[0][2]
    assert "--retrain weight_rewind --control random_prune" in lines[2][2] and "--seed 0" in lines[2][2]
    assert not (tmp_path / "exp").exists()  # listing runs nothing
    with pytest.raises(SystemExit, match="--cell 9 is not a cell"):
        run_experiments.main([*grid_argv(tmp_path / "exp", tiny_data), "--cell", "9"])


def test_cells_run_in_the_order_given(tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--cell 4,0: the second seed's dense run first (a priority order), each cell once."""
    order = []
    monkeypatch.setattr(tr, "run", lambda args, ds, **kw: order.append((args.seed, args.retrain)))
    run_experiments.main([*grid_argv(tmp_path / "exp", tiny_data), "--cell", "4,0,4"])
    assert order == [(1, None), (0, None)]


def test_three_concurrent_workers_match_one_process(reference: Path, tiny_data: Path, tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    procs = [worker([*grid_argv(exp, tiny_data), "--busy", "skip"], tmp_path / f"w{i}.log") for i in range(3)]
    assert all(p.wait(300) == 0 for p in procs), [(tmp_path / f"w{i}.log").read_text()[-800:] for i in range(3)]
    pd.testing.assert_frame_equal(results(exp), results(reference))
    assert set(starts(exp).values()) == {1}  # no run folder was trained twice
    assert starts(exp).keys() == starts(reference).keys()
    commands = json.loads((exp / "experiment.json").read_text())["commands"]
    assert len(commands) == 3 and all(c["finished_cells"] == 8 for c in commands)  # each saw the grid done


def test_a_worker_killed_mid_cell_loses_nothing(reference: Path, tiny_data: Path, tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    argv = [*grid_argv(exp, tiny_data), "--checkpoint-minutes", "0"]  # a checkpoint after every step
    victim = worker(argv, tmp_path / "victim.log")
    deadline = time.time() + 120
    while not list(exp.glob("seed0/weight_rewind/round_01/checkpoint.pt")) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)  # mid-cell: inside weight_rewind's first pruned training
    victim.wait()
    assert not (exp / "seed0" / "weight_rewind" / "round_01" / "metrics.json").is_file()
    procs = [worker([*argv, "--busy", "skip"], tmp_path / f"w{i}.log") for i in range(2)]
    assert all(p.wait(300) == 0 for p in procs), [(tmp_path / f"w{i}.log").read_text()[-800:] for i in range(2)]
    pd.testing.assert_frame_equal(results(exp), results(reference))
    counts = starts(exp)
    assert counts.pop("seed0/weight_rewind/round_01") == 2  # started, killed, resumed once
    assert set(counts.values()) == {1}


def test_run_sh_walks_the_grid_with_two_workers(tmp_path: Path) -> None:
    """The driver's WORKERS=2: two processes share the grid, each cell trained once, both
    recorded in experiment.json, the second one's output in its log; then the plot."""
    exp = tmp_path / "exp"
    cfg = tmp_path / "two.sh"
    cfg.write_text(f"SYNTHETIC_RECORDS=120\nDATA_DIR={tmp_path / 'data'}\nWIDTH=0.125\nBLOCKS=2\nCROP=512\n"
                   "EPOCHS=2\nMETHODS=weight_rewind,lr_rewind\nCONTROLS=random_prune\n"
                   "CONTROL_METHODS=weight_rewind\nCONTROL_EVERY=2\nFRACTION=0.5\nTARGET=4\nSEEDS=0,1\nWORKERS=2\n"
                   f"EXP={exp}\n")
    done = subprocess.run(["bash", "run.sh", str(cfg)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    commands = json.loads((exp / "experiment.json").read_text())["commands"]
    assert len(commands) == 2 and all(c["finished_cells"] == c["cells"] == 8 for c in commands)
    assert set(starts(exp).values()) == {1} and len(starts(exp)) == 2 * (1 + 2 + 2 + 1)
    assert "cells in" in (exp / "worker-2.log").read_text()
    table = pd.read_csv(exp / "results.csv")
    assert set(table["method"]) == {"weight_rewind", "lr_rewind"} and (exp / "plots" / "summary.md").is_file()
