"""``generate(..., strategy="draft_heads", heads=...)``: Medusa-style decoding, one forward per step.

The draft heads run inside the target's step graph (:class:`DraftHeadsEngine`): the forward
over ``[pending, c_1 .. c_k]`` (or a Medusa candidate tree, ``tree=``) scores the candidates,
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
from typing import Any

import torch
from transformers import PreTrainedModel

from dynexec_compile.decoding.draft_heads import DraftHeads, check_heads_fit
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

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The final hidden state after the norm ``[B, T, D]`` (the heads' input); traceable."""
        stack = self.stack
        return stack.norm(stack.run(stack.embed(tokens, positions), 0, stack.num_layers, mask, positions, self.cache, slots))

    def prefill_forward(self, ids, positions, mask, last):  # noqa: ANN001, ANN201 - see DecodeEngine
        h = self.hidden(ids, positions, positions, mask)  # [B, L, D]
        h = h.gather(1, last[:, :, None].expand(-1, 1, h.shape[-1]))[:, 0]  # [B, D]
        return self.stack.lm_head(h), self.heads(h, self.stack.lm_head)  # [B, V], [B, k, V]

    def step_forward(self, tokens, positions, slots, mask):  # noqa: ANN001, ANN201 - see DecodeEngine
        h = self.hidden(tokens, positions, slots, mask)  # [B, T, D]
        return tokens, self.stack.lm_head(h), (h,)

    def step_after(self, verdict: Verdict, extras: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The heads on the accepted path's last node: ``(heads' logits [B, k, V], next candidates [B, T])``."""
        (h,) = extras  # [B, T, D]
        last = verdict.path.gather(1, verdict.accepted[:, None])  # [B, 1] the path's last node (== its step token)
        head_logits = self.heads(h.gather(1, last[:, :, None].expand(-1, 1, h.shape[-1]))[:, 0], self.stack.lm_head)
        return head_logits, self.tree_tokens(verdict.next_token, head_logits)


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
    check_heads_fit(model, heads)
    spec = TreeSpec.chain(heads.num_heads) if tree is None else as_tree(tree, None)
    engine = strategy_engine(
        model, input_ids, attention_mask, settings, "draft_heads", reserve=spec.size,
        key=("draft_heads", id(heads), weights_fingerprint(heads), spec.parents),
        build=functools.partial(DraftHeadsEngine, heads=heads, tree=spec),
    )
    return decode_loop(_HeadsProposer("draft_heads", engine, settings, spec), input_ids, attention_mask, settings)


class _HeadsProposer(DraftProposer):
    """Draft heads' proposer: the candidates come out of the previous step's graph."""

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        logits, head_logits = self.engine.prefill_propose(input_ids, attention_mask)  # [B, V], [B, k, V]
        self.root = next_token(logits, self.settings)  # [B]
        self.tokens = self.engine.tree_tokens(self.root, head_logits)  # [B, T]
        return self.root

    def guess(self) -> tuple[torch.Tensor, None]:
        return self.tokens, None

    def accept(self, out: StepOut) -> None:
        _, self.tokens = out.after  # the heads' next candidates, from the step's graph

    def extra(self, stats: GenerateStats) -> dict[str, Any]:
        engine = self.engine
        return {
            **super().extra(stats),
            "draft_forwards": 0,  # the heads run inside the target's step graphs
            # token x layer evaluations per row in the decoding steps (prefill not counted):
            # every step runs all L layers on its T tokens; heads: one block each
            "target_layer_evals": stats.steps * engine.stack.num_layers * engine.tree.size,
            "draft_layer_evals": 0,
            "draft_head_evals": stats.steps * engine.num_heads,
        }


__all__ = ["DraftHeadsEngine", "draft_heads_strategy"]
