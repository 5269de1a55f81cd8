"""`kiln push`, `kiln model ...`: uploaded models."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from service.errors import KilnError
from workers.cli.common import (
    SERVER,
    TOKEN,
    _client,
    _fail,
    _signature_arg,
    app,
    out,
    remote,
)


@app.command()
def push(
    bundle: Path = typer.Argument(
        ..., metavar="BUNDLE", help="A .py file, a folder (zipped on the way), a .zip/.tar.gz, .pt, .pt2 or .onnx"
    ),
    name: str = typer.Option(..., help="Model name"),
    entry: str | None = typer.Option(None, help="Entry point, e.g. model.py:build_model"),
    weights: Path | None = typer.Option(None, help="Weights file"),
    samples: Path | None = typer.Option(None, help="Sample inputs (.npz)"),
    signature: Path | None = typer.Option(None, help="Signature file (YAML or JSON)"),
    input: list[str] | None = typer.Option(None, "--input", help="Input spec (repeatable)"),  # noqa: A002 - the --input flag's name
    output: list[str] | None = typer.Option(None, "--output", help="Output name (repeatable)"),
    dim: list[str] | None = typer.Option(None, "--dim", help="Dimension range name=min:opt:max"),
    server: str | None = SERVER,
    token: str | None = TOKEN,
) -> None:
    """Upload a model bundle to a Kiln server."""
    try:
        sig = _signature_arg(signature, input, output, dim)
        with _client(server, token) as client:
            v = client.push(
                bundle,
                name=name,
                entry=entry,
                weights=weights,
                samples=samples,
                signature=sig.to_json() if sig else None,
            )
    except KilnError as exc:
        _fail(exc)
        return
    what = "already there as" if v["existing"] else "pushed"
    out.print(f"{what} {v['name']} version {v['version']} ({v['kind']}, sha256 {v['sha256'][:12]})", highlight=False)


model_app = typer.Typer(help="Models on a Kiln server: push, list, show, delete.", no_args_is_help=True)


app.add_typer(model_app, name="model")


model_app.command("push")(push)


@model_app.command("list")
def model_list(server: str | None = SERVER, token: str | None = TOKEN) -> None:
    """List models and their newest version."""
    with remote(server, token) as client:
        items = client.models()
    table = Table()
    for col in ("name", "versions", "latest", "kind", "created"):
        table.add_column(col)
    for m in items:
        versions = m.get("versions") or []
        latest = versions[-1] if versions else {}
        table.add_row(
            m["name"],
            str(len(versions)),
            str(latest.get("version", "")),
            latest.get("kind", ""),
            (m.get("created_at") or "")[:19],
        )
    out.print(table)


@model_app.command("show")
def model_show(name: str, server: str | None = SERVER, token: str | None = TOKEN) -> None:
    """A model's versions (JSON)."""
    import json

    with remote(server, token) as client:
        print(json.dumps(client.model(name), indent=2))


@model_app.command("delete")
def model_delete(
    name: str,
    version: int = typer.Option(..., help="The version to delete"),
    server: str | None = SERVER,
    token: str | None = TOKEN,
) -> None:
    """Delete a version of a model that no deployment uses."""
    with remote(server, token) as client:
        client.delete_version(name, version)
    out.print(f"deleted {name} version {version}", highlight=False)
