"""torch.export candidates, from the capture step's `export` capture (the model returning a flat
tuple of its outputs, with the signature's dynamic dimensions): the ExportedProgram itself
(`torch_export`, run as its module), and the same program compiled ahead of time by AOTInductor into
a package with a shared library (`aotinductor`). fp32, on the CPU and (variant "cuda") on a CUDA
device: the program is moved there (`move_to_device_pass`) before it is saved or compiled, so an
AOTInductor package for CUDA holds the GPU kernels Inductor generated (Triton) and runs only on a GPU
of the kind it was built on.

Both artifacts carry code (a pickled program, native code), so they are built in the sandbox, from
there moved into the candidate's directory only after `produced()` checked what the box reported.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from service.errors import ConversionError, InvalidOptions, RuntimeUnavailable
from service.runtimes.base import ArtifactInfo
from workers.compilers.gpu import require_cuda
from workers.context import Candidate, Context
from workers.pipeline import StepLog
from workers.sandboxed import produced, sandbox_dir, sandboxed

ARTIFACT_FILE = "model.pt2"
# where programs are found in the box (service/boundary.py gives its processes this PATH)
BOX_PATH = "/usr/local/bin:/usr/bin:/bin"


def export_capture_file(ctx: Context) -> str:
    """The torch.export capture's file when it agrees with eager; otherwise why there is none, in
    one line that passes on the capture's hint (a branch over tensor values: torch.cond)."""
    capture = ctx.capture("export")
    if capture is None:
        why = "the upload is an ONNX graph" if ctx.bundle.kind == "onnx" else "the capture step did not try it"
        raise ConversionError(f"no torch.export capture: {why}")
    if not capture.ok or not capture.file:
        said = capture.hint or (capture.error or "it failed").splitlines()[0][:300]
        raise ConversionError(f"torch.export could not capture the model: {said}")
    if not capture.agrees:
        where = ", ".join(capture.disagreeing_samples[:4]) or "some samples"
        raise ConversionError(f"the torch.export capture disagrees with eager on {where}")
    return capture.file


class _Pt2Compiler:
    """What the two targets share: fp32 on the CPU or a CUDA device, built by the `build_pt2` sandbox op."""

    target: str
    runtime: str
    aotinductor: bool
    what: str

    def variants(self, precision: str, devices: list[str]) -> list[str | None]:
        if precision != "fp32":
            return []  # fp32 only: not a candidate (torchscript builds bf16/fp16, onnxruntime int8)
        return ([None] if "cpu" in devices else []) + (["cuda"] if "cuda" in devices else [])

    def stale(self, ctx: Context, candidate: Candidate) -> str | None:
        return None

    def build(self, ctx: Context, candidate: Candidate, out_dir: Path, log: StepLog) -> None:
        if candidate.precision != "fp32" or candidate.variant not in (None, "cuda"):
            raise InvalidOptions(f"{self.what} is built at fp32 only, not {candidate.id}")
        device = "cuda" if candidate.variant == "cuda" else "cpu"
        gpu = require_cuda() if device == "cuda" else None
        capture_file = export_capture_file(ctx)
        # Loading the program unpickles it, and AOTInductor compiles and runs native code: the sandbox.
        built = sandboxed(
            ctx,
            "build_pt2",
            {
                "capture_file": capture_file,
                "aotinductor": self.aotinductor,
                "device": device,
                "out_file": str(sandbox_dir(ctx) / self.target / f"{candidate.id}.pt2"),
            },
            log,
        )
        candidate.notes.extend(built["notes"])
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.move(produced(ctx, built["file"]), out_dir / ARTIFACT_FILE)
        candidate.file = ARTIFACT_FILE
        candidate.notes.append("from torch.export" + (f", on {device}" if device != "cpu" else ""))
        extra: dict[str, object] = {"capture": "export"}
        if self.aotinductor:
            extra.update(torch=str(built.get("torch")), cpu_capability=str(built.get("cpu_capability")))
            if gpu is not None:
                extra["gpu"] = gpu
        ArtifactInfo(
            runtime=self.runtime,
            file=ARTIFACT_FILE,
            precision="fp32",
            signature=ctx.signature.to_json(),
            device=device,
            extra=extra,
        ).save(out_dir)


class TorchExportCompiler(_Pt2Compiler):
    """The ExportedProgram, saved with torch.export.save."""

    target = runtime = "torch_export"
    aotinductor = False
    what = "an ExportedProgram"


class AOTInductorCompiler(_Pt2Compiler):
    """The ExportedProgram compiled by AOTInductor (`aoti_compile_and_package`) for this CPU, or for
    this machine's GPU."""

    target = runtime = "aotinductor"
    aotinductor = True
    what = "an AOTInductor package"

    def build(self, ctx: Context, candidate: Candidate, out_dir: Path, log: StepLog) -> None:
        # The box sees the host's /usr and searches it like this: a worker without a C++ compiler
        # (the slim CPU image) cannot build packages, and says so rather than failing in Inductor.
        if shutil.which("g++", path=BOX_PATH) is None:
            raise RuntimeUnavailable(
                "AOTInductor compiles C++ and this worker has no g++ (Debian/Ubuntu: apt-get install g++)"
            )
        super().build(ctx, candidate, out_dir, log)

    def stale(self, ctx: Context, candidate: Candidate) -> str | None:
        """A package holds machine code for the CPU (and GPU) and torch it was built with: after a
        resume on a worker with another instruction set, GPU or torch version, it is rebuilt rather
        than loaded."""
        if candidate.status != "built" or not candidate.artifact_dir:
            return None
        import torch

        extra = ArtifactInfo.load(ctx.out / candidate.artifact_dir).extra
        here = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
        if candidate.variant == "cuda":
            here["gpu"] = require_cuda()
        differs = [f"{k} {extra.get(k)} (here {v})" for k, v in here.items() if extra.get(k) != v]
        return f"the package was built for {', '.join(differs)}" if differs else None
