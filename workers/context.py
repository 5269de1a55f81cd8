"""The typed state of one conversion. Steps read and write it; it is saved after every step,
so a conversion interrupted by a dead worker resumes from the last finished step."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from service.bundles import Bundle
from service.options import ConversionOptions, Tolerance
from service.signature import Signature
from service.states import CandidateStatus, StepStatus

STATE_FILE = "state.json"


class StepRecord(BaseModel):
    name: str
    status: StepStatus = StepStatus.PENDING
    started_at: float | None = None
    duration_s: float | None = None
    log: str = ""
    outputs: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None


class CaptureRecord(BaseModel):
    method: str  # trace | script | export
    ok: bool
    file: str | None = None
    error: str | None = None
    hint: str | None = None  # what would make a failed capture work (e.g. torch.cond for a value branch)
    warnings: list[str] = Field(default_factory=list)
    agrees: bool | None = None  # matches eager on every sample
    max_abs: float | None = None
    disagreeing_samples: list[str] = Field(default_factory=list)
    seconds: float | None = None


class Hazard(BaseModel):
    kind: str  # e.g. frozen_branch
    detail: str
    action: str


class OutputMetrics(BaseModel):
    max_abs: float
    rel: float  # normwise: ||a-b|| / ||ref||, finite when ref is zero
    cosine: float
    top1: float | None = None
    topk: float | None = None  # the reference's class among the candidate's top 5
    exact: float | None = None  # share of equal elements (ids, masks)
    rows: int | None = None  # rows the top-1/top-k figures are over
    kind: str | None = None  # what the output was compared as (service.options.OUTPUT_KINDS)
    passed: bool
    tolerance: Tolerance
    failed_checks: list[str] = Field(default_factory=list)


class Validation(BaseModel):
    passed: bool
    samples: int
    outputs: dict[str, OutputMetrics] = Field(default_factory=dict)
    reason: str | None = None


class BenchPoint(BaseModel):
    batch: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput: float  # items per second
    iterations: int
    rounds: int | None = None  # interleaved rounds (workers/benchmark.py)
    p50_low_ms: float | None = None  # ~95% interval of the median of the per-round medians
    p50_high_ms: float | None = None
    round_p50_ms: list[float] = Field(default_factory=list)  # per round, paired with the other contenders'


class Candidate(BaseModel):
    id: str  # e.g. onnxruntime-int8-static: also its directory under artifacts/
    target: str
    precision: str
    variant: str | None = None
    status: CandidateStatus = CandidateStatus.PENDING
    reason: str | None = None
    artifact_dir: str | None = None  # relative to the output directory
    file: str | None = None
    size_bytes: int | None = None
    build_s: float | None = None
    notes: list[str] = Field(default_factory=list)
    # ONNX Runtime fused operators in the artifact, by type, where the transformer fusions ran
    # (workers/compilers/fusion.py); empty for every other candidate.
    fused_ops: dict[str, int] = Field(default_factory=dict)
    validation: Validation | None = None
    benchmark: list[BenchPoint] = Field(default_factory=list)
    speedup: float | None = None  # median over rounds of eager / candidate at the first batch size
    speedup_low: float | None = None  # ~95% interval of that median
    speedup_high: float | None = None
    noisy: bool = False  # the interval is too wide to rank on (workers.benchmark.NOISY_RATIO)
    lost_because: str | None = None

    @property
    def passed(self) -> bool:
        return self.status == CandidateStatus.BUILT and self.validation is not None and self.validation.passed


class Selection(BaseModel):
    policy: str
    candidate: str | None
    reason: str
    # Whether the selected candidate is faster than eager PyTorch by its whole interval
    # (None: no eager baseline, e.g. an uploaded ONNX model).
    beats_eager: bool | None = None
    noisy: bool = False  # the figures it was chosen on are too noisy to rank on


class BundleInfo(BaseModel):
    kind: str
    root: str
    entry: str | None = None
    model_file: str | None = None
    weights: str | None = None
    samples: str | None = None
    requirements: list[str] = Field(default_factory=list)  # PEP 508, checked again by the load step

    @classmethod
    def from_bundle(cls, b: Bundle) -> BundleInfo:
        s = lambda p: str(p) if p else None  # noqa: E731 - a one-line helper local to this function
        return cls(
            kind=b.kind,
            root=str(b.root),
            entry=b.entry,
            model_file=s(b.model_file),
            weights=s(b.weights),
            samples=s(b.samples),
            requirements=list(b.requirements),
        )


class Context(BaseModel):
    """Everything a conversion knows. Paths are absolute inside `workdir` / `out_dir`."""

    workdir: str
    out_dir: str
    bundle: BundleInfo
    signature: Signature
    options: ConversionOptions = Field(default_factory=ConversionOptions)
    steps: list[StepRecord] = Field(default_factory=list)
    samples_file: str | None = None
    sample_labels: list[str] = Field(default_factory=list)
    reference_file: str | None = None
    captures: list[CaptureRecord] = Field(default_factory=list)
    preferred_capture: str | None = None
    hazards: list[Hazard] = Field(default_factory=list)
    onnx_file: str | None = None
    onnx_exporter: str | None = None
    export_attempts: list[dict[str, Any]] = Field(default_factory=list)
    candidates: list[Candidate] = Field(default_factory=list)
    # Outputs whose reference cannot discriminate, with why (workers/validation.degenerate_reference).
    degenerate: dict[str, str] = Field(default_factory=dict)
    eager_benchmark: list[BenchPoint] = Field(default_factory=list)
    # Eager baselines on other devices, by "<device>-<precision>" (on a GPU host: cuda-fp32, cuda-fp16).
    eager_baselines: dict[str, list[BenchPoint]] = Field(default_factory=dict)
    # How the figures were taken: load before and after, thread settings, rounds, verdict.
    benchmark_conditions: dict[str, Any] = Field(default_factory=dict)
    selection: Selection | None = None
    environment: dict[str, Any] = Field(default_factory=dict)

    @property
    def work(self) -> Path:
        return Path(self.workdir)

    @property
    def out(self) -> Path:
        return Path(self.out_dir)

    def step(self, name: str) -> StepRecord | None:
        return next((s for s in self.steps if s.name == name), None)

    def candidate(self, cid: str) -> Candidate:
        return next(c for c in self.candidates if c.id == cid)

    def capture(self, method: str) -> CaptureRecord | None:
        return next((c for c in self.captures if c.method == method), None)

    def save(self) -> Path:
        """Write state.json atomically."""
        path = self.work / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, workdir: Path) -> Context:
        return cls.model_validate(json.loads((Path(workdir) / STATE_FILE).read_text()))
