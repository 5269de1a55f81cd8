"""The hand-written baseline for bench/serving.py: what a user would write without Kiln.

One FastAPI POST endpoint that takes the Open Inference Protocol (v2) JSON body, builds a tensor,
runs the eager PyTorch model under `torch.inference_mode()` and answers v2 JSON. A plain `def`
endpoint, so FastAPI runs it in its thread pool (the usual way to keep a blocking model call off
the event loop); the body is taken as a `dict` (no per-element pydantic validation, the cheapest
common way to write it). Served by uvicorn with the same stack `kiln api` uses (one process,
uvloop + httptools when installed, no access log).

    .venv/bin/python bench/eager_server.py --model tests/zoo/mlp.py --port 8100 --threads 2
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch
import uvicorn
from fastapi import Body, FastAPI


def build(path: Path, entry: str) -> torch.nn.Module:
    spec = importlib.util.spec_from_file_location(f"zoo_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return getattr(module, entry)().eval()


def make_app(model: torch.nn.Module, output: str) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"ok": True}

    @app.post("/v2/models/{name}/infer")
    def infer(name: str, body: dict = Body(...)) -> dict:
        item = body["inputs"][0]
        x = torch.tensor(item["data"], dtype=torch.float32).reshape(item["shape"])
        with torch.inference_mode():
            y = model(x)
        return {
            "model_name": name,
            "id": body.get("id"),
            "outputs": [{"name": output, "datatype": "FP32", "shape": list(y.shape), "data": y.flatten().tolist()}],
        }

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="a zoo .py file")
    ap.add_argument("--entry", default="build_model")
    ap.add_argument("--output", default="logits")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args.model, args.entry)
    print(
        f"eager server: {args.model.name}, torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s)",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(make_app(model, args.output), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
