"""Sort every block's heads and neurons by importance without changing what the model computes.

A transformer block is permutation-consistent: permute the heads (Q/K/V output rows in head
blocks, and the output projection's input columns with them) or the MLP neurons (up/gate
rows, down-projection columns) and the block's output is the same up to float rounding.
After sorting, every smaller sub-model is a *prefix* of each weight, which is what makes
elastic levels zero-copy views (``slicing.py``).

Grouped-query attention: query head ``i`` reads key/value head ``i // group_size``, so the
key/value heads are ordered by the summed importance of their query heads and the query
heads move with their group (ordered by their own importance inside it); the head-to-group
mapping stays valid and a prefix of whole groups is a valid smaller attention.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dynexec_compile.elastic.arch import BlockSpec, find_blocks, head_feature_index, in_dim, out_dim
from dynexec_compile.elastic.importance import Importance, head_importance


@dataclass(frozen=True)
class ElasticPlan:
    """Where every block's heads and neurons came from, and how important each layer is.

    Orders are in terms of the model as it was before any reordering: ``head_order[l][p]``
    is the original query head now at position ``p`` of block ``l``.

    Args:
        blocks: the model's blocks (module names, head and neuron counts).
        head_order: per block, original query-head index at each position.
        kv_order: per block, original key/value-head index at each position.
        neuron_order: per block, original neuron index at each position.
        layer_importance: per-block importance (for ``anchor_layers="auto"``), or ``None``.
        sorted_by: the importance method the order comes from, or ``None`` (original order).
    """

    blocks: tuple[BlockSpec, ...]
    head_order: tuple[tuple[int, ...], ...]
    kv_order: tuple[tuple[int, ...], ...]
    neuron_order: tuple[tuple[int, ...], ...]
    layer_importance: tuple[float, ...] | None
    sorted_by: str | None


# id(anchor parameter) -> (ref(anchor parameter), plan, ref(model))
_REGISTRY: dict[int, tuple[weakref.ref, ElasticPlan, weakref.ref]] = {}


def _anchor_param(model: nn.Module, blocks: tuple[BlockSpec, ...]) -> nn.Parameter:
    return model.get_submodule(blocks[0].head_out).weight


def register_plan(model: nn.Module, plan: ElasticPlan) -> None:
    """Remember ``plan`` for ``model`` (found again by :func:`lookup_plan`)."""
    param = _anchor_param(model, plan.blocks)
    if id(param) not in _REGISTRY:
        weakref.finalize(param, _REGISTRY.pop, id(param), None)
    _REGISTRY[id(param)] = (weakref.ref(param), plan, weakref.ref(model))


def _lookup(model_or_tensors: nn.Module | Iterable[torch.Tensor]) -> tuple | None:
    tensors = (
        model_or_tensors.parameters()
        if isinstance(model_or_tensors, nn.Module)
        else model_or_tensors
    )
    for t in tensors:
        entry = _REGISTRY.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry
    return None


def lookup_plan(model_or_tensors: nn.Module | Iterable[torch.Tensor]) -> ElasticPlan | None:
    """The plan :func:`reorder_by_importance` registered for a model, found from the model or
    from any iterable of tensors that contains its parameters (e.g. a Dynamo graph's example
    inputs, where parameters are lifted to inputs); ``None`` when there is none."""
    entry = _lookup(model_or_tensors)
    return entry[1] if entry is not None else None


def lookup_model(tensors: Iterable[torch.Tensor]) -> nn.Module | None:
    """The (still alive) model whose plan is registered and whose parameters are in ``tensors``."""
    entry = _lookup(tensors)
    return entry[2]() if entry is not None else None


def elastic_plan(model: nn.Module) -> ElasticPlan:
    """The model's registered plan, or a new identity plan (original order, registered for the
    model) when it has none.

    The identity plan lets any supported model be sliced in its original head order, the
    baseline the importance order is compared with.
    """
    plan = lookup_plan(model)
    if plan is not None:
        return plan
    blocks = tuple(find_blocks(model))
    plan = ElasticPlan(
        blocks=blocks,
        head_order=tuple(tuple(range(b.num_heads)) for b in blocks),
        kv_order=tuple(tuple(range(b.num_kv_heads)) for b in blocks),
        neuron_order=tuple(tuple(range(b.num_neurons)) for b in blocks),
        layer_importance=None,
        sorted_by=None,
    )
    register_plan(model, plan)
    return plan


def _descending(scores: torch.Tensor) -> torch.Tensor:
    return torch.sort(scores, descending=True, stable=True).indices


def head_permutation(scores: torch.Tensor, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(query-head order, key/value-head order) for one block, most important first.

    scores: [H] query-head importance. Key/value groups are ranked by the sum of their query
    heads' scores; query heads stay inside their group, ranked by their own score.
    """
    group = scores.numel() // num_kv_heads
    by_group = scores.view(num_kv_heads, group)  # [G, g]
    kv_order = _descending(by_group.sum(1))  # [G]
    inner = torch.stack([_descending(row) for row in by_group])  # [G, g]
    head_order = (kv_order[:, None] * group + inner[kv_order]).reshape(-1)  # [H]
    return head_order, kv_order


