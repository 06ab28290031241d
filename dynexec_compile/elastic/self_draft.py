"""Elastic self-drafting: a level of the model's own weights drafts for the full model.

After :func:`~dynexec_compile.elastic.reorder.reorder_by_importance`, the sub-model at level
``r`` (the first ``~r`` of every block's heads and MLP neurons) is a smaller causal LM made of
*prefix views* of the full model's parameters. :func:`elastic_draft` wraps that sub-model as a
model of the target's own class, so every consumer of a draft model serves it unchanged:
``dx.generate(model, ids, strategy="speculative", draft_model=draft)``, ``wrap_generate``'s
``assistant_model=draft``, and transformers' own assisted generation. The draft verifies
against the full model, so greedy output is the full model's and sampling keeps its
distribution, whatever the level.

Zero copies: every draft parameter is either the target's own ``Parameter`` object (the
embeddings, norms, LM head: not sliced) or a ``Parameter`` that aliases a prefix view of one
(``w.narrow(dim, 0, k)``, same storage, offset 0). :func:`draft_extra_bytes` counts the bytes a
draft holds outside the target's storages, 0 by construction (tested). The decoding engine
adds the draft's own key/value cache, sized by the level.

Why a model of the target's class built from a sliced config rather than
``functional_call`` (as :class:`~dynexec_compile.elastic.runtime.ElasticModel` does): the
decoding engines size their static key/value cache from the config (one geometry for every
layer) and call the model's own forward; a config whose ``num_attention_heads``,
``num_key_value_heads`` and ``intermediate_size`` are the level's makes the draft an ordinary
model to them. The same reason rules out anchor layers (blocks kept whole) in a draft: a cache
with one key/value geometry cannot hold layers with different numbers of key/value heads.

With a level's LoRA (:class:`~dynexec_compile.elastic.lora.LevelLoRA`, trained by distillation
from the full model, which is exactly what makes a draft agree with its target), each adapted
projection of the draft becomes a :class:`LoRALinear`: the prefix view plus the LoRA's
``A``/``B`` (the LoRA's own tensors, not copies), computed with the one
:func:`~dynexec_compile.elastic.lora.lora_delta`. Modules rather than forward hooks, so every
layer of the draft has the same structure and regional compilation still compiles one layer
graph for all of them (the LoRA tensors are graph inputs like the weights).
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from dynexec_compile.elastic.lora import LevelLoRA, lora_delta
from dynexec_compile.elastic.reorder import ElasticPlan, elastic_plan
from dynexec_compile.elastic.slicing import level_param_slices, level_params

# model -> {(level, LoRA or None): draft}
_DRAFTS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, nn.Module]] = weakref.WeakKeyDictionary()


class LoRALinear(nn.Module):
    """``y = W x + b + scale * B (A x)``: a draft's projection (``W`` a prefix view of the
    model's weight) with its level's LoRA. ``weight``/``bias`` keep ``nn.Linear``'s names."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.lora_A, self.lora_B, self.scale = a, b, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + lora_delta(x, self.lora_A, self.lora_B, self.scale)


def _attach_lora(draft: nn.Module, lora: LevelLoRA) -> None:
    for name, (a, b) in lora.pairs().items():
        base = draft.get_submodule(name)
        if type(base) is not nn.Linear:
            raise ValueError(f"dynexec elastic_draft: the LoRA adapts {name!r}, which is a {type(base).__name__} in the draft")
        if (a.shape[1], b.shape[0]) != (base.in_features, base.out_features):
            raise ValueError(
                f"dynexec elastic_draft: the LoRA's {name!r} is (in, out) {(a.shape[1], b.shape[0])}, the draft's "
                f"{(base.in_features, base.out_features)}"
            )
        owner_path, _, leaf = name.rpartition(".")
        setattr(draft.get_submodule(owner_path), leaf, LoRALinear(base, a, b, lora.scale))


def _level_geometry(plan: ElasticPlan, slices: dict) -> tuple[int, int, int]:
    """``(query heads, key/value heads, neurons)`` every block keeps at this level.

    Raises ``ValueError`` when blocks differ (a cache has one geometry for all layers)."""
    kept = set()
    for spec in plan.blocks:
        q = slices.get(f"{spec.head_in[0]}.weight")
        k = slices.get(f"{spec.head_in[1]}.weight")
        n = slices.get(f"{spec.neuron_out}.weight")
        kept.add((
            q[1] // spec.head_dim if q else spec.num_heads,
            k[1] // spec.head_dim if k else spec.num_kv_heads,
            n[1] if n else spec.num_neurons,
        ))
    if len(kept) != 1:
        raise ValueError(
            f"dynexec elastic_draft: the blocks keep different head / neuron counts at this level {sorted(kept)}; "
            "a draft needs one geometry for all layers (its decoding cache has one key/value shape)"
        )
    return kept.pop()


def _sliced_config(model: nn.Module, heads: int, kv_heads: int, neurons: int, head_dim: int):
    config = copy.deepcopy(model.config)
    text = config.get_text_config(decoder=True)
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if not hasattr(text, name):
            raise NotImplementedError(
                f"dynexec elastic_draft: {type(text).__name__} has no {name!r}; elastic drafts serve "
                "LLaMA-layout decoders (LLaMA, Qwen2, Mistral, ...)"
            )
    text.num_attention_heads, text.num_key_value_heads, text.intermediate_size = heads, kv_heads, neurons
    text.head_dim = head_dim  # explicit: hidden_size // num_attention_heads no longer gives it
    return config


def _set_tensor(module: nn.Module, path: str, tensor: torch.Tensor, kind: str) -> None:
    owner_path, _, leaf = path.rpartition(".")
    owner = module.get_submodule(owner_path)
    table = owner._parameters if kind == "parameter" else owner._buffers
    table[leaf] = tensor


