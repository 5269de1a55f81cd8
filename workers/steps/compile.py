"""compile: every requested target x precision (x variant) into a candidate artifact."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from service.errors import ConversionError, KilnError, RuntimeUnavailable
from service.states import CandidateStatus, move_candidate
from workers.compilers import COMPILERS, candidate_id
from workers.compilers.gpu import resolve_devices
from workers.context import Candidate, Context
from workers.pipeline import StepLog


class Compile:
    name = "compile"
    requires = ("load",)

    def run(self, ctx: Context, log: StepLog) -> dict[str, Any]:
        devices = resolve_devices(ctx.options.devices)
        plan = [
            (t, p, v)
            for t in ctx.options.targets
            for p in ctx.options.precisions
            for v in COMPILERS[t].variants(p, devices)
        ]
        # Combinations that cannot exist (int8 TorchScript, fp16 AOTInductor) are not candidates, so never failures.
        absent = [
            f"{t}-{p}"
            for t in ctx.options.targets
            for p in ctx.options.precisions
            if not COMPILERS[t].variants(p, devices)
        ]
        if absent:
            log.info(f"not built here (no such combination on {', '.join(devices)}): {', '.join(absent)}")
        if not plan:
            raise ConversionError(
                f"nothing to build: {', '.join(absent)} cannot be built on {', '.join(devices)} "
                "(TorchScript builds fp32, bf16 and fp16; torch_export and aotinductor build fp32 on the CPU; "
                "the onnxruntime and openvino targets build int8)"
            )
        ctx.candidates = []
        for i, (target, precision, variant) in enumerate(plan):
            cand = Candidate(
                id=candidate_id(target, precision, variant), target=target, precision=precision, variant=variant
            )
            ctx.candidates.append(cand)
            log.progress(i / len(plan), f"building {cand.id}")
            build_candidate(ctx, cand, log)
            ctx.save()
        built = [c.id for c in ctx.candidates if c.status == "built"]
        if not built:
            raise ConversionError(
                "no candidate could be built: " + "; ".join(f"{c.id}: {c.reason}" for c in ctx.candidates)
            )
        return {"built": built, "failed": [c.id for c in ctx.candidates if c.status != "built"], "devices": devices}


@contextlib.contextmanager
def scratch(path: Path) -> Iterator[Path]:
    """A directory under the job's working directory that is both the current directory and the
    temporary directory while a candidate builds, removed afterwards: exporters, shape inference and
    quantizers write temporary files into either (ONNX Runtime's symbolic shape inference leaves
    `sym_shape_infer_temp.onnx` and `<uuid>.data` files in the current directory when it gives up)."""
    path.mkdir(parents=True, exist_ok=True)
    saved_tmp, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = os.environ["TMPDIR"] = str(path)
    try:
        with contextlib.chdir(path):
            yield path
    finally:
        tempfile.tempdir = saved_tmp
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        shutil.rmtree(path, ignore_errors=True)


def build_candidate(ctx: Context, cand: Candidate, log: StepLog) -> None:
    """Build one candidate into `<out>/<id>/`, recording its status, reason, size and build time."""
    out_dir = ctx.out / cand.id
    if out_dir.exists():
        shutil.rmtree(out_dir)
    cand.notes, cand.fused_ops, cand.validation = [], {}, None
    move_candidate(cand, CandidateStatus.PENDING)  # a rebuild starts over
    t0 = time.perf_counter()
    try:
        with scratch(ctx.work / "scratch" / cand.id):
            COMPILERS[cand.target].build(ctx, cand, out_dir, log)
        move_candidate(cand, CandidateStatus.BUILT)
        cand.artifact_dir = cand.id
        cand.size_bytes = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    except RuntimeUnavailable as exc:
        move_candidate(cand, CandidateStatus.UNAVAILABLE, exc.detail)
    except KilnError as exc:
        move_candidate(cand, CandidateStatus.FAILED, exc.detail)
    except Exception as exc:  # noqa: BLE001 - one candidate's failure never stops the others
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        move_candidate(cand, CandidateStatus.FAILED, f"{type(exc).__name__}: {first}")
    cand.build_s = time.perf_counter() - t0
    if cand.status != CandidateStatus.BUILT and out_dir.exists():
        shutil.rmtree(out_dir)
    log.info(f"{cand.id}: {cand.status}{' - ' + cand.reason if cand.reason else ''} ({cand.build_s:.2f}s)")
