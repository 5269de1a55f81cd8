"""Does every real model convert, and is what Kiln picks as fast as what a user would build by hand?

    python3 bench/corpus.py [--models resnet50,bert,...] [--targets onnxruntime,torchscript,...]
                            [--precisions fp32] [--seconds 4] [--bench-seconds 1] [--no-compile] [--keep DIR]

Builds real architectures from torchvision, timm and transformers with random weights (their
BatchNorm statistics re-estimated on random inputs, bench/corpus_models.py, so that references are
not degenerate), writes each as a bundle (model.py + weights.pt + kiln.yaml), converts it with
Kiln in this process (`workers.engine.convert`: the sandbox, every capture and exporter, every
CPU target available here), then times at batch 1, in ONE interleaved run per model
(workers/benchmark.py `interleaved`, the same thread count everywhere, no busy-waiting threads):

- eager PyTorch;
- Kiln's selected candidate, loaded as Kiln serves it (`service.runtimes.load`: a code-bearing
  artifact runs in its isolated runner process, so its figure includes that channel);
- the plain path a user tries by hand: `torch.onnx.export` (the new exporter, else the
  TorchScript-based one) into an ONNX Runtime session with default optimizations;
- `torch.compile` (default mode; --no-compile leaves it out);
- OpenVINO from the eager model (`openvino.convert_model`, latency hint, computing in f32 as the
  candidates Kiln validates at fp32 do: on a CPU with bf16 its default is bf16);
- for Hugging Face models, Optimum's ONNX export with ORTOptimizer (optimization level 2).

Then prints, per model: whether Kiln has a passing candidate (and why not, in one line), the
exporter and capture used (and why each exporter tried before that one failed), the selected
candidate with Kiln's own speed-up over eager and its interval, whether the plain path worked and
with which exporter, each peer's p50, and the ratio fastest peer / Kiln with its ~95% interval;
the aim (Kiln at least as fast as the fastest peer) is met when the interval reaches 1.

The libraries the models need are not Kiln's: on first use the script makes its own environment
in bench/.venv-corpus (Kiln, transformers, timm, torchvision, openvino, optimum-onnx; torch pinned
by constraints.txt) and runs itself there. PyPI's torchvision is a CUDA build whose compiled ops do
not load beside the CPU torch: corpus_models.py defines the nms schema and a plain-PyTorch kernel.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

# No contender busy-waits (as in Kiln's own benchmark): set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parent.parent
ENV = ROOT / "bench" / ".venv-corpus"
PACKAGES = ["transformers", "timm", "torchvision==0.28.0", "openvino", "nncf", "optimum-onnx"]

IMAGE = {"inputs": ["image:float32[batch,3,224,224]"], "dims": {"batch": [1, 1, 2]}}


def ids(vocab: int) -> dict:
    return {
        "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"], "value_range": [0, vocab]}],
        "dims": {"batch": [1, 1, 2], "seq": [8, 64, 128]},
    }


# name: (entry, signature, Hugging Face model type for Optimum or None)
MODELS: dict[str, tuple[str, dict, str | None]] = {
    "resnet50": ("build_resnet50", IMAGE, None),
    "mobilenet_v3": ("build_mobilenet_v3", IMAGE, None),
    "efficientnet_b0": ("build_efficientnet_b0", IMAGE, None),
    "convnext_tiny": ("build_convnext_tiny", IMAGE, None),
    "swin_t": ("build_swin_t", IMAGE, None),
    "deeplabv3": ("build_deeplabv3", IMAGE, None),
    "ssdlite": ("build_ssdlite", {"inputs": ["image:float32[1,3,320,320]"]}, None),
    "vit_tiny": ("build_vit_tiny", IMAGE, None),
    "bert": ("build_bert", ids(30522), "bert"),
    "distilbert": ("build_distilbert", ids(30522), "distilbert"),
    "gpt2": ("build_gpt2", ids(50257), "gpt2"),
    "t5_encoder": ("build_t5_encoder", ids(32128), None),
    # In the corpus because the new exporter fails on it (torch.export: "Could not guard on
    # data-dependent expression Eq(u0, 1)", at `if is_global_attn:` on a tensor's .item()) and Kiln
    # still converts it, through the TorchScript-based exporter. A fixed length, a multiple of the
    # attention window: its chunking loops over the chunks in Python, so a trace holds one length.
    "longformer": (
        "build_longformer",
        {
            "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", 128], "value_range": [0, 30522]}],
            "dims": {"batch": [1, 1, 2]},
        },
        "longformer",
    ),
    "whisper_encoder": (
        "build_whisper_encoder",
        {"inputs": ["input_features:float32[batch,80,3000]"], "dims": {"batch": [1, 1, 2]}},
        None,
    ),
}
# ssdlite is left out by default: with random weights every anchor passes the score threshold, and
# the plain-PyTorch nms that stands in for torchvision's compiled one takes seconds per image.
DEFAULT = (
    "resnet50,mobilenet_v3,efficientnet_b0,convnext_tiny,swin_t,deeplabv3,vit_tiny,"
    "bert,distilbert,gpt2,t5_encoder,longformer"
)


def ensure_env() -> None:
    """Run in bench/.venv-corpus, making it first when it is missing."""
    if Path(sys.prefix).resolve() == ENV.resolve() or os.environ.get("KILN_CORPUS_ANY_ENV"):
        return
    py = ENV / "bin" / "python"
    if not py.exists():
        print(f"corpus: making {ENV.relative_to(ROOT)} (Kiln + {', '.join(PACKAGES)}); once", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(ENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
        subprocess.run(
            [str(py), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"), "-e", str(ROOT), *PACKAGES],
            check=True,
        )
    os.execv(str(py), [str(py), __file__, *sys.argv[1:]])


def write_bundle(name: str, directory: Path) -> tuple[object, dict]:
    """The bundle Kiln converts, and the same model (same weights) for the peers."""
    import torch
    import yaml

    sys.path.insert(0, str(ROOT / "bench"))
    import corpus_models

    entry, signature, _ = MODELS[name]
    model = getattr(corpus_models, entry)()
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "bench" / "corpus_models.py", directory / "model.py")
    # the statistics re-estimated here travel as weights: the sandbox builds the model with its
    # random initialisation, then loads these
    torch.save(model.state_dict(), directory / "weights.pt")
    (directory / "kiln.yaml").write_text(
        yaml.safe_dump({"entry": f"model.py:{entry}", "weights": "weights.pt", "signature": signature})
    )
    return model, signature


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}"


def flat(value) -> list:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in flat(v)]
    return []


def peers(
    name: str, model, inputs: dict, threads: int, tmp: Path, use_compile: bool, precisions: list[str]
) -> tuple[dict, dict, str]:
    """Callables a user would build by hand, at batch 1; why each missing one is missing; and which
    exporter the plain path used (with why the new one failed, when the old one stood in)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    calls: dict = {}
    failed: dict = {}
    args = tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in inputs.values())

    def eager() -> None:
        with torch.inference_mode():
            model(*args)

    calls["eager"] = eager

    def session(path: Path):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        # as Kiln times its own candidates: threads spin within a run and stop when it returns
        so.add_session_config_entry("session.force_spinning_stop", "1")
        so.log_severity_level = 3
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def ort_call(sess):
        feed = {i.name: v for i, v in zip(sess.get_inputs(), inputs.values())}
        return lambda: sess.run(None, feed)

    # the plain path: torch.onnx.export, the new exporter then the old one
    path = tmp / f"{name}.plain.onnx"
    reasons = []
    plain = "failed"
    for dynamo in (True, False):
        try:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                kw = {"dynamo": True, "external_data": False} if dynamo else {"dynamo": False, "opset_version": 17}
                torch.onnx.export(model, args, str(path), input_names=list(inputs), **kw)
            sess = session(path)
            fn = ort_call(sess)
            fn()
            calls["plain onnx"] = fn
            plain = "dynamo" if dynamo else f"torchscript-based ({reasons[0]})"
            break
        except Exception as exc:  # noqa: BLE001 - a peer that fails is reported, not raised
            # torch.onnx's own message is a generic "Failed to export the model with torch.export";
            # the cause it chains says why
            cause: BaseException = exc
            while cause.__cause__ is not None:
                cause = cause.__cause__
            reasons.append(("dynamo failed: " if dynamo else "torchscript failed: ") + one_line(cause))
    else:
        failed["plain onnx"] = "; ".join(reasons)

    try:
        import openvino as ov

        ovm = ov.convert_model(model, example_input=args)
        # in f32, as Kiln's fp32 candidates are validated: on a CPU with bf16, OpenVINO's default is to
        # compute in bf16 (Kiln's openvino-bf16 candidate, when bf16 is asked for)
        hint = "f32" if "bf16" not in precisions else "bf16"
        compiled = ov.Core().compile_model(
            ovm,
            "CPU",
            {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": str(threads), "INFERENCE_PRECISION_HINT": hint},
        )
        request = compiled.create_infer_request()
        feed = list(inputs.values())
        request.infer(feed)
        calls["openvino"] = lambda: request.infer(feed)
    except Exception as exc:  # noqa: BLE001 - a failure is a row of the table, not a crash
        failed["openvino"] = one_line(exc)

    hf_type = MODELS[name][2]
    if hf_type:
        try:
            calls["optimum"] = optimum_call(model, hf_type, inputs, tmp, session)
        except Exception as exc:  # noqa: BLE001 - a failure is a row of the table, not a crash
            failed["optimum"] = one_line(exc)

    if use_compile:
        try:
            compiled_model = torch.compile(model)

            def compiled_call() -> None:
                with torch.inference_mode():
                    compiled_model(*args)

            t0 = time.perf_counter()
            compiled_call()
            compiled_call()
            print(f"  torch.compile warm-up {time.perf_counter() - t0:.1f} s", flush=True)
            calls["torch.compile"] = compiled_call
        except Exception as exc:  # noqa: BLE001 - a failure is a row of the table, not a crash
            failed["torch.compile"] = one_line(exc)
    return calls, failed, plain


def optimum_call(model, hf_type: str, inputs: dict, tmp: Path, session):
    """Optimum's export of the same Hugging Face model (same weights), then ORTOptimizer."""
    from optimum.exporters.onnx import main_export
    from optimum.onnxruntime import ORTOptimizer
    from optimum.onnxruntime.configuration import OptimizationConfig

    saved = tmp / "hf-saved"
    exported = tmp / "hf-onnx"
    optimized = tmp / "hf-optimized"
    for d in (saved, exported, optimized):
        shutil.rmtree(d, ignore_errors=True)
    model.inner.save_pretrained(saved)
    main_export(str(saved), output=str(exported), task="feature-extraction", do_validation=False)
    optimizer = ORTOptimizer.from_pretrained(str(exported))
    optimizer.optimize(save_dir=str(optimized), optimization_config=OptimizationConfig(optimization_level=2))
    files = sorted(optimized.glob("*.onnx"))
    sess = session(files[0])
    names = [i.name for i in sess.get_inputs()]
    ids = next(iter(inputs.values()))
    import numpy as np

    feed = {n: (ids if n == "input_ids" else np.ones_like(ids)) for n in names}
    sess.run(None, feed)
    return lambda: sess.run(None, feed)


def convert(name: str, bundle: Path, out: Path, args) -> object:
    from workers import engine

    return engine.convert(
        bundle,
        out,
        options={
            "targets": args.targets.split(","),
            "precisions": args.precisions.split(","),
            "threads": args.threads,
            "bench_seconds": args.bench_seconds,
            "batch_sizes": [1],
        },
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT, help=f"any of {','.join(MODELS)}")
    ap.add_argument("--targets", default=None, help="Kiln targets (default: every CPU target available here)")
    ap.add_argument("--precisions", default="fp32")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seconds", type=float, default=4.0, help="interleaved timing of the peers, per model")
    ap.add_argument("--bench-seconds", type=float, default=1.0, help="Kiln's own benchmark, per contender")
    ap.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    ap.add_argument("--keep", type=Path, help="keep bundles and conversions here")
    args = ap.parse_args()
    ensure_env()
    sys.path.insert(0, str(ROOT))

    from service import runtimes
    from service import samples as sample_io
    from service.options import GPU_TARGETS, TARGETS
    from service.signature import Signature
    from workers.benchmark import interleaved, machine_load, ratio, speedup_text

    if args.targets is None:
        have = set(runtimes.available())
        args.targets = ",".join(t for t in TARGETS if t not in GPU_TARGETS and t in have)
    import torch

    torch.set_num_threads(args.threads)
    base = args.keep or Path(tempfile.mkdtemp(prefix="kiln-corpus-"))
    print(
        f"corpus: targets {args.targets}, precisions {args.precisions}, {args.threads} thread(s), "
        f"torch {torch.__version__}, load before {machine_load()}",
        flush=True,
    )
    rows = []
    for name in args.models.split(","):
        print(f"\n== {name}", flush=True)
        row: dict = {"model": name}
        rows.append(row)
        t0 = time.perf_counter()
        try:
            model, sig = write_bundle(name, base / name / "bundle")
        except Exception as exc:  # noqa: BLE001 - a failure is a row of the table, not a crash
            row["kiln"] = f"model not built: {one_line(exc)}"
            continue
        try:
            ctx = convert(name, base / name / "bundle", base / name / "out", args)
        except Exception as exc:  # noqa: BLE001 - a conversion that fails is a row, not a crash
            row["kiln"] = f"FAILED: {one_line(exc)}"
            traceback.print_exc()
            ctx = None
        row["convert_s"] = time.perf_counter() - t0
        selected = None
        if ctx is not None:
            passing = [c for c in ctx.candidates if c.passed]
            row["passing"] = ",".join(c.id for c in passing) or "none"
            row["failed"] = "; ".join(
                f"{c.id}: {(c.reason or (c.validation.reason if c.validation else '') or '')[:120]}"
                for c in ctx.candidates
                if not c.passed
            )
            row["exporter"] = ctx.onnx_exporter or "-"
            row["export_failed"] = export_failures(ctx.export_attempts)
            row["capture"] = ctx.preferred_capture or "-"
            if ctx.selection and ctx.selection.candidate:
                selected = ctx.candidate(ctx.selection.candidate)
                row["kiln"] = selected.id
                row["kiln_vs_eager"] = speedup_text(
                    selected.speedup, selected.speedup_low, selected.speedup_high, selected.noisy
                )
            else:
                # without a selection, the step that failed says why (e.g. no sandbox on this machine)
                failed_step = next((st for st in ctx.steps if st.error), None)
                why = ctx.selection.reason if ctx.selection else None
                why = why or (f"{failed_step.name}: {failed_step.error}" if failed_step else "no selection")
                row["kiln"] = "no candidate: " + " ".join(why.split())[:200]
        inputs = sample_io.at_batch(Signature.parse(sig), 1)
        tmp = base / name / "peers"
        tmp.mkdir(parents=True, exist_ok=True)
        calls, failed, row["plain"] = peers(
            name, model, inputs, args.threads, tmp, not args.no_compile, args.precisions.split(",")
        )
        row["peer_failures"] = failed
        rt = None
        if selected is not None:
            try:
                rt = runtimes.load(ctx.out / selected.artifact_dir, threads=args.threads, spin=False)
                rt.run(inputs)
                calls["kiln"] = lambda rt=rt, inputs=inputs: rt.run(inputs)
            except Exception as exc:  # noqa: BLE001 - a failure is a row of the table, not a crash
                row["kiln_load"] = one_line(exc)
        others = [n for n in calls if n not in ("kiln",)]
        timed = interleaved(
            calls, batch=1, budget_s=args.seconds, pairs=[(o, "kiln") for o in others if "kiln" in calls]
        )
        if rt is not None:
            rt.close()
        p50 = {n: t.point()["p50_ms"] for n, t in timed.items()}
        row["p50"] = p50
        if "kiln" in timed:
            contenders = [n for n in others if n != "eager"]
            if contenders:
                fastest = min(contenders, key=lambda n: p50[n])
                r, lo, hi = ratio(timed[fastest].rounds, timed["kiln"].rounds)
                row["vs_peer"] = (fastest, r, lo, hi)
        print_row(row)
    print_table(rows, args)
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)


