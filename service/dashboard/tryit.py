"""The "try it" box's starting request: an Open Inference Protocol body built from a deployment's
signature, one row at the batch dimension's smallest size, values drawn the way validation samples
are (service.samples). Large inputs are not written out: a placeholder the page fills in when it
sends keeps the box readable."""

from __future__ import annotations

import json
from typing import Any

from service import samples
from service.serving.protocol import DTYPE_TO_V2
from service.signature import Signature

INLINE_LIMIT = 4096  # values per input written into the box; beyond this the page generates them


def example_request(signature: dict[str, Any]) -> str:
    """The request body as pretty JSON text."""
    sig = Signature.parse(signature)
    batch = sig.dims[sig.batch_dim].min if sig.batch_dim else 1
    sample = samples.at_batch(sig, max(batch, 1))
    inputs = []
    for spec in sig.inputs:
        arr = sample[spec.name]
        entry: dict[str, Any] = {"name": spec.name, "shape": list(arr.shape), "datatype": DTYPE_TO_V2[str(spec.dtype)]}
        if arr.size <= INLINE_LIMIT:
            values = arr.ravel().tolist()
            entry["data"] = [round(v, 4) for v in values] if arr.dtype.kind == "f" else values
        else:
            lo, hi = spec.value_range or ((-1, 1) if arr.dtype.kind == "f" else (0, 10))
            entry["data"] = f"<{arr.size} random values in [{lo:g}, {hi:g})>"
        inputs.append(entry)
    return _compact_json({"inputs": inputs})


def _compact_json(body: dict[str, Any]) -> str:
    """Indented JSON with each data list on one line, so the structure stays visible."""
    lists: list[str] = []
    shallow: dict[str, list[dict[str, Any]]] = {"inputs": []}
    for entry in body["inputs"]:
        if isinstance(entry["data"], list):
            lists.append(json.dumps(entry["data"]))
            entry = {**entry, "data": f"@@{len(lists) - 1}@@"}
        shallow["inputs"].append(entry)
    text = json.dumps(shallow, indent=2)
    for i, data in enumerate(lists):
        text = text.replace(f'"@@{i}@@"', data)
    return text
