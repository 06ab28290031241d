"""``generate(..., strategy="self_speculative", exit_layer=E, exit_head=...)``: the model drafts for itself.

The drafter is the model's first ``E`` layers plus an exit head:

- ``exit_head="shared"``: the model's own final norm + LM head on the layer-``E`` hidden state;
- ``exit_head="trained"``: a ``last_token_rmsnorm`` head from :mod:`dynexec_compile.exit_heads`
  (RMSNorm + a ``D x V`` projection) trained for layer ``E`` by :func:`train_exit_lm_head`
  (self-distillation on the model's own next-token distribution, backbone frozen), passed as
  ``exit_heads=ExitHeads`` whose layer ``E - 1`` (the block whose output it reads) is used.

Work sharing (see :mod:`~dynexec_compile.decoding.self_speculative_engine`): drafted tokens
never go through layers ``0..E-1`` twice — verification continues from the layer-``E``
hidden states kept while drafting and reuses the keys/values drafting wrote for those
layers. Greedy output is token-identical to greedy decoding, and a greedy step is one
compiled graph (drafts, verification, acceptance, commit); sampling uses speculative
rejection sampling (the shared verification core) with the exit head's warped distribution
as the proposal, one graph per draft pass plus one for the verification.

``tree=`` (branching per depth, e.g. ``[3, 2, 1]``, or a ``TreeSpec``): the draft grows a
candidate tree level by level, a node's children being the exit head's top tokens there,
and one pass of layers ``E..L`` verifies all nodes under the tree mask; the accepted path's
keys/values are gathered in every layer's cache, never recomputed. Drafting and verifying
are one graph per step (greedy: with the acceptance and the commit). Sampling with a tree
uses the same deterministic top-k children, so each node's proposal is a point mass on its
token (:func:`~dynexec_compile.decoding.verify.point_mass_probs`): child ``x`` is accepted
with the target's probability ``p(x)``, a rejection removes ``x`` from ``p`` and the next
sibling is tried, the bonus comes from what is left — lossless. Why not children drawn from
the exit head's warped distribution (:func:`~dynexec_compile.decoding.verify.draw_children`):
each level would need host-side random draws between the draft passes, splitting the step
into ``D + 1`` graphs, where deterministic children keep drafting and verification in one
graph; and at the low temperatures where drafting pays, the head's top tokens carry most of
the target's mass.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from dynexec_compile.decoding.draft_heads import _batches, fit_heads
from dynexec_compile.decoding.engine_cache import cached_engine, engine_options
from dynexec_compile.decoding.generate import (
    DecodeSettings,
    GenerateOutput,
    GenerateStats,
    _next_token,
    cache_length,
    decode_loop,
)
from dynexec_compile.decoding.layers import DecoderStack
from dynexec_compile.decoding.masks import chain_mask
from dynexec_compile.decoding.runs import TokenRuns
from dynexec_compile.decoding.sampling import draw, sampling_probs
from dynexec_compile.decoding.self_speculative_engine import SelfSpeculativeEngine
from dynexec_compile.decoding.step import check_causal_lm, pack_prompts, weights_fingerprint
from dynexec_compile.decoding.verify import (
    TreeSpec,
    acceptance_stats,
    as_tree,
    commit_verdict,
    point_mass_probs,
    verify,
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
    exit_heads: ExitHeads | None = None,
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
    if settings.cache != "static":
        raise ValueError("strategy='self_speculative' runs on the static SlotCache; pass cache='static'")
    if tree is None and num_draft is None:
        num_draft = DEFAULT_NUM_DRAFT
    spec = None if tree is None else as_tree(tree, num_draft)
    if spec is None and (isinstance(num_draft, bool) or not isinstance(num_draft, int) or num_draft < 1):
        raise ValueError(f"num_draft must be an int >= 1, got {num_draft!r}")
    head, head_key = _exit_head(model, exit_layer, exit_head, exit_heads)
    _, lengths = pack_prompts(input_ids, attention_mask)
    batch = input_ids.shape[0]
    width = num_draft + 1 if spec is None else spec.size
    max_len = cache_length(int(lengths.max()), settings.max_new_tokens, reserve=width)
    engine = cached_engine(
        model,
        batch,
        max_len,
        settings,
        ("self_speculative", exit_layer, head_key, None if spec is None else spec.parents),
        lambda n: SelfSpeculativeEngine(model, batch, n, exit_layer, head, spec, **engine_options(settings)),
    )
    return decode_loop(_SelfProposer(engine, settings, width - 1), input_ids, attention_mask, settings)


def _exit_head(
    model: PreTrainedModel, exit_layer: Any, exit_head: str, exit_heads: ExitHeads | None
) -> tuple[nn.Module | None, tuple]:
    """The exit head module (``None`` = shared) and a cache key for it."""
    if exit_head not in EXIT_HEADS:
        raise ValueError(f"exit_head={exit_head!r} is not valid; use one of {list(EXIT_HEADS)}")
    if exit_head == "shared":
        if exit_heads is not None:
            raise ValueError("exit_heads= is for exit_head='trained'; the shared head is the model's own")
        return None, ("shared",)
    if not isinstance(exit_heads, ExitHeads):
        raise ValueError(
            "exit_head='trained' needs exit_heads=ExitHeads with a head for the exit layer "
            "(dynexec_compile.train_exit_lm_head or dynexec_compile.load_exit_heads)"
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
    weight = next(model.parameters())
    head = copy.deepcopy(exit_heads.head(block)).to(device=weight.device, dtype=weight.dtype).eval()
    return _TokenwiseHead(head), ("trained", id(exit_heads), weights_fingerprint(exit_heads))


class _TokenwiseHead(nn.Module):
    """An exit head's classifier (norm -> dropout -> linear) on every position: ``[.., D] -> [.., V]``."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head.classify(h)


