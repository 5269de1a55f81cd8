"""ONNX Runtime's transformer fusions for graphs that look like transformers.

ONNX Runtime's session optimizations (ORT_ENABLE_ALL) already fuse SkipLayerNormalization and
BiasGelu, but never a whole attention block: that takes its offline transformer optimizer
(`onnxruntime.transformers.optimizer`), which matches BERT's and GPT-2's subgraphs and writes
Attention, EmbedLayerNormalization and friends (all of the com.microsoft domain, which Kiln's ONNX
policy accepts). It recognises attention only where query, key and value are three separate MatMuls
of one input, each followed by Add (bias), Reshape (heads) and Transpose: a single packed QKV
projection split afterwards (`Linear(d, 3 * d)` then slicing) does not fuse, whichever exporter wrote it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from service.errors import ConversionError

# What may lie between an attention's score MatMul and its Softmax: scaling, masking, casts.
_SCORE_OPS = frozenset({"Div", "Mul", "Add", "Sub", "Where", "Cast", "Reshape"})
_NORM_OPS = frozenset({"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization"})


def transformer_kind(path: Path) -> str | None:
    """The transformer optimizer's model type for this graph: "gpt2" for a causal decoder, "bert"
    for an encoder, None when its top-level graph has no attention (MatMul of two activations,
    scaled or masked, into Softmax) or no layer normalization."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    constants = {t.name for t in graph.initializer} | {
        o for n in graph.node if n.op_type == "Constant" for o in n.output
    }
    producer = {o: n for n in graph.node for o in n.output}

    def attention_scores(softmax: Any) -> bool:
        name = softmax.input[0]
        for _ in range(4):
            node = producer.get(name)
            if node is None:
                return False
            if node.op_type == "MatMul":
                return not (set(node.input) & constants)
            if node.op_type not in _SCORE_OPS:
                return False
            name = next((i for i in node.input if i in producer and i not in constants), "")
        return False

    ops = {n.op_type for n in graph.node}
    if not (ops & _NORM_OPS) or not any(attention_scores(n) for n in graph.node if n.op_type == "Softmax"):
        return None
    return "gpt2" if _causal(model, ops) else "bert"


def _causal(model: Any, ops: set[str]) -> bool:
    """Whether the graph masks attention causally: a Trilu, a past key/value input, or a constant
    lower-triangular square mask (what a `torch.tril(torch.ones(n, n))` buffer exports as)."""
    import numpy as np
    from onnx import numpy_helper

    if "Trilu" in ops or any("past" in i.name.lower() for i in model.graph.input):
        return True
    tensors = list(model.graph.initializer) + [
        a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"
    ]
    for t in tensors:
        if len(t.dims) >= 2 and t.dims[-1] == t.dims[-2] > 1 and int(np.prod(t.dims)) <= 1 << 24:
            a = numpy_helper.to_array(t).astype(np.float64)
            if np.array_equal(np.tril(a), a) and not np.array_equal(np.triu(a), a):
                return True
    return False


def fuse_transformer(src: Path, dst: Path, kind: str) -> dict[str, int]:
    """Run ONNX Runtime's transformer optimizer (graph fusions only, heads and hidden size read from
    the graph) on `src`, save the result to `dst` and return how many of each operator it fused."""
    from onnxruntime.transformers.optimizer import optimize_model

    try:
        # opt_level 0: the Python fusions only; ONNX Runtime's own session optimizations run later,
        # for the provider the artifact is built for.
        optimized = optimize_model(str(src), model_type=kind, num_heads=0, hidden_size=0, opt_level=0)
        stats = optimized.get_fused_operator_statistics()
        optimized.save_model_to_file(str(dst))
    except Exception as exc:  # noqa: BLE001 - the optimizer raises whatever its pattern matching hits
        raise ConversionError(f"the transformer optimizer failed: {str(exc).splitlines()[0][:300]}") from None
    return {op: int(n) for op, n in sorted(stats.items()) if n}


def fused_operators(path: Path) -> dict[str, int]:
    """How many nodes of each ONNX Runtime fused (com.microsoft) operator the top-level graph has."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return dict(sorted(Counter(n.op_type for n in graph.node if n.domain == "com.microsoft").items()))
