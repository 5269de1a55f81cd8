"""The `kiln` command: parses arguments and calls one library function per command."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from service.errors import BadRequest, KilnError

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


@app.callback()
def _root() -> None:
    """Kiln: convert PyTorch models into fast, validated inference artifacts."""


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def _fail(exc: KilnError) -> None:
    console.print("[red]error:[/red] ", end="")
    console.print(exc.detail, markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(2 if isinstance(exc, BadRequest) else 1)


@app.command()
def convert(
    bundle: Path = typer.Argument(
        ..., metavar="BUNDLE", help="A .py file, a folder, a .zip/.tar.gz bundle, a TorchScript .pt, a .pt2 or an .onnx"
    ),
    entry: str | None = typer.Option(None, help="Entry point that builds the model, e.g. model.py:build_model"),
    weights: Path | None = typer.Option(None, help="Weights: .safetensors or a state-dict .pt"),
    signature: Path | None = typer.Option(None, help="Signature file (YAML or JSON)"),
    input: list[str] | None = typer.Option(  # noqa: A002 - as the --input flag
        None, "--input", help="Input spec, e.g. 'x:float32[batch,3,224,224]' (repeatable)"
    ),
    output: list[str] | None = typer.Option(None, "--output", help="Output name (repeatable)"),
    dim: list[str] | None = typer.Option(None, "--dim", help="Dynamic dimension range, e.g. batch=1:8:32 (repeatable)"),
    samples: Path | None = typer.Option(None, help="Sample inputs (.npz) for validation and int8 calibration"),
    target: list[str] | None = typer.Option(None, help="Targets, comma-separated: onnxruntime,torchscript,tensorrt"),
    precision: list[str] | None = typer.Option(None, help="Precisions, comma-separated: fp32,fp16,bf16,int8"),
    policy: str = typer.Option("latency", help="Selection policy: latency, throughput or accuracy"),
    threads: int | None = typer.Option(None, help="Threads for runtimes and benchmarks (default: all cores)"),
    bench_seconds: float = typer.Option(1.0, help="Seconds of timing per benchmark point"),
    out_dir: Path = typer.Option(Path("kiln-out"), "--out", help="Directory for report.json and the artifacts"),
    remote: str | None = typer.Option(None, "--remote", help="Convert on this Kiln server instead of locally"),
    name: str | None = typer.Option(None, help="Model name on the server (--remote; default: the file's stem)"),
    token: str | None = TOKEN,
) -> None:
    """Convert a model: capture, export, compile, validate, benchmark, select (locally, or on a server)."""
    if remote:
        _convert_remote(
            remote,
            token,
            bundle,
            name or bundle.name.split(".")[0],
            entry,
            weights,
            samples,
            signature,
            input,
            output,
            dim,
            _job_options(target, precision, policy, threads, bench_seconds),
            out_dir,
        )
        return
    from service.options import ConversionOptions
    from service.signature import Signature, parse_dim_range, parse_tensor_spec
    from workers import engine
    from workers.progress import ConsoleEvents

    try:
        opts = {"policy": policy, "bench_seconds": bench_seconds}
        if target:
            opts["targets"] = _split(target)
        if precision:
            opts["precisions"] = _split(precision)
        if threads:
            opts["threads"] = threads
        options = ConversionOptions.parse(opts)
        sig = None
        if signature and input:
            raise BadRequest("give either --signature or --input, not both")
        if signature:
            sig = Signature.from_file(signature)
        elif input:
            sig = Signature.parse(
                {
                    "inputs": [parse_tensor_spec(i) for i in input],
                    "outputs": [{"name": o} for o in output or []],
                    "dims": dict(parse_dim_range(d) for d in dim or []),
                }
            )
        if not bundle.exists():
            raise BadRequest(f"bundle {bundle} does not exist")
        for label, path in (("weights", weights), ("samples", samples)):
            if path is not None and not path.is_file():
                raise BadRequest(f"{label} file {path} does not exist")
        ctx = engine.prepare(
            bundle, out_dir, entry=entry, weights=weights, samples=samples, signature=sig, options=options
        )
        with ConsoleEvents(console) as events:
            ctx = engine.run(ctx, events=events)
    except KilnError as exc:
        _fail(exc)
        return
    print_summary(ctx)
    if not (ctx.selection and ctx.selection.candidate):
        failed = next((s for s in ctx.steps if s.status == "failed"), None)
        console.print("[red]no candidate passed[/red]", end="")
        console.print(
            f": {failed.error}" if failed and failed.error else "", markup=False, highlight=False, soft_wrap=True
        )
        raise typer.Exit(1)


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


# --- client side -------------------------------------------------------------------------------

job_app = typer.Typer(
    help="Conversion jobs on a Kiln server: create, list, show, watch, cancel, retry.", no_args_is_help=True
)
app.add_typer(job_app, name="job")


def _client(server: str | None, token: str | None = None):
    from service.client import KilnClient

    return KilnClient(server, token)


token_app = typer.Typer(help="API tokens: create, list, revoke.", no_args_is_help=True)
app.add_typer(token_app, name="token")


@token_app.command("create")
def token_create(
    name: str = typer.Option(..., help="What the token is for"),
    scope: list[str] = typer.Option(["infer"], help="infer, manage, admin or metrics (repeatable)"),
    owner: str | None = typer.Option(None, help="Team (an admin may name another)"),
    server: str | None = SERVER,
    token: str | None = TOKEN,
) -> None:
    """Create a token; it is printed once and stored only as a hash."""
    try:
        with _client(server, token) as client:
            t = client.create_token(name, _split(scope), owner)
    except KilnError as exc:
        _fail(exc)
        return
    out.print(f"token {t['id']} for {t['owner']} ({', '.join(t['scopes'])}):", highlight=False)
    print(t["token"])


@token_app.command("list")
def token_list(server: str | None = SERVER, token: str | None = TOKEN) -> None:
    """List tokens (never their secrets)."""
    try:
        with _client(server, token) as client:
            items = client.tokens()
    except KilnError as exc:
        _fail(exc)
        return
    table = Table()
    for col in ("id", "name", "owner", "prefix", "scopes", "created", "last used", "revoked"):
        table.add_column(col)
    for t in items:
        table.add_row(
            t["id"],
            t["name"],
            t["owner"],
            t["prefix"] + "...",
            ",".join(t["scopes"]),
            t["created_at"][:19],
            (t["last_used_at"] or "")[:19],
            (t["revoked_at"] or "")[:19],
        )
    out.print(table)


@token_app.command("revoke")
def token_revoke(token_id: str, server: str | None = SERVER, token: str | None = TOKEN) -> None:
    """Revoke a token (it stops working within seconds on every server)."""
    try:
        with _client(server, token) as client:
            client.revoke_token(token_id)
    except KilnError as exc:
        _fail(exc)
        return
    out.print(f"revoked {token_id}", highlight=False)


@token_app.command("admin")
def token_admin(server: str | None = SERVER) -> None:
    """Print the admin token of the `kiln up` on this machine (for curl: -H "Authorization: Bearer ...")."""
    from service.client import local_admin_token
    from service.local import default_server

    found = local_admin_token(server or default_server())
    if not found:
        console.print(
            "[red]error:[/red] no admin token here: no `kiln up` of this user is running with "
            "authentication on, and there is no .kiln/admin-token (KILN_DATA_DIR) in this directory",
            highlight=False,
        )
        raise typer.Exit(1)
    print(found)


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


def _job_options(target, precision, policy, threads, bench_seconds) -> dict:
    return {
        "targets": _split(target) or None,
        "precisions": _split(precision) or None,
        "policy": policy,
        "threads": threads,
        "bench_seconds": bench_seconds,
    }


@job_app.command("create")
def job_create(
    model: str = typer.Option(..., help="Model name"),
    version: int | None = typer.Option(None, help="Version (default: the newest)"),
    target: list[str] | None = typer.Option(None, help="Targets, comma-separated"),
    precision: list[str] | None = typer.Option(None, help="Precisions, comma-separated"),
    policy: str | None = typer.Option(None, help="latency, throughput or accuracy"),
    threads: int | None = typer.Option(None, help="Threads for runtimes and benchmarks"),
    bench_seconds: float | None = typer.Option(None, help="Seconds of timing per benchmark point"),
    watch: bool = typer.Option(False, "--watch", help="Follow the job until it ends"),
    server: str | None = SERVER,
    token: str | None = TOKEN,
) -> None:
    """Start a conversion job on a pushed model."""
    try:
        with _client(server, token) as client:
            job = client.create_job(
                model, version=version, **_job_options(target, precision, policy, threads, bench_seconds)
            )
            out.print(f"job {job['id']} {job['status']} ({model} v{job['version']})", highlight=False)
            if job.get("waiting"):  # e.g. a GPU target and no GPU worker online
                out.print(job["waiting"], highlight=False, markup=False, soft_wrap=True)
            if watch:
                job = _watch(client, job["id"])
    except KilnError as exc:
        _fail(exc)
        return
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
    try:
        with _client(server, token) as client:
            items = client.jobs(status=status, model=model, limit=limit)
    except KilnError as exc:
        _fail(exc)
        return
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
    try:
        with _client(server, token) as client:
            _print_job(client.job(job_id))
    except KilnError as exc:
        _fail(exc)


@job_app.command("watch")
def job_watch(job_id: str, server: str | None = SERVER, token: str | None = TOKEN) -> None:
    """Follow a job's progress live until it ends."""
    try:
        with _client(server, token) as client:
            job = _watch(client, job_id)
    except KilnError as exc:
        _fail(exc)
        return
    if job["status"] != "succeeded":
        raise typer.Exit(1)


