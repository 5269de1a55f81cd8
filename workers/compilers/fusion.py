"""ONNX Runtime's transformer fusions for graphs that look like transformers.

ONNX Runtime's session optimizations (ORT_ENABLE_ALL) already fuse SkipLayerNormalization and
BiasGelu, but never a whole attention block: that takes an offline rewrite into its fused
com.microsoft operators (Attention, EmbedLayerNormalization, ...; Kiln's ONNX policy accepts that
domain). Two rewriters do it, each matching the graphs it knows: ONNX Runtime's transformer optimizer
(`onnxruntime.transformers.optimizer`) and onnxscript's ORT fusions. Both recognise attention only
where query, key and value are three MatMuls of one input, each followed by a bias Add, a Reshape into
heads and a Transpose: a single packed QKV projection split afterwards (`Linear(d, 3 * d)` then
slicing) fuses nothing more than its layer norms and GELUs, whichever exporter wrote it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# What may lie between an attention's score MatMul and its Softmax: scaling, masking, casts.
_SCORE_OPS = frozenset({"Div", "Mul", "Add", "Sub", "Where", "Cast", "Reshape"})
_NORM_OPS = frozenset(
    {"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"}
)
# A layer or RMS norm written out in basic operators (older opsets, hand-written norms).
_DECOMPOSED_NORM = frozenset({"ReduceMean", "Pow", "Sqrt"})


def transformer_kind(path: Path) -> str | None:
    """The transformer optimizer's model type for this graph: "gpt2" for a causal decoder, "bert"
    for an encoder, None when its top-level graph has no attention (MatMul of two activations,
    scaled or masked, into Softmax) or no layer (or RMS) normalization."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    constants = {t.name for t in graph.initializer} | {
        o for n in graph.node if n.op_type == "Constant" for o in n.output
    }
    producer = {o: n for n in graph.node for o in n.output}

    def attention_scores(name: str, depth: int = 4) -> bool:
        node = producer.get(name)
        if node is None or depth == 0:
            return False
        if node.op_type == "MatMul":
            return not (set(node.input) & constants)
        if node.op_type not in _SCORE_OPS:
            return False
        # any input: a mask may come first (Where's condition)
        return any(attention_scores(i, depth - 1) for i in node.input if i not in constants)

    ops = {n.op_type for n in graph.node}
    normalized = bool(ops & _NORM_OPS) or ops >= _DECOMPOSED_NORM
    if not normalized or not any(attention_scores(n.input[0]) for n in graph.node if n.op_type == "Softmax"):
        return None
    return "gpt2" if _causal(model, ops) else "bert"


