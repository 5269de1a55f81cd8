"""The Open Inference Protocol (KServe v2) request and response bodies, JSON and Triton's binary
tensor extension. Pure parsing and encoding: no model, no I/O."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from service.errors import InvalidInput
from service.signature import numpy_dtype

# protocol datatype <-> Kiln dtype name
V2_TO_DTYPE = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
    "BF16": "bfloat16",
}
DTYPE_TO_V2 = {v: k for k, v in V2_TO_DTYPE.items()}
HEADER_LENGTH = "inference-header-content-length"
MAX_JSON_DEPTH = 64
MAX_ELEMENTS = 2**48
MAX_RANK = 32  # numpy's own limit is 64; no model in practice takes more than a handful


def np_dtype(dtype: str) -> np.dtype:
    return numpy_dtype(dtype) if dtype in ("bfloat16",) else np.dtype(dtype)


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[str] | None  # None: all
    binary_outputs: set[str] = field(default_factory=set)
    binary_all: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)


def parse(body: bytes, header_length: str | None, expected: dict[str, str]) -> InferRequest:
    """Parse an /infer body. `expected` maps input names to the dtypes the model takes."""
    if header_length is not None:
        if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(body):
            raise InvalidInput(
                f"Inference-Header-Content-Length {header_length[:40]!r} does not fit a body of {len(body)} bytes"
            )
        n = int(header_length)
        header, binary = body[:n], memoryview(body)[n:]
    else:
        header, binary = body, memoryview(b"")
    try:
        doc = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the request is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise InvalidInput("the request needs an 'inputs' list with at least one tensor")
    _check_depth(doc)
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for item in doc["inputs"]:
        if not isinstance(item, dict):
            raise InvalidInput("each input must be an object with name, shape, datatype and data")
        name, shape, dtype, count = check_input(
            item.get("name"), item.get("shape"), item.get("datatype"), expected, inputs
        )
        datatype = DTYPE_TO_V2[dtype]
        size = (item.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            itemsize = np_dtype(dtype).itemsize
            if not isinstance(size, int) or size != count * itemsize:
                raise InvalidInput(
                    f"input {name!r}: binary_data_size {size} does not match shape {shape} of "
                    f"{datatype} ({count * itemsize} bytes)"
                )
            if offset + size > len(binary):
                raise InvalidInput(
                    f"input {name!r}: the body holds {len(binary) - offset} more bytes, binary_data_size says {size}"
                )
            arr = np.frombuffer(binary[offset : offset + size], dtype=np_dtype(dtype)).reshape(shape)
            offset += size
        else:
            if "data" not in item:
                raise InvalidInput(f"input {name!r} has neither 'data' nor a binary_data_size parameter")
            arr = _from_json(name, item["data"], dtype, shape, count)
        inputs[name] = arr
    if offset != len(binary):
        raise InvalidInput(f"the body has {len(binary) - offset} bytes of binary data that no input claims")
    outputs = None
    binary_outputs: set[str] = set()
    if isinstance(doc.get("outputs"), list):
        outputs = []
        for o in doc["outputs"]:
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise InvalidInput("each requested output must be an object with a 'name'")
            outputs.append(o["name"])
            if (o.get("parameters") or {}).get("binary_data"):
                binary_outputs.add(o["name"])
    params: dict[str, Any] = doc["parameters"] if isinstance(doc.get("parameters"), dict) else {}
    rid = doc.get("id")
    return InferRequest(
        id=str(rid) if rid is not None else None,
        inputs=inputs,
        outputs=outputs,
        binary_outputs=binary_outputs,
        binary_all=bool(params.get("binary_data_output")),
        parameters=params,
    )


def check_input(
    name: Any, shape: Any, datatype: Any, expected: dict[str, str], seen: dict[str, np.ndarray]
) -> tuple[str, list[int], str, int]:
    """One input tensor's name, shape and datatype checked against the model (for JSON and gRPC
    requests alike): its name, shape, Kiln dtype and element count."""
    if not isinstance(name, str):
        raise InvalidInput("an input has no 'name'")
    if name in seen:
        raise InvalidInput(f"input {name!r} is given twice")
    if name not in expected:
        raise InvalidInput(f"unknown input {name!r}; the model takes {', '.join(expected)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InvalidInput(f"input {name!r}: 'shape' must be a list of non-negative integers")
    if len(shape) > MAX_RANK:
        raise InvalidInput(f"input {name!r}: rank {len(shape)} is more than the {MAX_RANK} dimensions accepted")
    if math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:  # numpy refuses such shapes even when one is 0
        raise InvalidInput(f"input {name!r}: shape {shape} is too large (over {MAX_ELEMENTS} elements)")
    if datatype not in V2_TO_DTYPE:
        raise InvalidInput(
            f"input {name!r}: datatype {datatype!r} is not supported; use one of {', '.join(V2_TO_DTYPE)}"
        )
    dtype = V2_TO_DTYPE[datatype]
    want = expected[name]
    if dtype != want:
        raise InvalidInput(f"input {name!r} has datatype {datatype}, the model takes {DTYPE_TO_V2.get(want, want)}")
    return name, shape, dtype, math.prod(shape)  # exact: numpy's product wraps around for huge shapes


def from_raw(name: str, raw: bytes | memoryview, dtype: str, shape: list[int], count: int) -> np.ndarray:
    """An input from its raw little-endian bytes (Triton's binary extension, gRPC raw contents)."""
    itemsize = np_dtype(dtype).itemsize
    if len(raw) != count * itemsize:
        raise InvalidInput(
            f"input {name!r}: {len(raw)} bytes given, shape {shape} of {DTYPE_TO_V2[dtype]} needs {count * itemsize}"
        )
    return np.frombuffer(raw, dtype=np_dtype(dtype)).reshape(shape)


def _from_json(name: str, data: Any, dtype: str, shape: list[int], count: int) -> np.ndarray:
    try:
        arr = np.asarray(data, dtype=np_dtype(dtype) if dtype != "bfloat16" else np.float32)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInput(f"input {name!r}: data cannot be read as {DTYPE_TO_V2[dtype]}: {exc}") from None
    if arr.size != count:
        raise InvalidInput(f"input {name!r}: {arr.size} values given, shape {shape} needs {count}")
    arr = arr.reshape(shape)
    return arr.astype(np_dtype(dtype)) if dtype == "bfloat16" else arr


def _check_depth(doc: Any) -> None:
    stack = [(doc, 0)]
    while stack:
        obj, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidInput(f"the request nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(obj, dict):
            stack.extend((v, depth + 1) for k, v in obj.items() if k != "data")
        elif isinstance(obj, list) and obj and isinstance(obj[0], (list, dict)):
            stack.extend((v, depth + 1) for v in obj)


def encode(
    model: str,
    version: str,
    request: InferRequest,
    outputs: dict[str, np.ndarray],
    out_dtypes: Mapping[str, str | None],
) -> tuple[bytes, dict[str, str]]:
    """The response body and headers: JSON, or JSON header + binary tensors where asked for."""
    items, blobs = [], []
    for name, arr in outputs.items():
        dtype = out_dtypes.get(name) or str(arr.dtype)
        item: dict[str, Any] = {"name": name, "datatype": DTYPE_TO_V2.get(dtype, "FP32"), "shape": list(arr.shape)}
        if request.binary_all or name in request.binary_outputs:
            raw = np.ascontiguousarray(arr).tobytes()
            item["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            item["data"] = arr.astype(np.float32).ravel().tolist() if dtype == "bfloat16" else arr.ravel()
        items.append(item)
    doc: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": items}
    if request.id is not None:
        doc["id"] = request.id
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
