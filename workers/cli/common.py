"""What the `kiln` commands share: the consoles, the --server/--token options, errors as exit
codes, and how jobs and conversions are printed."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from service.errors import BadRequest, KilnError

if TYPE_CHECKING:
    from service.client import KilnClient

app = typer.Typer(
    help="Kiln: convert PyTorch models into fast, validated inference artifacts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
console = Console(stderr=True)


out = Console(width=None if Console().is_terminal else 160)


SERVER = typer.Option(
    None,
    "--server",
    envvar="KILN_SERVER",
    show_envvar=True,
    help="Kiln server URL (default: the newest `kiln up` of this user, else http://127.0.0.1:8000)",
)


TOKEN = typer.Option(
    None,
    "--token",
    envvar="KILN_TOKEN",
    show_envvar=True,
    help="API token (default: the admin token of a `kiln up` on this machine, wherever its data is)",
)


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def _fail(exc: KilnError) -> None:
    console.print("[red]error:[/red] ", end="")
    console.print(exc.detail, markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(2 if isinstance(exc, BadRequest) else 1)


def _client(server: str | None, token: str | None = None):
    from service.client import KilnClient

    return KilnClient(server, token)


@contextmanager
def remote(server: str | None, token: str | None = None) -> Iterator[KilnClient]:
    """A client of the server for the block; a KilnError raised in the block (or opening the
    client) ends the command through `_fail`: its one line on stderr, exit 2 for a bad request
    and 1 otherwise."""
    try:
        with _client(server, token) as client:
            yield client
    except KilnError as exc:
        _fail(exc)


def _signature_arg(
    signature: Path | None,
    input: list[str] | None,  # noqa: A002 - as the --input flag
    output: list[str] | None,
    dim: list[str] | None,
):
    from service.signature import Signature, parse_dim_range, parse_tensor_spec

    if signature and input:
        raise BadRequest("give either --signature or --input, not both")
    if signature:
        return Signature.from_file(signature)
    if input:
        return Signature.parse(
            {
                "inputs": [parse_tensor_spec(i) for i in input],
                "outputs": [{"name": o} for o in output or []],
                "dims": dict(parse_dim_range(d) for d in dim or []),
            }
        )
    return None


EXPORTER_HELP = (
    "ONNX exporters to try, in order, comma-separated (default: dynamo:eager,dynamo:export,"
    "torchscript:script,torchscript:trace,torchscript:eager)"
)


def _job_options(target, precision, policy, threads, bench_seconds, onnx_exporter=None) -> dict:
    return {
        "targets": _split(target) or None,
        "precisions": _split(precision) or None,
        "onnx_exporters": _split(onnx_exporter) or None,
        "policy": policy,
        "threads": threads,
        "bench_seconds": bench_seconds,
    }


def _watch(client, job_id: str) -> dict:
    """A live progress display that follows the job's event stream; prints the job at the end."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("{task.fields[step]}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task(f"job {job_id}", total=1.0, step="")
        seen_steps: dict[str, str] = {}
        try:
            for event, data in client.events(job_id):
                if event == "job":
                    bar.update(task, completed=data["progress"], step=f"{data['status']} {data['current_step'] or ''}")
                    for st in data.get("steps", []):
                        if st["status"] in ("ok", "failed", "skipped") and seen_steps.get(st["name"]) != st["status"]:
                            seen_steps[st["name"]] = st["status"]
                            if st["status"] == "skipped" and (st.get("error") or "").startswith("needs "):
                                continue  # after a failed step: its failure is the one line that matters
                            note = f" - {st['error']}" if st.get("error") else ""
                            bar.console.print(
                                f"  {st['name']:<9} {MARKS_PLAIN.get(st['status'], st['status'])} "
                                f"({st['duration_s'] or 0:.1f}s){note}",
                                markup=False,
                                highlight=False,
                            )
                elif event == "end":
                    break
        except KilnError:
            pass  # the stream dropped: fall back to waiting below
    job = client.wait(job_id)
    _print_job(job)
    return job


MARKS_PLAIN = {"ok": "ok", "failed": "FAILED", "skipped": "skipped"}