def _causal(model: Any, ops: set[str]) -> bool:
    """Whether the graph masks attention causally: a Trilu, a past key/value input, or a constant
    lower-triangular square mask (what a `torch.tril(torch.ones(n, n))` buffer exports as)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    if "Trilu" in ops or any("past" in i.name.lower() for i in model.graph.input):
        return True
    tensors = list(model.graph.initializer) + [
        a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"
    ]
    for t in tensors:
        external = t.data_location == onnx.TensorProto.EXTERNAL
        if not external and len(t.dims) >= 2 and t.dims[-1] == t.dims[-2] > 1 and int(np.prod(t.dims)) <= 1 << 22:
            a = numpy_helper.to_array(t).astype(np.float64)
            if np.array_equal(np.tril(a), a) and not np.array_equal(np.triu(a), a):
                return True
    return False


# The fused operators that replace a whole attention block.
ATTENTION_OPS = frozenset({"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention"})


@dataclass
class Fusion:
    """The fused graph a compiler builds from, and how it was made."""

    path: Path
    kind: str  # the optimizer's model type: bert or gpt2
    route: str  # which rewriters made it
    fused_ops: dict[str, int]  # the fused operators it gained, by type
    tried: dict[str, str] = field(default_factory=dict)  # route -> what it gave or why it failed


def fuse_transformer(src: Path, work: Path, kind: str) -> Fusion | None:
    """The best fused graph of `src`, or None when no route fused anything.

    Three routes: ONNX Runtime's transformer optimizer (its patterns are those of the TorchScript-based
    exporter's graphs and of attention written out by hand), onnxscript's ORT fusions (its patterns are
    those of the torch.export-based exporter, where scaled_dot_product_attention decomposes into a
    Softmax guarded by IsNaN/Where that the optimizer does not recognise), and onnxscript's followed by
    the optimizer (which may add EmbedLayerNormalization). A route that raises is recorded and skipped.
    The graph with the most attention operators wins, then the one with the fewest nodes."""
    before = fused_operators(src)
    results: list[tuple[str, Path]] = []
    tried: dict[str, str] = {}

    def attempt(route: str, fn: Callable[[], Path]) -> Path | None:
        try:
            path = fn()
        except Exception as exc:  # noqa: BLE001 - each rewriter raises whatever its pattern matching hits
            tried[route] = f"failed: {type(exc).__name__}: {str(exc).strip()[:200]}"
            return None
        new_ops = gained(before, fused_operators(path))
        tried[route] = ", ".join(f"{op} x{n}" for op, n in new_ops.items()) or "nothing fused"
        if new_ops:
            results.append((route, path))
        return path

    attempt("ONNX Runtime transformer optimizer", lambda: _ort_optimizer(src, work / "fused-ort.onnx", kind))
    rewritten = attempt("onnxscript ORT fusions", lambda: _onnxscript(src, work / "fused-onnxscript.onnx"))
    if rewritten is not None:
        attempt(
            "onnxscript ORT fusions, then ONNX Runtime transformer optimizer",
            lambda: _ort_optimizer(rewritten, work / "fused-onnxscript-ort.onnx", kind),
        )
    if not results:
        return None

    def score(item: tuple[str, Path]) -> tuple[int, int]:
        ops = fused_operators(item[1])
        return sum(n for op, n in ops.items() if op in ATTENTION_OPS), -_node_count(item[1])

    route, path = max(results, key=score)
    return Fusion(path=path, kind=kind, route=route, fused_ops=gained(before, fused_operators(path)), tried=tried)


def _ort_optimizer(src: Path, dst: Path, kind: str) -> Path:
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    model = onnx.load(str(src))
    rewritten = _shape_dims_as_gathers(model.graph)
    # opt_level 0: the Python fusions only; ONNX Runtime's own session optimizations run later, for the
    # provider the artifact is built for. num_heads and hidden_size 0: read from the graph's reshapes.
    optimized = optimize_model(model, model_type=kind, num_heads=0, hidden_size=0, opt_level=0)
    _restore_shape_dims(optimized.model.graph, rewritten)
    optimized.save_model_to_file(str(dst))
    return dst


def _shape_dims_as_gathers(graph: Any) -> dict[str, tuple[str, int, str]]:
    """Write each Shape node that reads one dimension (opset 15's start and end, what the
    torch.export-based exporter writes for `x.shape[k]`) as the TorchScript-based exporter does: the
    whole shape, a Gather of dimension k, an Unsqueeze back to one element. The same value; but the
    optimizer's EmbedLayerNormalization fusion recognises BERT's position ids (a Slice of the
    position_ids buffer up to the sequence length) only where that length is a Gather of input_ids'
    Shape, so without this a BERT from the new exporter keeps its embeddings unfused.

    Returns, by output, the input, dimension and name of each Shape node rewritten."""
    import numpy as np
    from onnx import helper, numpy_helper

    nodes, rewritten = [], {}
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        start, end = attrs.get("start", 0), attrs.get("end")
        if node.op_type != "Shape" or node.domain not in ("", "ai.onnx") or end is None or not 0 <= start == end - 1:
            nodes.append(node)
            continue
        out = node.output[0]
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.array(start, np.int64), f"{out}__dim_index"),
                numpy_helper.from_array(np.array([0], np.int64), f"{out}__unsqueeze_axes"),
            ]
        )
        nodes += [
            helper.make_node("Shape", [node.input[0]], [f"{out}__shape"], name=f"{out}__shape"),
            helper.make_node(
                "Gather", [f"{out}__shape", f"{out}__dim_index"], [f"{out}__dim"], name=f"{out}__dim", axis=0
            ),
            helper.make_node("Unsqueeze", [f"{out}__dim", f"{out}__unsqueeze_axes"], [out], name=f"{out}__unsqueeze"),
        ]
        rewritten[out] = (node.input[0], start, node.name)
    if rewritten:
        del graph.node[:]
        graph.node.extend(nodes)
    return rewritten


def _restore_shape_dims(graph: Any, rewritten: dict[str, tuple[str, int, str]]) -> None:
    """Undo `_shape_dims_as_gathers` where no fusion took its nodes in: each Unsqueeze left is one
    Shape node again, and the Gather and whole Shape before it go where nothing else reads them (the
    optimizer may have given the whole shape other readers), so that only what fused changes the graph
    and its node count, by which the routes are compared."""
    from onnx import helper

    if not rewritten:
        return
    nodes = list(graph.node)
    for i, node in enumerate(nodes):
        out = node.output[0] if node.output else ""
        if out in rewritten and node.name == f"{out}__unsqueeze":
            source, dim, name = rewritten[out]
            nodes[i] = helper.make_node("Shape", [source], [out], name=name, start=dim, end=dim + 1)
    for suffix in ("__dim", "__shape"):  # a Gather's reader goes first, then the Shape's
        read = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
        nodes = [
            n
            for n in nodes
            if not (n.name.endswith(suffix) and n.name[: -len(suffix)] in rewritten and n.output[0] not in read)
        ]
    read = {i for n in nodes for i in n.input}
    added = {f"{out}{suffix}" for out in rewritten for suffix in ("__dim_index", "__unsqueeze_axes")}
    initializers = [t for t in graph.initializer if t.name not in added or t.name in read]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(initializers)


def _onnxscript(src: Path, dst: Path) -> Path:
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model, _ = optimize_for_ort(ir.load(str(src)))
    ir.save(model, str(dst))
    return dst


def gained(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The operators `after` has more of than `before`, and how many more."""
    return {op: n - before.get(op, 0) for op, n in after.items() if n > before.get(op, 0)}


def _node_count(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def fused_operators(path: Path) -> dict[str, int]:
    """How many nodes of each ONNX Runtime fused (com.microsoft) operator the top-level graph has."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return dict(sorted(Counter(n.op_type for n in graph.node if n.domain == "com.microsoft").items()))
