"""Where a gRPC ModelInfer's time goes for one sequential Python client (the MLP, x[1,64] -> [1,10]):
tritonclient.grpc and a bare grpc stub sending the same request, each to Kiln and to an echo server
(grpc's synchronous server answering a fixed ModelInferResponse, no Kiln code), beside HTTP JSON
from http.client, all timed in interleaved rounds (workers/benchmark.py) so that every row sees the
same machine. Then Kiln's ModelInfer handler alone, called in this process with a stand-in context.

    .venv/bin/python bench/grpc_floor.py [--seconds 4] [--profile]

The differences it prints, from per-round medians:
  client     tritonclient -> echo   minus  bare stub -> echo   (tritonclient's own Python work)
  transport  bare stub -> echo                                 (grpcio client + server, no handler work)
  server     bare stub -> Kiln      minus  bare stub -> echo   (Kiln's handler and the run)
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

DEP = "mlp"


def echo_main(port: int, response_file: str) -> None:
    """A gRPC server with Kiln's server settings answering every ModelInfer with the same response."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from service.serving.proto import inference_pb2 as pb

    response = pb.ModelInferResponse.FromString(Path(response_file).read_bytes())

    def infer(request, context):
        return response

    def live(request, context):
        return pb.ServerLiveResponse(live=True)

    # Kiln's thread pool size; ECHO_OPTIONS (a JSON list of [name, value]) tries server options
    options = [tuple(o) for o in json.loads(os.environ.get("ECHO_OPTIONS", "[]"))]
    server = grpc.server(ThreadPoolExecutor(max_workers=32), options=options)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "inference.GRPCInferenceService",
                {
                    "ModelInfer": grpc.unary_unary_rpc_method_handler(
                        infer,
                        request_deserializer=pb.ModelInferRequest.FromString,
                        response_serializer=pb.ModelInferResponse.SerializeToString,
                    ),
                    "ServerLive": grpc.unary_unary_rpc_method_handler(
                        live,
                        request_deserializer=pb.ServerLiveRequest.FromString,
                        response_serializer=pb.ServerLiveResponse.SerializeToString,
                    ),
                },
            ),
        )
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def wait_grpc(port: int, timeout: float = 60.0) -> None:
    import grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=timeout)
    channel.close()


def deploy(kiln_port: int) -> None:
    import serving

    body = json.dumps({"name": DEP, "job": CONVERTED["mlp"]["job"], "max_batch_size": 8}).encode()
    status, _, resp = serving.request(kiln_port, "POST", "/v1/deployments", body, {"Content-Type": "application/json"})
    if status != 201 or json.loads(resp).get("state") != "ready":
        raise RuntimeError(f"deployment failed: {status} {resp[:500]!r}")


CONVERTED: dict = {}


def _wait_model(port: int, timeout: float = 60.0) -> None:
    """Until a Kiln started after the deployment has loaded it (its sync with the database)."""
    import serving
    import tritonclient.grpc as tg

    headers = {k.lower(): v for k, v in serving.AUTH.items()}
    deadline = time.monotonic() + timeout
    with tg.InferenceServerClient(f"127.0.0.1:{port}") as client:
        while True:
            try:
                if client.is_model_ready(DEP, headers=headers):
                    return
            except Exception:  # not yet
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.2)


