"""``generate(..., strategy="draft_heads", heads=...)``: Medusa-style decoding, one forward per step.

Each step feeds ``[pending, c_1 .. c_k]`` through :meth:`DraftHeadsEngine.verify_greedy`
(or ``verify_all`` when sampling): the same forward scores the candidates and, through the
draft heads inside its graph, proposes the next ``k``. Row ``b`` keeps the candidates the
target agrees with plus the target's own next token, so greedy output is token-identical
to greedy decoding; sampling uses speculative rejection sampling with each head's warped
distribution as the proposal (:mod:`dynexec_compile.decoding.verify`), so the output follows
the target's own sampling distribution. With ``tree=`` the forward scores a Medusa candidate
tree instead of a chain (:meth:`DraftHeadsEngine.verify_tree` when greedy).

Sampling with a tree: the tree's node tokens are the heads' top-k tokens (the same tree as
greedy), deterministic given the context, so each node's proposal is a point mass on its
token (:func:`~dynexec_compile.decoding.verify.point_mass_probs`) and the shared multi-draft
rejection rule accepts child ``x`` with the target's probability ``p(x)``, removes ``x`` from
``p`` after a rejection and tries the next sibling — lossless. Why not draw the children
from the heads' warped distributions (:func:`~dynexec_compile.decoding.verify.draw_children`):
a head for offset ``d + 1`` predicts the target's distribution marginalised over the ``d``
tokens in between, flatter than the target's conditional distribution at the node, so
sampled children overlap it less than its top tokens do at the low temperatures where
drafting pays; and deterministic children keep the next tree a function of the heads'
logits, built inside the compiled graph with no host-side draws. Per step: one target
forward (:meth:`DraftHeadsEngine.score_tree`), the rejection sampling, and a small graph
without decoder layers that gathers the kept path and proposes the next tree
(:meth:`DraftHeadsEngine.keep_path`).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

from dynexec_compile.decoding.draft_heads import DraftHeads, check_heads_fit
from dynexec_compile.decoding.draft_heads_engine import DraftHeadsEngine
from dynexec_compile.decoding.engine_cache import cached_engine, engine_options
from dynexec_compile.decoding.generate import (
    DecodeSettings,
    GenerateOutput,
    GenerateStats,
    _next_token,
    cache_length,
    decode_loop,
)
from dynexec_compile.decoding.masks import chain_mask
from dynexec_compile.decoding.runs import TokenRuns
from dynexec_compile.decoding.sampling import draw, sampling_probs
from dynexec_compile.decoding.step import pack_prompts, weights_fingerprint
from dynexec_compile.decoding.verify import (
    TreeSpec,
    Verdict,
    acceptance_stats,
    as_tree,
    point_mass_probs,
    verify,
)


def draft_heads_strategy(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    settings: DecodeSettings,
    *,
    heads: DraftHeads | None = None,
    tree: Any = None,
    **options: Any,
) -> GenerateOutput:
    """The ``"draft_heads"`` strategy (see the module docstring).

    Options: ``heads`` (required); ``tree``: ``None`` for a chain of one candidate per head,
    or a candidate tree (children per depth, e.g. ``[4, 2, 1]``, or a ``TreeSpec``) at most
    ``k`` deep whose depth-``d`` nodes take head ``d``'s top tokens — greedy or sampling.
    """
    if options:
        raise TypeError(f"strategy='draft_heads' got unknown options {sorted(options)}; it takes heads= and tree=")
    if heads is None:
        raise ValueError("strategy='draft_heads' needs heads=DraftHeads (dynexec_compile.train_draft_heads / load_draft_heads)")
    if settings.cache != "static":
        raise ValueError("strategy='draft_heads' runs on the static SlotCache; pass cache='static'")
    check_heads_fit(model, heads)
    spec = None if tree is None else as_tree(tree, None)
    width = heads.num_heads + 1 if spec is None else spec.size
    _, lengths = pack_prompts(input_ids, attention_mask)
    batch = input_ids.shape[0]
    max_len = cache_length(int(lengths.max()), settings.max_new_tokens, reserve=width)
    engine = cached_engine(
        model,
        batch,
        max_len,
        settings,
        ("draft_heads", id(heads), weights_fingerprint(heads), None if spec is None else spec.parents),
        lambda n: DraftHeadsEngine(model, batch, n, heads, spec, **engine_options(settings)),
    )
    return decode_loop(_HeadsProposer(engine, settings), input_ids, attention_mask, settings)


class _HeadsProposer:
    """Draft heads' proposer: the heads run inside the target's verification forward."""

    name = "draft_heads"

    def __init__(self, engine: DraftHeadsEngine, settings: DecodeSettings):
        self.engine, self.settings = engine, settings
        k = engine.num_heads
        self.width = k + 1 if engine.tree is None else engine.tree.size  # tokens per verification forward
        self.offsets = torch.arange(k + 1, device=engine.device)
        self.drafted: list[torch.Tensor] = []
        self.accepted: list[torch.Tensor] = []

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        engine = self.engine
        logits, head_logits = engine.prefill_propose(input_ids, attention_mask)  # [B, V], [B, k, V]
        pending = _next_token(logits, self.settings)  # [B]
        candidates, self.proposal = _propose(head_logits, self.settings)  # [B, k], [B, k, V] or None
        self.tokens = torch.cat([pending[:, None], candidates], dim=1)  # [B, k+1]
        if engine.tree is not None:
            self.tokens = engine.tree_tokens(pending, head_logits)  # [B, T]
        return pending

    def step(self, runs: TokenRuns) -> torch.Tensor:
        engine, settings, sampling, tokens = self.engine, self.settings, self.settings.sampling, self.tokens
        live = ~runs.done  # [B]
        if engine.tree is not None and sampling is None:  # one graph: verify the tree, keep the best path, propose
            emitted, accepted, _, tokens = engine.verify_tree(tokens, live)  # [B, D+1], [B], _, [B, T]
        elif engine.tree is not None:
            logits, hidden = engine.score_tree(tokens)  # [B, T, V], [B, T, D]: the one target forward
            draft_probs = point_mass_probs(engine.tree, tokens, logits.shape[-1])  # [B, T, V]
            verdict = verify(engine.tree, tokens, logits, draft_probs, sampling, settings.generator)
            accepted, emitted = verdict.accepted, verdict.tokens  # [B], [B, D+1]
            _, tokens = engine.keep_path(hidden, verdict, live)  # next tree [B, T]
        elif sampling is None:  # one graph: verify, accept, commit, propose
            emitted, accepted, _, tokens = engine.verify_greedy(tokens, live)  # [B, k+1], [B], _, [B, k+1]
        else:
            positions = engine.lengths[:, None] + self.offsets  # [B, k+1]
            mask = chain_mask(positions, engine.max_len, engine.cache.dtype)
            verdict, head_all = _verify_sampled(engine, tokens, positions, mask, self.proposal, settings)
            accepted, emitted = verdict.accepted, verdict.tokens
            engine.commit(torch.where(live, accepted + 1, 0))  # pending + accepted candidates, in place
            rows = torch.arange(tokens.shape[0], device=engine.device)
            candidates, self.proposal = _propose(head_all[rows, accepted], settings)  # the heads at the last kept position
            tokens = torch.cat([verdict.next_token[:, None], candidates], dim=1)
        self.tokens = tokens
        self.drafted.append(torch.where(live, self.width - 1, 0))
        self.accepted.append(torch.where(live, accepted, 0))
        return runs.keep(emitted, accepted + 1)

    def extra(self, stats: GenerateStats) -> dict[str, Any]:
        engine, width, k = self.engine, self.width, self.engine.num_heads
        return {
            "num_draft": width - 1,
            "tree": None if engine.tree is None else list(engine.tree.parents),
            **acceptance_stats(self.drafted, self.accepted),
            "target_forwards": stats.forward_passes,
            "draft_forwards": 0,  # the heads run inside the target's forward (tree sampling: in keep_path's graph)
            # token x layer evaluations per row in the decoding steps (prefill not counted):
            # every step runs all L layers on its k + 1 (chain) or T (tree) tokens; heads: one block each
            "target_layer_evals": stats.steps * engine.stack.num_layers * width,
            "draft_layer_evals": 0,
            "draft_head_evals": stats.steps * k * (1 if self.settings.sampling is None or engine.tree is not None else k + 1),
        }


def _propose(head_logits: torch.Tensor, settings: DecodeSettings) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Candidates ``[B, k]`` from the heads' logits ``[B, k, V]``: argmax, or one draw per head
    from its warped distribution (returned as the proposal ``[B, k, V]`` for verification)."""
    if settings.sampling is None:
        return head_logits.argmax(dim=-1), None
    proposal = sampling_probs(head_logits, settings.sampling)  # [B, k, V]
    return draw(proposal, settings.generator), proposal


def _verify_sampled(
    engine: DraftHeadsEngine,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    proposal: torch.Tensor,
    settings: DecodeSettings,
) -> tuple[Verdict, torch.Tensor]:
    """Speculative rejection sampling of the chain; ``(verdict, heads' logits [B, k+1, k, V])``."""
    logits, head_all = engine.verify_all(tokens, positions, mask)  # [B, k+1, V], [B, k+1, k, V]
    draft_probs = torch.cat([torch.zeros_like(proposal[:, :1]), proposal], dim=1)  # [B, k+1, V], row 0 unused
    verdict = verify(TreeSpec.chain(engine.num_heads), tokens, logits, draft_probs, settings.sampling, settings.generator)
    return verdict, head_all


__all__ = ["draft_heads_strategy"]
