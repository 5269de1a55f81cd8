import pytest

from service.errors import InvalidSignature
from service.signature import Signature, parse_dim_range, parse_tensor_spec


def test_parses_specs_and_fills_default_ranges():
    sig = Signature.parse(
        {"inputs": ["x:fp32[batch,3,224,224]", "ids:int64[batch,seq]"], "outputs": ["y"], "dims": {"seq": [1, 16, 64]}}
    )
    assert sig.inputs[0].dtype == "float32"
    assert sig.inputs[0].shape == ["batch", 3, 224, 224]
    assert sig.batch_dim == "batch"
    assert sig.dims["seq"].max == 64
    assert sig.dims["batch"].min == 1 and sig.dims["batch"].max >= sig.dims["batch"].opt
    assert sig.concrete_shape(sig.inputs[1], sig.sizes_at("max")) == (sig.dims["batch"].max, 64)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"inputs": ["x:float33[b]"]}, "unsupported dtype 'float33'"),
        ({"inputs": ["x:float32[b]"], "dims": {"b": [4, 2, 8]}}, "min <= opt <= max"),
        ({"inputs": ["x:float32[b]"], "dims": {"c": [1, 2, 3]}}, "no tensor uses: c"),
        ({"inputs": []}, "at least one input"),
        ({"inputs": ["x:float32[b]", "x:float32[b]"]}, "unique: x"),
        ({"inputs": ["x:float32[-1, 3]"]}, "negative"),
        ([1, 2], "must be an object"),
    ],
)
def test_bad_signatures_say_what_is_wrong(data, message):
    with pytest.raises(InvalidSignature, match=message):
        Signature.parse(data)


def test_tensor_and_dim_specs():
    assert parse_tensor_spec("a.b:int32[2,n]") == {"name": "a.b", "dtype": "int32", "shape": [2, "n"]}
    assert parse_tensor_spec("out") == {"name": "out"}
    name, r = parse_dim_range("batch=1:8:32")
    assert (name, r.min, r.opt, r.max) == ("batch", 1, 8, 32)
    with pytest.raises(InvalidSignature, match="name=min:opt:max"):
        parse_dim_range("batch=1:8")
    with pytest.raises(InvalidSignature, match="name:dtype"):
        parse_tensor_spec("x:float32[1,2")


def test_yaml_text_and_file(tmp_path):
    (tmp_path / "kiln.yaml").write_text("signature:\n  inputs: ['x:float32[batch,4]']\n  dims: {batch: [1, 2, 4]}\n")
    assert Signature.from_file(tmp_path / "kiln.yaml").dims["batch"].opt == 2
    with pytest.raises(InvalidSignature, match="neither JSON nor YAML"):
        Signature.parse_text("inputs: [unclosed")