class _SelfProposer:
    """Self-speculation's proposer: the model's first ``E`` layers draft, the rest verify."""

    name = "self_speculative"

    def __init__(self, engine: SelfSpeculativeEngine, settings: DecodeSettings, k: int):
        self.engine, self.settings, self.k, self.width = engine, settings, k, k + 1
        self.offsets = torch.arange(k + 1, device=engine.device)
        self.layer_tokens0 = list(engine.layer_tokens)
        self.drafted: list[torch.Tensor] = []
        self.accepted: list[torch.Tensor] = []

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        self.pending = _next_token(self.engine.prefill(input_ids, attention_mask), self.settings)  # [B]
        return self.pending

    def step(self, runs: TokenRuns) -> torch.Tensor:
        engine, settings, k = self.engine, self.settings, self.k
        live = ~runs.done  # [B]
        if engine.tree is not None:
            emitted, accepted, self.pending = _tree_step(engine, self.pending, live, settings)  # [B, D+1], [B], [B]
        elif settings.sampling is None:  # the whole step is one graph, commit included
            emitted, accepted = engine.step_greedy(self.pending, live, k)  # [B, k+1], [B]
            self.pending = emitted.gather(1, accepted[:, None])[:, 0]
        else:
            tokens, hidden, proposal = _draft_chain(engine, self.pending, k, settings)  # [B, k+1], [B, k, D]
            positions = engine.lengths[:, None] + self.offsets  # [B, k+1]
            mask = chain_mask(positions, engine.max_len, engine.cache.dtype)
            logits = engine.verify(hidden, tokens[:, -1:], positions, mask)  # [B, k+1, V]
            verdict = verify(TreeSpec.chain(k), tokens, logits, proposal, settings.sampling, settings.generator)
            accepted, emitted, self.pending = verdict.accepted, verdict.tokens, verdict.next_token
            engine.commit(torch.where(live, accepted + 1, 0))  # pending + accepted drafts, in place
        self.drafted.append(torch.where(live, k, 0))
        self.accepted.append(torch.where(live, accepted, 0))
        return runs.keep(emitted, accepted + 1)

    def extra(self, stats: GenerateStats) -> dict[str, Any]:
        engine, k = self.engine, self.k
        layer_tokens = [a - b for a, b in zip(engine.layer_tokens, self.layer_tokens0)]
        exit_layer, tree = engine.exit_layer, engine.tree
        # the draft reads k tokens (a tree: the nodes above its deepest level) in D passes; the
        # verification runs layers < E on the rest (the last draft / the deepest level) and
        # layers >= E on all k + 1 — no token runs a layer twice
        unread = 1 if tree is None else engine.tree_leaves
        return {
            "num_draft": k,
            "tree": None if tree is None else list(tree.parents),
            "exit_layer": exit_layer,
            **acceptance_stats(self.drafted, self.accepted),
            "target_forwards": stats.forward_passes,
            "draft_forwards": stats.steps * (k if tree is None else tree.max_depth),
            # token x layer evaluations per row in the decoding steps (prefill not counted)
            "draft_layer_evals": stats.steps * exit_layer * (k + 1 - unread),
            "target_layer_evals": stats.steps * (exit_layer * unread + (engine.stack.num_layers - exit_layer) * (k + 1)),
            "layer_tokens": layer_tokens,
        }


