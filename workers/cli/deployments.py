"""`kiln deploy`, `kiln deployment ...`, `kiln infer`: serving."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from service.errors import BadRequest
from workers.cli.common import (
    SERVER,
    TOKEN,
    _fail,
    app,
    out,
    remote,
)


def _print_deployment(d: dict) -> None:
    out.print(
        f"deployment {d['name']}: {d['state']}, default version {d['default_version']}", highlight=False, markup=False
    )
    table = Table()
    for col in ("version", "candidate", "runtime", "state", "default", "batching", "note"):
        table.add_column(col)
    for v in d["versions"]:
        table.add_row(
            str(v["version"]),
            v["candidate_name"],
            v["runtime"],
            v["state"],
            "yes" if v["default"] else "",
            {True: "on", False: "off"}.get(v["batching"], ""),
            v.get("error") or v.get("batching_note") or "",
        )
    out.print(table)


@app.command()
def deploy(
    name: str = typer.Argument(..., help="Deployment name (the /v2 model name)"),
    job: str | None = typer.Option(None, help="Deploy this job's selected candidate"),
    candidate: str | None = typer.Option(None, help="Deploy this candidate (its id)"),
    force: bool = typer.Option(False, "--force", help="Deploy a candidate that failed validation"),
    max_batch_size: int | None = typer.Option(None, help="Rows joined per run"),
    max_queue_delay_ms: float | None = typer.Option(None, help="How long to wait for more requests"),
    max_queue_size: int | None = typer.Option(
        None, help="Requests that may wait; one more is refused at once (503) [default: 512]"
    ),
    instances: int | None = typer.Option(None, help="Runtime instances run in parallel"),
    threads: int | None = typer.Option(None, help="Threads per runtime instance"),
    server: str | None = SERVER,
    token: str | None = TOKEN,
) -> None:
    """Serve a job's winner (or a candidate) as a new version of a deployment, and make it the default."""
    if (job is None) == (candidate is None):
        _fail(BadRequest("give --job JOB_ID or --candidate CANDIDATE_ID (one of them)"))
    with remote(server, token) as client:
        d = client.deploy(
            name,
            job=job,
            candidate=candidate,
            force=force,
            max_batch_size=max_batch_size,
            max_queue_delay_ms=max_queue_delay_ms,
            max_queue_size=max_queue_size,
            instances=instances,
            threads=threads,
        )
    _print_deployment(d)
    newest = max(d["versions"], key=lambda v: v["version"])
    if newest["state"] != "ready":
        raise typer.Exit(1)


deployment_app = typer.Typer(
    help="Deployments: list, show, set-default, rollback, delete (create: kiln deploy).", no_args_is_help=True
)


app.add_typer(deployment_app, name="deployment")


@deployment_app.command("list")
def deployment_list(server: str | None = SERVER, token: str | None = TOKEN) -> None:
    """List deployments."""
    with remote(server, token) as client:
        items = client.deployments()
    table = Table()
    for col in ("name", "state", "default version", "versions", "candidate"):
        table.add_column(col)
    for d in items:
        default = next((v for v in d["versions"] if v["default"]), None)
        table.add_row(
            d["name"],
            d["state"],
            str(d["default_version"] or ""),
            str(len(d["versions"])),
            default["candidate_name"] if default else "",
        )
    out.print(table)


@deployment_app.command("show")
def deployment_show(name: str, server: str | None = SERVER, token: str | None = TOKEN) -> None:
    """A deployment's versions."""
    with remote(server, token) as client:
        _print_deployment(client.deployment(name))


@deployment_app.command("set-default")
def deployment_set_default(name: str, version: int, server: str | None = SERVER, token: str | None = TOKEN) -> None:
    """Serve this version by default."""
    with remote(server, token) as client:
        _print_deployment(client.set_default(name, version))


@deployment_app.command("rollback")
def deployment_rollback(name: str, server: str | None = SERVER, token: str | None = TOKEN) -> None:
    """Make the previous version the default."""
    with remote(server, token) as client:
        _print_deployment(client.rollback(name))


@deployment_app.command("delete")
def deployment_delete(name: str, server: str | None = SERVER, token: str | None = TOKEN) -> None:
    """Stop serving a deployment (all its versions)."""
    with remote(server, token) as client:
        client.delete_deployment(name)
    out.print(f"deleted deployment {name}", highlight=False)


def read_tensors(path: Path, metadata: dict) -> dict:
    """Named arrays from a .npy (the only input), .npz (keys are input names) or JSON file
    ({"input": nested list} or a /v2 request body), cast to the deployment's datatypes."""
    import json

    import numpy as np

    from service.serving.protocol import V2_TO_DTYPE

    wanted = {i["name"]: V2_TO_DTYPE.get(i["datatype"], "float32") for i in metadata["inputs"]}
    if not path.is_file():
        raise BadRequest(f"input file {path} does not exist")
    try:
        if path.suffix == ".npy":
            if len(wanted) != 1:
                raise BadRequest(
                    f"{path.name} holds one array but {metadata['name']} takes "
                    f"{len(wanted)} inputs ({', '.join(wanted)}); give an .npz or JSON with each by name"
                )
            arrays = {next(iter(wanted)): np.load(path, allow_pickle=False)}
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        elif path.suffix == ".json":
            doc = json.loads(path.read_text())
            if isinstance(doc, dict) and isinstance(doc.get("inputs"), list):
                arrays = {i["name"]: np.asarray(i["data"]).reshape(i["shape"]) for i in doc["inputs"]}
            elif isinstance(doc, dict):
                arrays = {k: np.asarray(v) for k, v in doc.items()}
            elif len(wanted) == 1:
                arrays = {next(iter(wanted)): np.asarray(doc)}
            else:
                raise BadRequest(f"{path.name}: give an object with one entry per input ({', '.join(wanted)})")
        else:
            raise BadRequest(f"{path.name}: inputs are read from .npy, .npz or .json files")
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise BadRequest(f"{path.name} cannot be read as tensors: {exc}") from None
    unknown, missing = set(arrays) - set(wanted), set(wanted) - set(arrays)
    if unknown or missing:
        raise BadRequest(
            f"{path.name} has {', '.join(sorted(arrays))} but {metadata['name']} takes {', '.join(wanted)}"
        )
    return {k: arrays[k].astype(wanted[k], copy=False) for k in wanted}


@app.command()
def infer(
    name: str = typer.Argument(..., help="Deployment name"),
    inputs: Path = typer.Argument(..., metavar="INPUTS", help="A .npy (one input), .npz or .json file"),
    version: int | None = typer.Option(None, help="Version (default: the deployment's default)"),
    output_file: Path | None = typer.Option(None, "--out", help="Write the outputs to this .npz"),
    server: str | None = SERVER,
    token: str | None = TOKEN,
) -> None:
    """Send inputs to a deployment and print its outputs."""
    import numpy as np

    with remote(server, token) as client:
        outputs = client.infer(name, read_tensors(inputs, client.metadata(name)), version=version)
    if output_file:
        np.savez(output_file, **outputs)
        out.print(f"wrote {output_file}", highlight=False)
        return
    with np.printoptions(precision=6, threshold=200, edgeitems=4, linewidth=120):
        for key, value in outputs.items():
            print(f"{key} {value.dtype.name}{list(value.shape)}:\n{value}")
