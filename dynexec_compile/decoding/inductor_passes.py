"""An Inductor graph pass for the batch-1 decoding step on CPU.

A linear layer's weight is stored ``[out, in]`` and multiplied transposed. With freezing,
Inductor folds the weights into graph constants, and the constants it builds itself (the
fused q/k/v and gate/up weights) come out contiguous ``[in, out]``; a weight used alone stays
a transposed view of the parameter, and MKL's matrix-vector product on that layout measured
~1.5x slower here (``benchmarks/bench_step.py``: the matmul-pass floor uses the contiguous
layout). This pass gives those matmuls a contiguous copy too — once, at compile time.
"""

from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

aten = torch.ops.aten
_MATMULS = {aten.mm.default: 1, aten.addmm.default: 2}  # op -> index of the weight argument


class ContiguousFrozenWeights(CustomGraphPass):
    """Post-grad pass: ``mm``/``addmm`` reading a frozen 2-D constant through a transposed
    layout read a contiguous copy of it instead (same values, row-major ``[in, out]``).

    Matches only ``get_attr`` constants (frozen weights); graph inputs are left alone. Edits
    the graph in place and registers the copies on the owning module.
    """

    def __call__(self, graph: torch.fx.Graph) -> None:
        module = graph.owning_module
        copies: dict[str, torch.fx.Node] = {}
        for node in list(graph.nodes):
            index = _MATMULS.get(node.target) if node.op == "call_function" else None
            if index is None or len(node.args) <= index:
                continue
            weight = node.args[index]
            if not isinstance(weight, torch.fx.Node) or weight.op != "get_attr":
                continue
            value = _attribute(module, weight.target)
            if not isinstance(value, torch.Tensor) or value.ndim != 2 or value.is_contiguous():
                continue
            if weight.target not in copies:
                copies[weight.target] = _register_copy(graph, module, weight, value)
            node.replace_input_with(weight, copies[weight.target])
        if copies:
            graph.eliminate_dead_code()
            graph.lint()

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))


def _attribute(module: torch.nn.Module, target: str) -> object:
    value: object = module
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


def _register_copy(
    graph: torch.fx.Graph, module: torch.nn.Module, weight: torch.fx.Node, value: torch.Tensor
) -> torch.fx.Node:
    name = f"{weight.target.replace('.', '_')}_contiguous"
    setattr(module, name, value.contiguous())
    first = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first):
        node = graph.get_attr(name)
    node.meta.update(weight.meta)
    if "val" in weight.meta:
        node.meta["val"] = weight.meta["val"].contiguous()
    return node