def _tree_step(
    engine: SelfSpeculativeEngine, pending: torch.Tensor, live: torch.Tensor, settings: DecodeSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One tree step: ``(tokens [B, D+1], accepted [B], next pending [B])``; row ``b`` emits
    ``tokens[b, :accepted[b] + 1]``; live rows' root and accepted path are committed."""
    tree = engine.tree
    if settings.sampling is None:  # one graph: draft, verify, accept, gather the path
        emitted, accepted = engine.step_tree_greedy(pending, live)
        return emitted, accepted, emitted.gather(1, accepted[:, None])[:, 0]
    tokens, logits = engine.draft_tree(pending)  # [B, T], [B, T, V]
    draft_probs = point_mass_probs(tree, tokens, logits.shape[-1])  # deterministic top-k children
    verdict = verify(tree, tokens, logits, draft_probs, settings.sampling, settings.generator)
    commit_verdict(engine, tree, verdict, live)  # root + accepted path, gathered in every layer
    return verdict.tokens, verdict.accepted, verdict.next_token


def _draft_chain(
    engine: SelfSpeculativeEngine, pending: torch.Tensor, k: int, settings: DecodeSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``k`` sampling draft calls from the pending token: ``(chain [B, k+1] = [pending, d_1..d_k],
    layer-E hidden states [B, k, D] of ``pending, d_1..d_{k-1}``, proposals [B, k+1, V])``."""
    tokens, hidden, probs = [pending], [], []
    for i in range(k):
        positions = engine.lengths[:, None] + i  # [B, 1]
        mask = chain_mask(positions, engine.max_len, engine.cache.dtype)
        h, logits = engine.draft(tokens[-1][:, None], positions, mask)  # [B, 1, D], [B, V]
        hidden.append(h)
        q = sampling_probs(logits, settings.sampling)  # [B, V]
        probs.append(q)
        tokens.append(draw(q, settings.generator))
    proposal = torch.stack([torch.zeros_like(probs[0]), *probs], dim=1)  # [B, k+1, V], row 0 unused
    return torch.stack(tokens, dim=1), torch.cat(hidden, dim=1), proposal


# ---- training a trained exit head -----------------------------------------------------------


def train_exit_lm_head(
    model: PreTrainedModel,
    data: torch.Tensor | Iterable[torch.Tensor],
    exit_layer: int,
    *,
    steps: int | None = None,
    batch_size: int = 8,
    seq_len: int = 256,
    lr: float = 1e-3,
    temperature: float = 1.0,
    progress: bool = True,
) -> ExitHeads:
    """Train a ``last_token_rmsnorm`` exit head over the vocabulary for ``exit_head="trained"``.

    The head (RMSNorm -> Linear(D, V)) reads block ``exit_layer - 1``'s output, starts from
    the model's own LM head (and, for RMSNorm models, its final norm's scale) and is fitted
    to the model's final next-token distribution at every position (KL divergence,
    teacher-forced). The model is never modified.

    Args:
        model: a llama / qwen2 / gpt2 causal LM in eval mode.
        data: token ids, as for :func:`~dynexec_compile.decoding.draft_heads.train_draft_heads`.
        exit_layer: ``E``, the layers the draft runs.
        steps, batch_size, seq_len, lr, temperature, progress: as for ``train_draft_heads``.
    Returns:
        :class:`ExitHeads` with one head at block ``exit_layer - 1`` (fp32, eval mode); save it
        with ``save_exit_heads``.
    """
    check_causal_lm(model)
    stack = DecoderStack(model)
    if isinstance(exit_layer, bool) or not isinstance(exit_layer, int) or not 1 <= exit_layer < stack.num_layers:
        raise ValueError(f"exit_layer must be an int in [1, {stack.num_layers - 1}], got {exit_layer!r}")
    vocab = int(model.config.vocab_size)
    eps = float(getattr(stack.norm, "variance_epsilon", getattr(stack.norm, "eps", 1e-6)))
    heads = ExitHeads([exit_layer - 1], stack.hidden_size, vocab, "last_token_rmsnorm", dropout=0.0, eps=eps)
    head = heads.head(exit_layer - 1)
    device = next(model.parameters()).device
    with torch.no_grad():
        head.out.weight.copy_(stack.lm_head.weight)
        if stack.family == "llama":
            head.norm.weight.copy_(stack.norm.weight)
    heads = heads.to(device=device, dtype=torch.float32).train()

    def loss_fn(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = model(input_ids=ids.to(device), output_hidden_states=True)
            teacher = F.log_softmax(out.logits.float() / temperature, dim=-1)  # [B, S, V]
            h = out.hidden_states[exit_layer].float()  # [B, S, D], block E-1's output
        student = F.log_softmax(head.classify(h) / temperature, dim=-1)  # [B, S, V]
        return F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1).mean() * temperature**2

    fit_heads(
        heads,
        _batches(data, batch_size, seq_len, steps),
        loss_fn,
        lr=lr,
        weight_decay=0.0,
        desc=f"exit head (layer {exit_layer})",
        progress=progress,
    )
    return heads.eval()


__all__ = ["self_speculative_strategy", "train_exit_lm_head"]