@torch.no_grad()
def _permute(module: nn.Module, dim: int, index: torch.Tensor, bias: bool) -> None:
    """Reorder ``module.weight`` along ``dim`` (and its bias when it indexes the same features)."""
    weight = module.weight
    weight.copy_(weight.index_select(dim, index.to(weight.device)))
    if bias and getattr(module, "bias", None) is not None:
        module.bias.copy_(module.bias.index_select(0, index.to(module.bias.device)))


def _permute_heads(
    model: nn.Module, spec: BlockSpec, head_order: torch.Tensor, kv_order: torch.Tensor
) -> None:
    q_idx = head_feature_index(head_order, spec.head_dim)  # [H * d]
    kv_idx = head_feature_index(kv_order, spec.head_dim)  # [G * d]
    if spec.arch == "gpt2":  # fused [Q | K | V] output features, each H * d wide
        width = spec.num_heads * spec.head_dim
        (c_attn,) = (model.get_submodule(n) for n in spec.head_in)
        _permute(
            c_attn, out_dim(c_attn), torch.cat([q_idx, q_idx + width, q_idx + 2 * width]), bias=True
        )
    else:
        q, k, v = (model.get_submodule(n) for n in spec.head_in)
        _permute(q, out_dim(q), q_idx, bias=True)
        _permute(k, out_dim(k), kv_idx, bias=True)
        _permute(v, out_dim(v), kv_idx, bias=True)
    o = model.get_submodule(spec.head_out)
    _permute(o, in_dim(o), q_idx, bias=False)


def _permute_neurons(model: nn.Module, spec: BlockSpec, neuron_order: torch.Tensor) -> None:
    for name in spec.neuron_in:
        module = model.get_submodule(name)
        _permute(module, out_dim(module), neuron_order, bias=True)
    down = model.get_submodule(spec.neuron_out)
    _permute(down, in_dim(down), neuron_order, bias=False)


def _check_importance(importance: Importance, blocks: list[BlockSpec]) -> None:
    want_h = (len(blocks), blocks[0].num_heads)
    want_i = (len(blocks), blocks[0].num_neurons)
    if tuple(importance.heads.shape) != want_h or tuple(importance.neurons.shape) != want_i:
        raise ValueError(
            f"dynexec elastic: importance has heads {tuple(importance.heads.shape)} and neurons "
            f"{tuple(importance.neurons.shape)}, but the model needs heads {want_h} and neurons {want_i}"
        )


