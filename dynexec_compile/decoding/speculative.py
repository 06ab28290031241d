"""``generate(strategy="speculative", draft_model=..., num_draft=k, tree=None)``: a draft model
proposes, the target verifies every candidate in one forward.

Each step: the draft model, on its own :class:`DecodeEngine` (static cache, compiled),
proposes a candidate tree (a chain of ``k`` tokens is the tree of one node per depth) in ONE
compiled call: its forwards, one per tree depth, are unrolled into one graph (each call
costs far more than a small draft model's arithmetic), a node's children being the draft's
top tokens or, when sampling, draws from its warped distribution
(:func:`~dynexec_compile.decoding.verify.propose_children`, with uniforms drawn on the host).
The target then runs the shared step (:func:`~dynexec_compile.decoding.verify.verify_step`:
one forward over the root and all candidates under the tree mask, verification, commit);
both caches keep the accepted tokens by moving their keys/values (never recomputed). Rows
accept different numbers of tokens; finished rows commit nothing. Every forward has a fixed
shape per configuration, so nothing recompiles after warm-up.

Draft cache bookkeeping: the draft feeds tree nodes of depths ``0 .. D-1`` (a node of depth
``D`` has no children to propose), writing node ``i`` at slot ``L + i`` like the target (``L``
the target's committed length). When a row accepts a full path of ``D`` drafts, the draft
never saw the last one: the row *lags* by that token, which the next step's first draft
forward feeds in front of the root (rows without lag feed a dummy there, written to the slot
of a depth-``D`` node that no draft query of that step reads).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from transformers import PreTrainedModel

from dynexec_compile.decoding.generate import (
    DecodeSettings,
    GenerateOutput,
    GenerateStats,
    decode_loop,
    register_strategy,
    strategy_engine,
)
from dynexec_compile.decoding.masks import step_mask
from dynexec_compile.decoding.sampling import SamplingParams
from dynexec_compile.decoding.step import DecodeEngine, check_causal_lm
from dynexec_compile.decoding.verify import (
    DraftProposer,
    StepOut,
    TreeSpec,
    Verdict,
    as_tree,
    propose_children,
)

DEFAULT_NUM_DRAFT = 4
# config fields that must agree for two models to share token ids
TOKEN_FIELDS = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")


class ModelDrafter:
    """A separate draft model on its own static-cache engine (see the module docstring).

    Args:
        engine: the draft model's :class:`DecodeEngine` (batch size of the target's).
        tree: the candidate tree it grows each step.
    """

    def __init__(self, engine: DecodeEngine, tree: TreeSpec):
        tree.check_vocabulary(int(engine.model.config.get_text_config(decoder=True).vocab_size))
        self.engine = engine
        self.tree = tree
        self.forwards = 0
        self.layer_evals = 0
        self._layers = engine.model.config.get_text_config(decoder=True).num_hidden_layers
        batch, device = engine.batch_size, engine.device
        self._lag = torch.zeros(batch, dtype=torch.long, device=device)  # [B] 1: draft misses one token
        self._catch_up = torch.zeros(batch, dtype=torch.long, device=device)  # [B] that token
        self._base = torch.zeros(batch, dtype=torch.long, device=device)  # [B] target length at propose

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        self.engine.prefill(input_ids, attention_mask)
        self.forwards += 1
        self._lag.zero_()

    def propose(
        self, root: torch.Tensor, target_lengths: torch.Tensor, sampling: SamplingParams | None,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Candidate tree ``tokens [B, T]`` (``tokens[:, 0] == root``) rooted at the target's
        committed lengths and, when sampling, ``draft_probs [B, T, V]`` (see
        :func:`~dynexec_compile.decoding.verify.verify_sampling`). Nothing is committed."""
        engine, tree = self.engine, self.tree
        self._base = target_lengths.clone()  # [B] slot of node 0, in both caches
        if int(self._base.max()) + tree.size > engine.max_len:
            raise ValueError(
                f"draft: a {tree.size}-node tree after {int(self._base.max())} tokens would overflow the "
                f"{engine.max_len}-slot cache; build the engine with a larger max_len"
            )
        lagging = bool(self._lag.any())  # then the first forward also carries the catch-up token
        noise = () if sampling is None else (1.0 - torch.rand(root.shape[0], tree.num_draft, generator=generator, device=engine.device),)
        out = engine.run_graph(
            f"draft{tree.parents}{'_lag' if lagging else ''}{'' if sampling is None else sampling}",
            _draft_body(tree, sampling, lagging), root, self._base, self._lag, self._catch_up, *noise,
            width=0, forwards=tree.max_depth,
        )
        self.forwards += tree.max_depth
        self.layer_evals += (tree.size - len(tree.level(tree.max_depth)) + lagging) * self._layers
        return out if sampling is not None else (out, None)

    def accept(self, verdict: Verdict, kept: torch.Tensor) -> None:
        """Keep the first ``kept[b]`` tokens of the verdict's path (the root and the drafts the
        target kept, ``[B]``; 0 for rows that had finished) in the draft's cache."""
        depth = self.tree.max_depth
        base, lag, keep = self._base, self._lag, kept > 0
        fed = torch.clamp(kept, max=depth)  # [B] kept path nodes the draft has seen
        counts = torch.where(keep, lag + fed, 0)  # [B]
        if self.tree.is_chain:
            self.engine.commit(counts)  # catch-up at L_d, then the path at L_d + lag .. : in place
        else:
            path_slots = base[:, None] + verdict.path[:, :depth]  # [B, D]
            with_lag = torch.cat([(base - 1)[:, None], path_slots], dim=1)  # [B, D + 1]
            without = torch.cat([path_slots, path_slots[:, -1:]], dim=1)
            self.engine.commit(counts, torch.where(lag.bool()[:, None], with_lag, without))
        full = kept == depth + 1  # every draft kept: the draft never saw the last one
        self._catch_up = torch.where(full, verdict.tokens[:, depth - 1], self._catch_up)
        self._lag = torch.where(keep, full.long(), lag)


