"""``generate(..., strategy="draft_heads", heads=...)``: Medusa-style decoding, one forward per step.

The draft heads run inside the target's step graph (:class:`HeadsModel`, a
:class:`~dynexec_compile.decoding.verify.StepModel`): the forward over ``[pending, c_1 .. c_k]``
(or a Medusa candidate tree, ``tree=``) scores the candidates, the shared step
(:mod:`dynexec_compile.decoding.verify`) keeps the path the target agrees with plus its own
next token, and the heads read the final hidden state of that path's last node — so their
guesses continue the sequence the step keeps. Greedy: the whole step is ONE graph (forward,
acceptance, stop rule, commit, heads); greedy output is token-identical to greedy decoding.

Sampling: the forward is one graph, the rejection sampling runs on the host, then a small
graph without decoder layers commits the kept path and runs the heads. A chain's candidates
are drawn from each head's warped distribution (the proposal); a tree's node tokens are the
heads' top-k tokens (the same tree as greedy), deterministic given the context, so each
node's proposal is a point mass on its token
(:func:`~dynexec_compile.decoding.verify.point_mass_probs`) — lossless. Why not sampled tree
children: a head for offset ``d + 1`` predicts the target's distribution marginalised over
the ``d`` tokens in between, flatter than the target's conditional distribution at the node,
so sampled children overlap it less than its top tokens do at the low temperatures where
drafting pays; and deterministic children keep the next tree a function of the heads'
logits, built inside the compiled graph with no host-side draws.

The prefill (:meth:`DraftHeadsEngine.prefill_propose`) also ends in the heads, so the first
step already has candidates. The model is run through :class:`DecoderStack` (its own
modules, final norm and LM head), so the logits are the model's.
"""

from __future__ import annotations

import copy
import types
from typing import Any

import torch
import torch.fx as fx
from transformers import PreTrainedModel

from dynexec_compile.decoding.draft_heads import DraftHeads, check_heads_fit
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
    pack_prompts,
    prefill_bucket,
    weights_fingerprint,
)
from dynexec_compile.decoding.verify import (
    StepModel,
    StepShape,
    TreeSpec,
    Verdict,
    _greedy_body,
    acceptance_stats,
    as_tree,
    greedy_step,
    sampled_step,
)


