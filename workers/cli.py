"""The `kiln` command: parses arguments and calls one library function per command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from service.errors import BadRequest, KilnError

app = typer.Typer(help="Kiln: convert PyTorch models into fast, validated inference artifacts.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console(stderr=True)
out = Console(width=None if Console().is_terminal else 160)


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
    bundle: Path = typer.Argument(..., help="A .py file, a .zip/.tar.gz bundle, a TorchScript .pt, a .pt2 or an .onnx"),
    entry: Optional[str] = typer.Option(None, help="Entry point that builds the model, e.g. model.py:build_model"),
    weights: Optional[Path] = typer.Option(None, help="Weights: .safetensors or a state-dict .pt"),
    signature: Optional[Path] = typer.Option(None, help="Signature file (YAML or JSON)"),
    input: Optional[list[str]] = typer.Option(None, "--input", help="Input spec, e.g. 'x:float32[batch,3,224,224]' (repeatable)"),
    output: Optional[list[str]] = typer.Option(None, "--output", help="Output name (repeatable)"),
    dim: Optional[list[str]] = typer.Option(None, "--dim", help="Dynamic dimension range, e.g. batch=1:8:32 (repeatable)"),
    samples: Optional[Path] = typer.Option(None, help="Sample inputs (.npz) for validation and int8 calibration"),
    target: Optional[list[str]] = typer.Option(None, help="Targets, comma-separated: onnxruntime,torchscript,tensorrt"),
    precision: Optional[list[str]] = typer.Option(None, help="Precisions, comma-separated: fp32,fp16,bf16,int8"),
    policy: str = typer.Option("latency", help="Selection policy: latency, throughput or accuracy"),
    threads: Optional[int] = typer.Option(None, help="Threads for runtimes and benchmarks (default: all cores)"),
    bench_seconds: float = typer.Option(1.0, help="Seconds of timing per benchmark point"),
    out_dir: Path = typer.Option(Path("kiln-out"), "--out", help="Directory for report.json and the artifacts"),
) -> None:
    """Convert a model on this machine: capture, export, compile, validate, benchmark, select."""
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
            sig = Signature.parse({"inputs": [parse_tensor_spec(i) for i in input],
                                   "outputs": [{"name": o} for o in output or []],
                                   "dims": dict(parse_dim_range(d) for d in dim or [])})
        for label, path in (("bundle", bundle), ("weights", weights), ("samples", samples)):
            if path is not None and not path.is_file():
                raise BadRequest(f"{label} file {path} does not exist")
        ctx = engine.prepare(bundle, out_dir, entry=entry, weights=weights, samples=samples, signature=sig,
                             options=options)
        with ConsoleEvents(console) as events:
            ctx = engine.run(ctx, events=events)
    except KilnError as exc:
        _fail(exc)
        return
    print_summary(ctx)
    if not (ctx.selection and ctx.selection.candidate):
        failed = next((s for s in ctx.steps if s.status == "failed"), None)
        console.print("[red]no candidate passed[/red]", end="")
        console.print(f": {failed.error}" if failed and failed.error else "", markup=False, highlight=False)
        raise typer.Exit(1)


def print_summary(ctx) -> None:
    """The candidates table and the selection, on stdout."""
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
        table.add_row(c.id, status,
                      f"{max(o.max_abs for o in outs):.3g}" if outs else "",
                      f"{min(o.cosine for o in outs):.6f}" if outs else "",
                      f"{min(top1):.3f}" if top1 else "",
                      f"{c.benchmark[0].p50_ms:.3g}" if c.benchmark else "",
                      f"{c.speedup:.2f}x" if c.speedup else "",
                      "[bold]selected[/bold]" if selected else (c.lost_because or c.reason or ""))
    out.print(table)
    if ctx.selection and ctx.selection.candidate:
        out.print(f"selected [bold]{ctx.selection.candidate}[/bold]: {ctx.selection.reason}", highlight=False)
    out.print(f"report: {ctx.out / 'report.json'}", highlight=False)


def main() -> None:  # pragma: no cover - console script entry
    app(prog_name="kiln")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
