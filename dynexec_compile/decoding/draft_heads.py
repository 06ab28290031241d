"""Medusa-style draft heads: guess tokens 2..k+1 ahead from the final hidden state.

A causal LM's final hidden state at position ``t`` already determines its next token
``t + 1`` (through the LM head). Draft head ``i`` (``i = 1..k``) is a small residual block
``x + SiLU(W x + b)`` on that same hidden state, followed by the model's own LM head, and is
trained to predict token ``t + 1 + i``. With them, one forward of the target both verifies
the previous step's candidates and proposes the next ones.

Why the model's own (tied, frozen) LM head rather than a projection per head, as Medusa-1
does: a ``[V, D]`` projection per head is ``V / D`` times the size of the residual block
(16x for the demo LM's 4096 x 256), so the heads would train slower on a CPU, ship k large
files and need an initialisation anyway (Medusa copies the LM head); sharing it keeps each
head to ``D^2 + D`` parameters and, with the residual weights initialised to zero, every
head starts out as the model's own next-token prediction — a sensible first guess for the
token after. The LM head is applied once to all heads' features together.

Training (:func:`~dynexec_compile.distill.train_draft_heads`) is self-distillation with the
backbone frozen: head ``i`` at position ``t`` learns the model's own next-token distribution
at position ``t + i``. Heads are saved as safetensors with their configuration in the file's
metadata.

The strategy, ``generate(..., strategy="draft_heads", heads=...)``, is one forward per step:
the heads run inside the target's step graph (:class:`DraftHeadsEngine`): the forward over
``[pending, c_1 .. c_k]`` (or a Medusa candidate tree, ``tree=``) scores the candidates,
the shared step (:func:`~dynexec_compile.decoding.verify.verify_step`) keeps the path the
target agrees with plus its own next token, and the heads read the final hidden state of
that path's last node — so their guesses continue the sequence the step keeps. Depth ``d``
of the tree takes head ``d``'s top tokens (:func:`~dynexec_compile.decoding.verify.propose_children`;
a chain: each head's argmax). Greedy: the whole step is ONE graph (forward, acceptance, stop
rule, commit, heads); greedy output is token-identical to greedy decoding.

Sampling: the forward is one graph, the rejection sampling runs on the host, then a small
graph without decoder layers commits the kept path and runs the heads. The candidates are
the same top tokens as greedy's, deterministic given the context, so each node's proposal is
a point mass on its token (:func:`~dynexec_compile.decoding.verify.point_mass_probs`) —
lossless. Why not tokens drawn from the heads: a head for offset ``d + 1`` predicts the
target's distribution marginalised over the ``d`` tokens in between, flatter than the
target's conditional distribution at the node, so drawn tokens overlap it less than its top
tokens do at the low temperatures where drafting pays; and deterministic candidates keep the
next tree a function of the heads' logits, built inside the compiled graph.

The prefill (:meth:`DraftHeadsEngine.prefill_propose`) also ends in the heads, so the first
step already has candidates. The model is run through :class:`DecoderStack` (its own
modules, final norm and LM head), so the logits are the model's.
"""

from __future__ import annotations

import copy
import functools
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from dynexec_compile.decoding.generate import (
    DecodeSettings,
    GenerateOutput,
    GenerateStats,
    decode_loop,
    next_token,
    strategy_engine,
)
from dynexec_compile.decoding.layers import DecoderStack
from dynexec_compile.decoding.step import DecodeEngine, weights_fingerprint
from dynexec_compile.decoding.verify import (
    DraftProposer,
    StepOut,
    StepShape,
    TreeSpec,
    Verdict,
    as_tree,
    propose_children,
)
from dynexec_compile.weights_io import read_with_config, save_with_config

METADATA_KEY = "dynexec_draft_heads"
FORMAT_VERSION = 1


