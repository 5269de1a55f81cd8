"""Running sandbox ops for one conversion: its limits, its working directory, cancellation, samples."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from service import samples as sample_io
from service.config import get_settings
from service.errors import ConversionError
from workers.context import Context
from workers.pipeline import Canceled, StepLog
from workers.sandbox import Limits, run_op


def sandbox_dir(ctx: Context) -> Path:
    """The sandbox's working directory: the only place model code may write."""
    path = ctx.work / "sandbox"
    path.mkdir(parents=True, exist_ok=True)
    return path


def produced(ctx: Context, path: str) -> Path:
    """A file an op says it wrote, checked before the worker touches it: a plain file inside this
    conversion's sandbox directory, reached through no link. Op results come from the box and are as
    untrusted as the model (model code can write them), and the worker runs as root."""
    root = sandbox_dir(ctx).resolve()
    p = Path(str(path))
    try:
        plain = p.is_absolute() and p.resolve() == Path(os.path.normpath(p)) and stat.S_ISREG(os.lstat(p).st_mode)
    except OSError:
        plain = False
    if not plain or not p.resolve().is_relative_to(root):
        raise ConversionError(
            f"the sandbox reported a file that is not a plain file in its directory: {str(path)[:200]!r}"
        )
    return p


def limits(ctx: Context, readable: list[Path] | tuple[Path, ...] = ()) -> Limits:
    """The sandbox's limits. Model code sees this conversion's own working directory (read-only but
    for its sandbox directory) and nothing else of the host: not the data directory (database,
    tokens, other jobs), not the artifact store; `readable` adds paths it may read (built candidates)."""
    s = get_settings()
    memory = ctx.options.memory_limit_bytes or s.sandbox_memory_bytes
    return Limits(
        timeout_s=s.sandbox_timeout_s,
        memory_bytes=memory,
        disk_bytes=s.sandbox_disk_bytes,
        processes=s.sandbox_processes,
        cpus=s.sandbox_cpus,
        threads=ctx.options.threads or s.threads,
        readable=(ctx.work, *readable),
    )


def sandboxed(
    ctx: Context, op: str, args: dict[str, Any], log: StepLog, readable: list[Path] | tuple[Path, ...] = ()
) -> dict[str, Any]:
    """Run one op in the sandbox with the context's bundle and signature; raise on failure.
    `readable` are further paths the op may read. A cancel of the run
    (`log.canceled`) kills the op."""
    base = {
        "bundle": ctx.bundle.model_dump(),
        "signature": ctx.signature.to_json(),
        "samples_file": ctx.samples_file,
        "reference_file": ctx.reference_file,
        "sample_labels": ctx.sample_labels,
        "threads": ctx.options.threads or get_settings().threads,
    }
    result = run_op(op, {**base, **args}, sandbox_dir(ctx), limits=limits(ctx, readable), cancel=log.canceled)
    # the report says how model code was contained, loudly when it was not
    ctx.environment["isolation"] = "bubblewrap" if result.isolated else "NONE (KILN_INSECURE_NO_SANDBOX)"
    for note in result.notes:
        log.info(note)
    if result.outcome == "canceled":
        raise Canceled("the conversion was canceled")
    if not result.ok:
        tail = "\n".join(result.log.strip().splitlines()[-15:])
        if tail:
            log.info(tail)
    return result.raise_for_outcome()


def load_samples(ctx: Context) -> list[sample_io.Sample]:
    """The samples the load step wrote (user samples first, then the generated ones)."""
    if ctx.samples_file is None:
        raise ConversionError("no samples: the load step has not run")
    return sample_io.load(Path(ctx.samples_file))


def load_references(ctx: Context) -> list[sample_io.Sample]:
    """The eager model's outputs on those samples."""
    if ctx.reference_file is None:
        raise ConversionError("no reference outputs: the load step has not run")
    return sample_io.load(Path(ctx.reference_file))


def uploaded_model_file(ctx: Context) -> Path:
    """The model file of a bundle that is an already captured model (ONNX, TorchScript, .pt2)."""
    if ctx.bundle.model_file is None:
        raise ConversionError(f"the {ctx.bundle.kind} bundle has no model file")
    return Path(ctx.bundle.model_file)