@functools.lru_cache(maxsize=64)
def _draft_body(tree: TreeSpec, sampling: SamplingParams | None, lagging: bool) -> Any:
    """The draft model's tree as one graph: one forward per depth over that level's nodes
    (after a catch-up token when ``lagging``), each node's children from its logits."""

    def body(engine: DecodeEngine, root: torch.Tensor, base: torch.Tensor, lag: torch.Tensor, catch_up: torch.Tensor,
             *noise: torch.Tensor) -> Any:
        # root, base, lag, catch_up: [B]; noise: [B, N] uniforms when sampling
        device = root.device
        node_slots = base[:, None] + torch.arange(tree.size, device=device)  # [B, T]
        visible = tree.visible(device)  # [T, T]
        tokens, probs = [root[:, None]], []
        for depth in range(tree.max_depth):
            start, stop = tree.levels[depth]
            feed, slots, seen = tokens[-1], node_slots[:, start:stop], visible[start:stop]  # [B, n], [B, n], [n, T]
            positions = (base[:, None] + depth).expand_as(feed)
            if depth == 0 and lagging:  # the catch-up token at L - 1 (prefix: seen by all); others a dummy
                lags = lag.bool()
                feed = torch.cat([torch.where(lags, catch_up, root)[:, None], feed], dim=1)
                positions = torch.cat([torch.where(lags, base - 1, base)[:, None], positions], dim=1)
                slots = torch.cat([torch.where(lags, base - 1, base + tree.size - 1)[:, None], slots], dim=1)
                seen = torch.cat([torch.zeros_like(seen[:1]), seen], dim=0)
            mask = step_mask(base, node_slots, seen, engine.max_len, engine.cache.dtype)  # [B, 1, n, S]
            logits = engine.forward_logits(feed, positions, slots, mask)[:, -(stop - start) :]  # [B, n, V]
            kids, kid_probs = propose_children(tree, depth, logits, sampling, *noise)
            tokens.append(kids)
            probs.append(kid_probs)
        tokens = torch.cat(tokens, dim=1)  # [B, T]
        if sampling is None:
            return tokens
        return tokens, torch.cat([torch.zeros_like(probs[0][:, :1]), *probs], dim=1)  # [B, T, V], row 0 unused

    return body


def draft_verify_loop(
    target: DecodeEngine,
    drafter: ModelDrafter,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    settings: DecodeSettings,
    tree: TreeSpec,
    strategy: str,
) -> GenerateOutput:
    """Decode with draft-and-verify steps; output and stopping as ``model.generate``.

    Each step costs the drafter's forwards and exactly one target forward. Rows stop at EOS
    or after ``max_new_tokens``; stopped rows keep running in the fixed-shape batch but
    commit nothing.
    """
    return decode_loop(_ModelDraftProposer(strategy, target, settings, tree, drafter), input_ids, attention_mask, settings)


