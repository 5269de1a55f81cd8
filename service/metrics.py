"""Prometheus metrics, base units, `kiln_` prefix. The dashboard reads the same numbers."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()  # the *_created series only add noise to scrapes

REGISTRY = CollectorRegistry(auto_describe=True)
_LABELS = ("model", "version")
_LATENCY = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)

REQUESTS = Counter("kiln_inference_requests", "Inference requests", _LABELS, registry=REGISTRY)
FAILURES = Counter("kiln_inference_failures", "Inference requests that failed", _LABELS + ("code",), registry=REGISTRY)
REQUEST = Histogram(
    "kiln_inference_request_duration_seconds",
    "Time from receiving a request to answering it",
    _LABELS,
    buckets=_LATENCY,
    registry=REGISTRY,
)
QUEUE = Histogram(
    "kiln_inference_queue_duration_seconds",
    "Time a request waited to be batched and run",
    _LABELS,
    buckets=_LATENCY,
    registry=REGISTRY,
)
COMPUTE = Histogram(
    "kiln_inference_compute_duration_seconds",
    "Runtime time of one (batched) run",
    _LABELS,
    buckets=_LATENCY,
    registry=REGISTRY,
)
BATCH = Histogram(
    "kiln_inference_batch_size",
    "Rows per run after dynamic batching",
    _LABELS,
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
    registry=REGISTRY,
)
IN_FLIGHT = Gauge("kiln_inference_in_flight", "Requests being served now", _LABELS, registry=REGISTRY)
DEPLOYMENTS = Gauge(
    "kiln_deployments_loaded", "Deployment versions loaded and ready in this process", registry=REGISTRY
)
PROCESS = Gauge("kiln_process_info", "Who this process is", ("host", "role"), registry=REGISTRY)


def identify(role: str) -> None:
    """Label this process's metrics with its host and role."""
    import socket

    PROCESS.labels(socket.gethostname(), role).set(1)
