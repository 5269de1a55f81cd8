"""The TensorRT compiler and runtime on the CPU: profiles, profile choice, shape buckets, the engine
compatibility check, the fp32 fallback, and the builder driven through a fake `tensorrt` module
(tests/gpu/fake_tensorrt.py). The real library is exercised by tests/gpu/test_gpu.py on a GPU host."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from service import samples as sample_io
from service.config import get_settings
from service.errors import ConversionError, InvalidInput
from service.options import Tolerance
from service.runtimes.tensorrt import (
    choose_profile,
    engine_mismatch,
    engine_stamp,
    optimization_profiles,
    ort_trt_profile_options,
    shape_bucket,
)
from service.signature import Signature
from tests.gpu import fake_tensorrt
from workers.compilers import tensorrt as trt_compiler
from workers.compilers.tensorrt import (
    LayerInfo,
    build_engine,
    build_mode,
    calibration_inputs,
    choose_fp32_layers,
    describe_fp32_layers,
    next_fp32_layers,
    weak_typing,
)
from workers.context import BundleInfo, Candidate, Context, OutputMetrics, Validation
from workers.pipeline import StepLog

ROOT = Path(__file__).resolve().parents[2]
SIG = Signature.parse({"inputs": ["x:float32[batch,8]"], "outputs": ["y"], "dims": {"batch": [1, 4, 16]}})
SEQ = Signature.parse(
    {
        "inputs": [{"name": "ids", "dtype": "int64", "shape": ["batch", "seq"]}],
        "outputs": ["logits"],
        "dims": {"batch": [1, 4, 8], "seq": [4, 64, 128]},
    }
)


# --- profiles and buckets -----------------------------------------------------------------------


def test_profiles_from_signature_min_opt_max():
    full, small = optimization_profiles(SEQ)
    assert full == {"ids": ((1, 4), (4, 64), (8, 128))}
    assert small == {"ids": ((1, 4), (1, 4), (4, 64))}  # tuned for min, up to opt
    static = Signature.parse({"inputs": ["x:float32[1,3]"]})
    assert optimization_profiles(static) == [{"x": ((1, 3), (1, 3), (1, 3))}]
    assert ort_trt_profile_options(SEQ) == {
        "trt_profile_min_shapes": "ids:1x4",
        "trt_profile_opt_shapes": "ids:4x64",
        "trt_profile_max_shapes": "ids:8x128",
    }
    assert ort_trt_profile_options(static) == {}


def test_choose_profile_prefers_the_closest_opt_and_refuses_shapes_outside():
    profiles = optimization_profiles(SEQ)
    assert choose_profile(profiles, {"ids": (1, 4)}) == 1  # batch 1, short: the min-tuned profile
    assert choose_profile(profiles, {"ids": (4, 64)}) == 0
    assert choose_profile(profiles, {"ids": (8, 128)}) == 0  # only the full profile reaches max
    assert choose_profile(profiles, {"ids": (2, 100)}) == 0
    with pytest.raises(InvalidInput, match=r"outside every optimization profile.*ids: \[1, 4\]\.\.\[8, 128\]"):
        choose_profile(profiles, {"ids": (9, 16)})
    with pytest.raises(InvalidInput):
        choose_profile(profiles, {"ids": (1, 2, 3)})


def test_shape_buckets_round_dynamic_dims_up_to_powers_of_two_within_the_profile():
    full = optimization_profiles(SEQ)[0]
    assert shape_bucket(full, {"ids": (3, 65)}) == {"ids": (4, 128)}
    assert shape_bucket(full, {"ids": (1, 4)}) == {"ids": (1, 4)}
    assert shape_bucket(full, {"ids": (5, 100)}) == {"ids": (8, 128)}  # capped at max
    image = optimization_profiles(
        Signature.parse({"inputs": ["image:float32[batch,3,224,224]"], "dims": {"batch": [1, 4, 8]}})
    )[0]
    assert shape_bucket(image, {"image": (3, 3, 224, 224)}) == {"image": (4, 3, 224, 224)}  # static dims kept
    # every shape of a bucket fits the buffer sized for it
    for b in range(1, 9):
        for s in range(4, 129, 7):
            ((bb, ss),) = shape_bucket(full, {"ids": (b, s)}).values()
            assert b <= bb <= 8 and s <= ss <= 128


def test_engine_compatibility_names_what_differs():
    here = engine_stamp("NVIDIA H100 80GB HBM3", "9.0", "10.16.1.11")
    assert engine_mismatch(here, dict(here)) is None
    why = engine_mismatch(engine_stamp("NVIDIA A10", "8.6", "10.16.1.11"), here)
    assert "GPU 'NVIDIA A10' (this host: 'NVIDIA H100 80GB HBM3')" in why and "compute capability" in why
    assert "TensorRT" not in why.split(";")[0] and "rebuild" in why
    assert "TensorRT '10.3.0'" in engine_mismatch(engine_stamp("NVIDIA H100 80GB HBM3", "9.0", "10.3.0"), here)
    assert "does not record" in engine_mismatch(None, here)


# --- precision and the fp32 fallback ------------------------------------------------------------


def test_build_mode_by_tensorrt_generation():
    assert build_mode("fp16", weak=True, has_qdq=False).flags == ("FP16",)
    assert build_mode("bf16", weak=True, has_qdq=False).flags == ("BF16",)
    calibrated = build_mode("int8", weak=True, has_qdq=False)
    assert calibrated.flags == ("INT8", "FP16") and calibrated.calibrate
    assert not build_mode("int8", weak=True, has_qdq=True).calibrate  # the graph's own Q/DQ scales
    strong = build_mode("fp16", weak=False, has_qdq=False)
    assert strong.strongly_typed and strong.graph == "fp16" and not strong.flags
    assert build_mode("int8", weak=False, has_qdq=False).graph == "qdq"
    assert build_mode("int8", weak=False, has_qdq=True).graph is None
    with pytest.raises(ConversionError, match="strongly typed"):
        build_mode("bf16", weak=False, has_qdq=False)
    assert weak_typing(fake_tensorrt.make(weak=True)) and not weak_typing(fake_tensorrt.make(weak=False))


def _net() -> list[LayerInfo]:
    # x -> conv -> relu -> matmul -> softmax -> y ;  x -> shape (feeds nothing float); side branch z
    return [
        LayerInfo("conv", "CONVOLUTION", ("x",), ("c",)),
        LayerInfo("relu", "ACTIVATION", ("c",), ("r",)),
        LayerInfo("shape", "SHAPE", ("x",), ("s",), float_outputs=False),
        LayerInfo("mm", "MATRIX_MULTIPLY", ("r", "s"), ("m",)),
        LayerInfo("softmax", "SOFTMAX", ("m",), ("y",)),
        LayerInfo("side", "NORMALIZATION", ("x",), ("z",)),
    ]


def test_fp32_fallback_rounds_widen_from_sensitive_layers_to_all_feeding_the_failing_output():
    layers = _net()
    assert choose_fp32_layers(layers, ["y"], set(), 1) == {"softmax"}  # side's normalization feeds z, not y
    assert choose_fp32_layers(layers, ["y"], set(), 2) == {"softmax", "mm"}
    assert choose_fp32_layers(layers, ["y"], set(), 3) == {"softmax", "mm", "relu", "conv"}  # never the shape layer
    assert choose_fp32_layers(layers, ["y", "z"], set(), 1) == {"softmax", "side"}
    assert next_fp32_layers(layers, ["y"], {"softmax"}, 2) == ({"softmax", "mm"}, 2)
    everything = {"softmax", "mm", "relu", "conv"}
    assert next_fp32_layers(layers, ["y"], everything, 1) == (everything, 4)  # nothing more to keep
    # a round that adds nothing is skipped
    plain = [LayerInfo("a", "CONVOLUTION", ("x",), ("h",)), LayerInfo("b", "ACTIVATION", ("h",), ("y",))]
    assert next_fp32_layers(plain, ["y"], set(), 1) == ({"b"}, 2)
    assert describe_fp32_layers(layers, {"softmax", "mm"}) == "2 layer(s) (MATRIX_MULTIPLY x1, SOFTMAX x1): mm, softmax"


def test_calibration_uses_batches_at_the_profiles_opt_shapes():
    profile = optimization_profiles(SIG)[0]
    batches = [{"x": np.zeros((n, 8), np.float32)} for n in (1, 4, 16, 4)]
    assert [b["x"].shape[0] for b in calibration_inputs(batches, profile)] == [4, 4]


# --- the builder through the fake module --------------------------------------------------------


def _onnx(path: Path, *, odd_op: str | None = None) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32), "w")
    scale = numpy_helper.from_array(np.ones(8, np.float32), "scale")
    bias = numpy_helper.from_array(np.zeros(8, np.float32), "bias")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("LayerNormalization", ["h", "scale", "bias"], ["n"], name="ln", axis=-1),
        helper.make_node("Softmax", ["n"], ["y"], name="sm", axis=-1),
    ]
    if odd_op:
        nodes.append(helper.make_node(odd_op, ["y"], ["y2"], name="odd"))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, ["batch", 8])],
        [w, scale, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_build_engine_sets_flags_profiles_pinned_layers_and_timing_cache(tmp_path):
    trt = fake_tensorrt.make(weak=True)
    src = _onnx(tmp_path / "m.onnx")
    cache = tmp_path / "cache" / "timing.cache"
    engine, layers = build_engine(
        trt,
        src,
        build_mode("fp16", weak=True, has_qdq=False),
        optimization_profiles(SIG),
        fp32_layers={"sm"},
        timing_cache=cache,
    )
    built = json.loads(engine)
    assert built["flags"] == ["FP16", "OBEY_PRECISION_CONSTRAINTS"] and not built["strongly_typed"]
    assert built["profiles"] == [{"x": [[1, 8], [4, 8], [16, 8]]}, {"x": [[1, 8], [1, 8], [4, 8]]}]
    assert built["fp32_layers"] == ["sm"]
    assert [(layer.name, layer.kind) for layer in layers] == [
        ("mm", "MATRIX_MULTIPLY"),
        ("ln", "NORMALIZATION"),
        ("sm", "SOFTMAX"),
    ]
    assert cache.read_bytes() == b"timing:+"  # persisted, and read back by the next build
    engine, _ = build_engine(
        trt, src, build_mode("fp32", weak=True, has_qdq=False), optimization_profiles(SIG), timing_cache=cache
    )
    assert json.loads(engine)["timing_cache_loaded"] == "timing:+" and json.loads(engine)["flags"] == []


def test_build_engine_reports_parser_and_builder_errors(tmp_path):
    trt = fake_tensorrt.make(weak=True)
    fp32 = build_mode("fp32", weak=True, has_qdq=False)
    with pytest.raises(ConversionError, match="ONNX parser refused the model: no importer for NoImporter"):
        build_engine(trt, _onnx(tmp_path / "a.onnx", odd_op="NoImporter"), fp32, optimization_profiles(SIG))
    with pytest.raises(ConversionError, match="TensorRT could not build the engine: no implementation"):
        build_engine(trt, _onnx(tmp_path / "b.onnx", odd_op="UnsupportedByBuilder"), fp32, optimization_profiles(SIG))


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    yield tmp_path / "data"
    get_settings.cache_clear()


def _context(tmp_path: Path) -> Context:
    import onnxruntime as ort

    src = _onnx(tmp_path / "model.onnx")
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    labelled = sample_io.generate(SIG)
    samples = [s for _, s in labelled]
    sess = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    refs = [{"y": sess.run(["y"], s)[0]} for s in samples]
    sample_io.save(work / "samples.npz", samples)
    sample_io.save(work / "refs.npz", refs)
    return Context(
        workdir=str(work),
        out_dir=str(out),
        bundle=BundleInfo(kind="onnx", root=str(tmp_path)),
        signature=SIG,
        samples_file=str(work / "samples.npz"),
        reference_file=str(work / "refs.npz"),
        sample_labels=[label for label, _ in labelled],
        onnx_file=str(src),
        onnx_exporter="given",
    )


def _passes_with(needed: set[str], seen: list):
    """A stand-in for validating an engine: it passes once `needed` layers are kept at fp32."""

    def validate(ctx, directory, precision, samples, refs):
        info = json.loads((directory / "kiln-artifact.json").read_text())
        pinned = set(info["extra"]["fp32_layers"])
        seen.append(sorted(pinned))
        ok = needed <= pinned
        metrics = OutputMetrics(
            max_abs=0.0 if ok else 0.5,
            rel=0.0,
            cosine=1.0,
            passed=ok,
            tolerance=Tolerance(),
            failed_checks=[] if ok else ["max abs error 0.5 > atol"],
        )
        return Validation(
            passed=ok,
            samples=len(samples),
            outputs={"y": metrics},
            reason=None if ok else "y: max abs error 0.5 > atol",
        )

    return validate


@pytest.mark.parametrize("weak", [True, False], ids=["tensorrt10", "tensorrt11"])
def test_compiler_keeps_layers_at_fp32_until_the_engine_validates_and_says_which(tmp_path, monkeypatch, data_dir, weak):
    trt = fake_tensorrt.make(weak=weak)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    stamp = engine_stamp("NVIDIA H100 80GB HBM3", "9.0", trt.__version__)
    monkeypatch.setattr(trt_compiler, "require_tensorrt", lambda: None)
    monkeypatch.setattr(trt_compiler, "current_stamp", lambda: stamp)
    seen: list = []
    monkeypatch.setattr(trt_compiler, "validate_artifact", _passes_with({"sm", "ln"}, seen))
    ctx = _context(tmp_path)
    cand = Candidate(id="tensorrt-fp16", target="tensorrt", precision="fp16")
    out = ctx.out / cand.id
    trt_compiler.TensorRTCompiler().build(ctx, cand, out, StepLog("compile"))
    assert seen == [[], ["ln", "sm"]]  # round 1 keeps the sensitive layers: normalization and softmax
    info = json.loads((out / "kiln-artifact.json").read_text())
    assert info["runtime"] == "tensorrt" and info["device"] == "cuda" and info["file"] == "model.plan"
    assert info["extra"]["engine"] == stamp and info["extra"]["fp32_layers"] == ["ln", "sm"]
    assert info["extra"]["strongly_typed"] is (not weak)
    engine = json.loads((out / "model.plan").read_bytes())
    if weak:
        assert engine["flags"] == ["FP16", "OBEY_PRECISION_CONSTRAINTS"] and engine["fp32_layers"] == ["ln", "sm"]
    else:  # TensorRT 11: the float16 graph keeps the blocked nodes in float32, with casts around them
        assert engine["strongly_typed"] and "Cast" in engine["op_types"]
    assert any(n.startswith("kept at fp32 to pass validation: 2 layer(s)") for n in cand.notes), cand.notes
    assert (data_dir / "cache" / "tensorrt").is_dir() and list((data_dir / "cache" / "tensorrt").glob("timing-*"))


def test_compiler_int8_on_tensorrt11_builds_a_symmetric_qdq_graph(tmp_path, monkeypatch, data_dir):
    trt = fake_tensorrt.make(weak=False)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trt_compiler, "require_tensorrt", lambda: None)
    monkeypatch.setattr(trt_compiler, "current_stamp", lambda: engine_stamp("GPU", "9.0", trt.__version__))
    monkeypatch.setattr(trt_compiler, "validate_artifact", _passes_with(set(), []))
    ctx = _context(tmp_path)
    cand = Candidate(id="tensorrt-int8", target="tensorrt", precision="int8")
    trt_compiler.TensorRTCompiler().build(ctx, cand, ctx.out / cand.id, StepLog("compile"))
    engine = json.loads((ctx.out / cand.id / "model.plan").read_bytes())
    assert engine["strongly_typed"] and {"QuantizeLinear", "DequantizeLinear"} <= set(engine["op_types"])
    import onnx

    qdq = onnx.load(str(ctx.work / "compile" / cand.id / "int8-static.onnx"))
    from onnx import numpy_helper

    zero_points = {i.name: i for i in qdq.graph.initializer if i.name.endswith("zero_point")}
    assert zero_points["x_zero_point"].data_type == onnx.TensorProto.INT8  # signed activations
    assert all(not numpy_helper.to_array(z).any() for z in zero_points.values())  # symmetric: zero points 0


def test_weak_int8_without_qdq_calibrates_at_opt_shapes(tmp_path, monkeypatch):
    trt = fake_tensorrt.make(weak=True)
    monkeypatch.setattr(trt_compiler, "make_calibrator", lambda trt, batches, cache: ("calibrator", len(batches)))
    batches = calibration_inputs([{"x": np.zeros((4, 8), np.float32)}], optimization_profiles(SIG)[0])
    engine, _ = build_engine(
        trt,
        _onnx(tmp_path / "m.onnx"),
        build_mode("int8", weak=True, has_qdq=False),
        optimization_profiles(SIG),
        calibration=batches,
    )
    built = json.loads(engine)
    assert built["calibrator"] and built["calibration_profile"] and built["flags"] == ["FP16", "INT8"]


# --- the code only names what the real API has ---------------------------------------------------


def _trt_attribute_chains(path: Path) -> set[tuple[str, ...]]:
    chains = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            parts, cur = [], node
            while isinstance(cur, ast.Attribute):
                parts.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id == "trt":
                chains.add(tuple(reversed(parts)))
    return chains


def test_tensorrt_code_names_only_what_tensorrt_has():
    """The fake mirrors TensorRT 10's names; every `trt.X.Y` the code uses must resolve on it (the
    flags it reaches through getattr are checked by build_mode's table above)."""
    trt = fake_tensorrt.make(weak=True)
    files = [ROOT / "workers" / "compilers" / "tensorrt.py", ROOT / "service" / "runtimes" / "tensorrt.py"]
    chains = set().union(*(_trt_attribute_chains(f) for f in files))
    assert ("BuilderFlag", "OBEY_PRECISION_CONSTRAINTS") in chains and ("TensorIOMode", "INPUT") in chains
    for chain in sorted(chains):
        obj = trt
        for part in chain:
            assert hasattr(obj, part), f"trt.{'.'.join(chain)} is not in TensorRT's API"
            obj = getattr(obj, part)
    for flag in {f for mode in ("fp16", "bf16", "int8") for f in build_mode(mode, weak=True, has_qdq=False).flags}:
        assert hasattr(trt.BuilderFlag, flag)
