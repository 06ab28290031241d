"""Elastic levels inside a Dynamo graph: narrow the lifted parameter placeholders.

With inlined ``nn.Module``s (the default since torch 2.5) Dynamo lifts every parameter to a
graph input, and the backend's example inputs *are* the ``Parameter`` objects. So a backend can
find the model's plan and the model itself (``lookup_plan`` / ``lookup_model``), name every
placeholder, and apply :func:`~dynexec_compile.elastic.slicing.level_param_slices` by inserting
``torch.narrow(placeholder, dim, 0, k)`` after the placeholders: the same prefix views
``ElasticModel`` uses, inside one graph per level.

Dynamo bakes some shapes into the graph as literals. Transformers' BERT reshapes with ``-1``
heads, but LLaMA/Qwen2's ``repeat_kv`` reads the key/value head count from the tensor at trace
time and records ``expand(B, G, n_rep, S, d)`` / ``reshape(B, H, S, d)``. So after narrowing,
the graph is run once on fake tensors and every ``view`` / ``reshape`` / ``expand`` whose input
shrank gets its size literals re-derived: an ``expand`` literal equal to the input's full size
becomes ``-1`` (keep), and a reshape keeps the full reshape's grouping of dims (merged dims
multiply; a split dim shrinks its first factor, the head count in ``[.., H*d] -> [.., H, d]``).
A node that still does not type-check raises ``NotImplementedError`` naming it; for such a
model run the levels through :class:`~dynexec_compile.elastic.runtime.ElasticModel`, which
traces each level anew.

GPT-2's fused ``c_attn`` (``Conv1D``: ``addmm(bias, x, weight)`` with ``[Q | K | V]`` output
columns) keeps a prefix of each part, which is not one view: its ``addmm`` becomes one
``addmm`` per part over a narrowed column block, concatenated, and the ``split`` at the full
part width that follows shrinks with it.

A level's LoRA (``lora.py``) is added the same way: after each target's ``linear(x, W, b)``
the graph computes ``linear(...) + lora_delta(x, A, B, scale)``, with ``A`` and ``B`` new
graph inputs (so another LoRA of the same shapes runs the same compiled code). New nodes take
the module-stack metadata of the node they serve, so block analysis keeps them in its block
and a level graph can be split into stages like the full one (elastic with early exit).
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import optimization_hint

from dynexec_compile.elastic.reorder import lookup_model, lookup_plan
from dynexec_compile.elastic.slicing import Anchors, choose_anchors, level_param_slices

if TYPE_CHECKING:
    from dynexec_compile.elastic.lora import LevelLoRA


def placeholder_param_names(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> dict[str, str]:
    """``{placeholder node name: parameter name}`` for the placeholders fed a model parameter.

    Raises:
        ValueError: no input is a parameter of a model with a registered elastic plan.
    """
    model = lookup_model(example_inputs)
    if model is None:
        raise ValueError(
            "dynexec elastic: no graph input is a parameter of a model with an elastic plan; call "
            "reorder_by_importance(model, batches) (or elastic_plan(model)) before torch.compile"
        )
    names = {id(p): name for name, p in model.named_parameters()}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {
        node.name: names[id(value)]
        for node, value in zip(placeholders, example_inputs, strict=True)
        if id(value) in names
    }


_RESHAPES = ("view", "reshape", "expand")
FULL_NAME = "dynexec_full_name"  # node.meta key: the node of the unsliced graph it stands for


def _dim_groups(full_in: Sequence[int], full_out: Sequence[int]) -> list[tuple[range, range]]:
    """Pair up runs of input and output dims of a reshape whose sizes multiply to the same
    number: ``[3, 2, 4, 11, 8] -> [3, 8, 11, 8]`` gives (0)(0), (1, 2)(1), (3)(2), (4)(3)."""
    groups, i, j = [], 0, 0
    while i < len(full_in) and j < len(full_out):
        i0, j0, a, b = i, j, full_in[i], full_out[j]
        while a != b:
            if a < b:
                i += 1
                a *= full_in[i]
            else:
                j += 1
                b *= full_out[j]
        groups.append((range(i0, i + 1), range(j0, j + 1)))
        i, j = i + 1, j + 1
    if groups:  # trailing size-1 dims join the last group
        last_in, last_out = groups[-1]
        groups[-1] = (range(last_in.start, len(full_in)), range(last_out.start, len(full_out)))
    return groups


def _resized_shape(
    full_in: Sequence[int], full_out: Sequence[int], new_in: Sequence[int]
) -> list[int] | None:
    """The reshape target for input ``new_in`` that keeps the full reshape's dim grouping, or
    ``None`` when a group changed in a way that has no unique answer."""
    out = list(full_out)
    for ins, outs in _dim_groups(full_in, full_out):
        old, new = math.prod(full_in[i] for i in ins), math.prod(new_in[i] for i in ins)
        if old == new:
            continue
        if len(outs) == 1:
            out[outs.start] = new
        elif len(ins) == 1 and (out[outs.start] * new) % old == 0:  # a split: the first factor
            out[outs.start] = out[outs.start] * new // old  # ([.., H*d] -> [.., H, d]) shrinks
        else:
            return None
    return out


class _FullShapes(fx.Interpreter):
    """Runs the unsliced graph on the same fake inputs and records every tensor's concrete
    shape by node name: the full sizes to compare the sliced run with, concrete even where
    Dynamo's example values are symbolic (a dynamic sequence length)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.shapes: dict[str, tuple[int, ...]] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n.name] = tuple(out.shape)
        return out