def over_the_wire(kiln_port: int, grpc_port: int, echo_port: int, seconds: float, other_port: int = 0) -> None:
    import grpc
    import numpy as np
    import serving
    import tritonclient.grpc as tg
    from tritonclient.grpc import service_pb2

    from workers.benchmark import busy_share, interleaved, machine_load

    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    headers = {k.lower(): v for k, v in serving.AUTH.items()}
    metadata = tuple(headers.items())
    js = json.dumps({"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": x.ravel().tolist()}]})
    conn = http.client.HTTPConnection("127.0.0.1", kiln_port, timeout=60)
    http_headers = {**serving.AUTH, "Content-Type": "application/json"}

    tensor = tg.InferInput("x", [1, 64], "FP32")
    tensor.set_data_from_numpy(x)
    kiln_tc = tg.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    echo_tc = tg.InferenceServerClient(f"127.0.0.1:{echo_port}")
    # the request tritonclient sends, built once
    request = service_pb2.ModelInferRequest(model_name=DEP)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(x.tobytes())

    def stub(port: int, method: str, req, resp):
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        call = channel.unary_unary(
            f"/inference.GRPCInferenceService/{method}",
            request_serializer=type(req).SerializeToString,
            response_deserializer=resp.FromString,
            _registered_method=True,
        )
        return lambda: call(req, metadata=metadata)

    kiln_stub = stub(grpc_port, "ModelInfer", request, service_pb2.ModelInferResponse)
    echo_stub = stub(echo_port, "ModelInfer", request, service_pb2.ModelInferResponse)
    kiln_live = stub(grpc_port, "ServerLive", service_pb2.ServerLiveRequest(), service_pb2.ServerLiveResponse)
    want = kiln_tc.infer(DEP, [tensor], headers=headers).as_numpy("logits")
    assert np.array_equal(np.frombuffer(kiln_stub().raw_output_contents[0], np.float32).reshape(1, 10), want)

    def over_http() -> None:
        conn.request("POST", f"/v2/models/{DEP}/infer", js, http_headers)
        r = conn.getresponse()
        r.read()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}")

    contenders = {
        "HTTP JSON -> Kiln (http.client)": over_http,
        "tritonclient -> Kiln ModelInfer": lambda: kiln_tc.infer(DEP, [tensor], headers=headers).as_numpy("logits"),
        "bare stub -> Kiln ModelInfer": kiln_stub,
        "tritonclient -> echo ModelInfer": lambda: echo_tc.infer(DEP, [tensor], headers=headers).as_numpy("logits"),
        "bare stub -> echo ModelInfer": echo_stub,
        "bare stub -> Kiln ServerLive": kiln_live,
    }
    if other_port:
        other_tc = tg.InferenceServerClient(f"127.0.0.1:{other_port}")
        contenders["tritonclient -> Kiln B ModelInfer"] = lambda: other_tc.infer(
            DEP, [tensor], headers=headers
        ).as_numpy("logits")
        contenders["bare stub -> Kiln B ModelInfer"] = stub(
            other_port, "ModelInfer", request, service_pb2.ModelInferResponse
        )
    names = list(contenders)
    before = machine_load()
    timed = interleaved(
        contenders, batch=1, budget_s=len(names) * seconds, pause_s=0.0, pairs=[(names[0], names[1])], min_rounds=15
    )
    after = machine_load()
    med = {n: float(np.median(t.rounds)) * 1e3 for n, t in timed.items()}

    share = busy_share(before, after)
    print(
        f"\nload (1 min) before {before['load_1m']:.2f}, after {after['load_1m']:.2f}; CPU stalled "
        f"{'?' if share is None else f'{share:.0%}'} of the time; {len(timed[names[0]].rounds)} rounds"
    )
    for n in names:
        print(f"  {n:38s} p50 {med[n]:.3f} ms ({len(timed[n].calls)} calls)")

    def diff(a: str, b: str) -> str:
        d = sorted((x - y) * 1e3 for x, y in zip(timed[a].rounds, timed[b].rounds))
        q = len(d) // 4
        return f"{d[len(d) // 2]:+.3f} ms (middle half {d[q]:+.3f}..{d[-q - 1]:+.3f})"

    def ratio(a: str, b: str) -> str:
        r = sorted(x / y for x, y in zip(timed[a].rounds, timed[b].rounds))
        q = len(r) // 4
        return f"{r[len(r) // 2]:.2f}x (middle half {r[q]:.2f}..{r[-q - 1]:.2f})"

    print("split, from per-round medians:")
    print(f"  client: tritonclient - bare stub (echo)   {diff(names[3], names[4])}")
    print(f"  client: tritonclient - bare stub (Kiln)   {diff(names[1], names[2])}")
    print(f"  server: Kiln - echo (bare stub)           {diff(names[2], names[4])}")
    print(f"  server: Kiln ModelInfer - ServerLive      {diff(names[2], names[5])}")
    print(f"  transport floor: bare stub -> echo        {med[names[4]]:.3f} ms")
    print(f"  gRPC speed-up over HTTP JSON (tritonclient -> Kiln): {ratio(names[0], names[1])}")
    print(f"  the floor's (tritonclient -> echo over HTTP JSON):    {ratio(names[0], names[3])}")
    if other_port:
        print(f"  time of Kiln B / Kiln (tritonclient): {ratio(names[6], names[1])}, {diff(names[6], names[1])}")
        print(f"  time of Kiln B / Kiln (bare stub):    {ratio(names[7], names[2])}, {diff(names[7], names[2])}")
        other_tc.close()
        print(f"  gRPC B over HTTP JSON:         {ratio(names[0], names[6])}")
    conn.close()
    kiln_tc.close()
    echo_tc.close()


