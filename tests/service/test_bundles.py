import io
import tarfile
import zipfile

import numpy as np
import pytest

from service import samples as sample_io
from service.bundles import ONNX, PYTHON, ArchiveLimits, prepare_bundle
from service.errors import InvalidBundle, InvalidSignature
from service.signature import Signature

MODEL = "import torch\ndef build_model():\n    return torch.nn.Linear(4, 2)\n"


def _zip(path, members):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_single_file_bundle_defaults_entry(tmp_path):
    src = tmp_path / "net.py"
    src.write_text(MODEL)
    b = prepare_bundle(src, tmp_path / "b")
    assert b.kind == PYTHON and b.entry == "net.py:build_model"
    assert (b.root / "net.py").read_text() == MODEL


def test_zip_bundle_with_manifest(tmp_path):
    z = _zip(
        tmp_path / "m.zip",
        {"model.py": MODEL, "kiln.yaml": "entry: model.py:build_model\nsignature:\n  inputs: ['x:float32[batch,4]']\n"},
    )
    b = prepare_bundle(z, tmp_path / "b")
    assert b.entry == "model.py:build_model"
    assert b.signature.inputs[0].name == "x"


def test_tar_gz_bundle(tmp_path):
    path = tmp_path / "m.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        data = MODEL.encode()
        info = tarfile.TarInfo("pkg/model.py")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    b = prepare_bundle(path, tmp_path / "b", entry="pkg/model.py:build_model")
    assert (b.root / "pkg" / "model.py").is_file()


@pytest.mark.parametrize("member", ["../evil.py", "/etc/evil.py", "a/../../evil.py"])
def test_zip_with_escaping_paths_is_refused_before_writing(tmp_path, member):
    z = _zip(tmp_path / "evil.zip", {"model.py": MODEL, member: "x"})
    with pytest.raises(InvalidBundle, match="outside the bundle"):
        prepare_bundle(z, tmp_path / "b")
    assert not (tmp_path / "evil.py").exists()
    assert not (tmp_path / "b" / "model.py").exists()


def test_tar_with_symlink_is_refused(tmp_path):
    path = tmp_path / "m.tar"
    with tarfile.open(path, "w") as tf:
        info = tarfile.TarInfo("model.py")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(InvalidBundle, match="link"):
        prepare_bundle(path, tmp_path / "b")


def test_zip_bomb_is_refused(tmp_path):
    z = _zip(tmp_path / "bomb.zip", {"model.py": MODEL, "zeros.bin": b"\0" * (64 << 20)})
    assert z.stat().st_size < (1 << 20)
    with pytest.raises(InvalidBundle, match="archive bomb"):
        prepare_bundle(z, tmp_path / "b")


def test_too_many_members(tmp_path):
    z = _zip(tmp_path / "many.zip", {f"f{i}.txt": "x" for i in range(20)})
    with pytest.raises(InvalidBundle, match="members"):
        prepare_bundle(z, tmp_path / "b", limits=ArchiveLimits(max_members=10))


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("empty.py", b"", "empty"),
        ("garbage.bin", b"\x00\x01garbage", "not a model bundle"),
        ("broken.zip", b"PK\x03\x04broken", "neither a zip nor a tar"),
        ("legacy.pt", b"\x80\x02legacy pickle", "legacy pickled"),
    ],
)
def test_not_a_bundle(tmp_path, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(InvalidBundle, match=message):
        prepare_bundle(path, tmp_path / "b")


def test_state_dict_pt_is_not_a_model(tmp_path):
    z = _zip(tmp_path / "w.pt", {"archive/data.pkl": "x", "archive/data/0": "y"})
    with pytest.raises(InvalidBundle, match="state dict"):
        prepare_bundle(z, tmp_path / "b")


def test_missing_entry_file(tmp_path):
    z = _zip(tmp_path / "m.zip", {"other.py": MODEL})
    with pytest.raises(InvalidBundle, match="no model.py"):
        prepare_bundle(z, tmp_path / "b")
    with pytest.raises(InvalidBundle, match="'nope.py' is not in the bundle"):
        prepare_bundle(z, tmp_path / "b2", entry="nope.py:build")


def test_onnx_upload_kind(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"\x08\x07")
    assert prepare_bundle(path, tmp_path / "b").kind == ONNX


def _onnx_matmul(weight_location: str | None = None, in_constant: bool = False) -> bytes:
    """y = x @ W, with W an initializer (or a Constant node's tensor), optionally kept in another file."""
    from onnx import TensorProto, helper

    w = helper.make_tensor("W", TensorProto.FLOAT, [4, 2], [0.5] * 8)
    if weight_location is not None:
        w.ClearField("float_data")
        w.data_location = TensorProto.EXTERNAL
        for key, value in (("location", weight_location), ("offset", "0"), ("length", "32")):
            w.external_data.add(key=key, value=value)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"])]
    inits = [w]
    if in_constant:
        nodes.insert(0, helper.make_node("Constant", [], ["W"], value=w))
        inits = []
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        inits,
    )
    return helper.make_model(graph).SerializeToString()


def test_onnx_with_weights_inside_is_accepted(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(_onnx_matmul())
    assert prepare_bundle(path, tmp_path / "b").kind == ONNX


@pytest.mark.parametrize(
    "location, in_constant",
    [("../../../../etc/passwd", False), ("/etc/shadow", False), ("weights.bin", False), ("/etc/passwd", True)],
)
def test_onnx_external_data_is_refused_at_upload(tmp_path, location, in_constant):
    path = tmp_path / "m.onnx"
    path.write_bytes(_onnx_matmul(location, in_constant))
    with pytest.raises(InvalidBundle, match=r"tensor 'W' keeps its data in another file \('"):
        prepare_bundle(path, tmp_path / "b")
    assert not (tmp_path / "b" / "weights.bin").exists()


@pytest.mark.parametrize("name", ["model.engine", "model.plan", "resnet.trt"])
def test_tensorrt_engines_are_never_accepted(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"ftrt" + bytes(64))
    with pytest.raises(InvalidBundle, match="TensorRT engines are not accepted"):
        prepare_bundle(path, tmp_path / "b")


def test_samples_roundtrip_and_checks(tmp_path):
    sig = Signature.parse({"inputs": ["x:float32[batch,4]", "ids:int64[batch,seq]"], "dims": {"seq": [2, 4, 8]}})
    gen = sample_io.generate(sig)
    labels = [label for label, _ in gen]
    assert labels == ["min", "opt", "max", "opt+", "opt-"]
    assert gen[0][1]["ids"].shape == (1, 2) and gen[2][1]["ids"].shape == (16, 8)
    assert gen[3][1]["x"].min() >= 0 and gen[4][1]["x"].max() <= 0
    sample_io.save(tmp_path / "s.npz", [s for _, s in gen])
    back = sample_io.load(tmp_path / "s.npz")
    assert np.array_equal(back[2]["ids"], gen[2][1]["ids"])
    with pytest.raises(InvalidSignature, match="has no input 'ids'"):
        sample_io.check_against(sig, [{"x": np.zeros((1, 4), np.float32)}])
    with pytest.raises(InvalidSignature, match="axis 1 is 5"):
        sample_io.check_against(sig, [{"x": np.zeros((1, 5), np.float32), "ids": np.zeros((1, 2), np.int64)}])


def test_samples_file_refuses_pickles(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(tmp_path / "s.npz", "w") as zf:
        zf.write(tmp_path / "obj.npy", "x.npy")
    with pytest.raises(InvalidBundle, match="not a readable"):
        sample_io.load(tmp_path / "s.npz")