class DraftHeadsEngine(DecodeEngine):
    """A :class:`DecodeEngine` that carries draft heads (and the candidate tree they fill).

    Args:
        model: a llama / qwen2 / gpt2 causal LM in eval mode (not modified).
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
        self.tree = tree
        if tree is not None:
            if tree.max_depth > self.num_heads:
                raise ValueError(
                    f"the candidate tree is {tree.max_depth} deep but there are {self.num_heads} draft heads "
                    "(depth d takes head d's top tokens); use a tree at most that deep"
                )
            ranks = [0] + [tree.children[parent].index(i) for i, parent in enumerate(tree.parents) if parent >= 0]
            self._node_depth = torch.tensor(tree.depths[1:], device=self.device) - 1  # [T-1] head of each node
            self._node_rank = torch.tensor(ranks[1:], device=self.device)  # [T-1] rank among siblings
            self._top = max(ranks) + 1
        self.shape = StepShape.of_tree(TreeSpec.chain(self.num_heads) if tree is None else tree)
        self.shape.in_place  # noqa: B018 - fill the cached property outside the traced step

    def prefill_propose(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fill the cache with the prompts: ``(next-token logits [B, V], heads' logits [B, k, V])``."""
        if input_ids.shape[0] != self.batch_size:
            raise ValueError(f"prefill: batch of {input_ids.shape[0]} rows, engine built for {self.batch_size}")
        packed, lengths = pack_prompts(input_ids.to(self.device), attention_mask)
        longest = int(lengths.max())
        bucket = prefill_bucket(longest)
        if bucket > self.max_len:
            raise ValueError(f"prefill: prompts of {longest} tokens need {bucket} slots (bucketed), cache has {self.max_len}")
        ids = torch.zeros(self.batch_size, bucket, dtype=torch.long, device=self.device)  # [B, bucket]
        ids[:, :longest] = packed[:, :longest]
        self.cache.reset()
        self._length_bound = 0
        out = self.run_graph("prefill_propose", _prefill_propose, ids, lengths.to(self.device), width=0)
        self._length_bound = longest
        return out

    def tree_tokens(self, root: torch.Tensor, head_logits: torch.Tensor) -> torch.Tensor:
        """The candidate tree's tokens ``[B, T]``: ``root`` ``[B]``, then each node's token from
        the heads' logits ``[B, k, V]`` (head ``depth``, ``rank``-th most likely)."""
        top = head_logits.topk(self._top, dim=-1).indices  # [B, k, top]
        return torch.cat([root[:, None], top[:, self._node_depth, self._node_rank]], dim=1)

    def next_tokens(self, root: torch.Tensor, head_logits: torch.Tensor) -> torch.Tensor:
        """The next step's greedy candidates ``[B, T]`` rooted at ``root``: the heads' argmax
        chain, or the tree of their top tokens."""
        if self.tree is not None:
            return self.tree_tokens(root, head_logits)
        return torch.cat([root[:, None], head_logits.argmax(dim=-1)], dim=1)

    def step_graph(self) -> fx.GraphModule:
        """The FX graph Dynamo captures for the greedy step (what the backend compiles): the
        shared step's outputs, then the draft heads' logits and the next candidates; the
        heads' parameters are inputs of the same graph. Captured at each row's committed
        length with every row finished (nothing is committed)."""
        graphs: list[fx.GraphModule] = []

        def capture(gm: fx.GraphModule, example_inputs: list) -> Any:
            graphs.append(gm)
            return gm.forward

        runs = TokenRuns(self.batch_size, 1, self.shape.tree.max_depth + 1, (), 0, self.device)
        runs.finished.fill_(True)  # commits nothing
        tokens = torch.zeros(self.batch_size, self.shape.width, dtype=torch.long, device=self.device)
        valid = torch.ones(self.batch_size, self.shape.tree.size, dtype=torch.bool, device=self.device)
        body = types.MethodType(_greedy_body(self.shape, HEADS), self)
        fn = torch.compile(body, backend=capture, fullgraph=True, dynamic=False)
        with torch.no_grad():
            fn(tokens, valid, torch.tensor(2**62), runs.produced, runs.finished, runs.limit, runs.eos)
        return graphs[0]


def _hidden(engine: DraftHeadsEngine, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
            slots: torch.Tensor) -> torch.Tensor:
    # tokens, positions, slots: [B, T] -> final hidden state after the norm: [B, T, D]
    stack = engine.stack
    h = stack.run(stack.embed(tokens, positions), 0, stack.num_layers, mask, positions, engine.cache, slots)
    return stack.norm(h)


