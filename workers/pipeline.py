"""The conversion pipeline: ordered steps over one typed Context, a record after every step.

A step is a small object with a `name`, the names of the steps it `requires`, and `run(ctx, log)`.
It raises `SkipStep` when it does not apply, a KilnError when it fails for a known reason. The
pipeline saves the context after every step, so a rerun resumes after the last finished one.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from service.errors import KilnError
from service.states import StepStatus, move_step
from workers.context import Context, StepRecord

logger = logging.getLogger("kiln.pipeline")
LOG_EXCERPT_LINES = 60


class SkipStep(Exception):
    """Raised by a step that does not apply to this conversion; the message says why."""


class Canceled(Exception):
    """Raised when the conversion was canceled while it ran."""


class StepLog:
    """What a step tells the user: kept as an excerpt in its record, streamed to listeners. It also
    carries the run's cancellation check (`canceled`), for work inside a step that must stop when the
    conversion is canceled (a sandboxed op polls it and is killed)."""

    def __init__(
        self,
        name: str,
        on_line: Callable[[str, str], None] | None = None,
        on_progress: Callable[[float, str], None] | None = None,
        canceled: Callable[[], bool] | None = None,
    ) -> None:
        self.name = name
        self.lines: deque[str] = deque(maxlen=LOG_EXCERPT_LINES)
        self._on_line = on_line
        self._on_progress = on_progress
        self.canceled = canceled

    def info(self, message: str) -> None:
        for line in message.splitlines() or [""]:
            self.lines.append(line)
            logger.info("[%s] %s", self.name, line)
            if self._on_line:
                self._on_line(self.name, line)

    def progress(self, fraction: float, message: str = "") -> None:
        """Progress within the step, from 0 to 1."""
        if self._on_progress:
            self._on_progress(max(0.0, min(1.0, fraction)), message)

    @property
    def excerpt(self) -> str:
        return "\n".join(self.lines)


class Step(Protocol):
    # read-only, so that a step may declare them as plain class attributes
    @property
    def name(self) -> str: ...

    @property
    def requires(self) -> tuple[str, ...]: ...

    def run(self, ctx: Context, log: StepLog) -> dict[str, Any] | None: ...


class Events(Protocol):
    """What the pipeline tells its caller (the CLI's progress display, the job store)."""

    def step_started(self, ctx: Context, record: StepRecord, index: int, total: int) -> None: ...

    def step_progress(self, ctx: Context, record: StepRecord, fraction: float, message: str) -> None: ...

    def step_finished(self, ctx: Context, record: StepRecord, index: int, total: int) -> None: ...

    def log_line(self, ctx: Context, step: str, line: str) -> None: ...


class NoEvents:
    def step_started(self, ctx: Context, record: StepRecord, index: int, total: int) -> None:
        pass

    def step_progress(self, ctx: Context, record: StepRecord, fraction: float, message: str) -> None:
        pass

    def step_finished(self, ctx: Context, record: StepRecord, index: int, total: int) -> None:
        pass

    def log_line(self, ctx: Context, step: str, line: str) -> None:
        pass


class Pipeline:
    """Runs steps in order. Finished steps (ok or skipped) are not run again on resume."""

    def __init__(
        self, steps: Sequence[Step], events: Events | None = None, canceled: Callable[[], bool] | None = None
    ) -> None:
        self.steps = list(steps)
        self.events = events or NoEvents()
        self._canceled = canceled

    def canceled(self) -> bool:
        return self._canceled is not None and self._canceled()

    def run(self, ctx: Context) -> Context:
        total = len(self.steps)
        for index, step in enumerate(self.steps):
            record = ctx.step(step.name)
            if record is None:
                record = StepRecord(name=step.name)
                ctx.steps.append(record)
            if record.status in (StepStatus.OK, StepStatus.SKIPPED, StepStatus.FAILED):
                continue
            if self.canceled():
                raise Canceled("the conversion was canceled")
            self._run_step(ctx, step, record, index, total)
            ctx.save()
            self.events.step_finished(ctx, record, index, total)
        return ctx

    def _run_step(self, ctx: Context, step: Step, record: StepRecord, index: int, total: int) -> None:
        missing = [r for r in step.requires if (done := ctx.step(r)) is None or done.status != StepStatus.OK]
        move_step(record, StepStatus.RUNNING)
        record.started_at = time.time()
        self.events.step_started(ctx, record, index, total)
        log = StepLog(
            step.name,
            on_line=lambda s, line: self.events.log_line(ctx, s, line),
            on_progress=lambda f, m: self.events.step_progress(ctx, record, f, m),
            canceled=self._canceled,
        )
        t0 = time.perf_counter()
        try:
            if missing:
                raise SkipStep(f"needs {', '.join(missing)}, which did not succeed")
            record.outputs = step.run(ctx, log) or {}
            move_step(record, StepStatus.OK)
        except SkipStep as exc:
            move_step(record, StepStatus.SKIPPED, str(exc))
            if not missing:  # a step skipped after a failure adds nothing to the failure's own line
                log.info(f"skipped: {exc}")
        except (Canceled, KeyboardInterrupt):
            move_step(record, StepStatus.FAILED, "canceled")
            raise
        except KilnError as exc:
            move_step(record, StepStatus.FAILED, exc.detail)
            log.info(f"failed: {exc.detail}")
        except Exception as exc:  # noqa: BLE001 - a bug in a step fails the step, never the worker
            move_step(record, StepStatus.FAILED, f"internal error: {type(exc).__name__}: {exc}")
            log.info(traceback.format_exc())
        finally:
            record.duration_s = time.perf_counter() - t0
            record.log = log.excerpt
