"""The README's tour, run as written against a real `kiln up` on a free port and its own data directory.

The shell blocks of "A short tour" (the local `kiln convert` included) are pasted into bash (`set -euo pipefail`) as they stand; only the
port in `KILN=http://127.0.0.1:8000` changes. `.venv/bin/kiln` is this checkout's `kiln`, and the
tour runs in a scratch directory that sees the repository's `examples/`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service.procs import ROOT, KilnUp, Processes, user_env

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (shutil.which("curl") and shutil.which("jq")),
        reason="the tour uses curl and jq (scripts/services installs them)",
    ),
]


def tour_blocks(readme: str) -> list[str]:
    """The ```sh blocks of the README's "A short tour" section, in order."""
    section = readme.split("## A short tour", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.DOTALL)


def kiln_shim(folder: Path) -> Path:
    """`.venv/bin/kiln` in `folder`: this checkout's CLI under this test's Python (`.venv/bin/python`)."""
    shim = folder / ".venv" / "bin" / "kiln"
    shim.parent.mkdir(parents=True)
    shim.write_text(f'#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -m workers.cli "$@"\n')
    shim.chmod(0o755)
    (shim.parent / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (shim.parent / "python").chmod(0o755)
    return shim


def test_the_readme_tour_runs_as_written(tmp_path):
    blocks = tour_blocks((ROOT / "README.md").read_text())
    assert len(blocks) == 3 and "kiln push" in blocks[0] and "kiln deploy" in blocks[1]
    assert "kiln convert tests/zoo/controlflow.py" in blocks[2]  # without a server
    script = "\n".join(blocks)
    assert script.count("KILN=http://127.0.0.1:8000") == 1

    home, work, data = tmp_path / "home", tmp_path / "work", tmp_path / "somewhere" / "data"
    home.mkdir()
    work.mkdir()
    for shared in ("examples", "tests"):
        (work / shared).symlink_to(ROOT / shared)
    kiln_shim(work)
    env = user_env(home)
    procs = Processes()
    up = procs.add(KilnUp(data, env, tmp_path / "up.log"))
    script = script.replace("KILN=http://127.0.0.1:8000", f"KILN={up.url}")
    try:
        up.start()
        run = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=work,
            env=env,
            text=True,
            capture_output=True,
            timeout=540,
            check=False,
        )
        (tmp_path / "tour.out").write_text(run.stdout)
        shown = f"exit {run.returncode}\n--- stdout\n{run.stdout}\n--- stderr\n{run.stderr[-6000:]}\n{up.tail()}"
        assert run.returncode == 0, shown
        assert "pushed classifier version 1" in run.stdout, shown
        assert "succeeded" in run.stdout, shown
        # int8 TorchScript cannot exist: it is neither a candidate nor a failure in any table
        assert not re.search(r"torchscript-int8\s*([│|]|: failed|: not built)", run.stdout + run.stderr), shown
        # jq .selection, from the file and from the API, names the selected candidate (not null)
        assert run.stdout.count('"candidate": "') >= 2, shown
        assert (work / "report.json").is_file() and (work / "out" / "classifier" / "report.json").is_file()
        assert (work / "out" / "controlflow" / "onnxruntime-fp32" / "model.onnx").is_file(), shown
        # --remote writes what a local run writes
        assert (work / "out" / "classifier" / "summary.md").is_file(), shown
        assert (work / "out" / "classifier" / "onnxruntime-fp32" / "model.onnx").is_file(), shown
        assert "logits float32[2, 10]" in run.stdout, shown  # kiln infer
        assert "\x1b[" not in run.stdout + run.stderr, shown  # no escape codes into a pipe
        assert re.search(r'"name": ?"classifier".*"platform"', run.stdout), shown  # the deployment's metadata
        assert re.search(r"token \S+ for default \(infer\):\nkiln_\S+$", run.stdout, re.MULTILINE), shown
    finally:
        procs.close()
