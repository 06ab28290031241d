"""``generate(strategy="speculative", draft_model=..., num_draft=k, tree=None)``: a draft model
proposes, the target verifies every candidate in one forward.

Each step: the draft model, on its own :class:`DecodeEngine` (static cache, compiled), proposes
a chain of ``k`` tokens in ONE compiled call (its ``k`` forwards unrolled into one graph,
:meth:`DecodeEngine.draft_chain`) or a candidate tree, one draft forward per tree depth; the target runs
ONE ``DecodeEngine.step`` over the root and all candidates under the tree mask; the shared
verification rule (:mod:`dynexec_compile.decoding.verify`) picks each row's accepted path and
bonus token; both caches keep the accepted tokens by moving their keys/values (never
recomputed). Rows accept different numbers of tokens; finished rows commit nothing. Every
forward has a fixed shape per configuration, so nothing recompiles after warm-up.

The loop (:func:`draft_verify_loop`) takes any :class:`Drafter`; other drafters (draft heads,
self-speculation) can reuse it or the verification core directly.

Draft cache bookkeeping: the draft feeds tree nodes of depths ``0 .. D-1`` (a node of depth
``D`` has no children to propose), writing node ``i`` at slot ``L + i`` like the target (``L``
the target's committed length). When a row accepts a full path of ``D`` drafts, the draft
never saw the last one: the row *lags* by that token, which the next step's first draft
forward feeds in front of the root (rows without lag feed a dummy there, written to the slot
of a depth-``D`` node that no draft query of that step reads).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from transformers import PreTrainedModel

from dynexec_compile.decoding.generate import (
    DecodeSettings,
    GenerateOutput,
    GenerateStats,
    _next_token,
    cache_length,
    decode_loop,
    get_engine,
    register_strategy,
)
from dynexec_compile.decoding.masks import step_mask
from dynexec_compile.decoding.runs import TokenRuns
from dynexec_compile.decoding.sampling import SamplingParams, sampling_probs
from dynexec_compile.decoding.step import DecodeEngine, check_causal_lm, pack_prompts
from dynexec_compile.decoding.verify import (
    TreeSpec,
    Verdict,
    acceptance_stats,
    as_tree,
    commit_verdict,
    draw_children,
    node_mask,
    tree_positions,
    verify,
    verify_step_greedy,
)

DEFAULT_NUM_DRAFT = 4
# config fields that must agree for two models to share token ids
TOKEN_FIELDS = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")


class Drafter(Protocol):
    """What :func:`draft_verify_loop` needs from a drafter.

    Attributes:
        forwards: drafter forwards run so far.
        layer_evals: token x layer evaluations per row so far (decoding steps).
    """

    forwards: int
    layer_evals: int

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """Take the prompts (the target has prefilled the same ones)."""

    def propose(
        self,
        root: torch.Tensor,
        target_lengths: torch.Tensor,
        tree: TreeSpec,
        sampling: SamplingParams | None,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Candidate tree ``tokens [B, T]`` (``tokens[:, 0] == root``) and, when sampling,
        ``draft_probs [B, T, V]`` (see :func:`~dynexec_compile.decoding.verify.verify_sampling`)."""

    def accept(self, verdict: Verdict, keep: torch.Tensor) -> None:
        """Keep the verdict's path in the drafter's state for rows with ``keep`` (``[B]`` bool)."""


