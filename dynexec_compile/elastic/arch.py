"""Where the heads and neurons of a Hugging Face transformer live.

Importance scoring, reordering and slicing all need the same facts about every block: which
modules project into the attention heads (Q/K/V or GPT-2's fused ``c_attn``), which one
projects out of them (the output projection), which project into the MLP neurons and which
one out of them, and how many heads, key/value heads and neurons there are. This module
finds those facts once, by module *names* (not module objects), so the same description
serves an eager ``nn.Module`` and a Dynamo graph whose placeholders carry parameter names.

Supported block layouts (matched by attribute names, so relatives with the same layout work):

* ``bert``: ``attention.self.{query,key,value}``, ``attention.output.dense``,
  ``intermediate.dense``, ``output.dense`` (BERT, MiniLM, RoBERTa, ...).
* ``llama``: ``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj`` (LLaMA, Qwen2,
  Mistral, ...), grouped-query attention included.
* ``gpt2``: ``attn.c_attn`` (fused Q|K|V, ``Conv1D`` with a transposed weight), ``attn.c_proj``,
  ``mlp.c_fc``, ``mlp.c_proj``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class BlockSpec:
    """One transformer block's head and neuron layout, by module name.

    Args:
        index: position of the block in the model (0-based).
        name: module path of the block, e.g. ``"encoder.layer.0"``.
        arch: ``"bert"``, ``"llama"`` or ``"gpt2"``.
        num_heads: query heads.
        num_kv_heads: key/value heads (``num_heads`` without grouped-query attention).
        head_dim: features per head.
        num_neurons: MLP intermediate size.
        head_in: modules whose output features are head features: ``(q, k, v)``, or
            ``(c_attn,)`` for GPT-2's fused projection.
        head_out: the attention output projection (its input features are head features).
        neuron_in: modules whose output features are MLP neurons (``up``/``gate``/``fc``).
        neuron_out: the MLP down projection (its input features are neurons).
    """

    index: int
    name: str
    arch: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_neurons: int
    head_in: tuple[str, ...]
    head_out: str
    neuron_in: tuple[str, ...]
    neuron_out: str

    @property
    def group_size(self) -> int:
        """Query heads that share one key/value head."""
        return self.num_heads // self.num_kv_heads


_LAYOUTS = {
    "bert": (
        ("attention.self.query", "attention.self.key", "attention.self.value"),
        "attention.output.dense",
        ("intermediate.dense",),
        "output.dense",
    ),
    "llama": (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "self_attn.o_proj",
        ("mlp.gate_proj", "mlp.up_proj"),
        "mlp.down_proj",
    ),
    "gpt2": (("attn.c_attn",), "attn.c_proj", ("mlp.c_fc",), "mlp.c_proj"),
}


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D`` (weight [in, out]); matched by name and its ``nf``/``nx``
    attributes so importing dynexec does not import transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def out_dim(module: nn.Module) -> int:
    """Weight dimension indexing a projection's output features (Conv1D stores [in, out])."""
    return 1 if _is_conv1d(module) else 0


def in_dim(module: nn.Module) -> int:
    """Weight dimension indexing a projection's input features."""
    return 1 - out_dim(module)


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _match_layout(block: nn.Module) -> str | None:
    for arch, (head_in, head_out, neuron_in, neuron_out) in _LAYOUTS.items():
        if all(_has(block, p) for p in (*head_in, head_out, *neuron_in, neuron_out)):
            return arch
    return None


def _features(module: nn.Module, dim_fn: Callable[[nn.Module], int]) -> int:
    return module.weight.shape[dim_fn(module)]


def _head_counts(block: nn.Module, arch: str) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim) read from the block's modules and the config."""
    if arch == "bert":
        attn = block.get_submodule("attention.self")
        heads, head_dim = attn.num_attention_heads, attn.attention_head_size
        return heads, heads, head_dim
    if arch == "gpt2":
        attn = block.get_submodule("attn")
        return attn.num_heads, attn.num_heads, attn.head_dim
    attn = block.get_submodule("self_attn")
    head_dim = attn.head_dim
    heads = _features(attn.q_proj, out_dim) // head_dim
    kv_heads = _features(attn.k_proj, out_dim) // head_dim
    if heads != kv_heads * attn.num_key_value_groups:
        raise ValueError(
            f"dynexec elastic: block has {heads} query heads and {kv_heads} key/value heads, "
            f"which does not match num_key_value_groups={attn.num_key_value_groups}"
        )
    return heads, kv_heads, head_dim


def find_blocks(model: nn.Module) -> list[BlockSpec]:
    """Every transformer block of ``model``, in execution order.

    Raises:
        ValueError: no block with a known layout was found (the message names the layouts).
    """
    specs: list[BlockSpec] = []
    taken: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(t + ".") for t in taken):
            continue
        arch = _match_layout(module)
        if arch is None:
            continue
        taken.append(name)
        head_in, head_out, neuron_in, neuron_out = _LAYOUTS[arch]
        heads, kv_heads, head_dim = _head_counts(module, arch)
        neurons = _features(module.get_submodule(neuron_out), in_dim)
        prefix = f"{name}." if name else ""
        specs.append(
            BlockSpec(
                index=len(specs),
                name=name,
                arch=arch,
                num_heads=heads,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                num_neurons=neurons,
                head_in=tuple(prefix + p for p in head_in),
                head_out=prefix + head_out,
                neuron_in=tuple(prefix + p for p in neuron_in),
                neuron_out=prefix + neuron_out,
            )
        )
    if not specs:
        raise ValueError(
            f"dynexec elastic: found no transformer block in {type(model).__name__}; supported "
            f"layouts are {sorted(_LAYOUTS)} (see dynexec_compile/elastic/arch.py)"
        )
    return specs


def head_feature_index(head_order: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Feature indices of the heads in ``head_order``, head blocks kept contiguous.

    head_order: [H'] head indices -> [H' * head_dim] feature indices.
    """
    offsets = torch.arange(head_dim, device=head_order.device)
    return (head_order[:, None] * head_dim + offsets[None, :]).reshape(-1)
