"""The floor for a lone client's binary /v2 request: the least a Python server can do around the
same runtime, to set Kiln's overhead against (bench/serving.py's CNN aim).

One thread, blocking sockets, one keep-alive connection at a time: it reads the request line and
headers, the Content-Length body into one buffer, takes the input tensor in place from the binary
part (the Inference-Header-Content-Length split of the Open Inference Protocol's binary
extension), runs the artifact through `service.runtimes.load` with the same settings as Kiln's
server (intra-op threads, no busy-waiting between runs) and answers the first output as binary
data. No routing, authentication, checks, metrics, batching, event loop or second thread: it
trusts its client, so it is a measuring stick, not a server.

    .venv/bin/python bench/bare_server.py --artifact DIR --port 8200 --threads 2
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DTYPES = {"FP32": "float32", "FP16": "float16", "INT64": "int64", "INT32": "int32"}


def serve(artifact: Path, port: int, threads: int) -> None:
    import numpy as np

    from service import runtimes

    rt = runtimes.load(artifact, threads=threads, spin=False)
    srv = socket.create_server(("127.0.0.1", port))
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            pending = b""
            while True:
                while b"\r\n\r\n" not in pending:
                    chunk = conn.recv(1 << 20)
                    if not chunk:
                        raise EOFError
                    pending += chunk
                head, _, rest = pending.partition(b"\r\n\r\n")
                fields = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:])
                fields = {k.strip().lower(): v.strip() for k, v in fields.items()}
                size = int(fields[b"content-length"])
                header_size = int(fields[b"inference-header-content-length"])
                body = bytearray(rest)
                while len(body) < size:
                    chunk = conn.recv(1 << 20)
                    if not chunk:
                        raise EOFError
                    body += chunk
                pending = bytes(body[size:])
                doc = json.loads(bytes(body[:header_size]))
                spec = doc["inputs"][0]
                x = np.frombuffer(body, DTYPES[spec["datatype"]], offset=header_size).reshape(spec["shape"])
                name, y = next(iter(rt.run({spec["name"]: x}).items()))
                out = np.ascontiguousarray(y, np.float32).tobytes()
                meta = {
                    "name": name,
                    "datatype": "FP32",
                    "shape": list(y.shape),
                    "parameters": {"binary_data_size": len(out)},
                }
                header = json.dumps({"outputs": [meta]}).encode()
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                    b"Inference-Header-Content-Length: %d\r\nContent-Length: %d\r\n\r\n"
                    % (len(header), len(header) + len(out))
                    + header
                    + out
                )
        except (EOFError, OSError):
            conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", type=Path, required=True, help="a built artifact directory (kiln-artifact.json)")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    serve(args.artifact, args.port, args.threads)


if __name__ == "__main__":
    main()
