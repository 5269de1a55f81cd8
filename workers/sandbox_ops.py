"""Operations that run inside the sandbox child. Each takes (args, workdir) and returns a
JSON-able dict; arrays and models travel as files in the working directory, never as pickles.

These are the only places where user code (model source, weights, captured graphs) is executed.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from service import samples as sample_io
from service.errors import InvalidBundle, InvalidEntryPoint, InvalidSignature
from service.options import ONNX_EXPORTERS
from service.runtimes.torchscript import telling_line
from service.signature import Signature

Op = Callable[[dict[str, Any], Path], dict[str, Any]]
OPS: dict[str, Op] = {}


def op(name: str) -> Callable[[Op], Op]:
    def register(fn: Op) -> Op:
        OPS[name] = fn
        return fn

    return register


@op("call_entry")
def call_entry(args: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Import a bundle's entry point and call it; report the type of what it returned."""
    from workers.modelcode import import_entry

    fn = import_entry(Path(args["bundle_dir"]), args["entry"])
    value = fn()
    return {"type": type(value).__name__, "value": value if isinstance(value, dict) else None}


# --- helpers (child side) ---------------------------------------------------------------------


def _setup_torch(args: dict[str, Any]) -> Any:
    import torch

    if args.get("threads"):
        torch.set_num_threads(int(args["threads"]))
    torch.manual_seed(0)
    return torch


def build_eager(bundle: dict[str, Any]) -> Any:
    """The model to treat as the reference: built from source, or the uploaded captured graph."""
    import torch

    kind = bundle["kind"]
    if kind == "python":
        from workers.modelcode import import_entry

        model = import_entry(Path(bundle["root"]), bundle["entry"])()
        if not isinstance(model, torch.nn.Module):
            raise InvalidEntryPoint(
                f"entry point {bundle['entry']!r} returned {type(model).__name__}, not a torch.nn.Module"
            )
        if bundle.get("weights"):
            _load_weights(model, Path(bundle["weights"]))
    elif kind == "torchscript":
        model = torch.jit.load(bundle["model_file"], map_location="cpu")
    elif kind == "export":
        # An ExportedProgram's module is already in the mode it was exported in, and refuses eval()
        # and train() ("Calling eval() is not supported yet.")
        return torch.export.load(bundle["model_file"]).module()
    else:
        raise InvalidBundle(f"bundle kind {kind!r} has no eager model")
    if hasattr(model, "eval"):
        model.eval()
    return model


def _load_weights(model: Any, path: Path) -> None:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - anything but a plain state dict is refused
            raise InvalidBundle(
                f"weights file {path.name} is not a plain state dict "
                f"(loaded with weights_only=True): {str(exc).splitlines()[0][:300]}"
            ) from None
    if not isinstance(state, dict):
        raise InvalidBundle(f"weights file {path.name} holds a {type(state).__name__}, not a state dict")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        details = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        raise InvalidBundle(f"weights {path.name} do not match the model: {'; '.join(details[:3])[:500]}") from None
    problems = []
    if result.missing_keys:
        problems.append(f"missing {', '.join(result.missing_keys[:5])}")
    if result.unexpected_keys:
        problems.append(f"unexpected {', '.join(result.unexpected_keys[:5])}")
    if problems:
        raise InvalidBundle(f"weights {path.name} do not match the model: {'; '.join(problems)}")


def describe(exc: BaseException) -> str:
    """One readable line for an exception from torch: ANSI colours stripped, the telling line first."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    telling = next(
        (line for line in lines if re.search(r"not supported|[Uu]nsupported|no decomposition", line)),
        telling_line(text),
    )
    cause = exc.__cause__ or exc.__context__
    tail = f" (caused by {describe(cause)})" if cause is not None and cause is not exc else ""
    return f"{type(exc).__name__}: {telling[:400]}{tail}"[:1200]


def export_hint(exc: BaseException) -> str | None:
    """For torch.export failing on a branch over tensor values: the model's line, and what to do."""
    import re

    text = str(exc)
    if "GuardOnDataDependentSymNode" not in type(exc).__name__ and "data-dependent" not in text:
        return None
    calls = re.findall(r'File "([^"]+)", line (\d+), in (\w+)\n\s+(.+)', text.split("raised this error", 1)[-1])
    where = ""
    if calls:
        path, line, fn, code = calls[-1]
        where = f" at {Path(path).name}:{line} in {fn} (`{code.strip()[:120]}`)"
    return (
        f"the model branches on tensor values{where}; torch.export needs that branch written with "
        "torch.cond (or both sides computed and picked with torch.where)"
    )


