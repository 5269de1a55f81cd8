"""LitServe around the same ONNX Runtime session, as its documentation shows a model served:
a `LitAPI` whose `decode_request` takes the Open Inference Protocol (v2) JSON body, `predict`
runs the session and `encode_response` answers v2 JSON; with --max-batch-size above 1, LitServe's
own batching joins requests (`batch`/`unbatch` concatenate and split along the first axis).

Runs in the benchmark's own environment (bench/serving.py makes bench/.venv-litserve with
`pip install litserve onnxruntime numpy`), never in the project's.

    bench/.venv-litserve/bin/python bench/litserve_server.py --onnx model.onnx --port 8100 \
        --threads 2 --max-batch-size 32 --batch-timeout 0.002
"""

from __future__ import annotations

import argparse

import litserve as ls
import numpy as np
import onnxruntime as ort


class OnnxAPI(ls.LitAPI):
    def __init__(self, onnx: str, threads: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.onnx, self.threads = onnx, threads

    def setup(self, device) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        self.session = ort.InferenceSession(self.onnx, options, providers=["CPUExecutionProvider"])
        self.output = self.session.get_outputs()[0].name

    def decode_request(self, request: dict) -> dict:
        return {
            item["name"]: np.asarray(item["data"], dtype=np.float32).reshape(item["shape"])
            for item in request["inputs"]
        }

    def batch(self, inputs: list[dict]) -> dict:
        return {name: np.concatenate([i[name] for i in inputs]) for name in inputs[0]}

    def predict(self, feeds: dict) -> np.ndarray:
        return self.session.run([self.output], feeds)[0]

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return [output[i : i + 1] for i in range(len(output))]

    def encode_response(self, y: np.ndarray) -> dict:
        return {
            "outputs": [{"name": self.output, "datatype": "FP32", "shape": list(y.shape), "data": y.ravel().tolist()}]
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/v2/models/model/infer")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--max-batch-size", type=int, default=1)
    ap.add_argument("--batch-timeout", type=float, default=0.0, help="seconds")
    args = ap.parse_args()
    api = OnnxAPI(
        args.onnx,
        args.threads,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout if args.max_batch_size > 1 else 0.0,
        api_path=args.path,
    )
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=60)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