def reorder_by_importance(
    model: nn.Module,
    batches: Iterable[Any] | None = None,
    importance: Importance | None = None,
    method: str = "taylor",
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    progress: bool = True,
) -> ElasticPlan:
    """Sort every block's heads and MLP neurons by importance, most important first.

    **Edits ``model`` in place**: the Q/K/V (or fused ``c_attn``) output rows, the output
    projection's input columns, the MLP up/gate rows and down-projection columns and their
    biases are permuted inside the existing parameters (same ``Parameter`` objects, same
    storage). The model computes the same function afterwards (up to float rounding). The
    plan is registered for the model (see :func:`lookup_plan`); reordering again composes.

    Args:
        model: a supported Hugging Face transformer (see ``arch.py``).
        batches: calibration batches for :func:`head_importance` (when ``importance`` is None).
        importance: precomputed scores (of the model in its current order).
        method, loss_fn, progress: passed to :func:`head_importance`.

    Returns:
        The :class:`ElasticPlan`: per block, which original head / key-value head / neuron
        now sits at each position, and the layer importance.
    """
    if importance is None:
        if batches is None:
            raise ValueError(
                "dynexec elastic: reorder_by_importance needs batches or an importance"
            )
        importance = head_importance(
            model, batches, method=method, loss_fn=loss_fn, progress=progress
        )
    previous = elastic_plan(model)
    blocks = list(previous.blocks)
    _check_importance(importance, blocks)
    head_orders, kv_orders, neuron_orders = [], [], []
    for spec, prev_h, prev_kv, prev_n in zip(
        blocks, previous.head_order, previous.kv_order, previous.neuron_order, strict=True
    ):
        head_order, kv_order = head_permutation(importance.heads[spec.index], spec.num_kv_heads)
        neuron_order = _descending(importance.neurons[spec.index])
        _permute_heads(model, spec, head_order, kv_order)
        _permute_neurons(model, spec, neuron_order)
        head_orders.append(tuple(prev_h[i] for i in head_order.tolist()))
        kv_orders.append(tuple(prev_kv[i] for i in kv_order.tolist()))
        neuron_orders.append(tuple(prev_n[i] for i in neuron_order.tolist()))
    plan = ElasticPlan(
        blocks=tuple(blocks),
        head_order=tuple(head_orders),
        kv_order=tuple(kv_orders),
        neuron_order=tuple(neuron_orders),
        layer_importance=tuple(importance.layers.tolist()),
        sorted_by=importance.method,
    )
    register_plan(model, plan)
    return plan


def plan_to_dict(plan: ElasticPlan) -> dict[str, Any]:
    """The plan's orders as JSON-able data (to ship next to weights trained on the order)."""
    return {
        "blocks": [b.name for b in plan.blocks],
        "head_order": [list(x) for x in plan.head_order],
        "kv_order": [list(x) for x in plan.kv_order],
        "neuron_order": [list(x) for x in plan.neuron_order],
        "layer_importance": None if plan.layer_importance is None else list(plan.layer_importance),
        "sorted_by": plan.sorted_by,
    }


def apply_plan(model: nn.Module, orders: ElasticPlan | dict[str, Any]) -> ElasticPlan:
    """Reorder ``model`` (in its original order) into a saved order: a plan, or the dict of
    :func:`plan_to_dict`. **Edits ``model`` in place** like :func:`reorder_by_importance`, which
    it calls with scores that sort into exactly the saved order; returns the new plan, whose
    fingerprint equals the saved one's (so LoRAs trained on that order fit).

    Raises:
        ValueError: the model was reordered already, or its blocks differ from the saved ones.
    """
    saved = plan_to_dict(orders) if isinstance(orders, ElasticPlan) else orders
    current = lookup_plan(model)
    if current is not None and current.sorted_by is not None:
        raise ValueError(
            "dynexec elastic: apply_plan needs a model in its original order; this one was reordered "
            f"already (by {current.sorted_by!r} importance)"
        )
    blocks = find_blocks(model)
    if [b.name for b in blocks] != saved["blocks"]:
        raise ValueError(
            f"dynexec elastic: the saved order is for blocks {saved['blocks'][:2]}..., this model has "
            f"{[b.name for b in blocks][:2]}..."
        )

    def scores(orders: list[list[int]], size: int) -> torch.Tensor:
        out = torch.zeros(len(orders), size)  # position p of block l scores size - p
        for layer, order in enumerate(orders):
            out[layer, torch.tensor(order)] = torch.arange(size, 0, -1, dtype=out.dtype)
        return out

    layers = saved["layer_importance"]
    importance = Importance(
        heads=scores(saved["head_order"], blocks[0].num_heads),
        neurons=scores(saved["neuron_order"], blocks[0].num_neurons),
        layers=torch.tensor(layers if layers is not None else [0.0] * len(blocks)),
        method=saved["sorted_by"] or "original",
        num_examples=0,
    )
    plan = reorder_by_importance(model, importance=importance, progress=False)
    if [list(x) for x in plan.head_order] != saved["head_order"] or [list(x) for x in plan.kv_order] != saved["kv_order"]:
        raise ValueError("dynexec elastic: the saved head order is not a valid grouped order for this model")
    if layers is None:
        plan = ElasticPlan(plan.blocks, plan.head_order, plan.kv_order, plan.neuron_order, None, plan.sorted_by)
        register_plan(model, plan)
    return plan
