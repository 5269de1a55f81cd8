"""Resize by constant scales where its output size follows from static dimensions.

The torch.export-based exporter writes `F.interpolate(x, size=(h, w))` on a batch-dynamic tensor as a
Resize whose `sizes` input is computed at run time: the batch and channels read from x's Shape,
concatenated with the constant (h, w). ONNX Runtime's NCHWc layout transformer (its blocked
convolution kernels on AVX2/AVX-512 CPUs) takes a Resize into that layout only when its scales are
constant, so each such Resize costs a reorder out of the layout and back, plus the Shape that reads
the blocked tensor. On DeepLabV3 (MobileNetV3, batch 1, 224x224) that was about 7% of the latency and
what made the plain static-shape export faster than Kiln's. Scales of 1 on the dimensions the input
and output share (the batch, symbolic) and out/in on the static ones give the same output for every
batch size: ONNX Runtime computes the output size as int(in * scale) and, from sizes, the scale as out/in,
so a scale is used only where that product gives the size back exactly.

Which dimensions are static, and which output dimension is the input's own, comes from ONNX
Runtime's symbolic shape inference (`onnxruntime.tools.symbolic_shape_infer`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Attributes under which `sizes` means something scales cannot say.
_SIZES_ONLY = {"keep_aspect_ratio_policy": b"stretch"}


def resize_by_scales(src: Path, dst: Path) -> int:
    """Write `src` to `dst` with every Resize whose size follows from static dimensions resized by
    constant scales instead, and the nodes that only computed those sizes removed. Returns how many
    Resize nodes changed; 0 (and nothing written) when none could, or when the weights are stored
    outside the file (their paths are relative to it)."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        return 0
    if not any(n.op_type == "Resize" and _sized(n) for n in model.graph.node):
        return 0
    shapes = _shapes(model)
    changed = sum(_to_scales(model.graph, node, shapes) for node in model.graph.node if _sized(node))
    if changed:
        prune_unread(model.graph)
        onnx.save(model, str(dst))
    return changed


def _sized(node: Any) -> bool:
    return node.op_type == "Resize" and node.domain in ("", "ai.onnx") and len(node.input) >= 4 and bool(node.input[3])


def _shapes(model: Any) -> dict[str, list[int | str | None]]:
    """Each value's dims (int, symbol, or None where unknown), from ONNX Runtime's symbolic shape
    inference, which follows Shape -> Slice -> Concat into a Resize's sizes and keeps the batch's
    symbol through them (ONNX's own inference names it anew). What the exporter annotated is set
    aside first: only what follows from the graph counts. Empty when inference fails."""
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    bare.graph.ClearField("value_info")
    try:
        inferred = SymbolicShapeInference.infer_shapes(bare)
    except Exception:  # noqa: BLE001 - an operator it does not know: leave the graph as it is
        return {}
    if inferred is None:
        return {}
    graph = inferred.graph
    out: dict[str, list[int | str | None]] = {}
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
    return out


def _to_scales(graph: Any, node: Any, shapes: dict[str, list[int | str | None]]) -> bool:
    import numpy as np
    from onnx import helper, numpy_helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if any(attrs.get(k, v) != v for k, v in _SIZES_ONLY.items()) or attrs.get("axes") is not None:
        return False
    if attrs.get("coordinate_transformation_mode") == b"tf_crop_and_resize":
        return False
    x, y = shapes.get(node.input[0]), shapes.get(node.output[0])
    if not x or not y or len(x) != len(y):
        return False
    scales = []
    for a, b in zip(x, y):
        if isinstance(a, int) and isinstance(b, int) and a > 0 and b > 0:
            s = np.float32(b) / np.float32(a)
            if int(np.float32(a) * s) != b:
                return False
            scales.append(s)
        elif isinstance(a, str) and a == b:
            scales.append(np.float32(1.0))
        else:
            return False
    name = f"{node.output[0]}__scales"
    graph.initializer.append(numpy_helper.from_array(np.array(scales, np.float32), name))
    data = node.input[0]
    del node.input[:]
    node.input.extend([data, "", name])
    return True


def prune_unread(graph: Any) -> int:
    """Remove the top-level nodes whose outputs nothing reads (repeatedly), and the initializers
    nothing reads that are not also graph inputs (those are inputs with a default); how many nodes went."""
    removed = 0
    while True:
        read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        read |= _read_in_subgraphs(graph)
        unread = [n for n in graph.node if not any(o in read for o in n.output)]
        if not unread:
            break
        for n in unread:
            graph.node.remove(n)
        removed += len(unread)
    read = {i for n in graph.node for i in n.input} | _read_in_subgraphs(graph) | {o.name for o in graph.output}
    read |= {i.name for i in graph.input}
    keep = [t for t in graph.initializer if t.name in read]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return removed


def _read_in_subgraphs(graph: Any) -> set[str]:
    """Names read inside If/Loop/Scan bodies (they may read outer values without listing them)."""
    from onnx import helper

    names: set[str] = set()
    for node in graph.node:
        for a in node.attribute:
            value = helper.get_attribute_value(a)
            for g in value if isinstance(value, list) else [value]:
                if hasattr(g, "node"):
                    names |= {i for n in g.node for i in n.input} | _read_in_subgraphs(g)
    return names
