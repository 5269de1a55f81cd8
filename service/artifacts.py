"""Content-addressed artifact store on a local directory (which a volume or network filesystem
can hold). Files are named by their sha256 and written atomically: a reader never sees a half-
written file under a final name."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

from service.config import get_settings
from service.errors import NotFound, PayloadTooLarge, StorageFull

CHUNK = 1 << 20


class ArtifactStore:
    """put a file or stream in, get back its sha256; open or locate by sha256."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise NotFound(f"{sha256!r} is not an artifact address")
        return self.root / "sha256" / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put_stream(self, stream: BinaryIO | Iterator[bytes], *, limit: int | None = None) -> tuple[str, int]:
        """Store what a stream yields; returns (sha256, size). Refuses past `limit` bytes."""
        digest, size = hashlib.sha256(), 0
        fd, tmp_name = tempfile.mkstemp(dir=self.root / "tmp")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                chunks = iter(lambda: stream.read(CHUNK), b"") if hasattr(stream, "read") else stream
                for chunk in chunks:
                    size += len(chunk)
                    if limit is not None and size > limit:
                        raise PayloadTooLarge(f"upload is larger than the limit of {limit} bytes")
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            sha = digest.hexdigest()
            self._commit(tmp, sha)
            return sha, size
        except OSError as exc:
            raise StorageFull(f"the artifact store could not write: {exc.strerror or exc}") from None
        finally:
            tmp.unlink(missing_ok=True)

    def put_file(self, path: Path) -> str:
        with open(path, "rb") as f:
            return self.put_stream(f)[0]

    def _commit(self, tmp: Path, sha: str) -> None:
        final = self.path(sha)
        if final.exists():  # identical content is stored once
            return
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)

    def open(self, sha256: str) -> BinaryIO:
        try:
            return self.path(sha256).open("rb")
        except FileNotFoundError:
            raise NotFound(f"artifact {sha256} is not in the store") from None

    def put_directory(self, directory: Path) -> dict[str, str]:
        """Store every file of a flat directory; returns {file name: sha256}."""
        return {p.name: self.put_file(p) for p in sorted(Path(directory).iterdir()) if p.is_file()}

    def materialize(self, files: dict[str, str], dest: Path) -> Path:
        """Lay out stored files as a directory (hard links where possible), e.g. for a runtime to load."""
        if dest.is_dir() and all((dest / n).is_file() for n in files):
            return dest
        tmp = Path(tempfile.mkdtemp(dir=self.root / "tmp"))
        for name, sha in files.items():
            src = self.path(sha)
            if not src.is_file():
                raise NotFound(f"artifact file {name} ({sha}) is missing from the store")
            try:
                os.link(src, tmp / name)
            except OSError:
                shutil.copyfile(src, tmp / name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, dest)
        except OSError:  # someone else materialized it first
            shutil.rmtree(tmp, ignore_errors=True)
        return dest


def get_store() -> ArtifactStore:
    return ArtifactStore(get_settings().artifact_dir)