class ResidualBlock(nn.Module):
    """``x + SiLU(W x + b)``; ``W`` and ``b`` start at zero, so the block starts as the identity."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))  # [..., D]


class DraftHeads(nn.Module):
    """``k`` draft heads reading the final (post-norm) hidden state; head ``i`` guesses offset ``i + 1``.

    Args:
        hidden_size: ``D`` of the model the heads read.
        num_heads: ``k``, future offsets ``2 .. k + 1`` (offset 1 is the model's own head).
        num_layers: residual blocks per head.
        vocab_size: ``V`` of the model's LM head (checked when the heads meet a model).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_layers: int = 1, vocab_size: int | None = None):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads), ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DraftHeads: {name} must be an int >= 1, got {value!r}")
        self.blocks = nn.ModuleList(
            nn.Sequential(*[ResidualBlock(hidden_size) for _ in range(num_layers)]) for _ in range(num_heads)
        )
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.vocab_size = vocab_size

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` final hidden states -> ``[..., k, D]`` inputs of the LM head, one per head."""
        return torch.stack([block(h) for block in self.blocks], dim=-2)

    def forward(self, h: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """``[..., D]`` -> ``[..., k, V]`` logits of the tokens ``2 .. k + 1`` ahead."""
        return lm_head(self.features(h))

    def config(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "hidden_size": self.hidden_size,
            "num_heads": self.num_heads,
            "num_layers": self.num_layers,
            "vocab_size": self.vocab_size,
        }


def check_heads_fit(model: PreTrainedModel, heads: Any) -> DraftHeads:
    """Raise ``TypeError``/``ValueError`` unless ``heads`` are :class:`DraftHeads` for ``model``."""
    if not isinstance(heads, DraftHeads):
        raise TypeError(
            f"heads must be DraftHeads (from train_draft_heads or load_draft_heads), got {type(heads).__name__}"
        )
    hidden, vocab = int(model.config.hidden_size), int(model.config.vocab_size)
    if heads.hidden_size != hidden or (heads.vocab_size is not None and heads.vocab_size != vocab):
        raise ValueError(
            f"draft heads were built for hidden size {heads.hidden_size} and vocabulary {heads.vocab_size}; "
            f"this {type(model).__name__} has {hidden} and {vocab}: train heads for this model"
        )
    return heads


# ---- saving and loading ------------------------------------------------------------------------


def save_draft_heads(heads: DraftHeads, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Write ``heads`` to a safetensors file (configuration in the metadata), optionally cast to ``dtype``."""
    if not isinstance(heads, DraftHeads):
        raise TypeError(f"expected DraftHeads, got {type(heads).__name__}")
    save_with_config(heads, path, METADATA_KEY, heads.config(), dtype)


def load_draft_heads(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> DraftHeads:
    """Read heads written by :func:`save_draft_heads`; ``dtype=None`` keeps the stored dtype. Eval mode."""
    config, tensors = read_with_config(path, METADATA_KEY, "draft-heads", FORMAT_VERSION)
    heads = DraftHeads(config["hidden_size"], config["num_heads"], config["num_layers"], config["vocab_size"])
    heads = heads.to(dtype=next(iter(tensors.values())).dtype)
    heads.load_state_dict(tensors, strict=True)
    return heads.to(device=device, dtype=dtype).eval()


# ---- the strategy ----------------------------------------------------------------------------


class DraftHeadsEngine(DecodeEngine):
    """A :class:`DecodeEngine` whose step ends in draft heads proposing the next candidates.

    Args:
        model: a causal LM in eval mode whose layers transformers exposes (not modified).
        batch_size, max_len: as for :class:`DecodeEngine`.
        heads: trained :class:`DraftHeads` for this model (copied to the model's device and
            dtype; the given module is unchanged).
        tree: a candidate tree at most ``k`` deep (depth ``d`` takes head ``d``'s top tokens);
            ``None`` for a chain of one candidate per head.
        **engine_options: the rest of :class:`DecodeEngine`'s options.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        batch_size: int,
        max_len: int,
        heads: DraftHeads,
        tree: TreeSpec | None = None,
        **engine_options: Any,
    ):
        super().__init__(model, batch_size, max_len, **engine_options)
        weight = next(model.parameters())
        self.heads = copy.deepcopy(check_heads_fit(model, heads)).to(device=weight.device, dtype=weight.dtype).eval()
        self.stack = DecoderStack(model)
        self.num_heads = self.heads.num_heads
        self.tree = TreeSpec.chain(self.num_heads) if tree is None else tree
        if self.tree.max_depth > self.num_heads:
            raise ValueError(
                f"the candidate tree is {self.tree.max_depth} deep but there are {self.num_heads} draft heads "
                "(depth d takes head d's top tokens); use a tree at most that deep"
            )
        self.tree.check_vocabulary(int(model.config.get_text_config(decoder=True).vocab_size))
        self.shape = StepShape.of_tree(self.tree)

    def prefill_propose(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fill the cache with the prompts: ``(next-token logits [B, V], heads' logits [B, k, V])``."""
        return self.prefill_outputs(input_ids, attention_mask)

    def tree_tokens(self, root: torch.Tensor, head_logits: torch.Tensor) -> torch.Tensor:
        """The candidate tree's tokens ``[B, T]``: ``root`` ``[B]``, then each node's token from
        the heads' logits ``[B, k, V]`` (head ``depth``, ``rank``-th most likely). Traceable."""
        levels = [propose_children(self.tree, d, head_logits[:, d])[0] for d in range(self.tree.max_depth)]
        return torch.cat([root[:, None], *levels], dim=1)

    def prefill_forward(self, ids, positions, mask, last):  # noqa: ANN001, ANN201 - see DecodeEngine
        h = self.stack.hidden(ids, positions, mask, self.cache, positions)  # [B, L, D]
        h = h.gather(1, last[:, :, None].expand(-1, 1, h.shape[-1]))[:, 0]  # [B, D]
        return self.stack.lm_head(h), self.heads(h, self.stack.lm_head)  # [B, V], [B, k, V]

    def step_forward(self, tokens, positions, slots, mask):  # noqa: ANN001, ANN201 - see DecodeEngine
        h = self.stack.hidden(tokens, positions, mask, self.cache, slots)  # [B, T, D]
        return tokens, self.stack.lm_head(h), (h,)

    def step_after(self, verdict: Verdict, extras: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The heads on the accepted path's last node: ``(heads' logits [B, k, V], next candidates
        [B, T])``. After a plain step (one token, no guesses; ``adaptive``) the heads do not run:
        its hidden state ``[B, D]`` is returned for :meth:`heads_after`."""
        (h,) = extras  # [B, T, D]
        if h.shape[1] == 1:
            return (h[:, 0],)
        last = verdict.path.gather(1, verdict.accepted[:, None])  # [B, 1] the path's last node (== its step token)
        return self._heads_on(h.gather(1, last[:, :, None].expand(-1, 1, h.shape[-1]))[:, 0], verdict.next_token)

    def _heads_on(self, h: torch.Tensor, root: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        head_logits = self.heads(h, self.stack.lm_head)  # [B, k, V]
        return head_logits, self.tree_tokens(root, head_logits)

    def heads_after(self, h: torch.Tensor, root: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(heads' logits, candidates)`` from a plain step's hidden state ``h`` ``[B, D]`` and
        token ``root`` ``[B]``, when the next step guesses (one small graph)."""
        return self.run_graph("draft_heads_after", _heads_after_body, h, root, width=0, forwards=0)


def draft_heads_strategy(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    settings: DecodeSettings,
    *,
    heads: DraftHeads | None = None,
    tree: Any = None,
    adaptive: bool = False,
    **options: Any,
) -> GenerateOutput:
    """The ``"draft_heads"`` strategy (see the module docstring).

    Options: ``heads`` (required); ``tree``: ``None`` for a chain of one candidate per head,
    or a candidate tree (children per depth, e.g. ``[4, 2, 1]``, or a ``TreeSpec``) at most
    ``k`` deep whose depth-``d`` nodes take head ``d``'s top tokens — greedy or sampling.
    ``adaptive``: each step verifies the heads' candidates or none (a plain one-token step,
    which skips the heads; they read its hidden state when a step guesses again), whichever is
    expected to give more tokens per second
    from the heads' probabilities and the measured step times
    (:mod:`~dynexec_compile.decoding.adaptive`); exact either way.
    """
    if options:
        raise TypeError(f"strategy='draft_heads' got unknown options {sorted(options)}; it takes heads=, tree= and adaptive=")
    if not isinstance(adaptive, bool):
        raise ValueError(f"strategy='draft_heads': adaptive must be True or False, got {adaptive!r}")
    if heads is None:
        raise ValueError("strategy='draft_heads' needs heads=DraftHeads (dynexec_compile.train_draft_heads / load_draft_heads)")
    check_heads_fit(model, heads)
    spec = TreeSpec.chain(heads.num_heads) if tree is None else as_tree(tree, None)
    engine = strategy_engine(
        model, input_ids, attention_mask, settings, "draft_heads", reserve=spec.size,
        key=("draft_heads", id(heads), weights_fingerprint(heads), spec.parents),
        build=functools.partial(DraftHeadsEngine, heads=heads, tree=spec),
    )
    proposer = _HeadsProposer("draft_heads", engine, settings, spec)
    if adaptive:
        proposer.chooser = engine.chooser
        proposer.chooser.begin()
    return decode_loop(proposer, input_ids, attention_mask, settings)


def _heads_after_body(engine: DraftHeadsEngine, h: torch.Tensor, root: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return engine._heads_on(h, root)


class _HeadsProposer(DraftProposer):
    """Draft heads' proposer: the candidates come out of the previous step's graph.

    Attributes:
        pending: ``adaptive``: after plain steps, whose graphs do not run the heads, the last
            one's hidden state ``[B, D]``; the heads read it when a step guesses again.
        head_runs: heads' evaluations after plain steps (:meth:`DraftHeadsEngine.heads_after`).
    """

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        logits, head_logits = self.engine.prefill_propose(input_ids, attention_mask)  # [B, V], [B, k, V]
        self.root = next_token(logits, self.settings)  # [B]
        self.head_logits, self.tokens = head_logits, self.engine.tree_tokens(self.root, head_logits)  # [B, T]
        self.full, self.pending, self.head_runs = self.shape, None, 0
        tops = [self.tree._kids[d][2] for d in range(self.tree.max_depth)]  # candidates per depth (head d's top tokens)
        self.ranks = torch.arange(max(tops), device=self.root.device) < torch.tensor(tops, device=self.root.device)[:, None]
        return self.root

    def guess(self) -> tuple[torch.Tensor, None]:
        if self.chooser is None:
            return self.tokens, None
        confidence = None  # stale after plain steps
        if self.pending is None:  # [B, k, A] the heads' probabilities of their candidates
            probs = self.head_logits[:, : self.tree.max_depth].float().softmax(dim=-1)
            confidence = self.confidence = probs.topk(self.ranks.shape[1], dim=-1).values * self.ranks
        _, expected = self.expected_drafts(confidence, self.tree.max_depth)
        self.shape = self.chooser.choose([(self.full, 1 + expected), (self.plain, 1.0)])
        if self.shape is self.plain:
            return self.root[:, None], None
        if self.pending is not None:  # the heads read the last plain step's hidden state
            self.head_logits, self.tokens = self.engine.heads_after(self.pending, self.root)
            self.pending, self.head_runs = None, self.head_runs + 1
        return self.tokens, None

    def accept(self, out: StepOut) -> None:
        if self.chooser is not None and self.pending is None:
            # the first depth's candidates against the model's token (fresh: no plain step since them)
            start, stop = self.tree.levels[1]
            hits = self.chooser.first_hits(self.tokens[:, start:stop], self.confidence[:, 0, : stop - start],
                                           out.verdict.tokens[:, 0], self.live)
            self.chooser.observe(self.shape, hits=hits[0], predicted=hits[1])
        if self.shape is self.plain:
            (self.pending,) = out.after  # [B, D]
        else:
            self.head_logits, self.tokens = out.after  # the heads' next candidates, from the step's graph

    def extra(self, stats: GenerateStats) -> dict[str, Any]:
        engine = self.engine
        plain = self.chooser.chosen.get(self.plain.name, 0) if self.chooser is not None else 0  # one-token steps
        return {
            **super().extra(stats),
            "draft_forwards": 0,  # the heads run inside the target's step graphs
            # token x layer evaluations per row in the decoding steps (prefill not counted):
            # every step runs all L layers on its T tokens; heads: one block each
            "target_layer_evals": (stats.steps * engine.tree.size - plain * (engine.tree.size - 1)) * engine.stack.num_layers,
            "draft_layer_evals": 0,
            "draft_head_evals": (stats.steps - plain + self.head_runs) * engine.num_heads,
            "adaptive_steps": dict(self.chooser.chosen) if self.chooser is not None else None,
        }


__all__ = [
    "DraftHeads",
    "DraftHeadsEngine",
    "ResidualBlock",
    "check_heads_fit",
    "draft_heads_strategy",
    "load_draft_heads",
    "save_draft_heads",
]
