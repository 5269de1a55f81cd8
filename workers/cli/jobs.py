"""`kiln job ...`: conversion jobs on a server."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from workers.cli.common import (
    EXPORTER_HELP,
    SERVER,
    TOKEN,
    _job_options,
    _print_job,
    _watch,
    app,
    out,
    remote,
)

job_app = typer.Typer(
    help="Conversion jobs on a Kiln server: create, list, show, watch, cancel, retry.", no_args_is_help=True
)


app.add_typer(job_app, name="job")


@job_app.command("create")
def job_create(
    model: str = typer.Option(..., help="Model name"),
    version: int | None = typer.Option(None, help="Version (default: the newest)"),
    target: list[str] | None = typer.Option(None, help="Targets, comma-separated"),
    precision: list[str] | None = typer.Option(None, help="Precisions, comma-separated"),
    policy: str | None = typer.Option(None, help="latency, throughput or accuracy"),
    threads: int | None = typer.Option(None, help="Threads for runtimes and benchmarks"),
    bench_seconds: float | None = typer.Option(None, help="Seconds of timing per benchmark point"),
    onnx_exporter: list[str] | None = typer.Option(None, help=EXPORTER_HELP),
    watch: bool = typer.Option(False, "--watch", help="Follow the job until it ends"),
    server: str | None = SERVER,
    token: str | None = TOKEN,
) -> None:
    """Start a conversion job on a pushed model."""
    with remote(server, token) as client:
        job = client.create_job(
            model, version=version, **_job_options(target, precision, policy, threads, bench_seconds, onnx_exporter)
        )
        out.print(f"job {job['id']} {job['status']} ({model} v{job['version']})", highlight=False)
        if job.get("waiting"):  # e.g. a GPU target and no GPU worker online
            out.print(job["waiting"], highlight=False, markup=False, soft_wrap=True)
        if watch:
            job = _watch(client, job["id"])
    if watch and job["status"] != "succeeded":
        raise typer.Exit(1)


@job_app.command("list")
def job_list(
    status: str | None = typer.Option(None, help="Filter by status"),
    model: str | None = typer.Option(None, help="Filter by model name"),
    limit: int = typer.Option(20, help="How many"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the ids, one a line"),
    server: str | None = SERVER,
    token: str | None = TOKEN,
) -> None:
    """List jobs, newest first."""
    with remote(server, token) as client:
        items = client.jobs(status=status, model=model, limit=limit)
    if quiet:
        for j in items:
            print(j["id"])
        return
    table = Table()
    for col in ("id", "model", "status", "progress", "step", "targets", "precisions", "created"):
        table.add_column(col)
    for j in items:
        table.add_row(
            j["id"],
            f"{j['model']} v{j['version']}",
            j["status"],
            f"{j['progress']:.0%}",
            j["current_step"] or "",
            ",".join(j["targets"]),
            ",".join(j["precisions"]),
            j["created_at"][:19],
        )
    out.print(table)


@job_app.command("show")
def job_show(job_id: str, server: str | None = SERVER, token: str | None = TOKEN) -> None:
    """A job's steps, candidates and selection."""
    with remote(server, token) as client:
        _print_job(client.job(job_id))


@job_app.command("watch")
def job_watch(job_id: str, server: str | None = SERVER, token: str | None = TOKEN) -> None:
    """Follow a job's progress live until it ends."""
    with remote(server, token) as client:
        job = _watch(client, job_id)
    if job["status"] != "succeeded":
        raise typer.Exit(1)


@job_app.command("cancel")
def job_cancel(job_id: str, server: str | None = SERVER, token: str | None = TOKEN) -> None:
    """Cancel a queued or running job."""
    with remote(server, token) as client:
        job = client.cancel(job_id)
    out.print(f"job {job_id}: {'canceled' if job['status'] == 'canceled' else 'cancel requested'}", highlight=False)


@job_app.command("retry")
def job_retry(
    job_id: str,
    watch: bool = typer.Option(False, "--watch", help="Follow the new attempt"),
    server: str | None = SERVER,
    token: str | None = TOKEN,
) -> None:
    """Start a new attempt of a failed or canceled job."""
    with remote(server, token) as client:
        job = client.retry(job_id)
        out.print(f"job {job['id']} queued (retry of {job_id})", highlight=False)
        if watch:
            job = _watch(client, job["id"])
    if watch and job["status"] != "succeeded":
        raise typer.Exit(1)


@job_app.command("report")
def job_report(
    job_id: str,
    output_file: Path | None = typer.Option(None, "--out", help="Write the JSON here"),
    server: str | None = SERVER,
    token: str | None = TOKEN,
) -> None:
    """The job's full report (JSON)."""
    import json

    with remote(server, token) as client:
        report = client.report(job_id)
    text = json.dumps(report, indent=2)
    if output_file:
        output_file.write_text(text)
        out.print(f"wrote {output_file}", highlight=False)
    else:
        print(text)


@job_app.command("logs")
def job_logs(job_id: str, server: str | None = SERVER, token: str | None = TOKEN) -> None:
    """The job's log."""
    with remote(server, token) as client:
        print(client.logs(job_id), end="")
