"""The pipeline's steps in order: load, capture, export, compile, validate, benchmark, select, report."""

from workers.pipeline import Step
from workers.steps.benchmark import Benchmark
from workers.steps.capture import Capture
from workers.steps.compile import Compile
from workers.steps.export import Export
from workers.steps.load import Load
from workers.steps.report import Report
from workers.steps.select import Select
from workers.steps.validate import Validate


def default_steps() -> list[Step]:
    return [Load(), Capture(), Export(), Compile(), Validate(), Benchmark(), Select(), Report()]


__all__ = ["default_steps"]