@job_app.command("cancel")
def job_cancel(job_id: str, server: str | None = SERVER, token: str | None = TOKEN) -> None:
    """Cancel a queued or running job."""
    try:
        with _client(server, token) as client:
            job = client.cancel(job_id)
    except KilnError as exc:
        _fail(exc)
        return
    out.print(f"job {job_id}: {'canceled' if job['status'] == 'canceled' else 'cancel requested'}", highlight=False)


@job_app.command("retry")
def job_retry(
    job_id: str,
    watch: bool = typer.Option(False, "--watch", help="Follow the new attempt"),
    server: str | None = SERVER,
    token: str | None = TOKEN,
) -> None:
    """Start a new attempt of a failed or canceled job."""
    try:
        with _client(server, token) as client:
            job = client.retry(job_id)
            out.print(f"job {job['id']} queued (retry of {job_id})", highlight=False)
            if watch:
                job = _watch(client, job["id"])
    except KilnError as exc:
        _fail(exc)
        return
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

    try:
        with _client(server, token) as client:
            report = client.report(job_id)
    except KilnError as exc:
        _fail(exc)
        return
    text = json.dumps(report, indent=2)
    if output_file:
        output_file.write_text(text)
        out.print(f"wrote {output_file}", highlight=False)
    else:
        print(text)


