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


_CONVERTS = {torch.ops.prims.convert_element_type.default, aten._to_copy.default}


@torch.library.custom_op("dynexec::widen_weight", mutates_args=())
def widen_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight.to(dtype)``, run by ATen (see :class:`WidenQuantizedWeights`)."""
    return weight.to(dtype)


@widen_weight.register_fake
def _(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty_like(weight, dtype=dtype)


class WidenQuantizedWeights(CustomGraphPass):
    """Post-grad pass for weight-only quantized linears (torchao's int8 weight-only on the CPU):
    ``convert(permute(w_int8, [1, 0]), float)`` becomes ``permute(widen_weight(w_int8, float), [1, 0])``;
    with ``skinny_rows``, ``mm(x, convert(permute(w_int8)))`` of at most that many static rows
    becomes ``dynexec::skinny_linear(x, w_int8)``, which streams the int8 weight and widens it
    in registers (:mod:`dynexec_compile.backends.kernels.skinny`).

    torchao's linear multiplies by ``w.t().to(x.dtype)`` and then by the per-row scales. Two
    things made Inductor's lowering of that conversion slow (SmolLM2-135M, int8, 1 thread, an
    AVX2 CPU: the compiled layers took 0.55x the speed of torchao's eager ones): it materialises
    the converted weight contiguous in the transposed shape (a transposing copy of every weight
    on every call), and its C++ kernel loads 8 int8 values per vector through a partial load —
    1.0 ms for a 1536 x 576 weight, against 0.12 ms for ATen's ``copy_``. The conversion of a
    graph-input weight therefore goes to ATen, untransposed, and the matmul takes the transposed
    view, as it does for fp32 weights. Same values, same matmul (the skinny kernel: the same
    sums in another order). Edits the graph in place.

    Args:
        skinny_rows: products of at most this many rows go to ``dynexec::skinny_linear`` (the
            caller checks that the kernel is available); 0: none.
    """

    def __init__(self, skinny_rows: int = 0):
        self.skinny_rows = skinny_rows

    def __call__(self, graph: torch.fx.Graph) -> None:
        changed = False
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in _CONVERTS or not _is_transposed_input(node.args[0]):
                continue
            weight = node.args[0].args[0]
            value, out = weight.meta.get("val"), node.meta.get("val")
            if value is None or out is None or value.dtype not in (torch.int8, torch.uint8) or value.ndim != 2:
                continue
            if self._to_skinny(graph, node, weight):
                changed = True
                continue
            with graph.inserting_before(node):
                widened = graph.call_function(torch.ops.dynexec.widen_weight.default, (weight, out.dtype))
                flipped = graph.call_function(aten.permute.default, (widened, [1, 0]))
            widened.meta["val"] = torch.empty_like(value, dtype=out.dtype)
            flipped.meta["val"] = widened.meta["val"].t()
            node.replace_all_uses_with(flipped)
            graph.erase_node(node)
            changed = True
        if changed:  # the old permute of the int8 weight is left unused
            graph.eliminate_dead_code()
            graph.lint()

    def _to_skinny(self, graph: torch.fx.Graph, convert: torch.fx.Node, weight: torch.fx.Node) -> bool:
        """Replace every ``mm(x, convert)`` by ``skinny_linear(x, weight)`` if all users of the
        widened weight are such products of at most ``skinny_rows`` static fp32 / bf16 rows."""
        value = weight.meta["val"]
        if not self.skinny_rows or value.dtype != torch.int8 or not value.is_contiguous() or not convert.users:
            return False
        for mm in convert.users:
            x = mm.args[0] if mm.target is aten.mm.default and mm.args[1] is convert else None
            rows = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
            if rows is None or rows.ndim != 2 or not isinstance(rows.shape[0], int) or rows.shape[0] > self.skinny_rows:
                return False
            if rows.dtype not in (torch.float32, torch.bfloat16):
                return False
        for mm in list(convert.users):
            with graph.inserting_before(mm):
                product = graph.call_function(torch.ops.dynexec.skinny_linear.default, (mm.args[0], weight, None))
            product.meta["val"] = mm.meta["val"]
            mm.replace_all_uses_with(product)
            graph.erase_node(mm)
        return True

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,)) + f"skinny_rows={self.skinny_rows}".encode()
