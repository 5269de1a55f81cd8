"""`kiln convert`: a conversion on this machine, or on a server with --remote."""

from __future__ import annotations

from pathlib import Path

import typer

from service.errors import BadRequest, KilnError
from service.options import TARGETS
from workers.cli.common import (
    EXPORTER_HELP,
    TOKEN,
    _client,
    _fail,
    _job_options,
    _signature_arg,
    _split,
    _watch,
    app,
    console,
    out,
    print_summary,
)


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
    target: list[str] | None = typer.Option(None, help=f"Targets, comma-separated: {','.join(TARGETS)}"),
    precision: list[str] | None = typer.Option(None, help="Precisions, comma-separated: fp32,fp16,bf16,int8"),
    policy: str = typer.Option("latency", help="Selection policy: latency, throughput or accuracy"),
    threads: int | None = typer.Option(None, help="Threads for runtimes and benchmarks (default: all cores)"),
    bench_seconds: float = typer.Option(1.0, help="Seconds of timing per benchmark point"),
    onnx_exporter: list[str] | None = typer.Option(None, help=EXPORTER_HELP),
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
            name or bundle.resolve().name.split(".")[0],  # `kiln convert . --remote` is named after the folder
            entry,
            weights,
            samples,
            signature,
            input,
            output,
            dim,
            _job_options(target, precision, policy, threads, bench_seconds, onnx_exporter),
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
        if onnx_exporter:
            opts["onnx_exporters"] = _split(onnx_exporter)
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