class _Reshape(fx.Interpreter):
    """Runs the sliced graph on fake tensors, rewriting the size literals of ``view`` /
    ``reshape`` / ``expand`` whose input shrank (sizes Dynamo baked from the full model's head
    counts), and turning any node that still fails into a ``NotImplementedError`` naming it.

    Only integer literals are rewritten: a size computed in the graph (a symbolic sequence
    length) or ``-1`` (inferred) is left as it is."""

    def __init__(self, gm: fx.GraphModule, full_shapes: dict[str, tuple[int, ...]]):
        super().__init__(gm)
        self.full_shapes = full_shapes

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "call_method" and n.target in _RESHAPES:
            self._rewrite(n)
        elif n.op == "call_method" and n.target == "split":
            self._rewrite_split(n)
        try:
            return super().run_node(n)
        except Exception as err:
            raise NotImplementedError(
                f"dynexec elastic: the sliced graph does not type-check at {n.format_node()}: {err}; "
                "run the levels with ElasticModel (which traces each level anew) instead"
            ) from err

    def _full_shape(self, n: fx.Node) -> tuple[int, ...] | None:
        return self.full_shapes.get(n.meta.get(FULL_NAME, n.name))

    def _rewrite_split(self, n: fx.Node) -> None:
        """``split(size, dim)`` of a tensor whose ``dim`` shrank: the parts shrink alike (the
        fused Q | K | V of GPT-2's ``c_attn``, split at ``split_size``)."""
        src, size = n.args[0], n.args[1]
        dim = n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else 0)
        full_in = self._full_shape(src)
        new_in = tuple(self.env[src].shape)
        if full_in is None or type(size) is not int or full_in[dim] == new_in[dim]:
            return
        if (size * new_in[dim]) % full_in[dim] == 0:
            n.args = (src, size * new_in[dim] // full_in[dim], *n.args[2:])

    def _rewrite(self, n: fx.Node) -> None:
        src = n.args[0]
        sizes = list(
            n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (tuple, list)) else n.args[1:]
        )
        full_in, full_out = self._full_shape(src), self._full_shape(n)
        new_in = tuple(self.env[src].shape)
        if full_in is None or full_out is None or full_in == new_in:
            return
        if n.target == "expand":  # a literal equal to the input size means "keep it": -1
            offset = len(sizes) - len(full_in)
            sizes = [
                -1 if i >= offset and type(s) is int and s == full_in[i - offset] else s
                for i, s in enumerate(sizes)
            ]
        else:
            resized = _resized_shape(full_in, full_out, new_in)
            if resized is None:
                return
            for j, (old, new) in enumerate(zip(full_out, resized, strict=True)):
                if old != new and type(sizes[j]) is int and sizes[j] != -1:
                    sizes[j] = new
        n.args = (src, *sizes)