def handler_alone(seconds: float, profile: bool) -> None:
    """Kiln's ModelInfer handler called in this process (no grpc), with its parts timed."""
    import cProfile
    import pstats

    import numpy as np
    import serving
    from fastapi.testclient import TestClient
    from tritonclient.grpc import service_pb2

    from service.app import create_app
    from service.serving import grpc_server
    from service.serving.manager import infer_blocking
    from workers.benchmark import interleaved

    os.environ.pop("KILN_GRPC_PORT", None)
    from service.config import get_settings

    get_settings.cache_clear()
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    request = service_pb2.ModelInferRequest(model_name=DEP)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(x.tobytes())
    wire = request.SerializeToString()
    metadata = tuple((k.lower(), v) for k, v in serving.AUTH.items())

    class Context:
        def invocation_metadata(self):
            return metadata

        def abort(self, code, details):
            raise RuntimeError(f"{code}: {details}")

    ctx = Context()
    with TestClient(create_app()) as api:
        manager = api.app.state.manager
        deadline = time.monotonic() + 60
        while True:
            try:
                served = manager.resolve(grpc_server._principal(ctx).owner, DEP, None)
                if served.state == "ready":
                    break
            except Exception:  # not loaded yet
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.2)
        service = grpc_server.InferenceService(manager)
        inputs = grpc_server.inputs_of(request, served)
        outputs = infer_blocking(served, inputs)
        runner = served.batcher.runners[0]
        owner = grpc_server._principal(ctx).owner
        response = service.ModelInfer(request, ctx)
        contenders = {
            "whole handler (parse + ModelInfer + serialize)": lambda: service.ModelInfer(
                service_pb2.ModelInferRequest.FromString(wire), ctx
            ).SerializeToString(),
            "ModelInfer(request, context)": lambda: service.ModelInfer(request, ctx),
            "  _principal (auth, metadata)": lambda: grpc_server._principal(ctx),
            "  manager.resolve": lambda: manager.resolve(owner, DEP, None),
            "  inputs_of (parse, checks)": lambda: grpc_server.inputs_of(request, served),
            "  infer_blocking (batcher, run)": lambda: infer_blocking(served, inputs),
            "  the runner alone": lambda: runner(inputs),
            "  response building": lambda: _response(served, request, outputs),
            "request FromString": lambda: service_pb2.ModelInferRequest.FromString(wire),
            "response SerializeToString": response.SerializeToString,
        }
        timed = interleaved(contenders, batch=1, budget_s=seconds, pause_s=0.0)
        print(
            f"\nKiln's handler in this process (no grpc; the runtime has {served.threads} intra-op thread(s)), per call:"
        )
        for n, t in timed.items():
            print(f"  {n:48s} {float(np.median(t.rounds)) * 1e6:8.1f} us")
        if profile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(20000):
                service.ModelInfer(request, ctx)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def _response(served, request, outputs):
    from service.serving import protocol
    from service.serving.proto import inference_pb2 as pb

    response = pb.ModelInferResponse(model_name=served.name, model_version=str(served.version), id=request.id)
    for name in list(outputs):
        arr = outputs[name]
        response.outputs.add(name=name, datatype=protocol.DTYPE_TO_V2["float32"], shape=list(arr.shape))
        response.raw_output_contents.append(arr.tobytes())
    return response


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--seconds", type=float, default=4.0, help="budget per contender over the wire")
    ap.add_argument("--profile", action="store_true", help="cProfile Kiln's handler in this process")
    ap.add_argument("--no-wire", action="store_true", help="only the in-process handler timing")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (data dir, logs)")
    ap.add_argument(
        "--ab",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="also start a second Kiln with this environment (repeatable) and time it beside the first",
    )
    ap.add_argument("--echo", nargs=2, metavar=("PORT", "RESPONSE_FILE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.echo:
        return echo_main(int(args.echo[0]), args.echo[1])

    tmp = Path(tempfile.mkdtemp(prefix="kiln-grpc-floor-"))
    os.environ["KILN_DATA_DIR"] = str(tmp / "data")
    import serving

    servers = serving.Servers()
    try:
        CONVERTED.update(serving.convert(["mlp"]))
        kiln_port, grpc_port, echo_port = serving.free_port(), serving.free_port(), serving.free_port()
        log = tmp / "kiln.log"
        cmd = [sys.executable, "-m", "workers.cli", "api", "--port", str(kiln_port)]
        kiln = servers.start(cmd, {**os.environ, "KILN_GRPC_PORT": str(grpc_port)}, log)
        serving.wait_http(kiln_port, "/v2/health/live", kiln, log)
        deploy(kiln_port)
        other_port = 0
        if args.ab:
            other_port, other_http = serving.free_port(), serving.free_port()
            env_b = {**os.environ, "KILN_GRPC_PORT": str(other_port), **dict(kv.split("=", 1) for kv in args.ab)}
            cmd_b = [sys.executable, "-m", "workers.cli", "api", "--port", str(other_http)]
            other = servers.start(cmd_b, env_b, tmp / "kiln-b.log")
            serving.wait_http(other_http, "/v2/health/live", other, tmp / "kiln-b.log")
        if not args.no_wire:
            import tritonclient.grpc as tg

            wait_grpc(grpc_port)
            x = __import__("numpy").zeros((1, 64), "float32")
            tensor = tg.InferInput("x", [1, 64], "FP32")
            tensor.set_data_from_numpy(x)
            with tg.InferenceServerClient(f"127.0.0.1:{grpc_port}") as c:
                headers = {k.lower(): v for k, v in serving.AUTH.items()}
                answer = c.infer(DEP, [tensor], headers=headers).get_response()
            (tmp / "response.bin").write_bytes(answer.SerializeToString())
            echo_cmd = [sys.executable, __file__, "--echo", str(echo_port), str(tmp / "response.bin")]
            servers.start(echo_cmd, dict(os.environ), tmp / "echo.log")
            wait_grpc(echo_port)
            if other_port:
                _wait_model(other_port)
            over_the_wire(kiln_port, grpc_port, echo_port, args.seconds, other_port)
        handler_alone(args.seconds, args.profile)
    finally:
        servers.stop_all()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
