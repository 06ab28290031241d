"""An Inductor graph pass for the batch-1 decoding step on CPU.

A linear layer's weight is stored ``[out, in]`` and multiplied transposed. With freezing,
Inductor folds the weights into graph constants; the constants it builds itself (the fused
q/k/v and gate/up weights) come out contiguous ``[in, out]``, but a weight used alone stays a
transposed view of the parameter, and MKL's matrix-vector product on that layout measured
~1.5x slower here (``benchmarks/bench_step.py``'s matmul-pass floor uses the contiguous
layout). This pass asks for a contiguous copy of those weights in the graph, which freezing's
constant folding then computes once, at compile time.

Why a joint-graph pass (before freezing) rather than a post-grad one: constants made by
freezing exist before Inductor computes its cache key, which then covers them; a constant
made later would be stored with the compiled artifact and go stale when the weights change.
"""

from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

aten = torch.ops.aten
_MATMULS = {aten.mm.default: 1, aten.addmm.default: 2}  # op -> index of the weight argument


class ContiguousWeightsForFreezing(CustomGraphPass):
    """Joint-graph pass, for frozen graphs only: ``mm(x, permute(w))`` with ``w`` a graph input
    (a parameter, which freezing turns into a constant) becomes ``mm(x, clone(permute(w)))``
    so that constant folding materialises the row-major ``[in, out]`` weight.

    Left alone: matmuls whose activation ``x`` feeds other matmuls (q/k/v, gate/up), which
    Inductor's ``concat_linear`` fuses into one contiguous weight anyway. Installed without
    freezing it would add a copy per call, so :class:`~dynexec_compile.decoding.DecodeEngine`
    only installs it with ``freeze=True``. Edits the graph in place.
    """

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in list(graph.nodes):
            index = _MATMULS.get(node.target) if node.op == "call_function" else None
            if index is None or len(node.args) <= index:
                continue
            weight, activation = node.args[index], node.args[index - 1]
            if not _is_transposed_input(weight) or _feeds_several_matmuls(activation):
                continue
            with graph.inserting_after(weight):
                copy = graph.call_function(aten.clone.default, (weight,), {"memory_format": torch.contiguous_format})
            if "val" in weight.meta:
                copy.meta["val"] = weight.meta["val"].clone(memory_format=torch.contiguous_format)
            node.replace_input_with(weight, copy)

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))


def _is_transposed_input(node: object) -> bool:
    """``permute(placeholder, [1, 0])`` of a 2-D graph input."""
    return (
        isinstance(node, torch.fx.Node)
        and node.op == "call_function"
        and node.target in (aten.permute.default, aten.t.default)
        and (node.target is aten.t.default or list(node.args[1]) == [1, 0])
        and isinstance(node.args[0], torch.fx.Node)
        and node.args[0].op == "placeholder"
    )


def _feeds_several_matmuls(activation: object) -> bool:
    if not isinstance(activation, torch.fx.Node):
        return False
    return sum(1 for user in activation.users if user.target in _MATMULS) > 1