def elastic_draft(model: nn.Module, level: float, lora: LevelLoRA | None = None) -> nn.Module:
    """The model's elastic level ``level`` as a draft model that shares the model's weights.

    The draft is a model of ``type(model)`` (a transformers causal LM) whose config keeps the
    level's query heads, key/value heads and MLP neurons in every block, and whose parameters
    are prefix views of ``model``'s (or ``model``'s own parameters where the level slices
    nothing): no weight is copied, and ``model`` is not modified. The draft is cached per
    ``(model, level)`` so repeated calls reuse its compiled decoding engines; it sees the
    model's weights as they are at each call (an in-place reordering or fine-tuning of the
    model shows through the views).

    Use it with any draft-model strategy::

        dx.reorder_by_importance(model, calibration_batches)   # in place, outputs unchanged
        draft = dx.elastic_draft(model, 0.5)
        out = dx.generate(model, ids, strategy="speculative", draft_model=draft, num_draft=3)

    Args:
        model: a transformers causal LM with a LLaMA-style block layout (LLaMA, Qwen2,
            Mistral, ...; ``elastic/arch.py``), best reordered by importance first: unreordered
            it is sliced in its original head order (a valid but weaker draft).
        level: fraction of heads and neurons kept, in (0, 1); query heads in whole
            key/value groups (``slicing.kept_units``).
        lora: the level's :class:`~dynexec_compile.elastic.lora.LevelLoRA` (made for this
            model's plan, this level and no anchor blocks), added to the draft's projections;
            its tensors are shared, not copied.

    Raises:
        ValueError: ``level`` outside (0, 1) (level 1.0 would be the model itself), or a LoRA
            made for another level, plan or anchor blocks.
        NotImplementedError: a fused projection (GPT-2's ``c_attn``), which no view can slice
            as one module, or a config without the LLaMA-style size fields.
    """
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 < level < 1.0:
        raise ValueError(
            f"dynexec elastic_draft: level={level!r} must be a fraction in (0, 1); level 1.0 is the model itself"
        )
    level = float(level)
    if lora is not None and not isinstance(lora, LevelLoRA):
        raise TypeError(f"dynexec elastic_draft: lora must be a LevelLoRA, got {type(lora).__name__}")
    cached = _DRAFTS.get(model, {}).get((level, lora))
    if cached is not None:
        return cached
    # Without a LoRA the plan's orders do not matter: a level keeps a prefix whose size depends
    # only on the block layout, and the views read whatever order the weights are in. A LoRA
    # was trained on one order: check_fits compares the plan's fingerprint.
    plan = elastic_plan(model)
    if lora is not None:
        lora.check_fits(model, plan, level, ())
    slices = level_param_slices(model, plan, level)
    views = level_params(model, slices)  # raises for fused projections
    heads, kv_heads, neurons = _level_geometry(plan, slices)
    config = _sliced_config(model, heads, kv_heads, neurons, plan.blocks[0].head_dim)
    with torch.device("meta"):
        draft = type(model)(config)
    own_params = dict(model.named_parameters(remove_duplicate=False))
    own_buffers = dict(model.named_buffers(remove_duplicate=False))
    for name, meta in draft.named_parameters(remove_duplicate=False):
        if name not in own_params:
            raise ValueError(f"dynexec elastic_draft: the draft has a parameter {name!r} the model lacks")
        shared = (
            nn.Parameter(views[name], requires_grad=False) if name in views else own_params[name]
        )
        if shared.shape != meta.shape:
            raise ValueError(
                f"dynexec elastic_draft: {name!r} is {tuple(shared.shape)} at level {level} but the sliced "
                f"config builds {tuple(meta.shape)}; this family sizes its modules in a way the level does not match"
            )
        _set_tensor(draft, name, shared, "parameter")
    for name, _ in draft.named_buffers(remove_duplicate=False):
        if name not in own_buffers:
            raise ValueError(f"dynexec elastic_draft: the draft has a buffer {name!r} the model lacks")
        _set_tensor(draft, name, own_buffers[name], "buffer")
    _copy_tensor_attributes(model, draft)
    draft.generation_config = copy.deepcopy(model.generation_config)
    draft.config._attn_implementation = model.config._attn_implementation
    if lora is not None:
        _attach_lora(draft, lora)
    draft.train(model.training)
    _DRAFTS.setdefault(model, {})[(level, lora)] = draft
    return draft


def _copy_tensor_attributes(model: nn.Module, draft: nn.Module) -> None:
    """Plain tensor attributes built at construction (e.g. a rotary embedding's
    ``original_inv_freq``) are still on the meta device: take the model's."""
    own = dict(model.named_modules())
    for name, module in draft.named_modules():
        for attr, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and value.is_meta:
                source = getattr(own.get(name), attr, None)
                if not isinstance(source, torch.Tensor):
                    raise ValueError(f"dynexec elastic_draft: {name}.{attr} has no counterpart in the model")
                setattr(module, attr, source)


def _storages(tensors: Iterable[torch.Tensor]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def draft_extra_bytes(draft: nn.Module, model: nn.Module) -> int:
    """Bytes of ``draft``'s parameters and buffers that live outside ``model``'s storages
    (0 for :func:`elastic_draft`: every tensor aliases one of the model's)."""
    owned = _storages([*model.parameters(), *model.buffers()])
    tensors = {id(t): t for t in [*draft.parameters(), *draft.buffers()]}.values()
    return sum(t.numel() * t.element_size() for t in tensors if t.untyped_storage().data_ptr() not in owned)


__all__ = ["LoRALinear", "draft_extra_bytes", "elastic_draft"]
