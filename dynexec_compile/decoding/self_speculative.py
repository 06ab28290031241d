"""``generate(..., strategy="self_speculative", exit_layer=E, exit_head=...)``: the model drafts for itself.

The drafter is the model's first ``E`` layers plus an exit head:

- ``exit_head="shared"``: the model's own final norm + LM head on the layer-``E`` hidden state;
- ``exit_head="trained"``: a ``last_token_rmsnorm`` head from :mod:`dynexec_compile.exit_heads`
  (RMSNorm + a ``D x V`` projection) trained for layer ``E`` by :func:`~dynexec_compile.distill.train_exit_lm_head`
  (self-distillation on the model's own next-token distribution, backbone frozen), passed as
  ``exit_heads=ExitHeads`` whose layer ``E - 1`` (the block whose output it reads) is used;
  or, as ``exit_heads=``, a one-head :class:`~dynexec_compile.decoding.draft_heads.DraftHeads`
  trained by ``train_exit_lm_head(..., head="adapter")``: residual blocks on the layer-``E``
  hidden state read by the model's own final norm + LM head (:class:`AdapterExitHead`; ``D x D``
  parameters instead of ``D x V``, so the file stays small for a large vocabulary).

Work sharing (:meth:`SelfSpeculativeEngine.step_forward`, the step's own forward): drafted
tokens never go through layers ``0..E-1`` twice — the draft grows the candidate tree level
by level through layers ``[0, E)`` + the exit head (a chain: one token per level), then one
pass of layers ``[E, L)`` scores every node from the kept layer-``E`` hidden states, reusing
the keys/values drafting wrote for the lower layers; the accepted path's keys/values are
gathered in every layer's cache, never recomputed. A node's children are the exit head's
top tokens (:func:`~dynexec_compile.decoding.verify.propose_children`; a chain: its argmax).
Greedy output is token-identical to greedy decoding, and a greedy step is one compiled graph
(drafts, verification, acceptance, commit).

Sampling drafts the same top tokens, deterministic given the context, so each node's
proposal is a point mass on its token
(:func:`~dynexec_compile.decoding.verify.point_mass_probs`): child ``x`` is accepted with
the target's probability ``p(x)``, a rejection removes ``x`` from ``p`` and the next sibling
is tried, the bonus comes from what is left — lossless. Why not tokens drawn from the exit
head's warped distribution: the draws would need random numbers inside the step graph (or
host draws between the draft passes, splitting the step into ``D + 1`` graphs), while top
tokens keep drafting and scoring in one graph; and at the low temperatures where drafting
pays, the head's top tokens carry most of the target's mass.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from dynexec_compile.decoding.draft_heads import DraftHeads
from dynexec_compile.decoding.generate import (
    DecodeSettings,
    GenerateOutput,
    GenerateStats,
    decode_loop,
    strategy_engine,
)
from dynexec_compile.decoding.layers import DecoderStack, LogitHead, final_norm
from dynexec_compile.decoding.step import (
    DecodeEngine,
    weights_fingerprint,
)
from dynexec_compile.decoding.verify import (
    DraftProposer,
    StepShape,
    TreeSpec,
    as_tree,
    propose_children,
)
from dynexec_compile.exit_heads import ExitHeads

EXIT_HEADS = ("shared", "trained")
DEFAULT_NUM_DRAFT = 4


def self_speculative_strategy(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    settings: DecodeSettings,
    *,
    exit_layer: int | None = None,
    exit_head: str = "shared",
    exit_heads: ExitHeads | DraftHeads | None = None,
    num_draft: int | None = None,
    tree: Any = None,
    **options: Any,
) -> GenerateOutput:
    """The ``"self_speculative"`` strategy (see the module docstring).

    Options: ``exit_layer`` (``E``, required), ``exit_head`` (``"shared"`` | ``"trained"``),
    ``exit_heads`` (the trained heads, for ``"trained"``), ``num_draft`` (``k`` drafted tokens
    per step in a chain, default 4), ``tree`` (a candidate tree instead of a chain: children
    per depth, e.g. ``[3, 2, 1]``, or a ``TreeSpec``; ``num_draft``, if given, must equal its
    drafted-token count).
    """
    if options:
        raise TypeError(
            f"strategy='self_speculative' got unknown options {sorted(options)}; it takes exit_layer=, "
            "exit_head=, exit_heads=, num_draft= (and tree=)"
        )
    if exit_layer is None:
        raise ValueError("strategy='self_speculative' needs exit_layer=E (the layers the draft runs)")
    spec = as_tree(tree, DEFAULT_NUM_DRAFT if tree is None and num_draft is None else num_draft)
    head, head_key = _exit_head(model, exit_layer, exit_head, exit_heads)
    engine = strategy_engine(
        model, input_ids, attention_mask, settings, "self_speculative", reserve=spec.size,
        key=("self_speculative", exit_layer, head_key, spec.parents),
        build=functools.partial(SelfSpeculativeEngine, exit_layer=exit_layer, exit_head=head, tree=spec),
    )
    return decode_loop(_SelfProposer("self_speculative", engine, settings, spec), input_ids, attention_mask, settings)


def _exit_head(
    model: PreTrainedModel, exit_layer: Any, exit_head: str, exit_heads: ExitHeads | DraftHeads | None
) -> tuple[nn.Module | None, tuple]:
    """The exit head module (``None`` = shared) and a cache key for it."""
    if exit_head not in EXIT_HEADS:
        raise ValueError(f"exit_head={exit_head!r} is not valid; use one of {list(EXIT_HEADS)}")
    if exit_head == "shared":
        if exit_heads is not None:
            raise ValueError("exit_heads= is for exit_head='trained'; the shared head is the model's own")
        return None, ("shared",)
    weight = next(model.parameters())
    if isinstance(exit_heads, DraftHeads):
        if exit_heads.num_heads != 1 or exit_heads.hidden_size != int(model.config.get_text_config(decoder=True).hidden_size):
            raise ValueError(
                f"an exit adapter is a one-head DraftHeads of the model's hidden size; got {exit_heads.num_heads} heads "
                f"of size {exit_heads.hidden_size} (train one with train_exit_lm_head(model, data, exit_layer, head='adapter'))"
            )
        blocks = copy.deepcopy(exit_heads.blocks[0]).to(device=weight.device, dtype=weight.dtype).eval()
        return AdapterExitHead(model, blocks), ("adapter", id(exit_heads), weights_fingerprint(exit_heads))
    if not isinstance(exit_heads, ExitHeads):
        raise ValueError(
            "exit_head='trained' needs exit_heads=ExitHeads with a head for the exit layer, or a one-head exit "
            "adapter (dynexec_compile.train_exit_lm_head, load_exit_heads / load_draft_heads)"
        )
    block = exit_layer - 1 if isinstance(exit_layer, int) else exit_layer
    if str(block) not in exit_heads:
        raise ValueError(
            f"exit_heads has heads after blocks {list(exit_heads.layers)}; exit_layer={exit_layer} reads block "
            f"{block}'s output: train a head with train_exit_lm_head(model, data, exit_layer={exit_layer})"
        )
    vocab = int(model.config.vocab_size)
    if exit_heads.kind != "last_token_rmsnorm" or exit_heads.num_labels != vocab:
        raise ValueError(
            f"exit_heads must be kind 'last_token_rmsnorm' over the vocabulary ({vocab}), got kind "
            f"{exit_heads.kind!r} with {exit_heads.num_labels} outputs"
        )
    head = copy.deepcopy(exit_heads.head(block)).to(device=weight.device, dtype=weight.dtype).eval()
    return _TokenwiseHead(head), ("trained", id(exit_heads), weights_fingerprint(exit_heads))


class AdapterExitHead(nn.Module):
    """An exit adapter on the layer-``E`` hidden state: residual blocks, then the model's own final
    norm and LM head (with its logit transform): ``[.., D] -> [.., V]``. The blocks start as the
    identity, so an untrained adapter is the shared head; only ``D x D`` weights are trained."""

    def __init__(self, model: PreTrainedModel, blocks: nn.Module):
        super().__init__()
        config = model.config.get_text_config(decoder=True)
        self.blocks = blocks
        self.norm = final_norm(model.get_decoder(), model)
        self.lm_head = LogitHead(model.get_output_embeddings(), config)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(self.blocks(h)))


class _TokenwiseHead(nn.Module):
    """An exit head's classifier (norm -> dropout -> linear) on every position: ``[.., D] -> [.., V]``."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head.classify(h)


