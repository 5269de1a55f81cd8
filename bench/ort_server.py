"""The hand-written baseline around the same runtime Kiln serves: what a user would write without
Kiln, given the ONNX file Kiln built.

One FastAPI POST endpoint that takes the Open Inference Protocol (v2) JSON body, builds a numpy
array, runs one `onnxruntime.InferenceSession` (the same file, the same intra-op thread count
Kiln gives a deployment) and answers v2 JSON. A plain `def` endpoint, so FastAPI runs it in its
thread pool (the usual way to keep a blocking model call off the event loop); the body is taken
as a `dict`. Served by uvicorn as `kiln api` is (one process, uvloop + httptools when installed,
no access log).

    .venv/bin/python bench/ort_server.py --onnx model.onnx --port 8100 --threads 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import Body, FastAPI


def make_app(session: ort.InferenceSession) -> FastAPI:
    app = FastAPI()
    output = session.get_outputs()[0].name

    @app.get("/health")
    def health() -> dict:
        return {"ok": True}

    @app.post("/v2/models/{name}/infer")
    def infer(name: str, body: dict = Body(...)) -> dict:
        feeds = {
            item["name"]: np.asarray(item["data"], dtype=np.float32).reshape(item["shape"]) for item in body["inputs"]
        }
        (y,) = session.run([output], feeds)
        return {
            "model_name": name,
            "id": body.get("id"),
            "outputs": [{"name": output, "datatype": "FP32", "shape": list(y.shape), "data": y.ravel().tolist()}],
        }

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", type=Path, required=True, help="the .onnx file")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT's default)")
    args = ap.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(args.onnx), options, providers=["CPUExecutionProvider"])
    print(
        f"ORT server: {args.onnx.name}, onnxruntime {ort.__version__}, {args.threads} intra-op thread(s)",
        file=sys.stderr,
    )
    uvicorn.run(make_app(session), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
