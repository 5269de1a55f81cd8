"""Importing and building user models. Runs only inside the sandbox child process."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.errors import InvalidEntryPoint


def import_entry(bundle_dir: Path, entry: str) -> Callable[..., Any]:
    """The callable named by ``file.py:function`` (or ``package.module:function``) in a bundle."""
    target, sep, attr = entry.partition(":")
    if not sep or not target or not attr:
        raise InvalidEntryPoint(f"entry point {entry!r} must look like 'model.py:build_model'")
    bundle_dir = bundle_dir.resolve()
    if str(bundle_dir) not in sys.path:
        sys.path.insert(0, str(bundle_dir))
    if target.endswith(".py"):
        path = (bundle_dir / target).resolve()
        if not path.is_relative_to(bundle_dir) or not path.is_file():
            raise InvalidEntryPoint(f"entry point file {target!r} is not in the bundle")
        name = "kiln_user_" + path.stem
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            raise InvalidEntryPoint(f"entry point module {target!r} is not in the bundle: {exc}") from None
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise InvalidEntryPoint(f"{target} has no attribute {attr!r} (entry point {entry!r})")
        fn = getattr(fn, part)
    if not callable(fn):
        raise InvalidEntryPoint(f"entry point {entry!r} is not callable")
    return fn
