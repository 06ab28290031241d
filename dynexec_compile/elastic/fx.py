"""Elastic levels inside a Dynamo graph: narrow the lifted parameter placeholders.

With inlined ``nn.Module``s (the default since torch 2.5) Dynamo lifts every parameter to a
graph input, and the backend's example inputs *are* the ``Parameter`` objects. So a backend can
find the model's plan and the model itself (``lookup_plan`` / ``lookup_model``), name every
placeholder, and apply :func:`~dynexec_compile.elastic.slicing.level_param_slices` by inserting
``torch.narrow(placeholder, dim, 0, k)`` after the placeholders: the same prefix views
``ElasticModel`` uses, inside one graph per level.

This is valid only when the traced graph holds no shape constant derived from a head count.
Transformers' BERT reshapes with ``-1`` heads, so its graph slices cleanly. LLaMA/Qwen2 with
grouped-query attention do not: ``repeat_kv`` reads the key/value head count from the tensor
shape at trace time, and Dynamo bakes it into ``expand(B, G, n_rep, S, d)`` /
``reshape(B, H, S, d)``. :func:`slice_param_placeholders` checks the sliced graph with fake
tensors and raises ``NotImplementedError`` naming that node; for those models run the levels
through :class:`~dynexec_compile.elastic.runtime.ElasticModel`, which traces each level anew.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode

from dynexec_compile.elastic.reorder import lookup_model, lookup_plan
from dynexec_compile.elastic.slicing import Anchors, level_param_slices


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


class _ShapeCheck(fx.Interpreter):
    """Runs a graph on fake tensors; a failing node becomes a ``NotImplementedError`` naming it."""

    def run_node(self, n: fx.Node) -> Any:
        try:
            return super().run_node(n)
        except Exception as err:
            raise NotImplementedError(
                f"dynexec elastic: the sliced graph does not type-check at {n.format_node()}: {err}. "
                "The graph holds a shape constant derived from a head count (LLaMA/Qwen2 repeat_kv "
                "does this); run the levels with ElasticModel instead of slicing this graph"
            ) from err


def slice_param_placeholders(
    gm: fx.GraphModule, example_inputs: Sequence[Any], level: float, anchors: Anchors = 0
) -> fx.GraphModule:
    """A copy of ``gm`` running elastic level ``level``: each sliced parameter placeholder is
    followed by ``torch.narrow(p, dim, 0, k)`` and all its uses read the narrowed view.

    ``gm`` itself is not modified. The result is checked with fake tensors of
    ``example_inputs``.

    Raises:
        ValueError: no registered plan for the graph's parameters, or a bad level/anchors.
        NotImplementedError: the sliced graph does not type-check (see the module docstring).
    """
    plan, model = lookup_plan(example_inputs), lookup_model(example_inputs)
    names = placeholder_param_names(gm, example_inputs)
    slices = level_param_slices(model, plan, level, anchors)
    graph = copy.deepcopy(gm.graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    insert_after = placeholders[-1]
    for node in placeholders:
        if names.get(node.name) not in slices:
            continue
        dim, k = slices[names[node.name]]
        with graph.inserting_after(insert_after):
            narrow = graph.call_function(torch.narrow, (node, dim, 0, k))
        node.replace_all_uses_with(
            narrow, delete_user_cb=lambda user, view=narrow: user is not view
        )
        insert_after = narrow
    graph.lint()
    sliced = fx.GraphModule(gm, graph)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fakes = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in example_inputs]
        _ShapeCheck(sliced).run(*fakes)
    return sliced
