"""report: the JSON report and readable summary; runs whatever happened before it."""

from __future__ import annotations

from typing import Any

from service.states import StepStatus, move_step
from workers import report
from workers.context import Context
from workers.pipeline import StepLog
from workers.report import REPORT_FILE


class Report:
    name = "report"
    requires: tuple[str, ...] = ()

    def run(self, ctx: Context, log: StepLog) -> dict[str, Any]:
        # versions and the machine, beside what the steps recorded (how model code was contained)
        ctx.environment = {**ctx.environment, **report.environment()}
        # this step's own record is finished by the pipeline after run(); mark it now for the file
        rec = ctx.step(self.name)
        if rec:
            move_step(rec, StepStatus.OK)
        data = report.write(ctx)
        log.info(f"wrote {ctx.out / REPORT_FILE}")
        return {"report": str(ctx.out / REPORT_FILE), "status": data["status"]}
