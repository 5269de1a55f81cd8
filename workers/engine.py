"""The conversion engine as one library call: a bundle in, validated and benchmarked artifacts out.

The CLI calls `convert`; the Celery task calls it too, with events that write to the job store.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service import requirements
from service.bundles import ONNX, onnx_signature, prepare_bundle
from service.errors import InvalidOptions, InvalidSignature
from service.options import GPU_TARGETS, ConversionOptions
from service.signature import Signature
from workers import report
from workers.context import STATE_FILE, BundleInfo, Context
from workers.pipeline import Canceled, Events, Pipeline
from workers.steps import default_steps


def prepare(
    bundle_path: Path,
    out_dir: Path,
    *,
    entry: str | None = None,
    weights: Path | None = None,
    samples: Path | None = None,
    signature: Signature | dict | str | None = None,
    options: ConversionOptions | dict | None = None,
    workdir: Path | None = None,
    check_requirements: bool = True,
) -> Context:
    """Lay out a new conversion and check what can be checked without running user code.

    The bundle's requirements are checked against this machine unless `check_requirements` is false
    (a worker: its load step checks them, so that the job fails at that step).
    """
    out_dir = Path(out_dir).resolve()
    workdir = Path(workdir).resolve() if workdir else out_dir / ".work"
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    opts = options if isinstance(options, ConversionOptions) else ConversionOptions.parse(options or {})
    check_devices(opts)
    bundle = prepare_bundle(
        Path(bundle_path), workdir / "bundle", entry=entry, weights=weights, samples=samples, signature=signature
    )
    if check_requirements:
        requirements.check(bundle.requirements, where="this machine")
    sig = bundle.signature or (onnx_signature(bundle) if bundle.kind == ONNX else None)
    if sig is None:
        raise InvalidSignature(
            "no signature: give one (--signature FILE or --input 'x:float32[batch,3,224,224]') "
            "or put it in the bundle's kiln.yaml"
        )
    ctx = Context(
        workdir=str(workdir), out_dir=str(out_dir), bundle=BundleInfo.from_bundle(bundle), signature=sig, options=opts
    )
    ctx.save()
    return ctx


def check_devices(opts: ConversionOptions) -> None:
    """Refuse at once a conversion that can build nothing on this machine (TensorRT, or only CUDA
    candidates, without a CUDA device), rather than after load, capture and export."""
    from workers.compilers.gpu import cuda_device

    if cuda_device() is not None:
        return
    cpu_targets = [t for t in opts.targets if t not in GPU_TARGETS]
    if not cpu_targets or opts.devices == ["cuda"]:
        asked = ", ".join(opts.targets) + (" on cuda" if opts.devices == ["cuda"] else "")
        raise InvalidOptions(
            f"{asked} needs a CUDA GPU and this machine has none; convert with "
            "--target onnxruntime,torchscript here, or on a server with a GPU worker"
        )


def run(ctx: Context, *, events: Events | None = None, canceled: Callable[[], bool] | None = None) -> Context:
    """Run (or resume) the pipeline on a prepared context; the report is written whatever happens."""
    try:
        Pipeline(default_steps(), events=events, canceled=canceled).run(ctx)
    except Canceled:
        report.write(ctx)
        raise
    report.write(ctx)
    return ctx


def resume(workdir: Path) -> Context | None:
    """The saved context of an interrupted conversion, if there is one."""
    return Context.load(workdir) if (Path(workdir) / STATE_FILE).is_file() else None


def convert(
    bundle_path: Path,
    out_dir: Path,
    *,
    events: Events | None = None,
    canceled: Callable[[], bool] | None = None,
    **kwargs: Any,
) -> Context:
    """prepare + run."""
    return run(prepare(bundle_path, out_dir, **kwargs), events=events, canceled=canceled)