def _prefill_propose(engine: DraftHeadsEngine, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # ids: [B, L]; lengths: [B]
    batch, width = ids.shape
    positions = torch.arange(width, device=ids.device)[None, :].expand(batch, width)  # [B, L]
    h = _hidden(engine, ids, positions, chain_mask(positions, engine.cache.max_len, engine.cache.dtype), positions)
    last = h.gather(1, (lengths - 1)[:, None, None].expand(batch, 1, h.shape[-1]))[:, 0]  # [B, D]
    engine.cache.lengths.copy_(lengths)
    return engine.stack.lm_head(last), engine.heads(last, engine.stack.lm_head)  # [B, V], [B, k, V]


class HeadsModel(StepModel):
    """The step's forward through the model's own layers, its final hidden states kept; after
    the verdict, the heads on the accepted path's last node propose the next candidates."""

    def forward(self, engine, tokens, positions, slots, mask):  # noqa: ANN001, ANN201 - see StepModel
        h = _hidden(engine, tokens, positions, mask, slots)  # [B, T, D]
        return tokens, engine.stack.lm_head(h), (h,)

    def after(self, engine, verdict: Verdict, extras):  # noqa: ANN001, ANN201 - see StepModel
        (h,) = extras  # [B, T, D]
        last = verdict.path.gather(1, verdict.accepted[:, None])  # [B, 1] the path's last node (== its step token)
        head_logits = engine.heads(h.gather(1, last[:, :, None].expand(-1, 1, h.shape[-1]))[:, 0], engine.stack.lm_head)
        return head_logits, engine.next_tokens(verdict.next_token, head_logits)  # [B, k, V], [B, T]


HEADS = HeadsModel()


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
    """Draft heads' proposer: the candidates come out of the previous step's graph."""

    name = "draft_heads"

    def __init__(self, engine: DraftHeadsEngine, settings: DecodeSettings):
        self.engine, self.settings = engine, settings
        self.width = engine.shape.width  # tokens per verification forward
        self.drafted: list[torch.Tensor] = []
        self.accepted: list[torch.Tensor] = []

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        logits, head_logits = self.engine.prefill_propose(input_ids, attention_mask)  # [B, V], [B, k, V]
        pending = _next_token(logits, self.settings)  # [B]
        self._propose(pending, head_logits, None)
        return pending

    def _propose(self, root: torch.Tensor, head_logits: torch.Tensor, greedy: torch.Tensor | None) -> None:
        """The next candidates: a chain drawn from the heads' warped distributions when
        sampling (kept as the proposal), else the heads' greedy chain or tree."""
        sampling = self.settings.sampling
        if sampling is not None and self.engine.tree is None:
            self.proposal = sampling_probs(head_logits, sampling)  # [B, k, V]
            self.tokens = torch.cat([root[:, None], draw(self.proposal, self.settings.generator)], dim=1)
        else:
            self.tokens = self.engine.next_tokens(root, head_logits) if greedy is None else greedy

    def step(self, runs: TokenRuns) -> torch.Tensor:
        engine, settings = self.engine, self.settings
        live = ~runs.done  # [B]
        if settings.sampling is None:  # one graph: verify, accept, commit, propose
            verdict, kept, _, (head_logits, greedy) = greedy_step(engine, engine.shape, self.tokens, runs, model=HEADS)
        else:
            probs = None  # a tree's nodes are the heads' top tokens: point masses
            if engine.tree is None:
                probs = torch.cat([torch.zeros_like(self.proposal[:, :1]), self.proposal], dim=1)  # [B, k+1, V]
            verdict, kept, (head_logits, greedy) = sampled_step(
                engine, engine.shape, self.tokens, runs, settings.sampling, settings.generator, probs, model=HEADS
            )
        self._propose(verdict.next_token, head_logits, greedy)
        self.drafted.append(torch.where(live, self.width - 1, 0))
        self.accepted.append(torch.where(live, verdict.accepted, 0))
        return kept

    def extra(self, stats: GenerateStats) -> dict[str, Any]:
        engine = self.engine
        return {
            "num_draft": self.width - 1,
            "tree": None if engine.tree is None else list(engine.tree.parents),
            **acceptance_stats(self.drafted, self.accepted),
            "target_forwards": stats.forward_passes,
            "draft_forwards": 0,  # the heads run inside the target's step graphs
            # token x layer evaluations per row in the decoding steps (prefill not counted):
            # every step runs all L layers on its k + 1 (chain) or T (tree) tokens; heads: one block each
            "target_layer_evals": stats.steps * engine.stack.num_layers * self.width,
            "draft_layer_evals": 0,
            "draft_head_evals": stats.steps * engine.num_heads,
        }


__all__ = ["HEADS", "DraftHeadsEngine", "HeadsModel", "draft_heads_strategy"]