def export_failures(attempts: list[dict]) -> str:
    """The ONNX exporters Kiln tried before the one it kept, and why each failed: the cause that
    torch.onnx puts last, rather than its generic first sentence."""
    reasons = []
    for a in attempts:
        if a.get("skipped") or (a.get("ok") and a.get("agrees")):
            continue
        error = a.get("error") or "disagrees on " + ", ".join(a.get("disagreeing_samples") or [])
        cause = error.rfind("(caused by ")
        if cause >= 0:
            error = error[cause + len("(caused by ") : -1]
        reasons.append(f"{a['exporter']}:{a['source']}: {error[:160]}")
    return "; ".join(reasons)


def print_row(row: dict) -> None:
    for key in (
        "kiln",
        "passing",
        "failed",
        "exporter",
        "export_failed",
        "capture",
        "kiln_vs_eager",
        "kiln_load",
        "convert_s",
        "plain",
    ):
        if row.get(key):
            print(f"  {key}: {row[key]}")
    for peer, why in row.get("peer_failures", {}).items():
        print(f"  peer {peer} failed: {why}")
    print("  p50 ms at batch 1: " + ", ".join(f"{n} {v:.2f}" for n, v in row.get("p50", {}).items()), flush=True)


def print_table(rows: list[dict], args) -> None:
    print(
        "\n| model | passing candidates | exporter | Kiln selects | vs eager (Kiln's benchmark) | eager ms | Kiln ms | plain ONNX ms | fastest peer (ms) | Kiln vs fastest peer | aim |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    covered = met = compared = 0
    for row in rows:
        p50 = row.get("p50", {})
        has = bool(row.get("passing")) and row.get("passing") != "none"
        covered += has
        vs = row.get("vs_peer")
        aim = ""
        if vs:
            compared += 1
            ok = vs[3] >= 1.0
            met += ok
            aim = "met" if ok else "missed"

        def ms(key: str, p50: dict = p50) -> str:
            return f"{p50[key]:.2f}" if key in p50 else "-"

        print(
            f"| {row['model']} | {row.get('passing') or '-'} | {row.get('exporter', '-')} | {row.get('kiln', '-')} | "
            f"{row.get('kiln_vs_eager', '-')} | {ms('eager')} | {ms('kiln')} | "
            f"{ms('plain onnx') if 'plain onnx' in p50 else 'failed'}"
            + (" (torchscript-based)" if row.get("plain", "").startswith("torchscript") else "")
            + " | "
            + (f"{vs[0]} ({p50[vs[0]]:.2f})" if vs else "-")
            + " | "
            + (f"{vs[1]:.2f}x ({vs[2]:.2f}-{vs[3]:.2f})" if vs else "-")
            + f" | {aim} |"
        )
    print(
        f"\ncoverage: {covered}/{len(rows)} models with a passing candidate; Kiln at least as fast as the "
        f"fastest peer (interval reaching 1) on {met}/{compared}. Ratios are peer p50 / Kiln p50 per round."
    )


if __name__ == "__main__":
    main()