def _print_job(job: dict) -> None:
    from workers.benchmark import speedup_text
    from workers.report import DEGENERATE, conditions_line

    out.print(
        f"job {job['id']}: {job['status']} ({job['model']} v{job['version']}, "
        f"{job['duration_s'] or 0:.1f}s)" + (f" - {job['error']}" if job.get("error") else ""),
        highlight=False,
        markup=False,
    )
    for h in job.get("hazards") or []:
        out.print(f"hazard ({h['kind']}): {h['detail']}\n  -> {h['action']}", highlight=False, markup=False)
    if job["candidates"]:
        table = Table()
        for col in ("candidate", "id", "status", "max abs err", "cosine", "p50 b1 (ms)", "speed-up", "note"):
            table.add_column(col)
        selected = job.get("selected_candidate")
        for c in job["candidates"]:
            outs = list(((c.get("validation") or {}).get("outputs") or {}).values())
            status = c["status"] if c["status"] != "built" else ("pass" if c["passed"] else "FAIL")
            table.add_row(
                c["name"],
                c["id"],
                status,
                f"{max(o['max_abs'] for o in outs):.3g}" if outs else "",
                f"{min(o['cosine'] for o in outs):.6f}" if outs else "",
                f"{c['benchmark'][0]['p50_ms']:.3g}" if c["benchmark"] else "",
                speedup_text(c.get("speedup"), c.get("speedup_low"), c.get("speedup_high"), c.get("noisy", False)),
                "selected" if c["id"] == selected else (c.get("lost_because") or c.get("reason") or ""),
            )
        out.print(table)
    for name, why in (job.get("degenerate") or {}).items():
        out.print(f"warning ({name}): {why}: {DEGENERATE}", highlight=False, markup=False)
    if job.get("benchmark_conditions"):
        out.print(conditions_line(job["benchmark_conditions"]), highlight=False, markup=False)
    if job.get("selection"):
        out.print(
            f"selected {job['selection']['candidate']}: {job['selection']['reason']}", highlight=False, markup=False
        )


def _data_dir(path: Path | None) -> None:
    """--data-dir wins over KILN_DATA_DIR; child processes inherit it through the environment."""
    import os

    from service.config import get_settings

    if path is not None:
        os.environ["KILN_DATA_DIR"] = str(path.resolve())
        get_settings.cache_clear()
    # Everything the service writes (database, uploads, work directories, artifacts) is its user's
    # alone; boxes are given read access to what they bind (service/boundary.py).
    os.umask(0o077)
    data = get_settings().data_dir
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    if data.stat().st_uid == os.geteuid():
        data.chmod(0o700)


def print_summary(ctx) -> None:
    """The candidates table and the selection, on stdout."""
    from workers.benchmark import speedup_text
    from workers.report import conditions_line, degenerate_lines

    for h in ctx.hazards:
        out.print(f"[yellow]hazard ({h.kind}):[/yellow] {h.detail}\n  -> {h.action}", highlight=False)
    table = Table(title=f"Candidates ({ctx.out})")
    for col in ("candidate", "status", "max abs err", "cosine", "top-1", "p50 b1 (ms)", "speed-up", "note"):
        table.add_column(col)
    if ctx.eager_benchmark:
        table.add_row("eager PyTorch", "baseline", "", "", "", f"{ctx.eager_benchmark[0].p50_ms:.3g}", "1.00x", "")
    for c in ctx.candidates:
        v = c.validation
        outs = list(v.outputs.values()) if v else []
        top1 = [o.top1 for o in outs if o.top1 is not None]
        status = c.status if c.status != "built" else ("[green]pass[/green]" if c.passed else "[red]FAIL[/red]")
        selected = ctx.selection and ctx.selection.candidate == c.id
        table.add_row(
            c.id,
            status,
            f"{max(o.max_abs for o in outs):.3g}" if outs else "",
            f"{min(o.cosine for o in outs):.6f}" if outs else "",
            f"{min(top1):.3f}" if top1 else "",
            f"{c.benchmark[0].p50_ms:.3g}" if c.benchmark else "",
            speedup_text(c.speedup, c.speedup_low, c.speedup_high, c.noisy),
            "[bold]selected[/bold]" if selected else (c.lost_because or c.reason or ""),
        )
    if ctx.candidates:  # an empty table after a failed load says nothing
        out.print(table)
    for name, line in degenerate_lines(ctx.model_dump()):
        out.print(f"warning ({name}): {line}", highlight=False, markup=False)
    if ctx.benchmark_conditions:
        out.print(conditions_line(ctx.benchmark_conditions), highlight=False, markup=False)
    if ctx.selection and ctx.selection.candidate:
        out.print(f"selected [bold]{ctx.selection.candidate}[/bold]: {ctx.selection.reason}", highlight=False)
    out.print(f"report: {ctx.out / 'report.json'}", highlight=False)
