"""`kiln api`, `kiln worker`, `kiln up`: the service's processes."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from service.errors import KilnError
from workers.cli.common import (
    _data_dir,
    _fail,
    _split,
    app,
    console,
)


@app.command()
def api(
    host: str = typer.Option("127.0.0.1", help="Address to listen on"),
    port: int = typer.Option(8000, help="Port to listen on"),
    data_dir: Path | None = typer.Option(None, help="Data directory (default: KILN_DATA_DIR or .kiln)"),
) -> None:
    """Start the API alone (for many machines)."""
    from workers import serve

    _data_dir(data_dir)
    serve.configure_logging("api")
    try:
        serve.check_exposure(host)
    except KilnError as exc:
        _fail(exc)
    serve.run_api(host, port)


@app.command()
def worker(
    queues: str = typer.Option("cpu,gpu", help="Queues to take work from: cpu, gpu or both"),
    concurrency: int = typer.Option(1, help="Jobs at once (each uses every core it is given)"),
    name: str | None = typer.Option(None, help="Celery node name"),
    data_dir: Path | None = typer.Option(None, help="Data directory (default: KILN_DATA_DIR or .kiln)"),
) -> None:
    """Start a conversion worker alone (for many machines)."""
    from service.queue import QUEUES
    from workers import serve

    chosen = _split([queues])
    unknown = [q for q in chosen if q not in QUEUES]
    if unknown or not chosen:
        console.print(f"[red]error:[/red] unknown queue(s) {', '.join(unknown) or '(none)'}; use cpu, gpu or cpu,gpu")
        raise typer.Exit(2)
    from workers.compilers.gpu import cuda_device

    if "gpu" in chosen and cuda_device() is None:
        # A GPU job taken here could only fail: leave it queued (it says why) for a worker with a GPU.
        if chosen == ["gpu"]:
            console.print(
                "[red]error:[/red] no CUDA device on this machine: a worker for the gpu queue needs one "
                "(use --queues cpu here)",
                highlight=False,
            )
            raise typer.Exit(2)
        chosen = [q for q in chosen if q != "gpu"]
        console.print(
            "no CUDA device on this machine: taking only the cpu queue (GPU jobs wait for a GPU worker)",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    _data_dir(data_dir)
    serve.configure_logging("worker")
    serve.run_worker(chosen, concurrency, name)


@app.command()
def up(
    host: str = typer.Option("127.0.0.1", help="Address to listen on"),
    port: int = typer.Option(8000, help="Port to listen on"),
    data_dir: Path | None = typer.Option(None, help="Data directory (default: KILN_DATA_DIR or .kiln)"),
    concurrency: int = typer.Option(1, help="Conversion jobs at once"),
    open_: bool = typer.Option(False, "--open", help="No authentication (only on a loopback address)"),
) -> None:
    """Start Kiln on this machine: the API and a worker, SQLite and local artifacts, no Redis needed."""
    import os

    from service.config import get_settings
    from service.db import migrate
    from workers import serve

    if open_:
        if not serve.is_loopback(host):
            console.print(
                f"[red]error:[/red] --open runs without authentication, so only on a loopback address (not {host})"
            )
            raise typer.Exit(2)
        os.environ["KILN_AUTH"] = "false"
    _data_dir(data_dir)
    try:
        serve.check_exposure(host)
    except KilnError as exc:
        _fail(exc)
    serve.configure_logging("up")
    settings = get_settings()
    migrate()
    supervisor = serve.Supervisor(["cpu", "gpu"], concurrency)
    supervisor.start()
    # One field a line, never wrapped inside one (a path or a URL is copied from here).
    console.print(
        f"Kiln on http://{host}:{port}\n  data:     {settings.data_dir.resolve()}\n"
        f"  database: {settings.database_url.split('@')[-1]}\n  broker:   {settings.broker_url.split('@')[-1]}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    if settings.auth:
        from service.auth import ADMIN_TOKEN_FILE, bootstrap
        from service.db import session_scope

        with session_scope() as session:
            token = bootstrap(session, settings.data_dir)
        where = settings.data_dir.resolve() / ADMIN_TOKEN_FILE
        if token and sys.stdout.isatty():
            console.print(
                f"admin token: {token}\n  saved in {where} (only you can read it); the kiln CLI on this "
                "machine uses it; elsewhere pass --token or set KILN_TOKEN, or send "
                "'Authorization: Bearer <token>'",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
        elif token:  # output that is not a terminal may be a log file others can read: no token in it
            console.print(
                f"created the admin token and saved it in {where} (only you can read it); the kiln "
                "CLI on this machine uses it",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
        else:
            console.print(
                f"authentication is on; the admin token is in {where}", highlight=False, markup=False, soft_wrap=True
            )
    from service import local

    url = local.client_url(host, port)
    local.record(url, settings.data_dir)  # so that the kiln CLI of this user finds it and its token
    try:
        serve.run_api(host, port)
    finally:
        local.forget(url)
        supervisor.stop()
