"""``generate(..., strategy="self_speculative", exit_layer=E, exit_head=...)``: the model drafts for itself.

The drafter is the model's first ``E`` layers plus an exit head:

- ``exit_head="shared"``: the model's own final norm + LM head on the layer-``E`` hidden state;
- ``exit_head="trained"``: a ``last_token_rmsnorm`` head from :mod:`dynexec_compile.exit_heads`
  (RMSNorm + a ``D x V`` projection) trained for layer ``E`` by :func:`train_exit_lm_head`
  (self-distillation on the model's own next-token distribution, backbone frozen), passed as
  ``exit_heads=ExitHeads`` whose layer ``E - 1`` (the block whose output it reads) is used.

Work sharing (:class:`SelfDraftModel`, the step's own forward): drafted tokens
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
from dynexec_compile.decoding.step import (
    DecodeEngine,
    check_causal_lm,
    pack_prompts,
    weights_fingerprint,
)
from dynexec_compile.decoding.verify import (
    StepModel,
    StepShape,
    TreeSpec,
    acceptance_stats,
    as_tree,
    greedy_step,
    sampled_step,
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


class SelfSpeculativeEngine(DecodeEngine):
    """A :class:`DecodeEngine` that carries an exit layer and head: the draft is layers
    ``[0, E)`` + the exit head, the verification layers ``[E, L)`` on the same hidden states.

    Args:
        model: a llama / qwen2 / gpt2 causal LM in eval mode (not modified).
        batch_size, max_len: as for :class:`DecodeEngine`.
        exit_layer: ``E``, layers the draft runs (``1 <= E < L``).
        exit_head: ``[..., D] -> [..., V]`` logits from the layer-``E`` hidden state; ``None``
            shares the model's own final norm + LM head.
        tree: the candidate tree (fixed per engine: its shape is baked into the step's
            graph); ``None`` for chains.
        **engine_options: the rest of :class:`DecodeEngine`'s options.

    Attributes:
        layer_tokens: ``[L]`` tokens each decoder layer has processed in decoding steps (host
            counters, per row), for the stats.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        batch_size: int,
        max_len: int,
        exit_layer: int,
        exit_head: nn.Module | None = None,
        tree: TreeSpec | None = None,
        **engine_options: Any,
    ):
        super().__init__(model, batch_size, max_len, **engine_options)
        self.stack = DecoderStack(model)
        layers = self.stack.num_layers
        if isinstance(exit_layer, bool) or not isinstance(exit_layer, int) or not 1 <= exit_layer < layers:
            raise ValueError(
                f"exit_layer must be an int in [1, {layers - 1}] for a model with {layers} layers, got {exit_layer!r}"
            )
        self.exit_layer, self.exit_head, self.tree = exit_layer, exit_head, tree
        self.layer_tokens = [0] * layers
        if tree is not None:
            self._tree_tables(tree)

    def _tree_tables(self, tree: TreeSpec) -> None:
        """Per depth: the level's node range (contiguous in breadth-first order) and, for the
        next level's nodes, their parent's index within this level and their rank among
        their siblings (which of the exit head's top tokens they take)."""
        vocab = int(self.model.config.get_text_config(decoder=True).vocab_size)
        widest = max(len(kids) for kids in tree.children)
        if widest > vocab:
            raise ValueError(f"a tree node has {widest} children but the vocabulary has {vocab} tokens; use fewer children")
        self._levels = [(min(tree.level(d)), max(tree.level(d)) + 1) for d in range(tree.max_depth + 1)]
        self._child_parent, self._child_rank, self._top = [], [], []
        for d in range(tree.max_depth):
            kids = tree.level(d + 1)
            ranks = [tree.children[tree.parents[c]].index(c) for c in kids]
            self._child_parent.append(torch.tensor([tree.parents[c] - self._levels[d][0] for c in kids], device=self.device))
            self._child_rank.append(torch.tensor(ranks, device=self.device))
            self._top.append(max(ranks) + 1)

    @property
    def tree_leaves(self) -> int:
        """Nodes of the tree's deepest level (their layers ``< E`` run in the verification)."""
        start, stop = self._levels[-1]
        return stop - start

    def count(self, layers: range, tokens: int) -> None:
        """Add ``tokens`` to :attr:`layer_tokens` of ``layers``."""
        for i in layers:
            self.layer_tokens[i] += tokens

    def exit_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The draft's logits ``[B, T, V]`` from the layer-``E`` output ``[B, T, D]`` (traceable)."""
        return self.stack.logits(h) if self.exit_head is None else self.exit_head(h)

    def draft(self, token: torch.Tensor, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layers ``[0, E)`` + exit head on one token per row (``[B, 1]`` token and position,
        slot == position): ``(h_E [B, 1, D], draft logits [B, V])``. Not a model forward."""
        out = self.run_graph("draft", _draft_one, token, position, width=0, forwards=0)
        self.count(range(self.exit_layer), 1)
        return out

    def verify(self, hidden: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Target logits ``[B, k+1, V]`` of a chain drafted with :meth:`draft` from its first
        ``k`` tokens' layer-``E`` hidden states ``[B, k, D]`` (their layers-``< E`` keys/values
        are in the cache) and its last token ``[B, 1]`` (through no layer yet)."""
        width = hidden.shape[1] + 1
        logits = self.run_graph("verify", _verify_chain, hidden, last, width=width)
        self.count(range(self.exit_layer), 1)
        self.count(range(self.exit_layer, self.stack.num_layers), width)
        return logits


def _draft_one(engine: SelfSpeculativeEngine, token: torch.Tensor, position: torch.Tensor) -> tuple[torch.Tensor, ...]:
    mask = chain_mask(position, engine.cache.max_len, engine.cache.dtype)  # [B, 1, 1, S]
    h = engine.stack.embed(token, position)  # [B, 1, D]
    h = engine.stack.run(h, 0, engine.exit_layer, mask, position, engine.cache, position)
    return h, engine.exit_logits(h)[:, -1]


def _verify_chain(engine: SelfSpeculativeEngine, hidden: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    # hidden: [B, k, D]; last: [B, 1]
    stack, exit_layer = engine.stack, engine.exit_layer
    positions = engine.cache.lengths[:, None] + torch.arange(hidden.shape[1] + 1, device=last.device)  # [B, k+1]
    mask = chain_mask(positions, engine.cache.max_len, engine.cache.dtype)  # [B, 1, k+1, S]
    tail = positions[:, -1:]  # [B, 1]
    h_last = stack.run(stack.embed(last, tail), 0, exit_layer, mask[:, :, -1:], tail, engine.cache, tail)
    h = stack.run(torch.cat([hidden, h_last], dim=1), exit_layer, stack.num_layers, mask, positions, engine.cache, positions)
    return stack.logits(h)  # [B, k+1, V]


class SelfDraftModel(StepModel):
    """The step's forward drafts its own tokens: from the root, layers ``[0, E)`` + the exit
    head propose each next token (a chain) or each level's children (a tree, the head's top
    tokens by rank); then layers ``[E, L)`` score every node from the kept layer-``E``
    hidden states. No token runs a layer twice; only ``tokens[:, 0]`` (the root) is read."""

    def forward(self, engine, tokens, positions, slots, mask):  # noqa: ANN001, ANN201 - see StepModel
        stack, exit_layer, tree = engine.stack, engine.exit_layer, engine.tree
        levels = [(i, i + 1) for i in range(tokens.shape[1])] if tree is None else engine._levels
        drafted, hidden = [tokens[:, :1]], []
        for depth, (start, stop) in enumerate(levels):  # a chain's depth d is its token d
            at, where = positions[:, start:stop], slots[:, start:stop]  # [B, n_d]
            h = stack.run(stack.embed(drafted[-1], at), 0, exit_layer, mask[:, :, start:stop], at, engine.cache, where)
            hidden.append(h)  # [B, n_d, D]
            if depth == len(levels) - 1:
                break
            if tree is None:
                drafted.append(engine.exit_logits(h).argmax(dim=-1))  # [B, 1]
            else:
                top = engine.exit_logits(h).topk(engine._top[depth], dim=-1).indices  # [B, n_d, top]
                drafted.append(top[:, engine._child_parent[depth], engine._child_rank[depth]])  # [B, n_{d+1}]
        h = stack.run(torch.cat(hidden, dim=1), exit_layer, stack.num_layers, mask, positions, engine.cache, slots)
        return torch.cat(drafted, dim=1), stack.logits(h), ()  # [B, T], [B, T, V]


SELF_DRAFT = SelfDraftModel()


class _SelfProposer:
    """Self-speculation's proposer: the model's first ``E`` layers draft, the rest verify."""

    name = "self_speculative"

    def __init__(self, engine: SelfSpeculativeEngine, settings: DecodeSettings, k: int):
        self.engine, self.settings, self.k = engine, settings, k
        self.shape = StepShape.of_tree(TreeSpec.chain(k) if engine.tree is None else engine.tree)
        self.width = self.shape.width
        self.tokens = torch.zeros(engine.batch_size, self.width, dtype=torch.long, device=engine.device)  # root first
        self.layer_tokens0 = list(engine.layer_tokens)
        self.drafted: list[torch.Tensor] = []
        self.accepted: list[torch.Tensor] = []

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        self.pending = _next_token(self.engine.prefill(input_ids, attention_mask), self.settings)  # [B]
        return self.pending

    def step(self, runs: TokenRuns) -> torch.Tensor:
        engine, settings, k = self.engine, self.settings, self.k
        live = ~runs.done  # [B]
        self.tokens[:, 0] = self.pending
        if settings.sampling is None:  # the whole step is one graph: drafts, verification, commit
            verdict, kept, _, _ = greedy_step(engine, self.shape, self.tokens, runs, model=SELF_DRAFT)
            engine.count(range(engine.stack.num_layers), self.width)
        elif engine.tree is not None:  # the draft tree and its scores in one graph; point-mass proposals
            verdict, kept, _ = sampled_step(engine, self.shape, self.tokens, runs, settings.sampling, settings.generator,
                                            model=SELF_DRAFT)
            engine.count(range(engine.stack.num_layers), self.width)
        else:  # draws between the drafts: one graph per draft, then the verification
            tokens, hidden, proposal = _draft_chain(engine, self.pending, k, settings)  # [B, k+1], [B, k, D], [B, k+1, V]
            logits = engine.verify(hidden, tokens[:, -1:])  # [B, k+1, V]
            verdict = verify(self.shape.tree, tokens, logits, proposal, settings.sampling, settings.generator)
            kept = runs.keep(verdict.tokens, verdict.emitted)
            engine.commit(kept)  # pending + kept drafts, in place
        self.pending = verdict.next_token
        self.drafted.append(torch.where(live, k, 0))
        self.accepted.append(torch.where(live, verdict.accepted, 0))
        return kept

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


def _draft_chain(
    engine: SelfSpeculativeEngine, pending: torch.Tensor, k: int, settings: DecodeSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``k`` sampling draft calls from the pending token: ``(chain [B, k+1] = [pending, d_1..d_k],
    layer-E hidden states [B, k, D] of ``pending, d_1..d_{k-1}``, proposals [B, k+1, V])``."""
    tokens, hidden, probs = [pending], [], []
    for i in range(k):
        h, logits = engine.draft(tokens[-1][:, None], engine.lengths[:, None] + i)  # [B, 1, D], [B, V]
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
