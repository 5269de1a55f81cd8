"""The `kiln` command, one module per command group (each registers its commands on `app`):
convert, server (api, worker, up), jobs, tokens, models, deployments; what they share is in
common.py. The commands parse arguments and call library functions."""

from __future__ import annotations

import importlib

from workers.cli.common import app, print_summary

# each group registers its commands on `app`, in the order `kiln --help` lists them
for _group in ("convert", "server", "models", "deployments", "jobs", "tokens"):
    importlib.import_module(f"workers.cli.{_group}")

__all__ = ["app", "main", "print_summary"]


@app.callback()
def _root() -> None:
    """Kiln: convert PyTorch models into fast, validated inference artifacts."""


def main() -> None:  # pragma: no cover - console script entry
    app(prog_name="kiln")
