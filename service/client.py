"""A small Python client for Kiln's /v1 API; the `kiln` command uses it, and apps can too.

client = KilnClient("http://127.0.0.1:8000")
version = client.push("model.py", name="resnet", signature={...})
job = client.create_job("resnet", targets=["onnxruntime"], precisions=["fp32", "int8"])
for event, data in client.events(job["id"]): ...
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from service import errors
from service.local import DEFAULT_SERVER, default_server, running

__all__ = ["DEFAULT_SERVER", "KilnClient", "local_admin_token"]
_BY_STATUS = {
    400: errors.BadRequest,
    401: errors.BadRequest,
    403: errors.BadRequest,
    404: errors.NotFound,
    409: errors.Conflict,
    413: errors.PayloadTooLarge,
    422: errors.BadRequest,
    503: errors.Unavailable,
    507: errors.StorageFull,
}


def local_admin_token(server: str | None = None) -> str | None:
    """The admin token of a `kiln up` on this machine: the one serving `server` wherever its data
    lives (service/local.py), else the one in this directory's data directory (KILN_DATA_DIR, .kiln)."""
    from service.auth import read_admin_token
    from service.config import get_settings

    found = running(server or default_server())
    if found is not None and (token := read_admin_token(found.data_dir)):
        return token
    return read_admin_token(get_settings().data_dir)


