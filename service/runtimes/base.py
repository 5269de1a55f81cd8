"""The runtime interface: load an artifact, describe its signature, run a batch of named arrays.

The same classes validate and benchmark candidates in workers and serve them in the API,
so what was validated is what is served. Heavy libraries are imported inside methods only.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from service.errors import InvalidBundle
from service.signature import Signature, TensorSpec

ARTIFACT_META = "kiln-artifact.json"


@dataclass
class ArtifactInfo:
    """What `kiln-artifact.json` says about a built artifact, which sits beside its model file."""

    runtime: str
    file: str
    precision: str = "fp32"
    signature: dict[str, Any] | None = None
    # dtype the artifact computes in when it differs from the signature's (torchscript bf16/fp16)
    compute_dtype: str | None = None
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: Path) -> Path:
        path = directory / ARTIFACT_META
        path.write_text(json.dumps(self.__dict__, indent=2, sort_keys=True))
        return path

    @classmethod
    def load(cls, directory: Path) -> ArtifactInfo:
        path = directory / ARTIFACT_META
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InvalidBundle(f"{directory} is not a Kiln artifact ({ARTIFACT_META}: {exc})") from None
        return cls(**data)


class Runtime(ABC):
    """One inference runtime. Subclasses name the library whose presence registers them."""

    name: ClassVar[str]
    library: ClassVar[str]
    # Whether an artifact can carry code or arbitrary operators: then it is loaded only in a runner
    # inside the isolation boundary (service/runner.py), never in the API or worker process.
    runs_code: ClassVar[bool] = False

    def __init__(
        self,
        path: Path,
        *,
        info: ArtifactInfo | None = None,
        threads: int | None = None,
        device: str = "cpu",
        spin: bool = True,
    ) -> None:
        """`spin`: let idle intra-op threads busy-wait for the next run (lowest latency for one caller;
        a server with many requests in flight gives those cores to other work instead). Runtimes
        whose library has no such switch ignore it."""
        self.path = Path(path)
        self.info = info
        self.threads = threads
        self.device = device
        # what a subclass learns from its library or the artifact's signature when it loads
        self._inputs: list[TensorSpec] = []
        self._outputs: list[TensorSpec] = []

    @property
    def inputs(self) -> list[TensorSpec]:
        """Input names, dtypes and shapes (named or -1-free ints) in the order the model takes them."""
        return self._inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        """Output names (dtypes and shapes where the runtime knows them)."""
        return self._outputs

    @abstractmethod
    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run one batch: named input arrays in, named output arrays out (all, or those asked for)."""

    def close(self) -> None:  # noqa: B027 - optional: a runtime with nothing to release keeps this
        """Release the session; the runtime is not used afterwards."""

    def signature(self) -> Signature | None:
        """The signature recorded with the artifact, when there is one."""
        if self.info and self.info.signature:
            return Signature.parse(self.info.signature)
        return None
