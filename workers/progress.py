"""Progress display for the local command: one line per step, a live bar while it runs."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from workers.context import Context, StepRecord

MARKS = {"ok": "[green]ok[/green]", "failed": "[red]failed[/red]", "skipped": "[yellow]skipped[/yellow]"}


class ConsoleEvents:
    """Pipeline events rendered on a console (stderr), usable as a context manager."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.task: TaskID | None = None

    def __enter__(self) -> ConsoleEvents:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def step_started(self, ctx: Context, record: StepRecord, index: int, total: int) -> None:
        self.task = self.progress.add_task(f"[{index + 1}/{total}] {record.name}", total=1.0, note="")

    def step_progress(self, ctx: Context, record: StepRecord, fraction: float, message: str) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=fraction, note=message)

    def step_finished(self, ctx: Context, record: StepRecord, index: int, total: int) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None
        if record.status == "skipped" and (record.error or "").startswith("needs "):
            return  # after a failed step: its failure is the one line that matters
        note = f" - {record.error}" if record.error else ""
        self.console.print(
            f"[{index + 1}/{total}] {record.name:<9} {MARKS.get(record.status, record.status)} "
            f"({record.duration_s or 0:.1f}s){note}",
            highlight=False,
            soft_wrap=True,
        )

    def log_line(self, ctx: Context, step: str, line: str) -> None:
        self.console.print(f"    {line}", style="dim", highlight=False, soft_wrap=True, markup=False)
