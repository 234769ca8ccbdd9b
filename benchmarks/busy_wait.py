"""CPU time a ``run_experiments.py --busy skip`` worker spends waiting on a cell another
worker holds: the dense cell of a one-seed grid is started (its config.json made by the
same cell elsewhere) and its folder held locked by this script; the worker's user + system
CPU seconds over 30 s of waiting are read from /proc.

    python benchmarks/busy_wait.py CODE_DIR SCRATCH_DIR [DATA]

CODE_DIR is a checkout (this one, or another commit's for comparison), SCRATCH_DIR a folder
it may delete and fill, DATA a built data set (absolute path; default data/cinc2017).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

FLAGS = ["--width", "0.125", "--blocks", "2", "--epochs", "1", "--crop", "1024", "--batch-size", "16", "--quiet",
         "--max-steps", "1"]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    code, tmp = Path(sys.argv[1]), Path(sys.argv[2])
    data = sys.argv[3] if len(sys.argv) > 3 else str(Path("data/cinc2017").resolve())
    shutil.rmtree(tmp, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "train.py", "--data", data, "--out", str(tmp / "scratch" / "seed0"), *FLAGS,
                    "--busy", "skip"], cwd=code, check=True, env=env, capture_output=True)
    dense = tmp / "exp" / "seed0" / "dense"
    dense.mkdir(parents=True)
    shutil.copy(tmp / "scratch" / "seed0" / "dense" / "config.json", dense / "config.json")
    with open(dense / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other worker
        worker = subprocess.Popen([sys.executable, "run_experiments.py", "--exp", str(tmp / "exp"), "--seeds", "0",
                                   "--cell", "0", "--data", data, *FLAGS, "--busy", "skip"], cwd=code, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(40)  # start-up: imports, loading the data, the first try of the cell
        start = cpu_seconds(worker.pid)
        time.sleep(30)
        used = cpu_seconds(worker.pid) - start
        worker.kill()
        worker.wait()
    print(f"{code}: {used:.2f} s CPU in 30 s of waiting ({100 * used / 30:.1f} % of a core)")


if __name__ == "__main__":
    main()