class ModelDrafter:
    """A separate draft model on its own static-cache engine (see the module docstring).

    Args:
        engine: the draft model's :class:`DecodeEngine` (batch size of the target's).
        tree: the candidate tree it grows each step.
    """

    def __init__(self, engine: DecodeEngine, tree: TreeSpec):
        self.engine = engine
        self.tree = tree
        self.forwards = 0
        self.layer_evals = 0
        self._layers = engine.model.config.get_text_config(decoder=True).num_hidden_layers
        batch, device = engine.batch_size, engine.device
        self._lag = torch.zeros(batch, dtype=torch.long, device=device)  # [B] 1: draft misses one token
        self._catch_up = torch.zeros(batch, dtype=torch.long, device=device)  # [B] that token
        self._base = torch.zeros(batch, dtype=torch.long, device=device)  # [B] target length at propose
        # per depth: the nodes fed, as a list and a tensor, and the nodes each of them sees
        self._levels = [list(tree.level(depth)) for depth in range(tree.max_depth)]
        self._level_nodes = [torch.tensor(level, device=device) for level in self._levels]
        self._level_visible = [tree.visible(device)[level] for level in self._levels]  # [n, T] each

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        self.engine.prefill(input_ids, attention_mask)
        self.forwards += 1
        self._lag.zero_()

    def propose(
        self,
        root: torch.Tensor,
        target_lengths: torch.Tensor,
        tree: TreeSpec,
        sampling: SamplingParams | None,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if tree != self.tree:
            raise ValueError("ModelDrafter.propose: the tree differs from the one it was built for")
        engine, device = self.engine, self.engine.device
        batch, size = root.shape[0], tree.size
        base = target_lengths.clone()  # [B] slot of node 0, in both caches
        self._base = base
        tokens = torch.zeros(batch, size, dtype=torch.long, device=device)  # [B, T]
        tokens[:, 0] = root
        probs = None
        if tree.is_chain:  # all k draft forwards in one compiled call
            feed, positions, slots, _ = self._level_inputs(tokens, base, 0)
            drafts, draft_probs = engine.draft_chain(feed, positions, slots, tree.num_draft, sampling, generator)
            tokens[:, 1:] = drafts
            self.forwards += tree.num_draft
            self.layer_evals += (feed.shape[1] + tree.num_draft - 1) * self._layers
            if draft_probs is not None:
                probs = torch.zeros(batch, size, draft_probs.shape[-1], device=device)  # [B, T, V]
                probs[:, 1:] = draft_probs
            return tokens, probs
        for depth, level in enumerate(self._levels):
            feed, positions, slots, visible = self._level_inputs(tokens, base, depth)
            mask = node_mask(base, base, visible, engine.max_len, engine.cache.dtype)
            logits = engine.step(feed, positions, mask, slots)  # [B, n, V]
            logits = logits[:, -len(level) :]  # the catch-up query's logits are not needed
            self.forwards += 1
            self.layer_evals += feed.shape[1] * self._layers
            counts = {len(tree.children[node]) for node in level}
            if sampling is None and len(counts) == 1 and 0 not in counts:  # one top-k for the level
                kids = [kid for node in level for kid in tree.children[node]]
                tokens[:, kids] = logits.topk(counts.pop(), dim=-1).indices.reshape(batch, len(kids))
                continue
            for j, node in enumerate(level):
                kids = list(tree.children[node])
                if not kids:
                    continue
                if sampling is None:
                    tokens[:, kids] = logits[:, j].topk(len(kids), dim=-1).indices
                    continue
                if probs is None:
                    probs = torch.zeros(batch, size, logits.shape[-1], device=device)  # [B, T, V]
                kid_tokens, kid_probs = draw_children(sampling_probs(logits[:, j], sampling), len(kids), generator)
                tokens[:, kids], probs[:, kids] = kid_tokens, kid_probs
        return tokens, probs

    def _level_inputs(
        self, tokens: torch.Tensor, base: torch.Tensor, depth: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens, positions, slots ``[B, n]`` and visible nodes ``[n, T]`` of one draft forward.

        When a row lags, the first forward also carries the catch-up token in front (rows
        without lag feed a dummy there); without lag anywhere it has the level's shape alone.
        """
        level, visible = self._levels[depth], self._level_visible[depth]
        feed = tokens[:, level]  # [B, n]
        positions = (base[:, None] + depth).repeat(1, len(level))  # [B, n]
        slots = base[:, None] + self._level_nodes[depth][None, :]  # [B, n]
        if depth > 0 or not bool(self._lag.any()):
            return feed, positions, slots, visible
        lag = self._lag.bool()
        spare = base + self.tree.size - 1  # a depth-D node's slot: never read while drafting
        first_tok = torch.where(lag, self._catch_up, feed[:, 0])[:, None]  # [B, 1]
        first_pos = torch.where(lag, base - 1, base)[:, None]
        first_slot = torch.where(lag, base - 1, spare)[:, None]
        none = torch.zeros(1, visible.shape[1], dtype=torch.bool, device=base.device)
        return (
            torch.cat([first_tok, feed], dim=1),
            torch.cat([first_pos, positions], dim=1),
            torch.cat([first_slot, slots], dim=1),
            torch.cat([none, visible], dim=0),
        )

    def accept(self, verdict: Verdict, keep: torch.Tensor) -> None:
        depth = self.tree.max_depth
        base, lag = self._base, self._lag
        fed = torch.clamp(verdict.accepted + 1, max=depth)  # [B] path nodes the draft has seen
        counts = torch.where(keep, lag + fed, 0)  # [B]
        if self.tree.is_chain:
            self.engine.commit(counts)  # catch-up at L_d, then the path at L_d + lag .. : in place
        else:
            path_slots = base[:, None] + verdict.path[:, :depth]  # [B, D]
            with_lag = torch.cat([(base - 1)[:, None], path_slots], dim=1)  # [B, D + 1]
            without = torch.cat([path_slots, path_slots[:, -1:]], dim=1)
            self.engine.commit(counts, torch.where(lag.bool()[:, None], with_lag, without))
        full = keep & (verdict.accepted == depth)
        self._catch_up = torch.where(full, verdict.tokens[:, depth - 1], self._catch_up)
        self._lag = torch.where(keep, full.long(), lag)


def draft_verify_loop(
    target: DecodeEngine,
    drafter: Drafter,
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
    return decode_loop(DraftVerify(target, drafter, tree, settings, strategy), input_ids, attention_mask, settings)


class DraftVerify:
    """The :class:`~dynexec_compile.decoding.generate.Proposer` of a :class:`Drafter`: it
    proposes a candidate tree, the target verifies it in one forward (greedy: one graph with
    the verification and the commit, :func:`verify_step_greedy`)."""

    def __init__(self, target: DecodeEngine, drafter: Drafter, tree: TreeSpec, settings: DecodeSettings, name: str):
        self.engine, self.drafter, self.tree, self.settings, self.name = target, drafter, tree, settings, name
        self.width = tree.max_depth + 1
        self.drafted: list[torch.Tensor] = []
        self.accepted: list[torch.Tensor] = []
        self._forwards0, self._evals0 = drafter.forwards, drafter.layer_evals

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        self.root = _next_token(self.engine.prefill(input_ids, attention_mask), self.settings)  # [B]
        self.drafter.prefill(input_ids, attention_mask)
        return self.root

    def step(self, runs: TokenRuns) -> torch.Tensor:
        target, tree, settings = self.engine, self.tree, self.settings
        keep = ~runs.done  # [B] rows still generating
        tokens, probs = self.drafter.propose(self.root, target.lengths, tree, settings.sampling, settings.generator)
        if settings.sampling is None:  # the one target forward, verification and commit: one graph
            verdict = verify_step_greedy(target, tree, tokens, keep)
        else:  # rejection sampling draws on the host between the forward and the commit
            positions, slots = tree_positions(tree, target.lengths)  # [B, T] each
            mask = step_mask(target.lengths, slots, tree.visible(target.device), target.max_len, target.cache.dtype)
            logits = target.step(tokens, positions, mask, slots)  # [B, T, V]: the one target forward
            verdict = verify(tree, tokens, logits, probs, settings.sampling, settings.generator)
            commit_verdict(target, tree, verdict, keep)
        self.drafter.accept(verdict, keep)
        self.root = torch.where(keep, verdict.next_token, self.root)
        self.drafted.append(keep.long() * tree.num_draft)
        self.accepted.append(torch.where(keep, verdict.accepted, 0))
        return runs.keep(verdict.tokens, verdict.emitted)

    def extra(self, stats: GenerateStats) -> dict[str, Any]:
        target_layers = self.engine.model.config.get_text_config(decoder=True).num_hidden_layers
        return {
            "tree": list(self.tree.parents),
            "num_draft": self.tree.num_draft,
            **acceptance_stats(self.drafted, self.accepted),
            "target_forwards": stats.forward_passes,
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
    if settings.cache != "static":
        raise ValueError("strategy='speculative' runs on the static cache; use cache='static'")
    target_device, draft_device = next(model.parameters()).device, next(draft_model.parameters()).device
    if target_device != draft_device:
        raise ValueError(f"the draft model is on {draft_device}, the target on {target_device}; put both on one device")
    if tree is None and num_draft is None:
        num_draft = DEFAULT_NUM_DRAFT
    spec = as_tree(tree, num_draft)
    _, lengths = pack_prompts(input_ids, attention_mask)
    max_len = cache_length(int(lengths.max()), settings.max_new_tokens, reserve=2 * spec.size)
    target = get_engine(model, input_ids.shape[0], max_len, settings)
    drafter = ModelDrafter(get_engine(draft_model, input_ids.shape[0], max_len, settings, role="draft"), spec)
    return draft_verify_loop(target, drafter, input_ids, attention_mask, settings, spec, "speculative")


register_strategy("speculative", _speculative)