class KilnClient:
    def __init__(self, server: str | None = None, token: str | None = None, timeout: float = 60.0) -> None:
        self.server = (server or default_server()).rstrip("/")
        token = token or os.environ.get("KILN_TOKEN") or local_admin_token(self.server)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> KilnClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, r: httpx.Response) -> httpx.Response:
        if r.is_success:
            return r
        try:
            body = r.json()
            detail = body.get("detail") or body.get("error") or r.text
        except ValueError:
            detail = r.text or r.reason_phrase
        cls = _BY_STATUS.get(r.status_code, errors.KilnError)
        raise cls(f"{detail} (HTTP {r.status_code})")

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._check(self.http.request(method, url, **kwargs))
        except httpx.TransportError as exc:
            raise errors.Unavailable(f"cannot reach Kiln at {self.server}: {exc}") from None

    # models
    def push(
        self,
        bundle: str | Path,
        *,
        name: str,
        entry: str | None = None,
        signature: dict | None = None,
        weights: str | Path | None = None,
        samples: str | Path | None = None,
    ) -> dict:
        """Upload a bundle as a new model or version; returns the version."""
        data = {"name": name}
        if entry:
            data["entry"] = entry
        if signature is not None:
            data["signature"] = json.dumps(signature)
        # refused here in one line, as a local `kiln convert` refuses them, not as an OSError
        if not Path(bundle).exists():
            raise errors.BadRequest(f"bundle {bundle} does not exist")
        for label, extra in (("weights", weights), ("samples", samples)):
            if extra is not None and not Path(extra).is_file():
                raise errors.BadRequest(f"{label} file {extra} does not exist")
        files = {}
        handles = []
        tmpdir = None
        if Path(bundle).is_dir():  # a folder travels as a zip of its files
            import shutil
            import tempfile

            tmpdir = tempfile.mkdtemp(prefix="kiln-push-")
            bundle = shutil.make_archive(str(Path(tmpdir) / Path(bundle).resolve().name), "zip", root_dir=bundle)
        try:
            for field, path in (("file", bundle), ("weights", weights), ("samples", samples)):
                if path is not None:
                    f = open(path, "rb")  # noqa: SIM115 - closed below
                    handles.append(f)
                    files[field] = (Path(path).name, f, "application/octet-stream")
            return self._request("POST", "/v1/models", data=data, files=files, timeout=None).json()
        finally:
            for f in handles:
                f.close()
            if tmpdir:
                import shutil

                shutil.rmtree(tmpdir, ignore_errors=True)

    def models(self) -> list[dict]:
        return self._request("GET", "/v1/models").json()["items"]

    def model(self, name: str) -> dict:
        return self._request("GET", f"/v1/models/{name}").json()

    def delete_version(self, name: str, version: int) -> None:
        self._request("DELETE", f"/v1/models/{name}/versions/{version}")

    # jobs
    def create_job(
        self, model: str, *, version: int | None = None, idempotency_key: str | None = None, **options: Any
    ) -> dict:
        body = {
            "model": model,
            **({"version": version} if version else {}),
            **{k: v for k, v in options.items() if v is not None},
        }
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._request("POST", "/v1/jobs", json=body, headers=headers).json()

    def job(self, job_id: str) -> dict:
        return self._request("GET", f"/v1/jobs/{job_id}").json()

    def jobs(self, *, status: str | None = None, model: str | None = None, limit: int = 50) -> list[dict]:
        params = {k: v for k, v in {"status": status, "model": model, "limit": limit}.items() if v is not None}
        return self._request("GET", "/v1/jobs", params=params).json()["items"]

    def cancel(self, job_id: str) -> dict:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel").json()

    def retry(self, job_id: str) -> dict:
        return self._request("POST", f"/v1/jobs/{job_id}/retry").json()

    def report(self, job_id: str) -> dict:
        return self._request("GET", f"/v1/jobs/{job_id}/report").json()

    def logs(self, job_id: str) -> str:
        return self._request("GET", f"/v1/jobs/{job_id}/logs").text

    def events(self, job_id: str) -> Iterator[tuple[str, Any]]:
        """Server-sent events of a job until it ends: ("job", summary), ("log", lines), ("end", {...})."""
        try:
            with self.http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=None) as r:
                if not r.is_success:
                    r.read()
                    self._check(r)
                event, data = "message", []
                for line in r.iter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].strip())
                    elif not line and data:
                        yield event, json.loads("\n".join(data))
                        event, data = "message", []
        except httpx.TransportError as exc:
            raise errors.Unavailable(f"lost the event stream from {self.server}: {exc}") from None

    def wait(self, job_id: str) -> dict:
        """Follow a job's events to its end (reconnecting if the stream drops) and return the job."""
        for _ in range(100):
            try:
                for event, _data in self.events(job_id):
                    if event == "end":
                        return self.job(job_id)
            except errors.Unavailable:
                import time

                time.sleep(1)
            job = self.job(job_id)
            if job["status"] in ("succeeded", "failed", "canceled"):
                return job
        return self.job(job_id)

    # deployments and inference
    def deploy(
        self, name: str, *, job: str | None = None, candidate: str | None = None, force: bool = False, **options: Any
    ) -> dict:
        """Deploy a job's selected candidate (or a given candidate) as a new version of `name`."""
        body = {
            "name": name,
            "job": job,
            "candidate": candidate,
            "force": force,
            **{k: v for k, v in options.items() if v is not None},
        }
        return self._request(
            "POST", "/v1/deployments", json={k: v for k, v in body.items() if v is not None}, timeout=None
        ).json()

    def deployments(self) -> list[dict]:
        return self._request("GET", "/v1/deployments").json()

    def deployment(self, name: str) -> dict:
        return self._request("GET", f"/v1/deployments/{name}").json()

    def set_default(self, name: str, version: int) -> dict:
        return self._request("PATCH", f"/v1/deployments/{name}", json={"default_version": version}, timeout=None).json()

    def rollback(self, name: str) -> dict:
        return self._request("POST", f"/v1/deployments/{name}/rollback", timeout=None).json()

    def delete_deployment(self, name: str) -> None:
        self._request("DELETE", f"/v1/deployments/{name}")

    def metadata(self, name: str) -> dict:
        """The Open Inference Protocol metadata of a deployment: its inputs and outputs."""
        return self._request("GET", f"/v2/models/{name}").json()

    def infer(self, name: str, inputs: dict[str, Any], *, version: int | None = None) -> dict[str, Any]:
        """Run named numpy arrays through a deployment (/v2 JSON); returns its outputs as numpy arrays."""
        import numpy as np

        from service.serving.protocol import DTYPE_TO_V2, V2_TO_DTYPE

        body = {
            "inputs": [
                {
                    "name": k,
                    "shape": list(np.shape(v)),
                    "datatype": DTYPE_TO_V2[np.asarray(v).dtype.name],
                    "data": np.asarray(v).ravel().tolist(),
                }
                for k, v in inputs.items()
            ]
        }
        path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/infer"
        out = self._request("POST", path, json=body).json()
        return {
            o["name"]: np.asarray(o["data"], dtype=V2_TO_DTYPE.get(o["datatype"], "float32")).reshape(o["shape"])
            for o in out["outputs"]
        }

    def create_token(self, name: str, scopes: list[str], owner: str | None = None) -> dict:
        return self._request(
            "POST", "/v1/tokens", json={"name": name, "scopes": scopes, **({"owner": owner} if owner else {})}
        ).json()

    def tokens(self) -> list[dict]:
        return self._request("GET", "/v1/tokens").json()

    def revoke_token(self, token_id: str) -> None:
        self._request("DELETE", f"/v1/tokens/{token_id}")

    def download(self, candidate_id: str, dest: str | Path, *, zip: bool = False) -> Path:  # noqa: A002 - the API's own parameter name
        dest = Path(dest)
        params = {"format": "zip"} if zip else {}
        with self.http.stream("GET", f"/v1/candidates/{candidate_id}/artifact", params=params, timeout=None) as r:
            if not r.is_success:
                r.read()
                self._check(r)
            if dest.is_dir():
                name = r.headers.get("content-disposition", "").partition("filename=")[2].strip('"') or candidate_id
                dest = dest / name
            with open(dest, "wb") as f:
                for chunk in r.iter_bytes():
                    f.write(chunk)
        return dest
