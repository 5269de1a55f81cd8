"""Content-addressed artifact store. Files are named by their sha256 and written atomically: a
reader never sees a half-written file under a final name.

Two backends behind one interface: a local directory (the default; a docker volume or a network
filesystem can hold it), and S3-compatible object storage (`KILN_ARTIFACT_URL=s3://bucket/prefix`,
with the usual AWS_* variables and `KILN_S3_ENDPOINT_URL` for MinIO, Ceph and the like). With S3,
each host keeps a local cache by sha256, so a replica or worker downloads an artifact once.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from service.config import get_settings
from service.errors import NotFound, PayloadTooLarge, StorageFull, Unavailable

CHUNK = 1 << 20


def _check(sha256: str) -> str:
    if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
        raise NotFound(f"{sha256!r} is not an artifact address")
    return sha256


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, read in chunks (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ArtifactStore:
    """The local store; also the local cache of the S3 store. `path(sha)` is always a local file."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)

    def local_path(self, sha256: str) -> Path:
        sha256 = _check(sha256)
        return self.root / "sha256" / sha256[:2] / sha256

    def path(self, sha256: str) -> Path:
        """A local file with the artifact's bytes."""
        return self.local_path(sha256)

    def exists(self, sha256: str) -> bool:
        return self.local_path(sha256).is_file()

    def put_stream(
        self, stream: BinaryIO | Iterator[bytes], *, limit: int | None = None, created: list[str] | None = None
    ) -> tuple[str, int]:
        """Store what a stream yields; returns (sha256, size). Refuses past `limit` bytes. Appends the
        sha256 to `created` when the content was not in the store before."""
        tmp, sha, size = self._spool(stream, limit)
        try:
            if self._commit(tmp, sha) and created is not None:
                created.append(sha)
        finally:
            tmp.unlink(missing_ok=True)
        return sha, size

    def sweep(self, referenced: set[str], older_than_s: float) -> list[str]:
        """Remove stored files that nothing refers to and that are older than `older_than_s` (an upload
        or a build still on its way to its row is younger); also spool files left by a crash. Returns
        what it removed."""
        cutoff = time.time() - older_than_s
        removed = []
        for path in list((self.root / "sha256").glob("*/*")) + list((self.root / "tmp").glob("*")):
            try:
                if path.name not in referenced and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed.append(path.name)
            except OSError:
                continue
        return removed

    def discard(self, sha256: str) -> None:
        """Remove a stored file (one that nothing refers to: a refused upload's)."""
        self.local_path(sha256).unlink(missing_ok=True)

    def _spool(self, stream: BinaryIO | Iterator[bytes], limit: int | None) -> tuple[Path, str, int]:
        """Copy a stream to a temporary file, hashing as it goes."""
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
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StorageFull(f"the artifact store could not write: {exc.strerror or exc}") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp, digest.hexdigest(), size

    def _commit(self, tmp: Path, sha: str) -> bool:
        """Move a spooled file into place; False when identical content was stored already."""
        final = self.local_path(sha)
        if final.exists():  # identical content is stored once
            return False
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
        return True

    def put_file(self, path: Path) -> str:
        with open(path, "rb") as f:
            return self.put_stream(f)[0]

    def put_directory(self, directory: Path) -> dict[str, str]:
        """Store every plain file of a flat directory (never what a link points at); returns {file name: sha256}."""
        return {
            p.name: self.put_file(p) for p in sorted(Path(directory).iterdir()) if p.is_file() and not p.is_symlink()
        }

    def open(self, sha256: str) -> BinaryIO:
        try:
            return self.path(sha256).open("rb")
        except FileNotFoundError:
            raise NotFound(f"artifact {sha256} is not in the store") from None

    def materialize(self, files: dict[str, str], dest: Path) -> Path:
        """Lay out stored files as a directory (hard links where possible), e.g. for a runtime to load.
        The folder is built beside `dest` (which may be on another filesystem than the store) and
        renamed into place whole."""
        if dest.is_dir() and all((dest / n).is_file() for n in files):
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
        try:
            for name, sha in files.items():
                src = self.path(sha)
                if not src.is_file():
                    raise NotFound(f"artifact file {name} ({sha}) is missing from the store")
                try:
                    os.link(src, tmp / name)
                except OSError:  # another filesystem, or links not allowed
                    shutil.copyfile(src, tmp / name)
            try:
                os.replace(tmp, dest)
            except OSError:  # someone else materialized it first (a non-empty dest is not replaced)
                if not (dest.is_dir() and all((dest / n).is_file() for n in files)):
                    raise
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise StorageFull(f"cannot lay out the artifact in {dest.parent}: {exc.strerror}") from None
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest


class S3Store(ArtifactStore):
    """Artifacts in an S3 bucket under `prefix/sha256/ab/<sha256>`; `root` is this host's cache.

    Uploads stream through a local temporary file (the key is the content's hash, known only at
    the end) and go up in parts; an object appears under its key only when complete, so readers
    never see a partial artifact. Downloads land in the cache atomically.
    """

    def __init__(self, url: str, cache: Path, endpoint_url: str | None = None) -> None:
        super().__init__(cache)
        import boto3
        from botocore.config import Config

        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError(f"KILN_ARTIFACT_URL {url!r} names no bucket")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.s3 = boto3.client(
            "s3", endpoint_url=endpoint_url, config=Config(retries={"max_attempts": 5, "mode": "standard"})
        )

    def key(self, sha256: str) -> str:
        sha256 = _check(sha256)
        return "/".join(p for p in (self.prefix, "sha256", sha256[:2], sha256) if p)

    def exists(self, sha256: str) -> bool:
        from botocore.exceptions import ClientError

        if super().exists(sha256):
            return True
        try:
            self.s3.head_object(Bucket=self.bucket, Key=self.key(sha256))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise Unavailable(f"object storage: {exc}") from None

    def _commit(self, tmp: Path, sha: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        new = not self.exists(sha)
        if new:
            try:
                self.s3.upload_file(str(tmp), self.bucket, self.key(sha))
            except (BotoCoreError, ClientError) as exc:
                raise Unavailable(f"object storage did not take the artifact: {exc}") from None
        super()._commit(tmp, sha)  # and keep it in this host's cache
        return new

    def path(self, sha256: str) -> Path:
        from botocore.exceptions import BotoCoreError, ClientError

        local = self.local_path(sha256)
        if local.is_file():
            return local
        fd, tmp_name = tempfile.mkstemp(dir=self.root / "tmp")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            self.s3.download_file(self.bucket, self.key(sha256), str(tmp))
            if sha256_file(tmp) != sha256:
                raise Unavailable(f"object storage returned corrupt bytes for {sha256}")
            local.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, local)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise NotFound(f"artifact {sha256} is not in the store") from None
            raise Unavailable(f"object storage: {exc}") from None
        except BotoCoreError as exc:
            raise Unavailable(f"object storage: {exc}") from None
        finally:
            tmp.unlink(missing_ok=True)
        return local


def get_store() -> ArtifactStore:
    s = get_settings()
    if s.artifact_url and s.artifact_url.startswith("s3://"):
        return _s3(s.artifact_url, str(s.artifact_dir), s.s3_endpoint_url)
    return ArtifactStore(s.artifact_dir)


_S3: dict[tuple, S3Store] = {}


def _s3(url: str, cache: str, endpoint: str | None) -> S3Store:
    key = (url, cache, endpoint)
    if key not in _S3:  # one boto3 client per process: they are thread-safe and slow to make
        _S3[key] = S3Store(url, Path(cache), endpoint)
    return _S3[key]
