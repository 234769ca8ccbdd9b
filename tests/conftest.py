"""Shared fixtures: small synthetic data made on the fly, and the real CinC copy if present."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io

import build_datasets as bd

SHARED_CINC = Path(__file__).resolve().parents[2] / "shared" / "data" / "cinc2017" / "training2017"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slurm", action="store_true",
                     help="also run the tests marked slurm: they start SLURM and MUNGE daemons and, as root on "
                          "Debian without SLURM, apt-install it (CI passes this; a plain run changes no system state)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The slurm tests only when asked (--slurm): a user running the tests does not expect
    system packages installed or daemons started."""
    if config.getoption("--slurm"):
        return
    skip = pytest.mark.skip(reason="starts SLURM daemons (and installs SLURM as root when missing): "
                                   "run with --slurm to include it")
    for item in items:
        if "slurm" in item.keywords:
            item.add_marker(skip)


def write_wfdb(folder: Path, name: str, samples: np.ndarray, fs: int = 300,
               header_samples: int | None = None) -> None:
    """Write one record the way training2017.zip holds it: MATLAB v4 ``val`` + WFDB header."""
    folder.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(folder / f"{name}.mat", {"val": samples.astype(np.int16)[None, :]}, format="4")
    n = len(samples) if header_samples is None else header_samples
    (folder / f"{name}.hea").write_text(
        f"{name} 1 {fs} {n} 05:05:15 1/05/2000\n"
        f"{name}.mat 16+24 1000/mV 16 0 {int(samples[0])} 0 0 ECG\n")


@pytest.fixture
def cinc_folder(tmp_path: Path) -> Path:
    """A CinC-2017-layout folder of 12 short synthetic records with a REFERENCE-v3.csv."""
    names, labels, signals = bd.synthesize(12, seed=3)
    source = tmp_path / "training2017"
    for name, x in zip(names, signals, strict=True):
        write_wfdb(source, name, x[:3000])
    (source / "REFERENCE-v3.csv").write_text(
        "".join(f"{n},{c}\n" for n, c in zip(names, labels, strict=True)))
    return source


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A built data set of 160 synthetic 9-12 s records (all four classes)."""
    out = tmp_path_factory.mktemp("tiny") / "data"
    names, labels, signals = [], [], []
    for i in range(160):
        rng = np.random.default_rng([7, i])
        label = bd.CLASSES[i % 4]
        names.append(f"S{i:05d}")
        labels.append(label)
        signals.append(bd.resample(bd.synthetic_record(label, rng, seconds=(9.0, 12.0)), 300))
    split = bd.stratified_split(labels, seed=0, val_fraction=0.2, test_fraction=0.2)
    bd.write_dataset(out, names, labels, signals, split, {"fs": bd.FS, "flags": {}})
    return out


TINY_FLAGS = ["--width", "0.125", "--epochs", "2", "--crop", "1024", "--batch-size", "16", "--quiet"]
"""train.py flags for a network and run small enough for a test on 2 CPU cores (6 steps/epoch)."""


def tiny_train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--out", str(out), *TINY_FLAGS, *extra]


# --------------------------------------------------------------------------- a shared small grid

ROOT = Path(__file__).resolve().parents[1]
F1 = ["val_challenge_f1", "test_challenge_f1", "val_f1_A", "test_f1_A"]


def grid_argv(exp: Path, data: Path) -> list[str]:
    """2 seeds x (dense, weight_rewind + random_prune, lr_rewind), 2 rounds: 12 trainings."""
    return ["--exp", str(exp), "--seeds", "0,1", "--methods", "weight_rewind,lr_rewind", "--controls",
            "random_prune", "--control-methods", "weight_rewind", "--prune-fraction", "0.5", "--rounds", "2",
            "--control-every", "2", "--data", str(data), *TINY_FLAGS]


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
"""Workers share the 2 cores without oversubscribing them; the reference runs the same way,
so every run does its float arithmetic identically."""


def worker(argv: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "run_experiments.py", *argv], cwd=ROOT, stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT, env=ONE_THREAD)


def results(exp: Path) -> pd.DataFrame:
    keys = ["seed", "method", "control", "round", "attempt"]
    return pd.read_csv(exp / "results.csv").sort_values(keys)[keys + F1].reset_index(drop=True)


@pytest.fixture(scope="session")
def reference(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The grid run by one process: what any set of workers must reproduce."""
    exp = tmp_path_factory.mktemp("one") / "exp"
    assert worker(grid_argv(exp, tiny_data), exp.parent / "log").wait(300) == 0, (exp.parent / "log").read_text()
    return exp
