"""What a page shows, shaped for its template: the rows of the candidates table, the series of the
charts, a job list row. Only reading and arranging what the job, its candidates and its report
already say; every judgement (pass/fail, the winner, why others lost) was made by the pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from service.dashboard import charts
from service.dashboard.formatting import elapsed
from service.schemas import CandidateOut, JobOut, JobSummary
from service.tables import Job

ACTIVE = ("queued", "running")


@dataclass
class CandidateView:
    """One row of the candidates table: a candidate's worst output and its latency per batch size."""

    id: str | None
    name: str
    target: str
    precision: str
    variant: str | None
    result: str  # pass | fail | not built | baseline
    reason: str | None = None
    tolerance: dict[str, Any] | None = None
    failed_checks: list[str] = field(default_factory=list)
    outputs: int = 0
    max_abs: float | None = None
    rel: float | None = None
    cosine: float | None = None
    top1: float | None = None
    latency: dict[int, dict[str, float]] = field(default_factory=dict)  # batch -> bench point
    speedup: float | None = None
    speedup_low: float | None = None  # ~95% interval of the speed-up
    speedup_high: float | None = None
    noisy: bool = False  # too wide an interval to rank on
    size_bytes: int | None = None
    artifact_url: str | None = None
    selected: bool = False
    lost_because: str | None = None
    notes: list[str] = field(default_factory=list)
    color: str = charts.EAGER_COLOR

    @property
    def pace(self) -> str:
        """faster or slower than eager PyTorch by the whole interval, else "" (within the noise)."""
        if not self.speedup or self.noisy or self.result == "baseline":
            return ""
        low, high = self.speedup_low or self.speedup, self.speedup_high or self.speedup
        return "faster" if low > 1 else "slower" if high < 1 else ""

    @property
    def deployable(self) -> bool:
        return self.result == "pass" and self.artifact_url is not None


def _worst(validation: dict[str, Any] | None) -> dict[str, Any]:
    """The worst figure of each kind over a candidate's outputs (the table has one row per candidate)."""
    by_name: dict[str, Any] = (validation or {}).get("outputs") or {}
    outs = list(by_name.values())
    if not outs:
        return {}
    top1s = [o["top1"] for o in outs if o.get("top1") is not None]
    tolerances = [o.get("tolerance") for o in outs]
    return {
        "outputs": len(outs),
        "max_abs": max(o["max_abs"] for o in outs),
        "rel": max(o["rel"] for o in outs),
        "cosine": min(o["cosine"] for o in outs),
        "top1": min(top1s) if top1s else None,
        # one tolerance when every output is held to the same one, else the first's (noted in the page)
        "tolerance": tolerances[0],
        "mixed_tolerances": any(t != tolerances[0] for t in tolerances),
        "failed_checks": [
            f"{name}: {c}" if len(outs) > 1 else c for name, o in by_name.items() for c in o.get("failed_checks", [])
        ],
    }


def candidate_view(c: CandidateOut, index: int, selected_id: str | None) -> CandidateView:
    worst = _worst(c.validation)
    result = "not built" if c.status != "built" else "pass" if c.passed else "fail"
    reason = c.reason or ((c.validation or {}).get("reason") if result == "fail" else None)
    return CandidateView(
        id=c.id,
        name=c.name,
        target=c.target,
        precision=c.precision,
        variant=c.variant,
        result=result,
        reason=reason,
        tolerance=worst.get("tolerance"),
        failed_checks=worst.get("failed_checks", []),
        outputs=worst.get("outputs", 0),
        max_abs=worst.get("max_abs"),
        rel=worst.get("rel"),
        cosine=worst.get("cosine"),
        top1=worst.get("top1"),
        latency={int(p["batch"]): p for p in c.benchmark},
        speedup=c.speedup,
        speedup_low=c.speedup_low,
        speedup_high=c.speedup_high,
        noisy=c.noisy,
        size_bytes=c.size_bytes,
        artifact_url=c.artifact_url,
        selected=c.id == selected_id,
        lost_because=c.lost_because,
        notes=[str(n) for n in c.notes],
        color=charts.color(index),
    )


def eager_view(points: list[dict[str, Any]]) -> CandidateView | None:
    if not points:
        return None
    return CandidateView(
        id=None,
        name="eager PyTorch",
        target="pytorch",
        precision="fp32",
        variant=None,
        result="baseline",
        latency={int(p["batch"]): p for p in points},
        speedup=1.0,
    )


@dataclass
class JobPage:
    """Everything the job page shows, beside the JobOut itself."""

    job: JobOut
    candidates: list[CandidateView]
    eager: CandidateView | None
    batch_sizes: list[int]
    selected: CandidateView | None
    losers: list[CandidateView]
    captures: list[dict[str, Any]]
    preferred_capture: str | None
    exporter: str | None
    latency_chart: str
    tradeoff_chart: str
    total_step_s: float
    has_report: bool

    @property
    def active(self) -> bool:
        return self.job.status in ACTIVE

    @property
    def deployable(self) -> list[CandidateView]:
        """Passing candidates with an artifact, the selected one first."""
        return sorted((c for c in self.candidates if c.deployable), key=lambda c: not c.selected)


def job_page(job: JobOut, report: dict[str, Any] | None) -> JobPage:
    report = report or {}
    rows = [candidate_view(c, i, job.selected_candidate) for i, c in enumerate(job.candidates)]
    eager = eager_view(report.get("eager_benchmark") or [])
    batches = sorted({b for r in rows + ([eager] if eager else []) for b in r.latency})
    selected = next((r for r in rows if r.selected), None)
    series = [charts.Series(r.name, r.color, [(b, r.latency[b]) for b in sorted(r.latency)]) for r in rows if r.latency]
    if eager:
        series.append(
            charts.Series(eager.name, eager.color, [(b, eager.latency[b]) for b in sorted(eager.latency)], dashed=True)
        )
    points = [
        charts.Point(r.name, r.color, r.speedup, r.rel, passed=r.result == "pass", selected=r.selected)
        for r in rows
        if r.speedup is not None and r.rel is not None
    ]
    return JobPage(
        job=job,
        candidates=rows,
        eager=eager,
        batch_sizes=batches,
        selected=selected,
        losers=[r for r in rows if not r.selected and r.lost_because],
        captures=report.get("captures") or [],
        preferred_capture=report.get("preferred_capture"),
        exporter=report.get("onnx_exporter"),
        latency_chart=charts.latency_chart(series, batches),
        tradeoff_chart=charts.tradeoff_chart(points, has_eager=eager is not None),
        total_step_s=sum(s.duration_s or 0 for s in job.steps),
        has_report=bool(report),
    )


@dataclass
class JobRow:
    """One row of the jobs list: the summary the API gives, and the winner with its speed-up."""

    job: JobSummary
    duration_s: float | None
    winner: str | None
    winner_speedup: float | None
    waiting: str | None = None  # why a queued job is not running (service.jobs.waiting_reason)

    @property
    def active(self) -> bool:
        return self.job.status in ACTIVE


def job_row(job: Job, waiting: str | None = None) -> JobRow:
    winner = next((c for c in job.candidates if c.id == job.selected_candidate_id), None)
    duration = elapsed(job.started_at, job.finished_at) if job.finished_at else None
    return JobRow(
        job=JobSummary.of(job),
        duration_s=duration,
        winner=winner.name if winner else None,
        winner_speedup=winner.speedup if winner else None,
        waiting=waiting,
    )
