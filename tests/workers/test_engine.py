"""The conversion engine end to end on the zoo, with the real sandbox, exporters and runtimes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from service import runtimes
from service import samples as sample_io
from service.errors import InvalidBundle, InvalidEntryPoint, InvalidSignature
from tests.conftest import ZOO, zoo_bundle, zoo_signature
from workers import engine

FAST = {"bench_seconds": 0.05, "threads": 1}


def convert(
    tmp_path,
    name,
    *,
    entry=None,
    signature=None,
    targets=("onnxruntime", "torchscript"),
    precisions=("fp32",),
    options_extra=None,
    **kwargs,
):
    bundle = zoo_bundle(tmp_path, name)
    return engine.convert(
        bundle,
        tmp_path / "out",
        entry=f"{name}.py:{entry}" if entry else None,
        signature=signature or zoo_signature(name),
        options={"targets": list(targets), "precisions": list(precisions), **FAST, **(options_extra or {})},
        **kwargs,
    )


def statuses(ctx):
    return {s.name: s.status for s in ctx.steps}


def test_mlp_every_step_and_precision(tmp_path):
    ctx = convert(tmp_path, "mlp", precisions=("fp32", "fp16", "bf16", "int8"))
    assert statuses(ctx) == {
        s: "ok" for s in ("load", "capture", "export", "compile", "validate", "benchmark", "select", "report")
    }
    by_id = {c.id: c for c in ctx.candidates}
    for cid in ("onnxruntime-fp32", "onnxruntime-fp16", "torchscript-fp32", "torchscript-bf16", "torchscript-fp16"):
        assert by_id[cid].passed, (cid, by_id[cid].reason, by_id[cid].validation)
        assert by_id[cid].benchmark and by_id[cid].benchmark[0].batch == 1
    # int8 of a randomly initialised MLP may flip near-tied logits: it must be built and judged
    int8 = by_id["onnxruntime-int8-dynamic"]
    assert int8.status == "built" and int8.validation.outputs["logits"].top1 is not None
    assert int8.validation.outputs["logits"].cosine > 0.99
    assert [p.batch for p in by_id["onnxruntime-fp32"].benchmark] == [1, 8, 32]
    assert by_id["onnxruntime-bf16"].status == "failed" and "bf16" in by_id["onnxruntime-bf16"].reason
    assert "torchscript-int8" not in by_id  # a combination that cannot exist is not a candidate
    assert by_id["onnxruntime-fp32"].validation.outputs["logits"].max_abs < 1e-4
    assert by_id["onnxruntime-fp32"].validation.outputs["logits"].top1 == 1.0
    assert ctx.eager_benchmark and ctx.selection.candidate in by_id
    # fixed artifact paths, and the report on disk says what the context says
    out = tmp_path / "out"
    assert (out / "onnxruntime-int8-dynamic" / "model.onnx").is_file()
    assert (out / "torchscript-bf16" / "model.pt").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "succeeded" and report["selection"]["candidate"] == ctx.selection.candidate
    assert report["environment"]["versions"]["torch"].startswith("2.")
    assert "## Candidates" in (out / "summary.md").read_text()
    # a served artifact computes what was validated
    x = sample_io.at_batch(ctx.signature, 3)
    ref = runtimes.load(out / "onnxruntime-fp32").run(x)["logits"]
    ts = runtimes.load(out / "torchscript-fp32").run(x)["logits"]
    assert ref.shape == (3, 10) and np.allclose(ref, ts, atol=1e-4)


def test_control_flow_trace_hazard_is_caught_and_both_branches_survive(tmp_path):
    ctx = convert(tmp_path, "controlflow", precisions=("fp32",))
    trace = ctx.capture("trace")
    assert trace.ok and not trace.agrees and trace.disagreeing_samples
    assert any("TracerWarning" in w for w in trace.warnings)
    assert ctx.preferred_capture == "script"
    hazard = next(h for h in ctx.hazards if h.kind == "frozen_branch")
    assert "froze" in hazard.detail and "torch.jit.script" in hazard.action
    assert ctx.onnx_exporter == "torchscript:script"
    model = onnx.load(ctx.onnx_file)
    assert "If" in {n.op_type for n in model.graph.node}
    for cid in ("onnxruntime-fp32", "torchscript-fp32"):
        c = ctx.candidate(cid)
        assert c.passed, c.validation
        assert c.validation.samples == len(ctx.sample_labels)
    # both branches, checked directly on the served artifacts against each other's branch
    rt = runtimes.load(tmp_path / "out" / "onnxruntime-fp32")
    pos = rt.run({"x": np.full((2, 16), 0.5, np.float32)})["y"]
    neg = rt.run({"x": np.full((2, 16), -0.5, np.float32)})["y"]
    assert pos.min() >= 0  # relu branch
    assert not np.allclose(pos, neg)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "frozen_branch" in summary
    # torch.export cannot keep the branch: the report says which line and what to write instead
    export = ctx.capture("export")
    line = next(
        i for i, text in enumerate((ZOO / "controlflow.py").read_text().splitlines(), 1) if "if x.sum() > 0:" in text
    )
    assert not export.ok and f"controlflow.py:{line} in forward (`if x.sum() > 0:`)" in export.hint
    assert "torch.cond" in export.hint
    assert any(h.kind == "value_branch" and f"controlflow.py:{line}" in h.detail for h in ctx.hazards)


def test_transformer_dynamic_sequence(tmp_path):
    ctx = convert(
        tmp_path,
        "transformer",
        entry="build_small",
        signature=zoo_signature("transformer", "SMALL_SIGNATURE"),
        targets=("onnxruntime",),
        precisions=("fp32", "int8"),
    )
    fp32 = ctx.candidate("onnxruntime-fp32")
    assert fp32.passed, fp32.validation
    model = onnx.load(ctx.onnx_file)
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq"]
    rt = runtimes.load(tmp_path / "out" / "onnxruntime-fp32")
    for seq in (2, 16):
        assert rt.run({"ids": np.ones((1, seq), np.int64)})["logits"].shape == (1, 4)


def test_several_inputs_and_outputs(tmp_path):
    ctx = convert(tmp_path, "multi_io")
    assert [o.name for o in ctx.signature.outputs] == ["scores", "embedding"]
    assert ctx.signature.outputs[1].shape == ["batch", 16]
    for c in ctx.candidates:
        assert c.passed and set(c.validation.outputs) == {"scores", "embedding"}


def test_unexportable_model_fails_export_with_reason_but_torchscript_passes(tmp_path):
    ctx = convert(tmp_path, "unexportable")
    export = ctx.step("export")
    assert export.status == "failed"
    assert "eigvalsh" in export.error and "ONNX export failed" in export.error
    ort = ctx.candidate("onnxruntime-fp32")
    assert ort.status == "failed" and "export" in ort.reason
    assert ctx.candidate("torchscript-fp32").passed
    assert ctx.selection.candidate == "torchscript-fp32"


def test_small_cnn_int8_static_and_dynamic(tmp_path):
    ctx = convert(
        tmp_path,
        "cnn",
        entry="build_small",
        signature=zoo_signature("cnn", "SMALL_SIGNATURE"),
        targets=("onnxruntime",),
        precisions=("fp32", "int8"),
    )
    static = ctx.candidate("onnxruntime-int8")
    assert static.status == "built" and "static quantization" in static.notes[0]
    assert static.validation.outputs["logits"].top1 is not None
    qops = {n.op_type for n in onnx.load(str(tmp_path / "out" / "onnxruntime-int8" / "model.onnx")).graph.node}
    assert qops & {"QLinearConv", "QuantizeLinear", "DequantizeLinear"}, qops
    assert ctx.candidate("onnxruntime-int8-dynamic").status == "built"
    # both paths quantize weights to 7 bits, which CPUs without VNNI need to avoid saturating
    for variant in ("onnxruntime-int8", "onnxruntime-int8-dynamic"):
        weights = [
            onnx.numpy_helper.to_array(t)
            for t in onnx.load(str(tmp_path / "out" / variant / "model.onnx")).graph.initializer
            if t.data_type == onnx.TensorProto.INT8 and t.dims and np.prod(t.dims) > 8
        ]
        assert weights, variant
        assert all(w.min() >= -64 and w.max() <= 64 for w in weights), (variant, [(w.min(), w.max()) for w in weights])


def test_weights_from_safetensors_and_mismatch(tmp_path):
    import torch
    from safetensors.torch import save_file

    (tmp_path / "m.py").write_text("import torch\ndef build_model():\n    return torch.nn.Linear(4, 3)\n")
    torch.manual_seed(1)
    good = torch.nn.Linear(4, 3)
    save_file(good.state_dict(), str(tmp_path / "w.safetensors"))
    sig = {"inputs": ["x:float32[batch,4]"], "dims": {"batch": [1, 2, 4]}}
    ctx = engine.convert(
        tmp_path / "m.py",
        tmp_path / "out",
        weights=tmp_path / "w.safetensors",
        signature=sig,
        options={"targets": ["onnxruntime"], **FAST},
    )
    x = np.ones((1, 4), np.float32)
    got = runtimes.load(tmp_path / "out" / "onnxruntime-fp32").run({"x": x})["output"]
    with torch.no_grad():
        assert np.allclose(got, good(torch.from_numpy(x)).numpy(), atol=1e-5)
    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "bad.safetensors"))
    ctx = engine.convert(
        tmp_path / "m.py",
        tmp_path / "out2",
        weights=tmp_path / "bad.safetensors",
        signature=sig,
        options={"targets": ["onnxruntime"], **FAST},
    )
    assert ctx.step("load").status == "failed" and "do not match the model" in ctx.step("load").error


def test_captured_uploads_torchscript_and_onnx(tmp_path):
    first = convert(tmp_path, "mlp", targets=("onnxruntime", "torchscript"))
    ts_capture = Path(first.capture("trace").file)
    onnx_file = Path(first.onnx_file)
    sig = zoo_signature("mlp")
    ctx = engine.convert(ts_capture, tmp_path / "ts", signature=sig, options={"targets": ["torchscript"], **FAST})
    assert ctx.bundle.kind == "torchscript" and ctx.candidate("torchscript-fp32").passed
    ctx = engine.convert(
        onnx_file, tmp_path / "onnx", options={"targets": ["onnxruntime"], "precisions": ["fp32", "int8"], **FAST}
    )
    assert ctx.bundle.kind == "onnx" and ctx.signature.inputs[0].shape == ["batch", 64]
    assert ctx.step("capture").status == "skipped" and ctx.candidate("onnxruntime-fp32").passed


def test_captured_upload_exported_program(tmp_path):
    """A `.pt2` saved with torch.export.save, its batch dynamic: the loaded program is the reference,
    the ONNX export is made from it, the onnxruntime and torch_export candidates pass and give the
    module's outputs, and the TorchScript candidate says in one line why it is not built."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(net, (torch.randn(4, 64),), dynamic_shapes=({0: batch},))
    pt2 = tmp_path / "mlp.pt2"
    torch.export.save(program, str(pt2))
    sig = {"inputs": ["x:float32[batch,64]"], "outputs": ["logits"], "dims": {"batch": [1, 8, 32]}}
    ctx = engine.convert(
        pt2,
        tmp_path / "out",
        signature=sig,
        options={"targets": ["onnxruntime", "torchscript", "torch_export"], **FAST},
    )
    assert ctx.bundle.kind == "export"
    assert statuses(ctx) == {
        s: "ok" for s in ("load", "capture", "export", "compile", "validate", "benchmark", "select", "report")
    }, [(s.name, s.error) for s in ctx.steps]
    assert ctx.onnx_exporter == "dynamo:export"
    assert ctx.export_attempts[0]["error"].startswith("not tried: an uploaded torch.export program")
    for cid in ("onnxruntime-fp32", "torch_export-fp32"):
        cand = ctx.candidate(cid)
        assert cand.passed, (cid, cand.reason, cand.validation)
        assert cand.validation.outputs["logits"].max_abs < 1e-4
    ts = ctx.candidate("torchscript-fp32")
    assert ts.status == "failed" and "\n" not in ts.reason and "torch.export program" in ts.reason, ts.reason
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)  # a batch no sample had
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    got = runtimes.load(tmp_path / "out" / "onnxruntime-fp32").run({"x": x})["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_signature_that_does_not_match_the_model(tmp_path):
    ctx = convert(tmp_path, "mlp", signature={"inputs": ["x:float32[batch,63]"]})
    load = ctx.step("load")
    assert load.status == "failed" and "failed on sample #" in load.error and "63" in load.error
    assert {s.name: s.status for s in ctx.steps}["validate"] == "skipped"
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["status"] == "failed" and "sample" in report["error"]


@pytest.mark.parametrize(
    "entry, message",
    [
        ("build_raises", "ValueError: this model refuses to be built"),
        ("build_not_a_module", "returned dict, not a torch.nn.Module"),
    ],
)
def test_misbehaving_model_code_fails_load_with_reason(tmp_path, entry, message):
    ctx = convert(tmp_path, "misbehaving", entry=entry)
    assert ctx.step("load").status == "failed"
    assert message in ctx.step("load").error


def test_bad_input_is_refused_before_running_anything(tmp_path):
    with pytest.raises(InvalidSignature, match="no signature"):
        engine.prepare(zoo_bundle(tmp_path, "mlp"), tmp_path / "out")
    with pytest.raises(InvalidBundle, match="'nope.py' is not in the bundle"):
        engine.prepare(zoo_bundle(tmp_path, "mlp"), tmp_path / "out", entry="nope.py:f", signature=zoo_signature("mlp"))
    # read from the source, not run: an entry point the file does not define
    with pytest.raises(InvalidEntryPoint, match="misbehaving.py defines no 'no_such_function'"):
        engine.prepare(
            zoo_bundle(tmp_path, "misbehaving"),
            tmp_path / "out",
            entry="misbehaving.py:no_such_function",
            signature=zoo_signature("misbehaving"),
        )
    with pytest.raises(InvalidEntryPoint, match="must look like"):
        from workers.modelcode import import_entry

        import_entry(tmp_path, "model.py")


def test_dict_outputs_of_a_hugging_face_style_model_become_named_outputs_of_every_candidate(tmp_path):
    ctx = convert(tmp_path, "hf_like")
    names = [o.name for o in ctx.signature.outputs]
    assert names == ["last_hidden_state", "pooler_output", "hidden_states.0", "hidden_states.1"]
    assert ctx.capture("trace").ok and ctx.capture("trace").agrees  # trace refused the dict before
    assert ctx.capture("export").ok and ctx.onnx_exporter == "dynamo:eager"
    assert not ctx.capture("script").ok  # the ModelOutput class is not scriptable, as in transformers
    by_id = {c.id: c for c in ctx.candidates}
    for cid in ("onnxruntime-fp32", "torchscript-fp32"):
        assert by_id[cid].passed, (cid, by_id[cid].reason, by_id[cid].validation)
        assert set(by_id[cid].validation.outputs) == set(names)
        # hidden states are compared as embeddings, never by an argmax over hidden units
        assert by_id[cid].validation.outputs["last_hidden_state"].kind == "embedding"
    rt = runtimes.load(tmp_path / "out" / "torchscript-fp32")
    try:
        got = rt.run(sample_io.at_batch(ctx.signature, 2))
        assert list(got) == names and got["pooler_output"].shape == (2, 32)
    finally:
        rt.close()


def test_cancel_reaches_the_sandboxed_op_that_is_running(tmp_path):
    """The run's cancel check is handed to the steps (no module global): a cancel while model code
    runs kills its sandbox at once, instead of after the op's own timeout."""
    import time

    from workers.pipeline import Canceled

    bundle = tmp_path / "slow.py"
    bundle.write_text(
        "import time\nimport torch\n\n\ndef build_model():\n    time.sleep(120)\n    return torch.nn.Linear(4, 2)\n"
    )
    calls = []

    def canceled() -> bool:  # the pipeline asks once before the load step; every later call is the op's,
        calls.append(time.monotonic())  # which is canceled after it has run for a second
        return len(calls) > 2 and calls[-1] - calls[1] > 1.0

    t0 = time.monotonic()
    with pytest.raises(Canceled):
        engine.convert(
            bundle,
            tmp_path / "out",
            signature={"inputs": ["x:float32[batch,4]"], "outputs": ["y"], "dims": {"batch": [1, 2, 4]}},
            options={"targets": ["onnxruntime"], **FAST},
            canceled=canceled,
        )
    assert time.monotonic() - t0 < 60, "the sandboxed op ran on after the cancel"
    assert len(calls) > 2, "the sandbox never polled the run's cancel check"
    report = json.loads((tmp_path / "out" / "report.json").read_text())  # written whatever happens
    load = next(s for s in report["steps"] if s["name"] == "load")
    assert (load["status"], load["error"]) == ("failed", "canceled"), load


def test_a_batch_optimised_at_one_is_captured_from_a_larger_sample(tmp_path):
    """torch.export specializes a dimension it sees at size 1: capturing from the opt sample of
    batch [1, 1, 4] failed with "Constraints violated (batch)". The capture now takes a sample where
    every dynamic dimension is at least 2, and the captured program still runs at batch 1."""
    sig = {**zoo_signature("mlp"), "dims": {"batch": [1, 1, 4]}}
    ctx = convert(tmp_path, "mlp", signature=sig, targets=("onnxruntime",))
    export = ctx.capture("export")
    assert export.ok and export.agrees, export.error
    assert ctx.capture("trace").agrees
    assert all(c.passed for c in ctx.candidates)


def test_every_onnx_exporter_of_the_fallback_chain_exports_a_graph_that_agrees(tmp_path):
    """Each exporter, asked for alone, exports the MLP (whose trace, script and torch.export captures
    all agree) into a graph ONNX Runtime runs in agreement with eager at a batch size of its own."""
    from service.options import ONNX_EXPORTERS
    from workers.pipeline import StepLog
    from workers.steps.export import Export

    ctx = convert(tmp_path, "mlp", targets=("onnxruntime",))
    assert ctx.onnx_exporter == "dynamo:eager"
    x = sample_io.at_batch(ctx.signature, 3)["x"]
    want = build_mlp()(torch_tensor(x)).detach().numpy()
    opsets = set()
    for name in ONNX_EXPORTERS:
        ctx.options.onnx_exporters = [name]
        result = Export().run(ctx, StepLog("export"))
        assert result["exporter"] == name and ctx.onnx_exporter == name
        assert [f"{a['exporter']}:{a['source']}" for a in ctx.export_attempts] == [name]
        assert ctx.export_attempts[0]["agrees"], ctx.export_attempts[0]
        import onnxruntime as ort

        got = ort.InferenceSession(ctx.onnx_file, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        np.testing.assert_allclose(got, want, atol=1e-4)
        opsets.add(next(o.version for o in onnx.load(ctx.onnx_file).opset_import if o.domain in ("", "ai.onnx")))
    # the TorchScript-based exporter writes opset 17; the torch.export-based one its own, newer
    assert 17 in opsets and max(opsets) > 17, opsets


def build_mlp():
    import importlib.util

    spec = importlib.util.spec_from_file_location("zoo_mlp", ZOO / "mlp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_model()


def torch_tensor(x):
    import torch

    return torch.from_numpy(x)


def test_exporters_are_tried_in_the_order_asked_and_say_why_each_was_not_used(tmp_path):
    """The Hugging Face-like encoder is not scriptable: asked for script then trace, the script
    exporter is not tried (no script capture), the trace one is used, and the report says both."""
    ctx = convert(
        tmp_path,
        "hf_like",
        targets=("onnxruntime",),
        options_extra={"onnx_exporters": ["torchscript:script", "torchscript:trace"]},
    )
    assert ctx.onnx_exporter == "torchscript:trace"
    first, second = ctx.export_attempts
    assert (first["source"], first.get("skipped")) == ("script", True)
    assert first["error"] == "not tried: no script capture agrees with eager"
    assert second["source"] == "trace" and second["agrees"]
    assert ctx.candidate("onnxruntime-fp32").passed


def test_when_every_exporter_fails_the_error_names_each_reason(tmp_path):
    ctx = convert(
        tmp_path,
        "unexportable",
        targets=("onnxruntime",),
        options_extra={"onnx_exporters": ["dynamo:eager", "torchscript:eager"]},
    )
    error = ctx.step("export").error
    assert error.startswith("ONNX export failed: dynamo:eager: ")
    assert "_linalg_eigh" in error and "torchscript:eager: " in error and "linalg_eigvalsh" in error, error
    assert error.endswith("(tried dynamo:eager, torchscript:eager)")


def test_an_unknown_onnx_exporter_is_refused_in_one_line():
    from service.errors import InvalidOptions
    from service.options import ConversionOptions

    with pytest.raises(InvalidOptions) as info:
        ConversionOptions.parse({"onnx_exporters": ["dynamo:eager", "tf2onnx"]})
    assert str(info.value) == (
        "onnx_exporters: unknown ONNX exporter 'tf2onnx'; known: dynamo:eager, dynamo:export, "
        "torchscript:script, torchscript:trace, torchscript:eager"
    )
