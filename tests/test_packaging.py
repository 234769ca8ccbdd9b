"""What a newcomer runs first: `bash run.sh --help` and `pip install .` (pyproject.toml)."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_run_sh_help_prints_usage_and_every_variable_and_runs_nothing() -> None:
    done = subprocess.run(["bash", "run.sh", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: bash run.sh [CONFIG] [--dry-run]")
    assert "builtin" not in done.stdout  # not bash's help for `source`
    assigned = re.findall(r"^([A-Z_]+)=", (ROOT / "run.sh").read_text(), flags=re.M)
    variables = assigned[:assigned.index("LATENCY_SECONDS") + 1]  # the settings block, not the script's own
    assert len(variables) > 20
    for name in variables:
        assert re.search(rf"^{name}=", done.stdout, flags=re.M), f"--help does not list {name}"


def test_run_sh_refuses_an_unknown_flag_or_a_missing_config(tmp_path: Path) -> None:
    for arg in ("--bogus", str(tmp_path / "missing.sh")):
        done = subprocess.run(["bash", "run.sh", arg], cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert done.returncode == 2 and f"error: {arg} is neither" in done.stderr


def test_pyproject_lists_every_module_and_its_commands_exist() -> None:
    """`pip install .` installs only the modules pyproject.toml names: a new script left out
    would import in a checkout and fail after an install."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    modules = project["tool"]["setuptools"]["py-modules"]
    assert sorted(modules) == sorted(p.stem for p in ROOT.glob("*.py"))
    for command, target in project["project"]["scripts"].items():
        module, func = target.split(":")
        assert module in modules and callable(getattr(importlib.import_module(module), func)), command


def test_slurm_tests_run_only_when_asked(pytester: pytest.Pytester) -> None:
    """A plain `python -m pytest` must not start SLURM (or apt-install it as root): the slurm
    marker skips unless --slurm is given, as CI (.ci/run) gives it."""
    pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text())
    pytester.makeini("[pytest]\nmarkers = slurm: test\n")
    pytester.makepyfile("import pytest\n\n\n@pytest.mark.slurm\ndef test_x():\n    pass\n")
    pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(skipped=1)
    pytester.runpytest_inprocess("-p", "no:cacheprovider", "--slurm").assert_outcomes(passed=1)
    assert "--slurm" in (ROOT / ".ci" / "run").read_text().splitlines()[-1]


def test_readme_test_command_is_what_ci_runs() -> None:
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("python ")]
    assert f"    {' && '.join(ci)}\n" in (ROOT / "README.md").read_text()


def test_relative_links_in_the_readmes_resolve() -> None:
    """Folders move (results/archive/, results/demo-reference/): a link left behind is caught here."""
    for md in (ROOT / "README.md", ROOT / "results" / "README.md", ROOT / "results" / "archive" / "README.md",
               ROOT / "docs" / "gpu-sitting.md"):
        for target in re.findall(r"\]\(([^)\s]+)\)", md.read_text()):
            path = target.split("#")[0]
            if path and not path.startswith(("http://", "https://")):
                assert (md.parent / path).exists(), f"{md.relative_to(ROOT)} links to missing {target}"


def test_the_real_data_source_comes_from_the_environment() -> None:
    """README's `DOWNLOAD=1 bash run.sh configs/cinc2017-cpu.sh` and `SOURCE=...` forms."""
    for env, build in ((("DOWNLOAD", "1"), "--source data/raw/training2017 --seed 0 --out data/cinc2017 --download"),
                       (("SOURCE", "/x/training2017"), "--source /x/training2017 --seed 0 --out data/cinc2017")):
        done = subprocess.run(["bash", "run.sh", "configs/cinc2017-cpu.sh", "--dry-run"], cwd=ROOT, text=True,
                              capture_output=True, timeout=60, env={**os.environ, env[0]: env[1]})
        assert done.stdout.splitlines()[0].strip() == f"python build_datasets.py {build}", done.stdout