class _ModelDraftProposer(DraftProposer):
    """Speculative decoding's proposer: the :class:`ModelDrafter` (its own engine and cache)
    guesses the tree; the shared step verifies it in one target forward."""

    def __init__(self, name: str, target: DecodeEngine, settings: DecodeSettings, tree: TreeSpec, drafter: ModelDrafter):
        super().__init__(name, target, settings, tree)
        self.drafter = drafter
        self._forwards0, self._evals0 = drafter.forwards, drafter.layer_evals

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        self.drafter.prefill(input_ids, attention_mask)
        return super().prefill(input_ids, attention_mask)

    def guess(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.drafter.propose(self.root, self.engine.lengths, self.settings.sampling, self.settings.generator)

    def accept(self, out: StepOut) -> None:
        self.drafter.accept(out.verdict, out.kept)

    def extra(self, stats: GenerateStats) -> dict[str, Any]:
        target_layers = self.engine.model.config.get_text_config(decoder=True).num_hidden_layers
        return {
            **super().extra(stats),
            "draft_forwards": self.drafter.forwards - self._forwards0,
            # token x layer evaluations per row in the decoding steps (prefill not counted)
            "target_layer_evals": stats.steps * self.tree.size * target_layers,
            "draft_layer_evals": self.drafter.layer_evals - self._evals0,
        }


def check_same_vocabulary(target: PreTrainedModel, draft: PreTrainedModel) -> None:
    """Raise ``ValueError`` unless both models map token ids the same way (vocabulary size and
    special tokens), as draft-and-verify compares token ids directly."""
    t_cfg = target.config.get_text_config(decoder=True)
    d_cfg = draft.config.get_text_config(decoder=True)
    for name in TOKEN_FIELDS:
        t, d = getattr(t_cfg, name, None), getattr(d_cfg, name, None)
        if t != d:
            raise ValueError(
                f"the draft model has another vocabulary: {name}={d!r} but the target's is {t!r}. "
                "Speculative decoding compares token ids, so the draft must use the target's tokenizer "
                "(same vocab_size and special token ids)"
            )
    t_out, d_out = target.get_output_embeddings(), draft.get_output_embeddings()
    t_width = getattr(t_out, "out_features", None)
    d_width = getattr(d_out, "out_features", None)
    if t_width != d_width:
        raise ValueError(f"the draft model's LM head has {d_width} outputs, the target's {t_width}; they must match")


def _speculative(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    settings: DecodeSettings,
    *,
    draft_model: PreTrainedModel | None = None,
    num_draft: int | None = None,
    tree: TreeSpec | list[int] | None = None,
) -> GenerateOutput:
    """``strategy="speculative"``: see the module docstring.

    Options:
        draft_model: a causal LM with the target's vocabulary (not modified).
        num_draft: drafted tokens per step for a chain (default 4 when ``tree`` is None).
        tree: a candidate tree instead of a chain: branching per depth (``[2, 2, 1]``) or a
            :class:`~dynexec_compile.decoding.verify.TreeSpec`.
    """
    if draft_model is None:
        raise ValueError("strategy='speculative' needs draft_model=<a causal LM with the target's vocabulary>")
    try:
        check_causal_lm(draft_model)
    except (TypeError, ValueError) as err:
        raise type(err)(f"draft_model: {err}") from None
    check_same_vocabulary(model, draft_model)
    target_device, draft_device = next(model.parameters()).device, next(draft_model.parameters()).device
    if target_device != draft_device:
        raise ValueError(f"the draft model is on {draft_device}, the target on {target_device}; put both on one device")
    if tree is None and num_draft is None:
        num_draft = DEFAULT_NUM_DRAFT
    spec = as_tree(tree, num_draft)
    target = strategy_engine(model, input_ids, attention_mask, settings, "speculative", reserve=2 * spec.size)
    draft = strategy_engine(draft_model, input_ids, attention_mask, settings, "speculative", reserve=2 * spec.size,
                            key=("plain", "draft"))
    drafter = ModelDrafter(draft, spec)
    return draft_verify_loop(target, drafter, input_ids, attention_mask, settings, spec, "speculative")


register_strategy("speculative", _speculative)