@job_app.command("logs")
def job_logs(job_id: str, server: str | None = SERVER, token: str | None = TOKEN) -> None:
    """The job's log."""
    try:
        with _client(server, token) as client:
            print(client.logs(job_id), end="")
    except KilnError as exc:
        _fail(exc)


# --- models, deployments, inference ---------------------------------------------------------------

model_app = typer.Typer(help="Models on a Kiln server: push, list, show, delete.", no_args_is_help=True)
app.add_typer(model_app, name="model")
model_app.command("push")(push)


@model_app.command("list")
def model_list(server: str | None = SERVER, token: str | None = TOKEN) -> None:
    """List models and their newest version."""
    try:
        with _client(server, token) as client:
            items = client.models()
    except KilnError as exc:
        _fail(exc)
        return
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

    try:
        with _client(server, token) as client:
            print(json.dumps(client.model(name), indent=2))
    except KilnError as exc:
        _fail(exc)


@model_app.command("delete")
def model_delete(
    name: str,
    version: int = typer.Option(..., help="The version to delete"),
    server: str | None = SERVER,
    token: str | None = TOKEN,
) -> None:
    """Delete a version of a model that no deployment uses."""
    try:
        with _client(server, token) as client:
            client.delete_version(name, version)
    except KilnError as exc:
        _fail(exc)
        return
    out.print(f"deleted {name} version {version}", highlight=False)


deployment_app = typer.Typer(
    help="Deployments: list, show, set-default, rollback, delete (create: kiln deploy).", no_args_is_help=True
)
app.add_typer(deployment_app, name="deployment")


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
    instances: int | None = typer.Option(None, help="Runtime instances run in parallel"),
    threads: int | None = typer.Option(None, help="Threads per runtime instance"),
    server: str | None = SERVER,
    token: str | None = TOKEN,
) -> None:
    """Serve a job's winner (or a candidate) as a new version of a deployment, and make it the default."""
    if (job is None) == (candidate is None):
        _fail(BadRequest("give --job JOB_ID or --candidate CANDIDATE_ID (one of them)"))
    try:
        with _client(server, token) as client:
            d = client.deploy(
                name,
                job=job,
                candidate=candidate,
                force=force,
                max_batch_size=max_batch_size,
                max_queue_delay_ms=max_queue_delay_ms,
                instances=instances,
                threads=threads,
            )
    except KilnError as exc:
        _fail(exc)
        return
    _print_deployment(d)
    newest = max(d["versions"], key=lambda v: v["version"])
    if newest["state"] != "ready":
        raise typer.Exit(1)


