"""The /infer body parser fuzzed directly (the OpenAPI fuzz cannot reach it: the body is raw bytes).
Whatever a client sends, parsing either gives tensors that match the shapes they claim, or raises
InvalidInput (a 400 with a reason): never another exception, which the API would answer with a 500."""

from __future__ import annotations

import json
import math

import hypothesis
import pytest
from hypothesis import strategies as st

from service.errors import InvalidInput
from service.serving import protocol

EXPECTED = {"x": "float32", "ids": "int64", "mask": "bool", "h": "float16", "b": "bfloat16"}

dims = st.one_of(
    st.integers(0, 4), st.sampled_from([0, 1, 2**31, 2**32, 2**62, 2**63 - 1, 2**64]), st.integers(-3, 2**66)
)
shapes = st.one_of(
    st.lists(dims, max_size=5),
    st.lists(st.just(1), min_size=30, max_size=70),
    st.sampled_from(["nope", None, [1.5], [True]]),
)
scalars = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(-(2**70), 2**70),
    st.booleans(),
    st.text(max_size=3),
    st.none(),
)
data = st.recursive(st.lists(scalars, max_size=8), lambda inner: st.lists(inner, max_size=3), max_leaves=30)
datatypes = st.one_of(st.sampled_from(list(protocol.V2_TO_DTYPE)), st.text(max_size=5), st.none())


@st.composite
def tensors(draw) -> dict:
    odd = lambda: draw(st.integers(0, 9)) == 0  # noqa: E731 - a field is malformed one time in ten
    name = draw(st.one_of(st.text(max_size=3), st.integers())) if odd() else draw(st.sampled_from(list(EXPECTED)))
    right = protocol.DTYPE_TO_V2.get(EXPECTED.get(name, ""), "FP32")  # mostly the model's own datatype
    item = {"name": name, "shape": draw(shapes), "datatype": draw(datatypes) if odd() else right}
    shape = item["shape"]
    count = math.prod(shape) if isinstance(shape, list) and all(isinstance(d, int) for d in shape) else -1
    if 0 <= count <= 64 and draw(st.booleans()):  # as many values as the shape claims (up to 64 bits)
        item["data"] = draw(st.lists(st.floats(-1e3, 1e3), min_size=count, max_size=count))
    elif 0 <= count % 2**64 <= 64 and draw(st.booleans()):  # as many as numpy's wrapped-around product
        item["data"] = draw(st.lists(st.integers(0, 1), min_size=count % 2**64, max_size=count % 2**64))
    elif draw(st.booleans()):
        item["data"] = draw(data)
    if odd():
        item["parameters"] = {
            "binary_data_size": draw(st.one_of(st.integers(-8, 64), st.just(2**64), st.text(max_size=2)))
        }
    return item


@st.composite
def bodies(draw) -> tuple[bytes, str | None]:
    doc = {"inputs": draw(st.lists(tensors(), max_size=3))}
    if draw(st.booleans()):
        doc["outputs"] = draw(
            st.lists(st.one_of(st.fixed_dictionaries({"name": st.text(max_size=3)}), st.integers()), max_size=2)
        )
    if draw(st.booleans()):
        doc["parameters"] = draw(st.one_of(st.just({"binary_data_output": True}), st.integers(), st.none()))
    header = json.dumps(doc).encode()  # the stdlib writes any int
    if draw(st.booleans()):
        return header, None
    binary = draw(st.binary(max_size=64))
    if draw(st.integers(0, 3)):
        return header + binary, str(len(header))
    length = draw(st.one_of(st.integers(-2, len(header) + 80).map(str), st.text(max_size=4)))
    return header + binary, length


@hypothesis.settings(max_examples=600, deadline=None, derandomize=True)
@hypothesis.given(bodies())
def test_any_body_parses_or_is_invalid_input(body):
    content, header_length = body
    try:
        request = protocol.parse(content, header_length, EXPECTED)
    except InvalidInput as exc:
        assert str(exc)
        return
    for name, array in request.inputs.items():
        assert name in EXPECTED
        assert array.ndim <= 64 and array.size == math.prod(array.shape)


@hypothesis.settings(max_examples=200, deadline=None, derandomize=True)
@hypothesis.given(st.binary(max_size=200), st.one_of(st.none(), st.text(max_size=6)))
def test_random_bytes_are_invalid_input(content, header_length):
    # Random bytes are never a request: a JSON object with an "inputs" list of named tensors.
    with pytest.raises(InvalidInput) as refused:
        protocol.parse(content, header_length, EXPECTED)
    assert str(refused.value)