def _concrete(mode: FakeTensorMode, value: Any) -> Any:
    """A fake tensor of a real one, and a symbolic size as its example value: the check runs
    with concrete shapes so it never adds a guard to Dynamo's symbolic ones (which would
    specialise a dynamic sequence length and recompile at every new length)."""
    if isinstance(value, torch.Tensor):
        return mode.from_tensor(value)
    if isinstance(value, torch.SymInt):
        return optimization_hint(value)
    return value


def _split_fused(
    graph: fx.Graph,
    weight: fx.Node,
    name: str,
    by_name: dict[str, fx.Node],
    slices: dict[str, tuple],
    model: torch.nn.Module,
) -> None:
    """Replace each ``addmm(bias, x, weight)`` of a fused projection (GPT-2's ``Conv1D``
    ``c_attn``, output columns ``[Q | K | V]``) by one ``addmm`` per part over narrowed views
    of its column block, concatenated: ``k`` features of each part, no weight copied. The
    split that follows (at the full part width) is re-derived by ``_Reshape``."""
    dim, k, parts = slices[name]
    bias_name = name.rsplit(".", 1)[0] + ".bias"
    bias = by_name.get(bias_name)
    part = model.get_parameter(name).shape[dim] // parts
    if dim != 1 or bias is None or slices.get(bias_name) != (0, k, parts):
        raise NotImplementedError(
            f"dynexec elastic: fused parameter {name!r} is sliced as {slices[name]}; only a Conv1D "
            "weight [in, parts * out] with its bias is supported"
        )
    for user in list(weight.users):
        if user.target is not torch.addmm or user.args[0] is not bias or user.args[2] is not weight:
            raise NotImplementedError(
                f"dynexec elastic: fused parameter {name!r} is read by {user.format_node()}; only "
                "addmm(bias, x, weight) (transformers' Conv1D) can be split into parts"
            )
        with graph.inserting_before(user):
            outs = []
            for j in range(parts):
                w = _like(graph.call_function(torch.narrow, (weight, 1, j * part, k)), user)  # [in, k]
                b = _like(graph.call_function(torch.narrow, (bias, 0, j * part, k)), user)  # [k]
                outs.append(_like(graph.call_function(torch.addmm, (b, user.args[1], w), dict(user.kwargs)), user))
            cat = _like(graph.call_function(torch.cat, (outs, -1)), user)  # [N, parts * k]
        cat.meta[FULL_NAME] = user.name  # its full-model shape is the fused addmm's
        user.replace_all_uses_with(cat)
        graph.erase_node(user)


LINEARS = (torch._C._nn.linear, torch.nn.functional.linear)
_STAGE_META = ("nn_module_stack", "stack_trace", "source_fn_stack")


def _like(node: fx.Node, user: fx.Node) -> fx.Node:
    """Give a new node the module-stack metadata of the node it serves, so block analysis puts
    it in that node's block (a staged level graph keeps every block's weights in its stage)."""
    for key in _STAGE_META:
        if key in user.meta:
            node.meta[key] = user.meta[key]
    return node


def _first_user(node: fx.Node) -> fx.Node:
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return min(node.users, key=order.__getitem__)


def _insert_lora(
    graph: fx.Graph, by_name: dict[str, fx.Node], lora: LevelLoRA, example_inputs: Sequence[Any]
) -> None:
    """After every target's ``linear(x, W, b)`` add ``lora_delta(x, A, B, scale)``; ``A`` and
    ``B`` become new placeholders after the existing ones, in ``lora.tensors()`` order."""
    from torch._guards import detect_fake_mode

    from dynexec_compile.elastic.lora import lora_delta

    fake_mode = detect_fake_mode(
        [n.meta.get("example_value") for n in graph.nodes if n.op == "placeholder"]
    )
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    for i, (name, (a, b)) in enumerate(lora.pairs().items()):
        weight = by_name.get(f"{name}.weight")
        if weight is None:
            raise NotImplementedError(
                f"dynexec elastic LoRA: target {name!r} has no weight among the graph's inputs"
            )
        readers = [weight, *(u for u in weight.users if u.target is torch.narrow)]
        calls = [u for r in readers for u in r.users if u.target in LINEARS and u.args[1] is r]
        if len(calls) != 1:
            raise NotImplementedError(
                f"dynexec elastic LoRA: target {name!r}'s weight is read by {len(calls)} linear calls "
                "(need exactly one: transformers' nn.Linear)"
            )
        (call,) = calls
        with graph.inserting_after(last):
            a_in = graph.placeholder(f"dynexec_lora_{i}_a")
        with graph.inserting_after(a_in):
            b_in = graph.placeholder(f"dynexec_lora_{i}_b")
        last = b_in
        for node, value in ((a_in, a), (b_in, b)):
            node.meta["example_value"] = fake_mode.from_tensor(value, static_shapes=True) if fake_mode else value
        with graph.inserting_after(call):
            delta = _like(graph.call_function(lora_delta, (call.args[0], a_in, b_in, lora.scale)), call)
        with graph.inserting_after(delta):
            total = _like(graph.call_function(operator.add, (call, delta)), call)
        total.meta[FULL_NAME] = call.name
        call.replace_all_uses_with(total, delete_user_cb=lambda user, t=total: user is not t)


