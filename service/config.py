"""Settings from `KILN_*` environment variables; every default works on one machine."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KILN_", extra="ignore", populate_by_name=True)

    data_dir: Path = Path(".kiln")
    # SQLAlchemy URL; default: SQLite in the data directory.
    database_url_: str | None = Field(default=None, alias="KILN_DATABASE_URL")
    # Celery broker; default: a broker in files under the data directory (one machine, no Redis).
    broker_url_: str | None = Field(default=None, alias="KILN_BROKER_URL")
    # Content-addressed artifact store; default: a directory in the data directory.
    artifact_dir_: Path | None = Field(default=None, alias="KILN_ARTIFACT_DIR")
    # s3://bucket/prefix for S3-compatible object storage; then artifact_dir is this host's cache.
    artifact_url: str | None = None
    s3_endpoint_url: str | None = None
    max_upload_bytes: int = 8 << 30
    # Largest /v2 inference request body.
    max_infer_bytes: int = 256 << 20
    # Largest body of every other route: JSON of the /v1 API, dashboard forms.
    max_json_bytes: int = 1 << 20
    # Slow and many clients: a request's headers must arrive within header_timeout_s, its body may not
    # stall longer than body_timeout_s between chunks, an idle keep-alive connection is closed after
    # keep_alive_timeout_s, and past max_connections concurrent connections requests get a 503.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_timeout_s: float = 5.0
    max_connections: int = 1000
    # Stored files no row refers to are removed once older than the grace period, checked this often.
    store_sweep_grace_s: float = 24 * 3600.0
    store_sweep_interval_s: float = 3600.0
    # Redis URL for telling replicas about deployment changes (default: the broker, when it is Redis).
    notify_url: str | None = None
    # Whether a served model's idle intra-op threads busy-wait for the next run. Off: they spin
    # only within a run and stop when it returns (ONNX Runtime's force_spinning_stop), since under
    # concurrent load threads spinning between runs take the cores that the event loop and other
    # requests need.
    serving_spin_wait: bool = False
    # How often each replica checks the database for deployment changes (the fallback).
    sync_interval_s: float = 5.0
    # What this process is, for logs and metrics: api, worker or up.
    role: str = "api"
    # Hard time limit of one conversion job; the soft limit is a minute earlier.
    job_time_limit_s: int = 4 * 3600
    # A running job whose heartbeat is older than this is taken to have lost its worker.
    job_stale_after_s: float = 30.0
    # A queued job not picked up for this long has its message sent again.
    job_requeue_after_s: float = 60.0
    # Bearer tokens on every API but health checks. Off only when asked for (`kiln up --open`),
    # and then only on a loopback address unless open_network says the network is guarded otherwise
    # (an authenticating proxy in front of Kiln, say).
    auth: bool = True
    open_network: bool = False
    # Owner of everything while authentication is off.
    default_owner: str = "default"
    # Allowed browser origins for CORS; none by default.
    cors_origins: list[str] = Field(default_factory=list)
    # Limits of the isolation boundary (service/boundary.py) for user model code and code-bearing
    # artifacts. None: fitted to this machine (memory: half of RAM; disk: half of the free space
    # where the job works; CPU: every core). Memory is the box's cgroup limit (resident memory).
    sandbox_timeout_s: float = 1800.0
    sandbox_memory_bytes: int | None = None
    sandbox_disk_bytes: int | None = None
    sandbox_cpus: float | None = None
    sandbox_processes: int = 256
    # The host user boxes run as when Kiln runs as root (65534: nobody).
    sandbox_uid: int = 65534
    # Run untrusted code WITHOUT the isolation boundary where bubblewrap is missing. Only for a
    # single-user machine: model code can then read and write whatever Kiln can.
    insecure_no_sandbox: bool = False
    # The Open Inference Protocol over gRPC, beside HTTP (`kiln api`/`kiln up` default: the HTTP
    # port + 1 on the same address, Triton's 8000/8001 pair; 0: off).
    grpc_port: int | None = None
    grpc_host: str = "127.0.0.1"
    # Threads for conversion benchmarks and CPU runtimes (None: the runtime's default).
    threads: int | None = None

    @property
    def database_url(self) -> str:
        return self.database_url_ or f"sqlite:///{(self.data_dir / 'kiln.db').resolve()}"

    @property
    def broker_url(self) -> str:
        return self.broker_url_ or "filesystem://"

    @property
    def artifact_dir(self) -> Path:
        return (self.artifact_dir_ or self.data_dir / "artifacts").resolve()


@lru_cache
def get_settings() -> Settings:
    return Settings()