class SelfSpeculativeEngine(DecodeEngine):
    """A :class:`DecodeEngine` whose step drafts its own tokens: layers ``[0, E)`` + the exit
    head propose the candidate tree, layers ``[E, L)`` verify it on the same hidden states.

    Args:
        model: a causal LM in eval mode whose layers transformers exposes (not modified).
        batch_size, max_len: as for :class:`DecodeEngine`.
        exit_layer: ``E``, layers the draft runs (``1 <= E < L``).
        exit_head: ``[..., D] -> [..., V]`` logits from the layer-``E`` hidden state; ``None``
            shares the model's own final norm + LM head.
        tree: the candidate tree (fixed per engine: its shape is baked into the step's graph).
        **engine_options: the rest of :class:`DecodeEngine`'s options.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        batch_size: int,
        max_len: int,
        exit_layer: int,
        exit_head: nn.Module | None,
        tree: TreeSpec,
        **engine_options: Any,
    ):
        super().__init__(model, batch_size, max_len, **engine_options)
        self.stack = DecoderStack(model)
        layers = self.stack.num_layers
        if isinstance(exit_layer, bool) or not isinstance(exit_layer, int) or not 1 <= exit_layer < layers:
            raise ValueError(
                f"exit_layer must be an int in [1, {layers - 1}] for a model with {layers} layers, got {exit_layer!r}"
            )
        tree.check_vocabulary(int(model.config.get_text_config(decoder=True).vocab_size))
        self.exit_layer, self.exit_head, self.tree = exit_layer, exit_head, tree
        self.shape = StepShape.of_tree(tree)

    def exit_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The draft's logits ``[B, T, V]`` from the layer-``E`` output ``[B, T, D]`` (traceable)."""
        return self.stack.logits(h) if self.exit_head is None else self.exit_head(h)

    def step_forward(self, tokens, positions, slots, mask):  # noqa: ANN001, ANN201 - see DecodeEngine
        """Draft the tree from the root ``tokens[:, 0]`` level by level through layers
        ``[0, E)`` and the exit head, then score every node with layers ``[E, L)``."""
        stack, exit_layer, tree = self.stack, self.exit_layer, self.tree
        drafted, hidden = [tokens[:, :1]], []
        for depth, (start, stop) in enumerate(tree.levels):
            at, where = positions[:, start:stop], slots[:, start:stop]  # [B, n_d]
            h = stack.run(stack.embed(drafted[-1], at), 0, exit_layer, mask[:, :, start:stop], at, self.cache, where)
            hidden.append(h)  # [B, n_d, D]
            if depth < tree.max_depth:
                drafted.append(propose_children(tree, depth, self.exit_logits(h))[0])  # [B, n_{d+1}]
        h = stack.run(torch.cat(hidden, dim=1), exit_layer, stack.num_layers, mask, positions, self.cache, slots)
        return torch.cat(drafted, dim=1), stack.logits(h), ()  # [B, T], [B, T, V]


class _SelfProposer(DraftProposer):
    """Self-speculation's proposer: the engine's step drafts from the root and verifies."""

    def guess(self) -> tuple[torch.Tensor, None]:
        return self.root[:, None].expand(-1, self.tree.size), None  # only the root is read

    def extra(self, stats: GenerateStats) -> dict[str, Any]:
        engine, tree, exit_layer = self.engine, self.tree, self.engine.exit_layer
        layers, leaves = engine.stack.num_layers, len(tree.level(tree.max_depth))
        # every layer runs each of the T nodes once per step: layers < E while drafting (the
        # deepest level, which proposes nothing, in the verification), layers >= E verifying
        return {
            **super().extra(stats),
            "exit_layer": exit_layer,
            "draft_forwards": stats.steps * tree.max_depth,
            # token x layer evaluations per row in the decoding steps (prefill not counted)
            "draft_layer_evals": stats.steps * exit_layer * (tree.size - leaves),
            "target_layer_evals": stats.steps * (exit_layer * leaves + (layers - exit_layer) * tree.size),
            "layer_tokens": [stats.steps * tree.size] * layers,
        }


__all__ = ["SelfSpeculativeEngine", "self_speculative_strategy"]
