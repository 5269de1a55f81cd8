"""Kiln service: everything the web process needs. Never imports `workers`, torch or tensorrt at import time."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kiln")  # pyproject.toml's, as installed: the one place it is written
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
