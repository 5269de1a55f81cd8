"""What an ONNX model may contain before Kiln loads it in-process: operators of the standard domains
only (a custom domain needs a custom-operator library, that is, code) and no data in other files
(a tensor's `location` could name any file on the host). Checked at upload and again before every
load, since a model exported in the sandbox is as untrusted as an uploaded one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from service.errors import InvalidBundle, KilnError

# ONNX's own domains and ONNX Runtime's built-in contrib operators (com.microsoft.nchwc is what its
# layout optimizer writes on the CPU).
STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc"})


def check_onnx(path: Path, *, error: type[KilnError] = InvalidBundle, external_in_folder: bool = False) -> Any:
    """The parsed model (without external data), or `error` saying why it is refused.
    `external_in_folder`: allow tensors whose data lies in files beside the model (a large export)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types
        raise error(f"{path.name} is not a valid ONNX model: {str(exc)[:200]}") from None
    local = {(f.domain, f.name) for f in model.functions}
    for node in _nodes(model):
        if node.domain not in STANDARD_DOMAINS and (node.domain, node.op_type) not in local:
            raise error(
                f"ONNX node {node.name or node.op_type!r} is the operator {node.op_type!r} of the custom "
                f"domain {node.domain!r}; only the standard domains (ai.onnx, ai.onnx.ml, com.microsoft) "
                "are accepted, since a custom operator needs its code loaded into the server"
            )
    folder = path.parent.resolve()
    for tensor in _tensors(model):
        if uses_external_data(tensor) or tensor.data_location == onnx.TensorProto.EXTERNAL:
            where = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if external_in_folder and where and (folder / where).resolve().is_relative_to(folder):
                continue
            raise error(
                f"ONNX tensor {tensor.name!r} keeps its data in another file ({where[:200]!r}); upload a "
                "model with its weights inside the .onnx file (onnx.save(..., "
                "save_as_external_data=False), up to 2 GB)"
            )
    return model


def _graphs(model: Any) -> list[Any]:
    """The main graph and every subgraph (of If, Loop, Scan), in local functions too."""
    found, stack = [], [model.graph]
    nodes = [n for f in model.functions for n in f.node]
    while stack or nodes:
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("g"):
                    stack.append(attr.g)
                stack.extend(attr.graphs)
        nodes = []
        if stack:
            graph = stack.pop()
            found.append(graph)
            nodes = list(graph.node)
    return found


def _nodes(model: Any) -> Iterator[Any]:
    for f in model.functions:
        yield from f.node
    for graph in _graphs(model):
        yield from graph.node


def _tensors(model: Any) -> Iterator[Any]:
    """Every tensor: initializers (sparse ones too) and attribute tensors."""
    for graph in _graphs(model):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
    attributes = [a for node in _nodes(model) for a in node.attribute]
    attributes += [a for f in model.functions for a in f.attribute_proto]  # defaults of function attributes
    for attr in attributes:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        for sparse in ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(attr.sparse_tensors):
            yield sparse.values
            yield sparse.indices
