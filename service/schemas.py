"""Request and response bodies of the /v1 API."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from service.options import Tolerance
from service.tables import CandidateRow, Job, JobStep, Model, ModelVersion

T = TypeVar("T")


# The largest offset a list takes (the databases' integers end at 2**63; no list is that long).
MAX_OFFSET = (1 << 31) - 1


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int


class ModelVersionOut(BaseModel):
    id: str
    name: str
    version: int
    sha256: str
    kind: str
    filename: str
    entry: str | None
    signature: dict[str, Any]
    weights: str | None = None
    samples: bool = False
    size_bytes: int
    created_at: datetime
    existing: bool = Field(False, description="true when an identical upload already existed")

    @classmethod
    def of(cls, v: ModelVersion, existing: bool = False) -> ModelVersionOut:
        return cls(
            id=v.id,
            name=v.model.name,
            version=v.version,
            sha256=v.sha256,
            kind=v.kind,
            filename=v.filename,
            entry=v.entry,
            signature=v.signature,
            weights=v.weights_filename,
            samples=bool(v.samples_sha256),
            size_bytes=v.size_bytes,
            created_at=v.created_at,
            existing=existing,
        )


class ModelOut(BaseModel):
    id: str
    name: str
    created_at: datetime
    versions: list[ModelVersionOut]

    @classmethod
    def of(cls, m: Model) -> ModelOut:
        return cls(id=m.id, name=m.name, created_at=m.created_at, versions=[ModelVersionOut.of(v) for v in m.versions])


class JobCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {"model": "resnet", "version": 1, "targets": ["onnxruntime"], "precisions": ["fp32", "int8"]}
        },
    )
    model: str = Field(min_length=1, max_length=200)
    version: int | None = Field(None, ge=1, description="default: the newest version")
    targets: list[str] = Field(default_factory=lambda: ["onnxruntime", "torchscript"], max_length=8)
    precisions: list[str] = Field(default_factory=lambda: ["fp32"], max_length=8)
    policy: str = "latency"
    accuracy_budget: float | None = Field(None, gt=0)
    tolerances: dict[str, Tolerance] = Field(default_factory=dict, max_length=64)
    batch_sizes: list[int] | None = Field(None, max_length=16)
    threads: int | None = Field(None, ge=1, le=256)
    bench_seconds: float | None = Field(None, gt=0, le=60)
    onnx_exporters: list[str] | None = Field(
        None, max_length=8, description="ONNX exporters to try, in order (default: all, dynamo:eager first)"
    )
    memory_limit_bytes: int | None = Field(
        None,
        ge=1 << 30,
        description="the sandbox's memory limit for this "
        "job's model code (default: KILN_SANDBOX_MEMORY_BYTES, half of RAM)",
    )


class StepOut(BaseModel):
    name: str
    status: str
    started_at: datetime | None
    duration_s: float | None
    log: str
    outputs: dict[str, Any]
    error: str | None

    @classmethod
    def of(cls, s: JobStep) -> StepOut:
        return cls(
            name=s.name,
            status=s.status,
            started_at=s.started_at,
            duration_s=s.duration_s,
            log=s.log,
            outputs=s.outputs or {},
            error=s.error,
        )


class CandidateOut(BaseModel):
    id: str
    job_id: str
    name: str
    target: str
    precision: str
    variant: str | None
    status: str
    passed: bool
    reason: str | None
    model_file: str | None
    size_bytes: int | None
    validation: dict[str, Any] | None
    benchmark: list[Any]
    speedup: float | None
    speedup_low: float | None = None
    speedup_high: float | None = None
    noisy: bool = False
    lost_because: str | None
    notes: list[Any]
    artifact_url: str | None

    @classmethod
    def of(cls, c: CandidateRow) -> CandidateOut:
        return cls(
            id=c.id,
            job_id=c.job_id,
            name=c.name,
            target=c.target,
            precision=c.precision,
            variant=c.variant,
            status=c.status,
            passed=c.passed,
            reason=c.reason,
            model_file=c.model_file,
            size_bytes=c.size_bytes,
            validation=c.validation,
            benchmark=c.benchmark or [],
            speedup=c.speedup,
            speedup_low=c.speedup_low,
            speedup_high=c.speedup_high,
            noisy=bool(c.noisy),
            lost_because=c.lost_because,
            notes=c.notes or [],
            artifact_url=f"/v1/candidates/{c.id}/artifact" if c.files else None,
        )


class JobOut(BaseModel):
    id: str
    model: str
    version: int
    status: str
    progress: float
    current_step: str | None
    options: dict[str, Any]
    queue: str
    error: str | None
    attempts: int
    retry_of: str | None
    cancel_requested: bool
    worker: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_s: float | None
    steps: list[StepOut]
    candidates: list[CandidateOut]
    selected_candidate: str | None
    selection: dict[str, Any] | None
    hazards: list[dict[str, Any]]
    degenerate: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "outputs whose eager reference cannot discriminate (one class for every input, near-constant "
            "outputs), with why: validation against it proves little"
        ),
    )
    benchmark_conditions: dict[str, Any] = Field(
        default_factory=dict,
        description=("how the figures were timed: interleaved rounds, threads, the machine's load, noisy candidates"),
    )
    waiting: str | None = Field(None, description="why a queued job is not running yet")

    @classmethod
    def of(cls, j: Job) -> JobOut:
        report = j.report or {}
        end = j.finished_at
        duration = (end - j.started_at).total_seconds() if end and j.started_at else None
        return cls(
            id=j.id,
            model=j.version.model.name,
            version=j.version.version,
            status=j.status,
            progress=j.progress,
            current_step=j.current_step,
            options=j.options,
            queue=j.queue,
            error=j.error,
            attempts=j.attempts,
            retry_of=j.retry_of,
            cancel_requested=j.cancel_requested,
            worker=j.worker,
            created_at=j.created_at,
            started_at=j.started_at,
            finished_at=j.finished_at,
            duration_s=duration,
            steps=[StepOut.of(s) for s in j.steps],
            candidates=[CandidateOut.of(c) for c in j.candidates],
            selected_candidate=j.selected_candidate_id,
            selection=report.get("selection"),
            hazards=report.get("hazards") or [],
            degenerate=report.get("degenerate") or {},
            benchmark_conditions=report.get("benchmark_conditions") or {},
        )


class JobSummary(BaseModel):
    id: str
    model: str
    version: int
    status: str
    progress: float
    current_step: str | None
    targets: list[str]
    precisions: list[str]
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, j: Job) -> JobSummary:
        return cls(
            id=j.id,
            model=j.version.model.name,
            version=j.version.version,
            status=j.status,
            progress=j.progress,
            current_step=j.current_step,
            targets=j.options.get("targets", []),
            precisions=j.options.get("precisions", []),
            error=j.error,
            created_at=j.created_at,
            started_at=j.started_at,
            finished_at=j.finished_at,
        )


# --- deployments ----------------------------------------------------------------------------


class ServingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_batch_size: int | None = Field(
        None, ge=1, le=4096, description="rows joined per run (default: the batch dimension's max)"
    )
    max_queue_delay_ms: float | None = Field(
        None,
        ge=0,
        le=10_000,
        description="the longest a batch stays open for requests that arrive while the runtime is busy (default 0)",
    )
    max_queue_size: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="requests that may wait for a runtime instance; one more is refused at once with a 503 "
        "and Retry-After (default 512)",
    )
    instances: int | None = Field(None, ge=1, le=64, description="runtime instances run in parallel")
    threads: int | None = Field(None, ge=1, le=256, description="threads per runtime instance")


class DeploymentCreate(ServingOptions):
    name: str = Field(min_length=1, max_length=128)
    candidate: str | None = None
    job: str | None = None
    force: bool = Field(False, description="deploy a candidate that failed validation")


class DeploymentPatch(ServingOptions):
    default_version: int | None = Field(None, ge=1)


class VersionOut(BaseModel):
    version: int
    candidate: str
    candidate_name: str
    runtime: str
    options: dict[str, Any]
    default: bool
    forced: bool
    state: str
    error: str | None
    batching: bool | None
    batching_note: str | None
    max_batch_size: int | None


class DeploymentOut(BaseModel):
    name: str
    default_version: int | None
    state: str
    versions: list[VersionOut]
