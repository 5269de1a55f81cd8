"""The set-up scripts and the package, as a new user meets them: what `scripts/up` installs, and an
install that prints no warnings."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.service.procs import ROOT

FAKE_PYTHON = """#!/bin/sh
echo "python $*" >> "$(dirname "$0")/../calls.log"
"""


def checkout(tmp_path):
    """The scripts and the project files in a folder of their own, with a stand-in .venv that records
    how it is called (so nothing is installed)."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "scripts", repo / "scripts")
    for name in ("pyproject.toml", "constraints.txt"):
        shutil.copy(ROOT / name, repo / name)
    bin_dir = repo / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "kiln"):
        (bin_dir / name).write_text(FAKE_PYTHON.replace("python", name, 1))
        (bin_dir / name).chmod(0o755)
    return repo


def installs(repo) -> list[str]:
    calls = (repo / ".venv" / "calls.log").read_text().splitlines() if (repo / ".venv" / "calls.log").exists() else []
    return [c for c in calls if c.startswith("python -m pip install") and "--upgrade pip" not in c]


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="scripts/up would install bubblewrap")
def test_scripts_up_installs_the_server_without_the_test_tools(tmp_path):
    repo = checkout(tmp_path)
    run = subprocess.run(
        ["scripts/up", "--port", "9"], cwd=repo, capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == 0, run.stderr
    assert installs(repo) == ["python -m pip install -q -c constraints.txt -e ."], installs(repo)
    assert "kiln up --port 9" in (repo / ".venv" / "calls.log").read_text()
    # scripts/test's set-up adds the test tools; a server started after it does not reinstall
    (repo / ".venv" / "calls.log").unlink()
    assert subprocess.run(["scripts/setup"], cwd=repo, capture_output=True, timeout=60, check=False).returncode == 0
    assert installs(repo) == ["python -m pip install -q -c constraints.txt -e .[test]"], installs(repo)
    (repo / ".venv" / "calls.log").unlink()
    assert subprocess.run(["scripts/up"], cwd=repo, capture_output=True, timeout=60, check=False).returncode == 0
    assert installs(repo) == []


def test_building_the_package_prints_no_warnings(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("service", "workers"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "warning" not in (run.stdout + run.stderr).lower(), run.stdout + run.stderr
