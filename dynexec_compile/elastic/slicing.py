"""Elastic levels as prefix views of the one set of weights.

After :func:`~dynexec_compile.elastic.reorder.reorder_by_importance` the most important heads
and neurons of every block come first, so the sub-model at level ``r`` keeps the first
``~r * H`` heads and ``~r * I`` neurons: each sliced weight is ``w.narrow(dim, 0, k)``, a view
that shares storage with the full parameter. Switching level swaps which views the forward
uses; nothing is copied and memory does not grow with the number of levels.

The slicing itself is the pure function :func:`level_param_slices`, ``{param_name: (dim, k)}``,
so the same decision applies to an ``nn.Module`` (:func:`level_params` +
``torch.func.functional_call``) and to the lifted parameter placeholders of a Dynamo graph (an
FX pass inserts ``aten.narrow(placeholder, dim, 0, k)`` after each named placeholder).

Transformers' BERT and LLaMA/Qwen2 attention reshape with ``-1`` heads
(``view(*input_shape, -1, head_dim)``) and take the key/value repeat factor from
``num_key_value_groups``, a ratio that whole-group slicing keeps; so fewer heads need no
config change. GPT-2's fused ``c_attn`` (``Conv1D``, weight ``[in, 3 * H * d]``) keeps a
prefix of *each* of its Q, K and V column blocks: three views, not one, so its entry is
``(dim, k, parts)`` with ``parts=3`` (``k`` features kept of each part). The module's own
forward cannot take three views (it splits one output at a hard-coded ``split_size``), so
``level_params`` refuses such a model and only the dynexec backend serves it (its FX pass
turns the fused ``addmm`` into one ``addmm`` per part, see ``fx.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from dynexec_compile.elastic.arch import BlockSpec
from dynexec_compile.elastic.reorder import ElasticPlan

Anchors = int | str | Sequence[int]


def kept_units(total: int, level: float, unit: int = 1) -> int:
    """Units kept at ``level``: ``ceil(level * total)`` rounded up to whole ``unit`` groups,
    at least one group (so a level never drops a block's attention or MLP entirely)."""
    groups = total // unit
    return max(1, min(groups, math.ceil(level * groups - 1e-9))) * unit


def choose_anchors(plan: ElasticPlan, anchors: Anchors) -> frozenset[int]:
    """Blocks kept whole at every level.

    Args:
        plan: the model's plan (its ``layer_importance`` ranks the blocks).
        anchors: a count ``n`` (the ``n`` most important blocks), ``"auto"`` (the most
            important quarter of the blocks, ``ceil(L / 4)``), or explicit block indices.
    """
    num_blocks = len(plan.blocks)
    if isinstance(anchors, str):
        if anchors != "auto":
            raise ValueError(
                f"dynexec elastic: anchor_layers={anchors!r}; use an int, 'auto' or block indices"
            )
        anchors = math.ceil(num_blocks / 4)
    if isinstance(anchors, bool) or not isinstance(anchors, (int, Sequence)):
        raise TypeError(
            f"dynexec elastic: anchor_layers must be an int, 'auto' or block indices, got {anchors!r}"
        )
    if not isinstance(anchors, int):
        chosen = frozenset(anchors)
        if any(not isinstance(i, int) or not 0 <= i < num_blocks for i in chosen):
            raise ValueError(
                f"dynexec elastic: anchor_layers={list(anchors)} must be block indices in [0, {num_blocks})"
            )
        return chosen
    if not 0 <= anchors <= num_blocks:
        raise ValueError(f"dynexec elastic: anchor_layers={anchors} must be in [0, {num_blocks}]")
    if anchors == 0:
        return frozenset()
    if plan.layer_importance is None:
        raise ValueError(
            "dynexec elastic: choosing anchor layers by count or 'auto' needs layer importance; "
            "reorder the model with reorder_by_importance first, or pass block indices"
        )
    ranked = sorted(range(num_blocks), key=lambda i: -plan.layer_importance[i])
    return frozenset(ranked[:anchors])


Slice = tuple[int, int] | tuple[int, int, int]  # (dim, k) or, fused, (dim, k, parts)


def _gpt2_block_slices(spec: BlockSpec, level: float) -> dict[str, Slice]:
    """GPT-2's ``Conv1D`` weights are ``[in, out]``: output features are columns (dim 1)."""
    width = kept_units(spec.num_heads, level) * spec.head_dim
    neurons = kept_units(spec.num_neurons, level)
    (c_attn,) = spec.head_in
    (c_fc,) = spec.neuron_in
    return {
        f"{c_attn}.weight": (1, width, 3),  # [D, Q | K | V]: a prefix of each part
        f"{c_attn}.bias": (0, width, 3),
        f"{spec.head_out}.weight": (0, width),
        f"{c_fc}.weight": (1, neurons),
        f"{c_fc}.bias": (0, neurons),
        f"{spec.neuron_out}.weight": (0, neurons),
    }


def _block_slices(spec: BlockSpec, level: float) -> dict[str, Slice]:
    """{module name + '.weight' / '.bias': (dim, k) or (dim, k, parts)} for one (non-anchor)
    block."""
    if spec.arch == "gpt2":
        return _gpt2_block_slices(spec, level)
    kv = kept_units(spec.num_kv_heads, level)
    q_width, kv_width = kv * spec.group_size * spec.head_dim, kv * spec.head_dim
    neurons = kept_units(spec.num_neurons, level)
    q, k, v = spec.head_in
    out: dict[str, tuple[int, int]] = {}
    for name, width in ((q, q_width), (k, kv_width), (v, kv_width)):
        out[f"{name}.weight"] = out[f"{name}.bias"] = (0, width)
    out[f"{spec.head_out}.weight"] = (1, q_width)
    for name in spec.neuron_in:
        out[f"{name}.weight"] = out[f"{name}.bias"] = (0, neurons)
    out[f"{spec.neuron_out}.weight"] = (1, neurons)
    return out


def level_param_slices(
    model_or_named_params: nn.Module | Mapping[str, torch.Tensor],
    plan: ElasticPlan,
    level: float,
    anchors: Anchors = 0,
) -> dict[str, Slice]:
    """Which parameters level ``level`` slices, and how: ``{param_name: (dim, k)}``, or
    ``(dim, k, parts)`` for a fused projection (GPT-2's ``c_attn``: ``k`` of each part).

    A pure function of names, shapes and the plan: the sub-model uses
    ``param.narrow(dim, 0, k)`` for every listed parameter and the full parameter for every
    other. Query heads are kept in whole key/value groups; at least one group and one neuron
    survive; anchor blocks are not listed (kept whole); level 1.0 gives ``{}``.

    Args:
        model_or_named_params: the (reordered) model, or its ``named_parameters()`` as a
            mapping (e.g. from a Dynamo graph's placeholder names mapped back to names).
            Parameters that do not exist (biases of bias-free projections) are left out.
        plan: from ``reorder_by_importance`` or ``elastic_plan``.
        level: fraction of heads and neurons kept, in (0, 1].
        anchors: see :func:`choose_anchors`.

    Raises:
        ValueError: a level outside (0, 1], bad anchors, or a parameter whose size does not
            match the plan.
    """
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 < level <= 1.0:
        raise ValueError(f"dynexec elastic: level={level!r} must be a fraction in (0, 1]")
    params = (
        dict(model_or_named_params.named_parameters())
        if isinstance(model_or_named_params, nn.Module)
        else model_or_named_params
    )
    keep_whole = choose_anchors(plan, anchors)
    slices: dict[str, Slice] = {}
    if level == 1.0:
        return slices
    for spec in plan.blocks:
        if spec.index in keep_whole:
            continue
        full = _block_slices(spec, 1.0)
        for name, cut in _block_slices(spec, level).items():
            if name not in params:
                if name.endswith(".weight"):
                    raise ValueError(
                        f"dynexec elastic: the plan names parameter {name!r}, which the model lacks"
                    )
                continue
            dim, parts = cut[0], cut[2] if len(cut) == 3 else 1
            if params[name].shape[dim] != full[name][1] * parts:
                raise ValueError(
                    f"dynexec elastic: parameter {name!r} has {params[name].shape[dim]} features on dim "
                    f"{dim}, the plan expects {full[name][1] * parts}; was the model changed after planning?"
                )
            slices[name] = cut
    return slices


def level_params(model: nn.Module, slices: Mapping[str, Slice]) -> dict[str, torch.Tensor]:
    """``{name: param.narrow(dim, 0, k)}``: views sharing storage with ``model``'s parameters.

    Pass the result to ``torch.func.functional_call(model, views, args, kwargs)``; parameters
    not in it are taken from the model unchanged.

    Raises:
        NotImplementedError: a fused projection (GPT-2's ``c_attn``) is sliced: its prefix of
            each part is not one view, and the module cannot take several; serve such a model
            with ``torch.compile(model, backend="dynexec", options={"elastic": ...})``.
    """
    fused = [name for name, cut in slices.items() if len(cut) == 3]
    if fused:
        raise NotImplementedError(
            f"dynexec elastic: {fused[0]!r} is a fused projection (GPT-2's c_attn): a prefix of each "
            "of its Q, K and V parts is not one view, so functional_call (ElasticModel) cannot run "
            "the level; compile the model with backend='dynexec' and options={'elastic': ...}"
        )
    params = dict(model.named_parameters())
    return {name: params[name].narrow(dim, 0, k) for name, (dim, k) in slices.items()}
