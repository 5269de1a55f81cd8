"""Shared fixtures: the model zoo as bundles, and helpers to run conversions."""

from __future__ import annotations

import faulthandler
import os
import shutil
import sys
from pathlib import Path

import pytest

ZOO = Path(__file__).parent / "zoo"
ARTIFACTS = Path(os.environ.get("KILN_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts"))


def zoo_bundle(tmp_path: Path, name: str) -> Path:
    """A copy of one zoo model as a single-file bundle (model code is only ever read by the sandbox)."""
    dst = tmp_path / f"{name}.py"
    shutil.copyfile(ZOO / f"{name}.py", dst)
    return dst


def zoo_signature(name: str, attr: str = "SIGNATURE") -> dict:
    """The SIGNATURE dict a zoo file declares, read without importing it (no torch in the test process)."""
    import ast

    tree = ast.parse((ZOO / f"{name}.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == attr for t in node.targets):
            value = node.value
            # VOCAB-style names inside literals are resolved from the same module's constants
            consts = {
                n.targets[0].id: ast.literal_eval(n.value)
                for n in tree.body
                if isinstance(n, ast.Assign)
                and isinstance(n.value, ast.Constant)
                and isinstance(n.targets[0], ast.Name)
            }
            src = ast.unparse(value)
            return eval(src, {"__builtins__": {}}, consts)  # noqa: S307 - literals and constants only
    raise KeyError(attr)


@pytest.fixture
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


def pytest_unconfigure(config: pytest.Config) -> None:
    """A watchdog for the exit: a thread left running (a runner nobody stopped) that keeps the
    interpreter from exiting once the tests are done would hang CI without a word. Two minutes
    after pytest is done, a process still alive prints every thread's stack and exits with 1."""
    faulthandler.dump_traceback_later(120, exit=True, file=sys.__stderr__)