def trace_hint(exc: BaseException) -> str | None:
    """For torch.jit.trace failing on an index taken inside torch's TransformGetItemToIndex mode:
    the model's line, and why no trace can be had.

    Hugging Face's attention masks (GPT-2's in transformers 4.57, through create_causal_mask) call
    a mask function through nested torch.vmap and read a mask tensor in it as `mask[b, k]` inside
    that mode, where the index is an autograd Function over a list of index tensors (ModIndex).
    The tracer cannot record such a call when the list holds traced tensors and fails with a bare
    "RuntimeError: unordered_map::at". Nor would going around it help: a trace of torch.vmap
    records the batch sizes it saw as constants, so the trace would hold one input shape only.
    The mask has to be built without vmap for a trace (what Optimum's ONNX export patches into
    transformers); Kiln does not patch a library's code, so it says why here."""
    import traceback

    import torch

    torch_dir = str(Path(torch.__file__).resolve().parent) + os.sep
    frames = [(f, str(Path(f.filename).resolve())) for f in traceback.extract_tb(exc.__traceback__)]
    at = next(
        (
            i
            for i, (f, path) in enumerate(frames)
            if path.endswith("_trace_wrapped_higher_order_op.py") and f.name == "__torch_function__"
        ),
        None,
    )
    if at is None:
        return None
    caller = next((f for f, path in reversed(frames[:at]) if not path.startswith(torch_dir)), None)
    where = ""
    if caller is not None:
        code = (caller.line or "").strip()[:120]
        where = f" at {Path(caller.filename).name}:{caller.lineno} in {caller.name} (`{code}`)"
    vmapped = any(path.startswith(torch_dir + "_functorch") and f.name == "_flat_vmap" for f, path in frames[:at])
    return (
        f"the model indexes a tensor{' inside torch.vmap' if vmapped else ''} under torch's "
        f"TransformGetItemToIndex{where}, as Hugging Face's attention masks do; torch.jit.trace cannot "
        "record that index (an autograd Function over a list of tensors)"
        + (", and a trace of torch.vmap would hold only the traced sizes" if vmapped else "")
    )


def _tensors(torch: Any, signature: Signature, sample: dict[str, np.ndarray]) -> tuple[Any, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(sample[s.name])) for s in signature.inputs)


def _outputs(value: Any) -> tuple[list[str] | None, list[Any]]:
    """Flatten a model's return value (tensors, tuples, lists, dicts and dict-like outputs such as
    Hugging Face's ModelOutput, nested; None left out). Names come with it when there is a dict
    anywhere: its keys, with the path through nested tuples (`past_key_values.0.1`)."""
    named = _named(value, "")
    has_dict = _has_dict(value)
    return ([n for n, _ in named] if has_dict else None), [t for _, t in named]


def _named(value: Any, path: str) -> list[tuple[str, Any]]:
    if value is None:
        return []
    if isinstance(value, dict):
        items = [(_name_part(str(k)), v) for k, v in value.items()]
    elif isinstance(value, (tuple, list)):
        items = [(str(i) if path else f"output_{i}", v) for i, v in enumerate(value)]
    else:
        return [(path or "output", value)]
    out: list[tuple[str, Any]] = []
    for key, v in items:
        out += _named(v, f"{path}.{key}" if path else key)
    return out


def _has_dict(value: Any) -> bool:
    if isinstance(value, dict):
        return True
    return isinstance(value, (tuple, list)) and any(_has_dict(v) for v in value)


def _name_part(key: str) -> str:
    import re

    key = re.sub(r"[^A-Za-z0-9_.:/-]", "_", key)[:100]
    return key if re.match(r"[A-Za-z_]", key) else f"_{key}"


def flat_dynamic_shapes(torch: Any, signature: Signature) -> dict[str, tuple[Any, ...]]:
    """torch.export's dynamic shapes for flat_module, whose inputs arrive as one `*inputs` tuple."""
    return {"inputs": tuple(export_dynamic_shapes(torch, signature).values())}


def flat_module(torch: Any, model: Any) -> Any:
    """`model` returning a flat tuple of its output tensors in the order _outputs gives: what trace,
    torch.export and the ONNX exporters take whatever the model returns (dicts, ModelOutput, nesting)."""

    class FlatOutputs(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *inputs: Any) -> tuple[Any, ...]:
            return tuple(_outputs(self.inner(*inputs))[1])

    return FlatOutputs(model).eval() if isinstance(model, torch.nn.Module) else model


def _run(torch: Any, model: Any, signature: Signature, sample: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.inference_mode():
        _, flat = _outputs(model(*_tensors(torch, signature, sample)))
    out = []
    for t in flat:
        if not isinstance(t, torch.Tensor):
            raise InvalidSignature(f"the model returned a {type(t).__name__}; outputs must be tensors")
        t = t.detach().cpu()
        out.append((t.float() if t.dtype == torch.bfloat16 else t).numpy())
    return out


def _compare(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    if len(got) != len(want):
        return float("inf")
    worst = 0.0
    for a, b in zip(got, want):
        if a.shape != b.shape:
            return float("inf")
        if a.size:
            worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))))
    return worst


def _agreement_tol(ref: list[np.ndarray]) -> float:
    scale = max([float(np.max(np.abs(r))) for r in ref if r.size and r.dtype.kind == "f"] or [1.0])
    return 1e-4 + 1e-4 * scale


def _load_reference(args: dict[str, Any], signature: Signature) -> tuple[list[dict], list[list[np.ndarray]]]:
    samples = sample_io.load(Path(args["samples_file"]))
    ref = sample_io.load(Path(args["reference_file"]))
    names = [o.name for o in signature.outputs]
    return samples, [[r[n] for n in names] for r in ref]