@deployment_app.command("list")
def deployment_list(server: str | None = SERVER, token: str | None = TOKEN) -> None:
    """List deployments."""
    try:
        with _client(server, token) as client:
            items = client.deployments()
    except KilnError as exc:
        _fail(exc)
        return
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
    try:
        with _client(server, token) as client:
            _print_deployment(client.deployment(name))
    except KilnError as exc:
        _fail(exc)


@deployment_app.command("set-default")
def deployment_set_default(name: str, version: int, server: str | None = SERVER, token: str | None = TOKEN) -> None:
    """Serve this version by default."""
    try:
        with _client(server, token) as client:
            _print_deployment(client.set_default(name, version))
    except KilnError as exc:
        _fail(exc)


@deployment_app.command("rollback")
def deployment_rollback(name: str, server: str | None = SERVER, token: str | None = TOKEN) -> None:
    """Make the previous version the default."""
    try:
        with _client(server, token) as client:
            _print_deployment(client.rollback(name))
    except KilnError as exc:
        _fail(exc)


@deployment_app.command("delete")
def deployment_delete(name: str, server: str | None = SERVER, token: str | None = TOKEN) -> None:
    """Stop serving a deployment (all its versions)."""
    try:
        with _client(server, token) as client:
            client.delete_deployment(name)
    except KilnError as exc:
        _fail(exc)
        return
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

    try:
        with _client(server, token) as client:
            outputs = client.infer(name, read_tensors(inputs, client.metadata(name)), version=version)
    except KilnError as exc:
        _fail(exc)
        return
    if output_file:
        np.savez(output_file, **outputs)
        out.print(f"wrote {output_file}", highlight=False)
        return
    with np.printoptions(precision=6, threshold=200, edgeitems=4, linewidth=120):
        for key, value in outputs.items():
            print(f"{key} {value.dtype.name}{list(value.shape)}:\n{value}")


def _convert_remote(
    server: str,
    token: str | None,
    bundle: Path,
    name: str,
    entry,
    weights,
    samples,
    signature,
    input,  # noqa: A002 - as the --input flag
    output,
    dim,
    options: dict,
    out_dir: Path,
) -> None:
    """push + job create + watch, then the report and the selected artifact into out_dir."""
    import json

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
            job = client.create_job(name, version=v["version"], **options)
            out.print(f"{name} v{v['version']}: job {job['id']}", highlight=False)
            job = _watch(client, job["id"])
            out_dir.mkdir(parents=True, exist_ok=True)
            if job["status"] in ("succeeded", "failed"):
                report = client.report(job["id"])
                (out_dir / "report.json").write_text(json.dumps(report, indent=2))
                from workers.report import SUMMARY_FILE, summary

                (out_dir / SUMMARY_FILE).write_text(summary(report))
            _download_candidates(client, job, out_dir)  # one folder per candidate, as a local run writes
            if job.get("selected_candidate"):
                path = client.download(job["selected_candidate"], out_dir)
                out.print(
                    f"report: {out_dir / 'report.json'}  summary: {out_dir / 'summary.md'}  artifact: {path}",
                    highlight=False,
                )
    except KilnError as exc:
        _fail(exc)
        return
    if job["status"] != "succeeded":
        raise typer.Exit(1)


def _download_candidates(client, job: dict, out_dir: Path) -> None:
    """Every built candidate of a job into out_dir/<candidate>/ (its model file and kiln-artifact.json)."""
    import shutil
    import tempfile

    from service.bundles import safe_extract

    for c in job.get("candidates") or []:
        if c["status"] != "built":
            continue
        with tempfile.TemporaryDirectory(prefix="kiln-get-") as tmp:
            archive = client.download(c["id"], Path(tmp) / "artifact.zip", zip=True)
            if (out_dir / c["name"]).exists():
                shutil.rmtree(out_dir / c["name"])
            safe_extract(archive, out_dir)  # its members are <candidate>/<file>


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


def main() -> None:  # pragma: no cover - console script entry
    app(prog_name="kiln")


if __name__ == "__main__":  # pragma: no cover
    main()
