"""Settings from `KILN_*` environment variables; every default works on one machine."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KILN_", extra="ignore")

    data_dir: Path = Path(".kiln")
    # Sandbox limits for user model code. Memory is address space (RLIMIT_AS): torch alone
    # maps a few GiB, so this is set well above what a model needs.
    sandbox_timeout_s: float = 1800.0
    sandbox_memory_bytes: int = 24 << 30
    sandbox_file_size_bytes: int = 16 << 30
    # Threads for conversion benchmarks and CPU runtimes (None: the runtime's default).
    threads: int | None = None


@lru_cache
def get_settings() -> Settings:
    return Settings()