# --- load ---------------------------------------------------------------------------------------


@op("load")
def load(args: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Build the eager model, run it on every sample, write the reference outputs."""
    torch = _setup_torch(args)
    signature = Signature.parse(args["signature"])
    t0 = time.perf_counter()
    model = build_eager(args["bundle"])
    build_s = time.perf_counter() - t0
    samples = sample_io.load(Path(args["samples_file"]))
    references: list[dict[str, np.ndarray]] = []
    names: list[str] | None = None
    for i, sample in enumerate(samples):
        try:
            with torch.inference_mode():
                value = model(*_tensors(torch, signature, sample))
        except Exception as exc:  # noqa: BLE001 - model code raises anything
            shapes = ", ".join(f"{k}{list(v.shape)}:{v.dtype}" for k, v in sample.items())
            raise InvalidSignature(f"the model failed on sample #{i} ({shapes}): {describe(exc)[:400]}") from None
        dict_names, flat = _outputs(value)
        arrays = [
            t.detach().cpu().float().numpy() if t.dtype == torch.bfloat16 else t.detach().cpu().numpy() for t in flat
        ]
        if names is None:
            declared = [o.name for o in signature.outputs]
            if declared and len(declared) != len(arrays):
                raise InvalidSignature(
                    f"the signature names {len(declared)} outputs ({', '.join(declared)}) "
                    f"but the model returned {len(arrays)}"
                )
            names = (
                declared
                or dict_names
                or (["output"] if len(arrays) == 1 else [f"output_{k}" for k in range(len(arrays))])
            )
        references.append(dict(zip(names, arrays)))
    sample_io.save(Path(args["reference_file"]), references)
    n_params = sum(p.numel() for p in model.parameters()) if hasattr(model, "parameters") else None
    return {
        "output_names": names,
        "build_s": build_s,
        "parameters": n_params,
        "outputs": [[{"dtype": str(a.dtype), "shape": list(a.shape)} for a in r.values()] for r in references],
    }


# --- capture ------------------------------------------------------------------------------------


def _check(torch: Any, module: Any, signature: Signature, samples: list, refs: list, labels: list[str]) -> dict:
    worst, bad = 0.0, []
    for label, sample, ref in zip(labels, samples, refs):
        try:
            got = _run(torch, module, signature, sample)
            err = _compare(got, ref)
        except Exception as exc:  # noqa: BLE001 - a capture that fails on a shape is a disagreement
            err = float("inf")
            bad.append(f"{label} ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
            worst = err
            continue
        worst = max(worst, err)
        if err > _agreement_tol(ref):
            bad.append(label)
    return {"agrees": not bad, "max_abs": worst if np.isfinite(worst) else None, "disagreeing_samples": bad}


def example_index(signature: Signature, samples: list[dict[str, np.ndarray]], labels: list[str]) -> int:
    """The sample to capture from: the opt sizes, unless a dynamic dimension is 1 there and another
    sample has it larger. torch.export specializes a dimension it sees at size 0 or 1 (batch [1, 1, 8]
    failed with "Constraints violated (batch)"), and a trace at size 1 can fold it into a reshape."""
    dynamic = [(s.name, i) for s in signature.inputs for i, d in enumerate(s.shape or []) if isinstance(d, str)]

    def smallest(sample: dict[str, np.ndarray]) -> int:
        return min((int(sample[name].shape[i]) for name, i in dynamic), default=2)

    order = [labels.index(label) for label in ("opt", "max") if label in labels] + list(range(len(samples)))
    return next((i for i in order if smallest(samples[i]) >= 2), order[0])


def export_dynamic_shapes(torch: Any, signature: Signature) -> dict[str, dict[int, Any]]:
    dims = {name: torch.export.Dim(name, min=r.min, max=r.max) for name, r in signature.dims.items()}
    return {s.name: {i: dims[d] for i, d in enumerate(s.shape or []) if isinstance(d, str)} for s in signature.inputs}


def capture_dynamic_shapes(torch: Any, signature: Signature) -> dict[str, tuple[Any, ...]]:
    """flat_dynamic_shapes for the torch.export capture, with a range from 0 or 1 up to 2 raised to
    end at 3. torch.export traces as if a dynamic size were never 0 or 1, but saves the range as
    given; when AOTInductor compiles the loaded program, a check such as `batch > 1` narrows [1, 2]
    to the constant 2, and the package then reads two rows of input at batch 1 (a T5 encoder's
    package aborted on 'index out of bounds' in its embedding). [1, 3] narrows to [2, 3] and stays
    a dimension; the signature, not the program, bounds what is served."""
    dims = {
        name: torch.export.Dim(name, min=r.min, max=3 if r.min < 2 and r.max == 2 else r.max)
        for name, r in signature.dims.items()
    }
    shapes = [{i: dims[d] for i, d in enumerate(s.shape or []) if isinstance(d, str)} for s in signature.inputs]
    return {"inputs": tuple(shapes)}


def save_exported(torch: Any, program: Any, path: Path) -> str | None:
    """torch.export.save the capture; when the serializer refuses a node of it, save the program
    lowered by `run_decompositions({})` (ATen, nothing decomposed) instead, and say so.

    torch.export keeps some calls as higher-order nodes that only tracing can run, not the
    serializer: Hugging Face's attention masks (GPT-2's in transformers 4.57) index the padding
    mask inside torch's TransformGetItemToIndex mode, which export records as a `flat_apply` node
    whose argument is a function (a TreeSpec constant `function_const_func_spec0`): "SerializeError:
    Failed serializing node flat_apply". Lowering traces through such nodes into the ATen ops they
    run. Programs that save as they are are saved unchanged."""
    from torch._export.serde.serialize import SerializeError

    try:
        torch.export.save(program, str(path))
        return None
    except SerializeError as exc:
        refused = telling_line(str(exc)).split(" in graph")[0][:200]
    torch.export.save(program.run_decompositions({}), str(path))
    return f"torch.export.save refused the program ({refused}); saved it lowered by run_decompositions({{}})"


@op("capture")
def capture(args: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Capture TorchScript by trace and by script, and torch.export; check each against eager."""
    torch = _setup_torch(args)
    signature = Signature.parse(args["signature"])
    samples, refs = _load_reference(args, signature)
    labels = args["sample_labels"]
    example = samples[example_index(signature, samples, labels)]
    out = Path(args["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    model = build_eager(args["bundle"])
    records = []

    def attempt(method: str, fn: Callable[[], Any], save: Callable[[Any, Path], str | None], filename: str) -> None:
        t0 = time.perf_counter()
        caught: list[str] = []
        path = out / filename
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            try:
                captured = fn()
                # saving can fail where capturing did not: that capture fails, not the step
                note = save(captured, path)
            except Exception as exc:  # noqa: BLE001 - a failed capture is recorded, not raised
                hint = {"export": export_hint, "trace": trace_hint}.get(method, lambda _: None)(exc)
                records.append(
                    {
                        "method": method,
                        "ok": False,
                        "seconds": time.perf_counter() - t0,
                        "error": describe(exc),
                        **({"hint": hint} if hint else {}),
                    }
                )
                return
            caught = [
                f"{w.category.__name__}: {str(w.message).splitlines()[0][:300]}"
                for w in seen
                if "Tracer" in w.category.__name__
            ] + ([note] if note else [])
        rec = {
            "method": method,
            "ok": True,
            "file": str(path),
            "warnings": sorted(set(caught)),
            "seconds": time.perf_counter() - t0,
        }
        rec.update(_check(torch, captured, signature, samples, refs, labels))
        records.append(rec)

    kind = args["bundle"]["kind"]
    if kind == "python":
        flat = flat_module(torch, model)
        attempt(
            "trace",
            lambda: torch.jit.trace(flat, _tensors(torch, signature, example), check_trace=False),
            lambda m, p: m.save(str(p)),
            "traced.pt",
        )
        attempt("script", lambda: torch.jit.script(model), lambda m, p: m.save(str(p)), "scripted.pt")
        attempt(
            "export",
            lambda: torch.export.export(
                flat, _tensors(torch, signature, example), dynamic_shapes=capture_dynamic_shapes(torch, signature)
            ),
            lambda ep, p: save_exported(torch, ep, p),
            "exported.pt2",
        )
        # an ExportedProgram is checked through its module
        for r in records:
            if r["method"] == "export" and r["ok"]:
                ep = torch.export.load(r["file"])
                r.update(_check(torch, ep.module(), signature, samples, refs, labels))
    elif kind == "torchscript":
        records.append(
            {
                "method": "script",
                "ok": True,
                "file": args["bundle"]["model_file"],
                "agrees": True,
                "max_abs": 0.0,
                "warnings": [],
                "seconds": 0.0,
            }
        )
    elif kind == "export":
        records.append(
            {
                "method": "export",
                "ok": True,
                "file": args["bundle"]["model_file"],
                "agrees": True,
                "max_abs": 0.0,
                "warnings": [],
                "seconds": 0.0,
            }
        )
    return {"captures": records}


# --- TorchScript candidates ---------------------------------------------------------------------


def retarget_device_constants(graph: Any, device: str) -> int:
    """Point the graph's constant CPU devices at `device`; return how many there were.

    torch.jit.trace records `ids.device` as a constant (here: `torch.arange(..., device=ids.device)`
    became device="cpu"), so a trace made on the CPU would create tensors on the CPU beside CUDA
    weights."""
    count = 0
    for node in graph.findAllNodes("prim::Constant", True):
        if node.output().type().kind() == "DeviceObjType" and node.hasAttribute("value") and node.s("value") == "cpu":
            node.s_("value", device)
            count += 1
    return count


@op("build_torchscript")
def build_torchscript(args: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Load a TorchScript capture, cast it to the compute dtype, freeze it for `device`, save it."""
    torch = _setup_torch(args)
    device, compute = args["device"], args.get("compute")
    notes: list[str] = []
    module = torch.jit.load(args["capture_file"], map_location=device).eval()
    if compute:
        module = module.to(getattr(torch, compute))
        notes.append(f"weights and compute in {compute}; inputs cast in, outputs cast back")
    if compute == "bfloat16" and device == "cpu" and not torch.backends.mkldnn.is_available():
        notes.append("this CPU has no oneDNN bf16 support; expect it to be slow")
    frozen = torch.jit.freeze(module)
    if device != "cpu":
        moved = retarget_device_constants(frozen.graph, device)
        if moved:
            notes.append(f"{moved} device constant(s) recorded on the CPU by the capture now say {device}")
    out = Path(args["out_file"])
    out.parent.mkdir(parents=True, exist_ok=True)
    # Saved frozen: optimize_for_inference is applied after loading (a saved optimized module
    # failed to load again).
    frozen.save(str(out))
    return {"file": str(out), "notes": notes}


# --- torch.export and AOTInductor candidates ----------------------------------------------------


@op("build_pt2")
def build_pt2(args: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Load the torch.export capture and save it as a candidate: the ExportedProgram itself
    (`aotinductor` false), or compiled ahead of time by AOTInductor into a package. On `device`
    "cuda" the program is first moved to the GPU: its parameters, buffers and the device arguments
    its graph recorded on the CPU (`move_to_device_pass`).

    Inductor writes its generated C++ and the compiler's output under its cache directory and
    TMPDIR, and runs the host's C++ compiler (in the box: /usr, read-only); Triton (the GPU kernels)
    caches under its own directory. All of them are pointed into this op's working directory, the
    one place the box may write."""
    if args.get("aotinductor"):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(workdir / "inductor-cache")
        os.environ["TRITON_CACHE_DIR"] = str(workdir / "triton-cache")
        os.environ["TRITON_HOME"] = str(workdir / "triton-home")
        # no pool of compile workers: one compile, and the box bounds its processes
        os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
    torch = _setup_torch(args)
    program = torch.export.load(args["capture_file"])
    device = args.get("device") or "cpu"
    notes: list[str] = []
    if device != "cpu":
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)
    out = Path(args["out_file"])
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.get("aotinductor"):
        torch.export.save(program, str(out))
        return {"file": str(out), "notes": notes, "seconds": 0.0}
    import torch._inductor

    t0 = time.perf_counter()
    # Precompiled headers pay off from the second compile in a cache: every build here starts with
    # an empty one, and precompiling them made the MLP's compile take 37 s of CPU instead of 22 s
    # (on a loaded 2-core machine, 200 s instead of 45 s).
    configs = {"aot_inductor.precompile_headers": False, "cpp_cache_precompile_headers": False}
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(out), inductor_configs=configs)
    seconds = time.perf_counter() - t0
    where = (
        f"this GPU ({torch.cuda.get_device_name()})"
        if device != "cpu"
        else f"this CPU ({torch.backends.cpu.get_cpu_capability()})"
    )
    notes.append(f"compiled by AOTInductor for {where} in {seconds:.1f}s")
    return {
        "file": str(path),
        "notes": notes,
        "seconds": seconds,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


# --- export to ONNX -----------------------------------------------------------------------------


@op("export_onnx")
def export_onnx(args: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """ONNX export: torch.export-based first, then TorchScript-based from the faithful capture.

    Stops at the first export that ONNX Runtime runs in agreement with eager on every sample.
    """
    torch = _setup_torch(args)
    import onnxruntime as ort

    signature = Signature.parse(args["signature"])
    samples, refs = _load_reference(args, signature)
    labels = args["sample_labels"]
    example = _tensors(torch, signature, samples[example_index(signature, samples, labels)])
    out = Path(args["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    in_names = [s.name for s in signature.inputs]
    out_names = [o.name for o in signature.outputs]
    dynamic_axes = {
        t.name: {i: d for i, d in enumerate(t.shape or []) if isinstance(d, str)}
        for t in signature.inputs + signature.outputs
        if t.shape
    }
    dynamic_axes = {k: v for k, v in dynamic_axes.items() if v}
    attempts: list[dict[str, Any]] = []

    def onnx_check(path: Path) -> dict[str, Any]:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        worst, bad = 0.0, []
        for label, sample, ref in zip(labels, samples, refs):
            try:
                got = sess.run(out_names, {n: sample[n] for n in in_names})
                err = _compare(list(got), ref)
            except Exception as exc:  # noqa: BLE001 - a sample the graph fails on is a disagreement
                bad.append(f"{label} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})")
                continue
            worst = max(worst, err)
            if err > _agreement_tol(ref):
                bad.append(label)
        return {"agrees": not bad, "max_abs": worst if np.isfinite(worst) else None, "disagreeing_samples": bad}

    def attempt(exporter: str, source: str, fn: Callable[[Path], None]) -> bool:
        path = out / f"model.{exporter}-{source}.onnx"
        t0 = time.perf_counter()
        rec: dict[str, Any] = {"exporter": exporter, "source": source}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn(path)
            rec.update(file=str(path), ok=True, seconds=time.perf_counter() - t0)
            rec.update(onnx_check(path))
        except Exception as exc:  # noqa: BLE001 - recorded; the next exporter is tried
            rec.update(ok=False, seconds=time.perf_counter() - t0, error=describe(exc))
        attempts.append(rec)
        return bool(rec.get("ok") and rec.get("agrees"))

    kind = args["bundle"]["kind"]
    captures = {c["method"]: c for c in args.get("captures", []) if c.get("ok")}
    order = list(args.get("exporters") or ONNX_EXPORTERS)
    eager: list[Any] = []  # built once, when an exporter from eager is tried

    def eager_model() -> Any:
        if not eager:
            eager.append(build_eager(args["bundle"]))
        return eager[0]

    def dynamo(target: Any, shapes: Any) -> Callable[[Path], None]:
        def run(path: Path) -> None:
            torch.onnx.export(
                target,
                example,
                str(path),
                dynamo=True,
                external_data=False,
                input_names=in_names,
                output_names=out_names,
                dynamic_shapes=shapes,
                verbose=False,
            )

        return run

    def legacy(module: Any) -> Callable[[Path], None]:
        # opset 17: the TorchScript-based exporter's best-tested opset (the torch.export-based one
        # picks its own, 18 or newer)
        def run(path: Path) -> None:
            torch.onnx.export(
                module,
                example,
                str(path),
                dynamo=False,
                input_names=in_names,
                output_names=out_names,
                dynamic_axes=dynamic_axes,
                opset_version=17,
            )

        return run

    for name in order:
        exporter, source = name.split(":")
        fn: Callable[[Path], None] | None = None
        if exporter == "torchscript" and source in ("script", "trace"):
            # from the scripted module when it is faithful (keeps control flow as ONNX If), or the trace
            cap = captures.get(source)
            if cap and cap.get("agrees"):
                fn = legacy(torch.jit.load(cap["file"], map_location="cpu"))
        elif kind == "python" and name == "dynamo:eager":
            fn = dynamo(flat_module(torch, eager_model()), flat_dynamic_shapes(torch, signature))
        elif kind == "python" and name == "dynamo:export":
            cap = captures.get("export")
            if cap and cap.get("agrees"):
                # the torch.export capture (strict=False), which carries its dynamic shapes
                fn = dynamo(torch.export.load(cap["file"]), None)
        elif kind == "python" and name == "torchscript:eager":
            # the TorchScript-based exporter straight from the eager model (it traces it itself)
            fn = legacy(flat_module(torch, eager_model()))
        elif kind == "export" and name == "dynamo:export":
            # an uploaded ExportedProgram: its own inputs and outputs
            program = torch.export.load(args["bundle"]["model_file"])
            fn = dynamo(program, tuple(export_dynamic_shapes(torch, signature).values()))
        if fn is None:
            attempts.append(
                {
                    "exporter": exporter,
                    "source": source,
                    "ok": False,
                    "skipped": True,
                    "error": _no_source(source, kind),
                }
            )
            continue
        if attempt(exporter, source, fn):
            return {"attempts": attempts, "chosen": attempts[-1]}
    return {"attempts": attempts, "chosen": None}


def _no_source(source: str, kind: str) -> str:
    if kind == "export":
        return "not tried: an uploaded torch.export program is exported from itself, by dynamo:export"
    if source == "eager":
        return "not tried: this bundle has no eager model to export from"
    return f"not tried: no {source} capture agrees with eager"


# --- eager benchmark ----------------------------------------------------------------------------


@op("benchmark")
def benchmark(args: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Eager PyTorch and every built candidate timed in one process, in interleaved rounds
    (workers/benchmark.py), with the same thread settings: the figures every speed-up comes from.

    `eager` lists the eager baselines to time ({"id", "device", "precision"}; on a GPU host also
    on CUDA at fp32 and fp16, where a call copies the inputs in and the outputs back, as a runtime
    serving numpy arrays does); `artifacts` the candidates ({"id", "dir"}), loaded in this process
    through their runtimes (this process is the boundary, so code-bearing artifacts run here too);
    `pairs` the (baseline, candidate) ratios whose spread decides when the rounds may stop. A
    contender that cannot load or run is left out with its reason in `errors`.
    """
    import copy
    import sys

    from service import runtimes
    from workers.benchmark import interleaved, machine_load

    # No contender busy-waits: on a machine shared with other work, OpenMP threads that spin at their
    # barriers (GNU OpenMP's default) lose their time slices to the spinning and eager PyTorch slows
    # down 10-50x while ONNX Runtime barely moves; measured passive, both keep their speed. The
    # variable must be set before torch loads libgomp (a fresh sandbox child has not imported it).
    passive = "torch" not in sys.modules
    if passive:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    torch = _setup_torch(args)
    signature = Signature.parse(args["signature"])
    threads = int(args.get("threads") or torch.get_num_threads())
    load_before = machine_load()
    errors: dict[str, str] = {}
    makers: dict[str, Callable[[dict[str, np.ndarray]], Callable[[], None]]] = {}
    closers: list[Callable[[], None]] = []
    eager = list(args.get("eager") or [])
    base_model = build_eager(args["bundle"]) if eager else None
    for spec in eager:
        device, precision = spec.get("device", "cpu"), spec.get("precision", "fp32")
        try:
            makers[spec["id"]] = _eager_call(
                torch,
                signature,
                base_model if (device, precision) == ("cpu", "fp32") else copy.deepcopy(base_model),
                device,
                precision,
            )
        except Exception as exc:  # noqa: BLE001 - one baseline failing leaves the others' figures
            errors[spec["id"]] = describe(exc)
    for spec in args.get("artifacts") or []:
        try:
            rt = runtimes.load(Path(spec["dir"]), threads=threads, spin=False, isolated=False)
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot load here is left out
            errors[spec["id"]] = describe(exc)
            continue
        closers.append(rt.close)
        makers[spec["id"]] = _runtime_call(rt)
    points: dict[str, list[dict[str, Any]]] = {name: [] for name in makers}
    try:
        for batch in args["batch_sizes"]:
            inputs = sample_io.at_batch(signature, int(batch))
            calls: dict[str, Callable[[], object]] = {}
            for name, make in makers.items():
                if name in errors:
                    continue
                try:
                    call = make(inputs)
                    call()
                    calls[name] = call
                except Exception as exc:  # noqa: BLE001 - e.g. a batch size an artifact froze
                    errors[name] = describe(exc)
            if not calls:  # every contender failed (each has its reason in `errors`): nothing to time
                continue
            pairs = [(b, o) for b, o in args.get("pairs") or [] if b in calls and o in calls]
            timed = interleaved(calls, batch=int(batch), budget_s=float(args["budget_s"]), pairs=pairs)
            for name, t in timed.items():
                points[name].append(t.point())
    finally:
        for close in closers:
            close()
    return {
        "points": {n: p for n, p in points.items() if n not in errors},
        "errors": errors,
        "threads": {
            "torch": torch.get_num_threads(),
            "torch_interop": torch.get_num_interop_threads(),
            "runtimes": threads,
            "busy_wait": False if passive else "unknown",
            "env": {
                k: v
                for k, v in os.environ.items()
                if k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")
            },
        },
        "load_before": load_before,
        "load_after": machine_load(),
    }


def _runtime_call(rt: Any) -> Callable[[dict[str, np.ndarray]], Callable[[], None]]:
    """A maker of timed calls of a loaded candidate."""

    def make(inputs: dict[str, np.ndarray]) -> Callable[[], None]:
        def call() -> None:
            rt.run(inputs)

        return call

    return make


def _eager_call(
    torch: Any, signature: Signature, model: Any, device: str, precision: str
) -> Callable[[dict[str, np.ndarray]], Callable[[], None]]:
    """A maker of timed calls of the eager model on `device` at `precision`."""
    if (device, precision) == ("cpu", "fp32"):

        def make_cpu(sample: dict[str, np.ndarray]) -> Callable[[], None]:
            inputs = _tensors(torch, signature, sample)

            def call() -> None:
                with torch.inference_mode():
                    model(*inputs)

            return call

        return make_cpu
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    model = model.to(device=device, dtype=dtype)

    def make(sample: dict[str, np.ndarray]) -> Callable[[], None]:
        host = _tensors(torch, signature, sample)

        def call() -> None:
            with torch.inference_mode():
                xs = [x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype) for x in host]
                _, flat = _outputs(model(*xs))
                for t in flat:
                    t.float().cpu()
            if device == "cuda":
                torch.cuda.synchronize()

        return call

    return make


# --- OpenVINO IR (the openvino target; workers/compilers/openvino.py says why it runs here) ------


@op("build_openvino")
def build_openvino(args: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Convert the ONNX export to OpenVINO IR; for int8, quantize it with NNCF's post-training
    quantization calibrated on the samples at `calibration` (indices into the samples file). An fp32
    IR (bf16 and fp16 use it too) is also converted from the eager model of a source bundle, and the
    faster of the two is kept (`_faster_ir`). Weights stay as computed (no fp16 compression of an fp32
    IR)."""
    import openvino as ov

    out = Path(args["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    model = ov.convert_model(args["onnx_file"])
    result: dict[str, Any] = {"openvino": ov.get_version()}
    if args["precision"] != "int8" and args["bundle"]["kind"] == "python":
        # Neither source always gives the faster IR: a Longformer's ran 25% faster converted from the
        # eager model, a T5 encoder's as fast or faster from the ONNX export. Both are timed here.
        model, result["source"] = _faster_ir(ov, args, model)
    if args["precision"] == "int8":
        import nncf
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

        samples = sample_io.load(Path(args["samples_file"]))
        calibration = [samples[int(i)] for i in args["calibration"]] or samples
        names = {p.get_any_name() for p in model.inputs}
        model = nncf.quantize(
            model,
            nncf.Dataset(calibration, lambda s: {k: v for k, v in s.items() if k in names}),
            preset=nncf.QuantizationPreset.MIXED,
            subset_size=len(calibration),
            # 7-bit weights everywhere: x86 CPUs without VNNI saturate 16-bit sums of full-range
            # u8 x s8 products (the same reason the onnxruntime target's int8 uses reduce_range), and
            # an artifact may be served on such a host even when it was built on one with VNNI
            advanced_parameters=AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE),
        )
        result.update(nncf=nncf.__version__, calibrated=len(calibration))
    ov.save_model(model, str(out / "model.xml"), compress_to_fp16=False)
    return {**result, "model.xml": str(out / "model.xml"), "model.bin": str(out / "model.bin")}


def _faster_ir(ov: Any, args: dict[str, Any], onnx_ir: Any) -> tuple[Any, dict[str, Any]]:
    """The IR from the eager model (OpenVINO's PyTorch frontend) or `onnx_ir`, whichever runs faster
    on a batch-1 sample, and what was found: {"kept": "pytorch" | "onnx", p50s in ms, or "error"}.
    The eager model's IR is kept only when it agrees with the reference outputs on every sample as
    closely as the ONNX export's does."""
    import sys

    from service.runtimes.openvino import error_line
    from workers.benchmark import interleaved

    if "torch" not in sys.modules:  # as in the benchmark op: no OpenMP threads spinning beside the timing
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    torch = _setup_torch(args)
    signature = Signature.parse(args["signature"])
    samples, refs = _load_reference(args, signature)
    threads = int(args.get("threads") or torch.get_num_threads())
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads}
    try:
        eager_ir = _eager_ir(ov, torch, args, signature, samples)
        compiled = {
            "pytorch": ov.Core().compile_model(eager_ir, "CPU", config),
            "onnx": ov.Core().compile_model(onnx_ir.clone(), "CPU", config),
        }
        out_names = [o.name for o in signature.outputs]
        in_names = [s.name for s in signature.inputs]

        # by name as the runtime finds them (an ONNX export may give one tensor two output names)
        ports = {source: {n: p for p in c.outputs for n in p.get_names()} for source, c in compiled.items()}
        missing = [n for n in out_names if n not in ports["pytorch"]]
        if missing:
            raise ValueError(f"its IR has no output named {', '.join(missing)}")

        def run(source: str, sample: dict[str, np.ndarray]) -> list[np.ndarray]:
            got = compiled[source]({n: np.ascontiguousarray(sample[n]) for n in in_names})
            return [np.asarray(got[ports[source][n]]) for n in out_names]

        for i, (sample, ref) in enumerate(zip(samples, refs)):
            err, onnx_err = _compare(run("pytorch", sample), ref), _compare(run("onnx", sample), ref)
            if not err <= max(_agreement_tol(ref), 2 * onnx_err):
                raise ValueError(f"it disagrees with eager on sample #{i} (max abs {err:.3g}, ONNX's {onnx_err:.3g})")
        # the batch-1 input Kiln's benchmark times (every other dimension at its opt size)
        sample = sample_io.at_batch(signature, 1)

        def timed_call(source: str) -> Callable[[], object]:
            return lambda: run(source, sample)

        timed = interleaved(
            {name: timed_call(name) for name in compiled},
            batch=1,
            budget_s=1.0,
            pairs=[("onnx", "pytorch")],
        )
    except Exception as exc:  # noqa: BLE001 - the ONNX export's IR stays; the reason goes in the notes
        # OpenVINO's messages start with where in its source they were raised
        reason = error_line(exc) if "Exception from" in str(exc) else describe(exc)
        return onnx_ir, {"kept": "onnx", "error": reason[:300]}
    p50 = {name: float(np.median(t.rounds)) * 1e3 for name, t in timed.items()}
    kept = "pytorch" if p50["pytorch"] < p50["onnx"] else "onnx"
    return (eager_ir if kept == "pytorch" else onnx_ir), {"kept": kept, "p50_ms": p50}


def _eager_ir(ov: Any, torch: Any, args: dict[str, Any], signature: Signature, samples: list) -> Any:
    """The eager model converted by OpenVINO's PyTorch frontend, with the inputs, dynamic dimensions
    and output names of the ONNX export's IR (the signature's; a named dimension is -1 there too)."""
    example = samples[example_index(signature, samples, args["sample_labels"])]
    shapes = [
        (
            ov.PartialShape([-1 if isinstance(d, str) else int(d) for d in s.shape or example[s.name].shape]),
            ov.Type(example[s.name].dtype),
        )
        for s in signature.inputs
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ov.convert_model(
            flat_module(torch, build_eager(args["bundle"])),
            example_input=_tensors(torch, signature, example),
            input=shapes,
        )
    if len(model.inputs) != len(signature.inputs) or len(model.outputs) != len(signature.outputs):
        raise ValueError(
            f"its IR has {len(model.inputs)} input(s) and {len(model.outputs)} output(s), "
            f"not the signature's {len(signature.inputs)} and {len(signature.outputs)}"
        )
    for port, spec in zip(model.inputs, signature.inputs):
        port.get_tensor().set_names({spec.name})
    # A tensor returned twice (a ModelOutput's last hidden state is also the last of its hidden
    # states) gets an Identity per further output, as the ONNX export has: the CPU plugin's compiled
    # model otherwise gives both outputs the last name set.
    import openvino.opset16 as opset

    produced = set()
    for port in model.outputs:
        result = port.get_node()
        source = result.input_value(0)
        key = (source.get_node().get_friendly_name(), source.get_index())
        if key in produced:
            result.input(0).replace_source_output(opset.identity(source).output(0))
        produced.add(key)
    model.validate_nodes_and_infer_types()
    for port, spec in zip(model.outputs, signature.outputs):
        port.get_tensor().set_names({spec.name})
    return model
