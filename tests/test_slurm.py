"""The grid through a real single-node SLURM cluster (run_experiments.py --executor slurm).

The test installs Debian's SLURM and MUNGE packages when sbatch is missing (as root, ~40 s),
starts its own munged, slurmctld and slurmd on private sockets, ports and folders, runs a
tiny grid as SLURM array jobs with dependencies, checks results.csv against one process
running the same grid, and stops exactly the daemons it started (by pid). It skips, saying
why, where it cannot be root or cannot install the packages. It runs only when asked,
``python -m pytest --slurm`` (tests/conftest.py; CI asks): a plain run changes no system state.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from conftest import ONE_THREAD, grid_argv, results

import run_experiments

pytestmark = pytest.mark.slurm
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install() -> None:
    if all(shutil.which(b) for b in ("sbatch", "squeue", "slurmctld", "slurmd", "munged")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and this is not a root Debian machine that could install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = [["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]]
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if done.returncode:
            pytest.skip(f"could not install SLURM ({' '.join(cmd[:2])}: {done.stderr.strip()[-300:]})")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A running single-node cluster; yields the environment that talks to it."""
    if os.geteuid() != 0:
        pytest.skip("starting SLURM daemons needs root")
    install()
    home = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log"):
        (home / sub).mkdir()
    key = home / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    sock = home / "munge.socket"
    host = socket.gethostname()
    conf = home / "slurm.conf"
    conf.write_text(f"""ClusterName=lthtest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
StateSaveLocation={home}/state
SlurmdSpoolDir={home}/spool
SlurmctldPidFile={home}/slurmctld.pid
SlurmdPidFile={home}/slurmd.pid
SlurmctldLogFile={home}/log/slurmctld.log
SlurmdLogFile={home}/log/slurmd.log
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
NodeName={host} CPUs=2 State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    env = {**ONE_THREAD, "SLURM_CONF": str(conf)}
    quiet = {"env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}  # they log to home/log
    daemons = []
    try:
        daemons.append(subprocess.Popen(["munged", "-F", "--force", f"--socket={sock}", f"--key-file={key}",
                                         f"--pid-file={home}/munged.pid", f"--log-file={home}/log/munged.log",
                                         f"--seed-file={home}/munged.seed"], **quiet))
        for _ in range(50):
            if sock.exists():
                break
            time.sleep(0.1)
        daemons.append(subprocess.Popen(["slurmctld", "-D", "-f", str(conf)], **quiet))
        daemons.append(subprocess.Popen(["slurmd", "-D", "-f", str(conf)], **quiet))
        deadline = time.time() + 60
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=env).stdout
            if out.strip() in ("idle", "mix", "alloc"):
                break
            time.sleep(0.5)
        else:
            logs = "\n".join(p.read_text()[-500:] for p in (home / "log").glob("*.log"))
            pytest.fail(f"the SLURM node did not come up within 60 s:\n{logs}")
        yield env
    finally:
        for d in reversed(daemons):  # only what this fixture started
            d.terminate()
            try:
                d.wait(20)
            except subprocess.TimeoutExpired:
                d.kill()
                d.wait()


def test_grid_through_slurm_matches_one_process(cluster: dict[str, str], reference: Path, tiny_data: Path,
                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in cluster.items():
        monkeypatch.setenv(k, v)
    exp = tmp_path / "exp"
    t0 = time.time()
    run_experiments.main([*grid_argv(exp, tiny_data), "--executor", "slurm", "--slurm-wait",
                          "--sbatch=--cpus-per-task=1"])
    print(f"grid through SLURM: {time.time() - t0:.0f} s")
    pd.testing.assert_frame_equal(results(exp), results(reference))
    logs = sorted((exp / "slurm").glob("lth-*.out"))
    assert len(logs) == 8  # one per cell: 2 dense, 4 methods, 2 controls
    assert all("error" not in p.read_text().lower() for p in logs)


def test_a_failing_stage_is_reported_not_waited_for(cluster: dict[str, str], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in cluster.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit, match="can never start|unfinished"):
        run_experiments.main(["--exp", str(tmp_path / "exp"), "--seeds", "0", "--methods", "lr_rewind",
                              "--controls", "", "--data", str(tmp_path / "missing"), "--executor", "slurm",
                              "--slurm-wait"])