def level_graph(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    level: float,
    anchors: Anchors = 0,
    lora: LevelLoRA | None = None,
) -> fx.GraphModule:
    """A copy of ``gm`` running elastic level ``level`` (with ``lora`` when given): each sliced
    parameter placeholder is read through ``torch.narrow(p, dim, 0, k)``, placed before the
    parameter's first use, and every LoRA target's ``linear`` gets its delta added; the
    LoRA's tensors are extra inputs after ``gm``'s (``lora.tensors()`` order).

    ``gm`` itself is not modified. The result is checked with fake tensors of
    ``example_inputs`` (and the LoRA's).

    Raises:
        ValueError: no registered plan for the graph's parameters, a bad level/anchors, or a
            LoRA that does not fit.
        NotImplementedError: the sliced graph does not type-check (see the module docstring),
            or a LoRA target is not read by exactly one ``linear``.
    """
    plan, model = lookup_plan(example_inputs), lookup_model(example_inputs)
    names = placeholder_param_names(gm, example_inputs)
    anchor_set = sorted(choose_anchors(plan, anchors))
    slices = level_param_slices(model, plan, level, anchor_set)
    if lora is not None:
        lora.check_fits(model, plan, level, anchor_set)
    graph = copy.deepcopy(gm.graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    by_name = {names[n.name]: n for n in placeholders if n.name in names}
    for node in placeholders:
        if names.get(node.name) not in slices:
            continue
        if len(slices[names[node.name]]) == 3:  # a fused projection: split with its weight
            if names[node.name].endswith(".weight"):
                _split_fused(graph, node, names[node.name], by_name, slices, model)
            continue
        dim, k = slices[names[node.name]]
        user = _first_user(node)
        with graph.inserting_before(user):
            narrow = _like(graph.call_function(torch.narrow, (node, dim, 0, k)), user)
        node.replace_all_uses_with(
            narrow, delete_user_cb=lambda user, view=narrow: user is not view
        )
    if lora is not None:
        _insert_lora(graph, by_name, lora, example_inputs)
    sliced = fx.GraphModule(gm, graph)
    inputs = [*example_inputs, *(lora.tensors() if lora is not None else ())]
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        full = _FullShapes(gm)
        full.run(*[_concrete(mode, x) for x in example_inputs])
        _Reshape(sliced, full.shapes).run(*[_concrete(mode, x) for x in inputs])
    sliced.graph.lint()
    sliced.recompile()
    return sliced


class _RecordNarrows(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.views: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.op == "call_function" and n.target is torch.narrow:
            self.views.setdefault(n.args[0].name, []).append((self.env[n.args[0]], out))
        return out


def narrowed_weights(
    gm: fx.GraphModule, example_inputs: Sequence[Any]
) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Run a level's graph eagerly on ``example_inputs`` (real tensors; symbolic sizes are
    taken at their example value) and return ``{placeholder name: [(input, narrowed view)]}``
    for every ``torch.narrow`` of a placeholder (one per part of a fused projection): what a
    zero-copy check compares storages of."""
    recorder = _RecordNarrows(gm)
    with torch.no_grad():
        recorder.run(
            *[optimization_hint(x) if isinstance(x, torch.SymInt) else x for x in example_inputs]
        )
    return recorder.views
