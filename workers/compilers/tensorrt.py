"""TensorRT candidates. The engine builder is its own piece of work; until the library is
installed on a worker, the candidate is reported as unavailable and the rest of the job goes on."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from service.errors import ConversionError, RuntimeUnavailable
from workers.context import Candidate, Context
from workers.pipeline import StepLog


class TensorRTCompiler:
    target = "tensorrt"

    def variants(self, precision: str) -> list[str | None]:
        return [None]

    def build(self, ctx: Context, candidate: Candidate, out_dir: Path, log: StepLog) -> None:
        if importlib.util.find_spec("tensorrt") is None:
            raise RuntimeUnavailable("TensorRT is not installed on this worker")
        raise ConversionError("the TensorRT engine builder is not part of this build of Kiln yet")
