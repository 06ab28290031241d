"""EAGLE-style feature drafting: one small decoder layer guesses the model's next hidden states.

Medusa-style heads (:mod:`~dynexec_compile.decoding.draft_heads`) guess token ``t + 1 + i``
from one hidden state; on SmolLM2-135M they agree with the model one time in seven at the
first guess. EAGLE (Li et al. 2024) drafts autoregressively at the *feature* level instead:
one decoder layer of the model's own family reads, at every position ``p``, the model's final
hidden state ``f_p`` together with the token ``x_{p+1}`` that followed it
(``fc([embed(x_{p+1}), f_p])``), attends over all earlier positions through its own small
KV cache, and predicts ``f_{p+1}``; the model's own LM head on that guess gives the draft
token, which is fed back with the guessed feature for the next guess.

How it runs here (:class:`EagleEngine`, ``generate(..., strategy="eagle", draft=...)``):

- the verification step is the shared one (:func:`~dynexec_compile.decoding.verify.verify_step`)
  over the chain ``[root, c_1 .. c_k]``; its forward also returns the final hidden states;
- after the verdict, in the same graph (``step_after``), the draft layer takes the accepted
  path's features and the tokens that follow them (the accepted drafts, then the model's own
  bonus token), writing them at the slots of their positions in the draft's cache — so the
  draft cache always holds the model's true features for every committed position — and
  the output at the last kept pair starts the next ``k`` guesses;
- every draft-cache write is at the slot of its position and every draft query sees the
  slots up to its own (a chain mask): pairs past what a row kept are scratch that the next
  step overwrites before any query can see them.

The draft's LM head is the model's output embedding restricted to the ``vocab`` tokens the
model emits most often (FR-Spec, Zhao et al. 2025): the full 49,152-token head of SmolLM2
would stream 113 MB per guessed token, as much as a fifth of the whole model. Each row may
also guess its own prompt's tokens outside that set (up to :data:`REQUEST_VOCAB`): answers
copy names and rare words from their request. Logit transforms (soft-capping, scaling) are
monotone and skipped: guesses are top-1 tokens.

``lookup=N`` adds a second branch to each step's tree: the ``N`` tokens that followed the last
occurrence of the text's last two tokens earlier in the text (prompt lookup,
:class:`~dynexec_compile.decoding.lookahead.ContextLookup`), verified in the same forward as
the draft's chain; the draft then continues from whichever path was accepted. A step where no
row has a candidate runs the chain alone, a narrower shape. With ``copy_lookup=C`` a step where
the text's last :data:`~dynexec_compile.decoding.lookahead.COPY_MATCH` tokens occurred earlier
in it (an answer copying a passage) verifies ``C`` looked-up tokens instead of ``N``, in a wider
shape of its own (lookahead's ``copy_ngram``): a long branch only where a long run is likely.

``alternatives=A`` verifies, beside each token of the draft's chain, the draft's next ``A`` best
tokens in its place, as leaves of the step's tree: the draft's top-1 guess agrees with the model
less often than its top-3 (SmolLM2's draft, held-out answers: 0.35 against 0.54), the ranks come
from the same draft step, and on a few-row kernel a few more rows of a step cost little. The
chain continues from the best guess only; when the model's token is an alternative, the step
keeps it (and the model's own token after it), and the next guesses start from there.

Exactness does not depend on the draft: greedy output is token-identical to greedy decoding
and sampling is lossless (the guesses are deterministic given the context, so each node's
proposal is a point mass, :func:`~dynexec_compile.decoding.verify.point_mass_probs`). Train
a draft with :func:`~dynexec_compile.distill.train_eagle_draft`; it is saved as safetensors
with its configuration (:func:`save_eagle_draft`, :func:`load_eagle_draft`).
"""

from __future__ import annotations

import copy
import functools
import os
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from dynexec_compile.decoding.cache import SlotCache
from dynexec_compile.decoding.generate import (
    DecodeSettings,
    GenerateOutput,
    GenerateStats,
    decode_loop,
    next_token,
    strategy_engine,
)
from dynexec_compile.decoding.layers import DecoderStack
from dynexec_compile.decoding.lookahead import COPY_MATCH, ContextLookup
from dynexec_compile.decoding.masks import chain_mask
from dynexec_compile.decoding.regional import private_copy
from dynexec_compile.decoding.step import DecodeEngine, _compiler, weights_fingerprint
from dynexec_compile.decoding.verify import DraftProposer, StepOut, StepShape, TreeSpec, Verdict
from dynexec_compile.weights_io import read_with_config, save_tensors

METADATA_KEY = "dynexec_eagle_draft"
# config entries a draft does not keep: quantisation and dtype belong to the model's weights
_NOT_KEPT = ("quantization_config", "dtype", "torch_dtype", "transformers_version", "architectures", "_name_or_path")
FORMAT_VERSION = 1
DEFAULT_NUM_DRAFT = 3
REQUEST_VOCAB = 256  # prompt tokens outside the draft's vocabulary that a row may also guess
CATCH_UP = 8  # missed positions the draft reads per call after plain steps (adaptive): one graph, padded


class EagleDraft(nn.Module):
    """The draft: ``fc`` (``2D -> D``) and one decoder layer of the model's family.

    Args:
        config: the model's (text) config; the draft layer is built from a copy with one layer,
            full attention and ``intermediate_size`` (``None``: the model's).
        vocab: ``[N]`` token ids the draft may guess (its LM head rows); ``None``: all.
        intermediate_size: the draft layer's MLP width.
    """

    def __init__(self, config: Any, vocab: torch.Tensor | None = None, intermediate_size: int | None = None):
        super().__init__()
        hidden = int(config.hidden_size)
        self.model_config = {k: v for k, v in config.to_dict().items() if k not in _NOT_KEPT}
        self.source_config = AutoConfig.for_model(**self.model_config)
        layer_config = copy.deepcopy(self.source_config)
        layer_config.num_hidden_layers = 1
        layer_config.vocab_size = 8  # the 1-layer model's own embeddings are never used
        layer_config.pad_token_id = None
        if getattr(layer_config, "layer_types", None) is not None:
            layer_config.layer_types = ["full_attention"]
        if intermediate_size is not None:
            layer_config.intermediate_size = int(intermediate_size)
        layer_config.tie_word_embeddings = False
        self.layer_model = AutoModelForCausalLM.from_config(layer_config).eval()
        self.fc = nn.Linear(2 * hidden, hidden)
        full = torch.arange(int(config.vocab_size))
        self.register_buffer("vocab", full if vocab is None else vocab.long().clone(), persistent=True)
        self.hidden_size = hidden
        self.intermediate_size = intermediate_size

    def config(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "model_config": self.model_config,
                "intermediate_size": self.intermediate_size, "vocab_size": int(self.vocab.numel())}


def check_draft_fits(model: PreTrainedModel, draft: Any) -> EagleDraft:
    """Raise ``TypeError``/``ValueError`` unless ``draft`` is an :class:`EagleDraft` for ``model``."""
    if not isinstance(draft, EagleDraft):
        raise TypeError(f"draft must be an EagleDraft (train_eagle_draft / load_eagle_draft), got {type(draft).__name__}")
    config = model.config.get_text_config(decoder=True)
    ours = draft.source_config
    for key in ("model_type", "hidden_size", "vocab_size"):
        if getattr(ours, key, None) != getattr(config, key, None):
            raise ValueError(
                f"the EAGLE draft was built for {key}={getattr(ours, key, None)!r}; this {type(model).__name__} has "
                f"{getattr(config, key, None)!r}: train a draft for this model"
            )
    return draft


class DraftRunner:
    """The draft's forward on a :class:`SlotCache` of its own: feature pairs in, guesses out.

    Runs ``draft`` as it is (its device and dtype; the engine passes a copy, training the
    module it fits) with the model's :class:`DecoderStack` for the token embeddings and the
    output embedding rows of ``draft.vocab`` as the head. Traceable.
    """

    def __init__(self, draft: EagleDraft, stack: DecoderStack, batch_size: int, max_len: int,
                 max_position: int | None = None):
        self.draft = draft
        self.max_position = max_position  # a model's learned positions: embeddings clamp to the last
        self.layer = DecoderStack(draft.layer_model)
        self.stack = stack
        out = stack.lm_head.weight.detach()
        if type(out) is not torch.Tensor:  # a quantised weight (torchao): its values
            out = out.dequantize()
        self.out = out.to(draft.fc.weight.dtype)  # [V, D] the model's output embedding (frozen)
        self.vocab = draft.vocab.to(out.device)
        self.head = self.out[self.vocab].contiguous()  # [N, D]
        self.new_cache(batch_size, max_len)
        # each row's request tokens outside the vocabulary, and their head rows (set_request_vocab)
        self.request_ids = self.vocab[:1].repeat(batch_size, REQUEST_VOCAB)  # [B, E]
        self.request_head = self.head[:1].repeat(batch_size * REQUEST_VOCAB, 1).view(batch_size, REQUEST_VOCAB, -1)

    def set_request_vocab(self, ids: torch.Tensor, lengths: torch.Tensor) -> None:
        """Let each row also guess the tokens of its own prompt (``ids [B, L]``, the first
        ``lengths[b]`` real) that the vocabulary lacks, up to :data:`REQUEST_VOCAB` (the most
        recent): answers copy names and rare words from their request. Host work, once per request."""
        filler = self.vocab[0]
        for row in range(ids.shape[0]):
            tokens = ids[row, : int(lengths[row])].to(self.vocab.device)
            tokens = tokens[~torch.isin(tokens, self.vocab)]
            first = {int(t): None for t in reversed(tokens.tolist())}  # unique, most recent first
            chosen = torch.tensor(list(first)[:REQUEST_VOCAB], dtype=torch.long, device=self.vocab.device)
            row_ids = torch.full((REQUEST_VOCAB,), int(filler), dtype=torch.long, device=self.vocab.device)
            row_ids[: chosen.numel()] = chosen
            self.request_ids[row].copy_(row_ids)
        self.request_head.copy_(self.out[self.request_ids])

    def new_cache(self, batch_size: int, max_len: int) -> None:
        """A fresh draft cache (training builds one per batch: its writes carry autograd history)."""
        weight = self.draft.fc.weight
        self.cache = SlotCache(self.draft.layer_model.config, batch_size, max_len, dtype=weight.dtype, device=weight.device)

    def pairs(self, features: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Draft-layer outputs ``[B, P, D]`` of ``(f_p, x_{p+1})`` pairs written at slots == positions."""
        at = positions if self.max_position is None else positions.clamp(max=self.max_position - 1)
        x = self.draft.fc(torch.cat([self.stack.embed(tokens, at), features], dim=-1))  # [B, P, D]
        mask = chain_mask(positions, self.cache.max_len, self.cache.dtype)
        return self.layer.run(x, 0, 1, mask, positions, self.cache, positions)

    def guess(self, out: torch.Tensor) -> torch.Tensor:
        """Top-1 draft tokens ``[B, ...]`` of draft features ``[B, ..., D]`` (see :meth:`ranked`)."""
        return self.ranked(out, 1)[0][..., 0]

    def ranked(self, out: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``count`` best draft tokens ``[B, ..., count]``, best first, of draft features
        ``[B, ..., D]``: over the vocabulary and each row's request tokens (distinct tokens);
        and their draft probabilities ``[B, ..., count]`` (softmax over those logits)."""
        # F.linear: a compiled decoding graph runs it on the few-row kernel (backends/packed.py)
        request = torch.einsum("b...d,bed->b...e", out, self.request_head)  # [B, ..., E]
        # fillers are vocab[0] (a request token is never in the vocabulary): never a second guess
        unused = (self.request_ids == self.vocab[0]).view(out.shape[0], *[1] * (out.dim() - 2), -1)
        logits = torch.cat([F.linear(out, self.head), request.masked_fill(unused, float("-inf"))], dim=-1)
        top, best = logits.topk(count, dim=-1)  # [B, ..., count]
        probs = (top - logits.logsumexp(dim=-1, keepdim=True)).exp()
        size = self.vocab.numel()
        index = (best - size).clamp(min=0).reshape(best.shape[0], -1)
        tokens = torch.where(best < size, self.vocab[best.clamp(max=size - 1)], self.request_ids.gather(1, index).view(best.shape))
        return tokens, probs

    def propose(self, features: torch.Tensor, tokens: torch.Tensor, base: torch.Tensor, kept: torch.Tensor, k: int,
                count: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``P`` pairs at positions ``base + j`` and guess ``k`` tokens after each row's
        ``kept``-th pair, each guess fed back for the next: ``[B, k, count]``, the ``count``
        best tokens at each of the ``k`` positions (``[..., 0]`` the guess fed back), and their
        draft probabilities ``[B, k, count]``.

        Args:
            features: ``[B, P, D]`` the model's final hidden states; tokens: ``[B, P]`` the token
                after each; base: ``[B]`` position of pair 0; kept: ``[B]`` real pairs (>= 1).
        """
        positions = base[:, None] + torch.arange(tokens.shape[1], device=base.device)  # [B, P]
        positions = positions.clamp(max=self.cache.max_len - 1)
        out = self.pairs(features, tokens, positions)  # [B, P, D]
        last = (kept - 1).clamp(min=0)[:, None]  # [B, 1]
        feature = out.gather(1, last[:, :, None].expand(-1, 1, out.shape[-1]))  # [B, 1, D]
        position = positions.gather(1, last)  # [B, 1]
        guesses = [self.ranked(feature[:, 0], count)]  # ([B, count], [B, count]) each
        for _ in range(k - 1):
            position = (position + 1).clamp(max=self.cache.max_len - 1)
            feature = self.pairs(feature, guesses[-1][0][:, :1], position)  # [B, 1, D]
            guesses.append(self.ranked(feature[:, 0], count))
        return torch.stack([g[0] for g in guesses], dim=1), torch.stack([g[1] for g in guesses], dim=1)


class EagleEngine(DecodeEngine):
    """A :class:`DecodeEngine` whose steps end in the EAGLE draft proposing the next chain.

    Args:
        model: a causal LM in eval mode whose layers transformers exposes (not modified).
        batch_size, max_len: as for :class:`DecodeEngine`.
        draft: a trained :class:`EagleDraft` for this model (copied; the given one is unchanged).
        num_draft: ``k``, tokens guessed per step (a chain).
        alternatives: the draft's next-best tokens verified beside each chain token (see :func:`eagle_strategy`).
        lookup, copy_lookup: lookup-branch lengths (see :func:`eagle_strategy`).
        **engine_options: the rest of :class:`DecodeEngine`'s options.
    """

    def __init__(self, model: PreTrainedModel, batch_size: int, max_len: int, draft: EagleDraft, num_draft: int,
                 alternatives: int = 0, lookup: int = 0, copy_lookup: int = 0, **engine_options: Any):
        super().__init__(model, batch_size, max_len, **engine_options)
        self.stack = DecoderStack(model)
        weight = next(model.parameters())
        draft = copy.deepcopy(check_draft_fits(model, draft)).to(device=weight.device, dtype=weight.dtype).eval()
        self.runner = DraftRunner(draft, self.stack, batch_size, max_len, self._max_position)
        self._propose = self._catch_up = self.runner.propose
        settings = self.compile_settings
        if settings["regional"]:  # only the model's layers compile there: compile the draft's step apart
            backend = engine_options.get("backend", "inductor")
            compiler = _compiler(True, backend, settings["mode"], settings["options"], packed=settings["packed"])
            # a code object of its own: Dynamo's recompile limit counts per code object, and every
            # engine's draft compiles a graph per step shape
            self._propose = compiler(types.MethodType(private_copy(DraftRunner.propose, f"draft{id(self):x}"), self.runner))
            # catching up after plain steps: a code object of its own
            self._catch_up = compiler(types.MethodType(private_copy(DraftRunner.propose, f"catchup{id(self):x}"), self.runner))
        self.num_draft, self.alternatives, self.lookup, self.copy_lookup = num_draft, alternatives, lookup, copy_lookup
        # span -> (step shape, (chain nodes, alternative nodes, lookup nodes)), one graph each: the
        # draft's nodes alone (0: no row has a lookup candidate), with `lookup` tokens, with
        # `copy_lookup` (steps that copy)
        self.branches = {}
        for span in {0, lookup, copy_lookup}:
            tree, nodes = branch_tree(num_draft, alternatives, span)
            self.branches[span] = (StepShape.of_tree(tree), nodes)
        self.tree = self.branches[max(lookup, copy_lookup)][0].tree  # the widest

    def prefill_forward(self, ids, positions, mask, last):  # noqa: ANN001, ANN201 - see DecodeEngine
        h = self.stack.hidden(ids, positions, mask, self.cache, positions)  # [B, L, D]
        h_last = h.gather(1, last[:, :, None].expand(-1, 1, h.shape[-1]))[:, 0]  # [B, D]
        return self.stack.lm_head(h_last), h, ids

    def catch_up(self, features: torch.Tensor, tokens: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The draft reads the pairs of positions ``base .. base + n - 1`` that plain steps
        committed without it (``features [B, n, D]``, ``tokens [B, n]``) and guesses from the
        last: ``(guesses, probabilities)`` as after a step. :data:`CATCH_UP` pairs a call, the last
        call padded (one graph for any count: a new shape would compile mid-request; the padding
        pairs are scratch past every row's position, overwritten before any query sees them)."""
        while True:
            n = min(features.shape[1], CATCH_UP)
            # fresh buffers: a full chunk cut from a longer run is a view with its strides (for one
            # row even after .contiguous()), and Dynamo guards on strides: it recompiled mid-request
            chunk = features.new_zeros(features.shape[0], CATCH_UP, features.shape[2]), tokens.new_zeros(tokens.shape[0], CATCH_UP)
            chunk[0][:, :n], chunk[1][:, :n] = features[:, :n], tokens[:, :n]
            kept = torch.full_like(base, n)
            out = self.run_graph("eagle_catch_up", _catch_up_body, *chunk, base, kept, width=0, forwards=0)
            if n == features.shape[1]:
                return out
            features, tokens, base = features[:, n:], tokens[:, n:], base + n

    def first_guesses(self, h: torch.Tensor, ids: torch.Tensor, root: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first guesses ``[B, k, 1 + alternatives]`` after the prefill (the prompt's pairs,
        the root last) and their draft probabilities."""
        self.runner.set_request_vocab(ids, self.cache.lengths)
        return self.run_graph("eagle_prompt", _prompt_body, h, ids, root, width=0, forwards=0)

    def step_forward(self, tokens, positions, slots, mask):  # noqa: ANN001, ANN201 - see DecodeEngine
        h = self.stack.hidden(tokens, positions, mask, self.cache, slots)  # [B, T, D]
        return tokens, self.stack.lm_head(h), (h, slots[:, 0].clone(memory_format=torch.contiguous_format))  # one stride, any shape

    def step_after(self, verdict: Verdict, extras: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The next guesses ``[B, k, 1 + alternatives]`` and their draft probabilities: the
        accepted path's pairs, then ``k`` guesses. After a plain step (one token, no guesses) the
        draft does not run: its pair ``(feature [B, 1, D], token [B, 1])`` is returned for
        :meth:`catch_up`."""
        h, base = extras  # [B, T, D], [B]
        if h.shape[1] == 1:
            return h, verdict.tokens
        features = h.gather(1, verdict.path[:, :, None].expand(-1, -1, h.shape[-1]))  # [B, D + 1, D]
        return self._propose(features, verdict.tokens, base, verdict.emitted, self.num_draft, 1 + self.alternatives)


def _catch_up_body(engine: EagleEngine, features: torch.Tensor, tokens: torch.Tensor, base: torch.Tensor,
                   kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return engine._catch_up(features, tokens, base, kept, engine.num_draft, 1 + engine.alternatives)


def _prompt_body(engine: EagleEngine, h: torch.Tensor, ids: torch.Tensor, root: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # h: [B, L, D] prompt features; ids: [B, L] packed prompts; root: [B] each row's first token
    lengths = engine.cache.lengths  # [B] prompt lengths (the prefill set them)
    after = torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)  # [B, L] the token after each position
    at_last = torch.arange(ids.shape[1], device=ids.device)[None, :] == (lengths - 1)[:, None]
    after = torch.where(at_last, root[:, None], after)
    base = torch.zeros_like(lengths)
    return engine.runner.propose(h, after, base, lengths, engine.num_draft, 1 + engine.alternatives)


def branch_tree(num_draft: int, alternatives: int, span: int) -> tuple[TreeSpec, tuple[list[int], list[int], list[int]]]:
    """The draft's chain of ``num_draft`` guesses with ``alternatives`` leaves beside each (the
    draft's next-best tokens in its place) and a lookup chain of ``span`` tokens, from one root,
    as a breadth-first :class:`TreeSpec`; and the node indices of the chain ``[k]``, the
    alternatives ``[k * alternatives]`` (by depth, then rank) and the lookup chain ``[span]``."""
    parents, chain, others, lookup = [-1], [], [], []
    for depth in range(max(num_draft, span)):
        if depth < num_draft:
            parent = chain[-1] if chain else 0  # the chain's guess before (its alternatives hang beside it)
            for rank in range(1 + alternatives):
                parents.append(parent)
                (others if rank else chain).append(len(parents) - 1)
        if depth < span:
            parents.append(lookup[-1] if lookup else 0)
            lookup.append(len(parents) - 1)
    return TreeSpec(tuple(parents)), (chain, others, lookup)


# ---- saving and loading ------------------------------------------------------------------------


def save_eagle_draft(draft: EagleDraft, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Write ``draft`` to a safetensors file (configuration in the metadata), optionally cast to ``dtype``."""
    if not isinstance(draft, EagleDraft):
        raise TypeError(f"expected EagleDraft, got {type(draft).__name__}")
    tensors = {
        name: (tensor if name == "vocab" or dtype is None else tensor.to(dtype)).detach().cpu()
        for name, tensor in draft.state_dict().items() if saved_tensor(name)
    }
    save_tensors(tensors, path, METADATA_KEY, draft.config())


def saved_tensor(name: str) -> bool:
    """Whether a draft tensor is saved: ``fc``, ``vocab`` and the decoder layer, not the unused
    embeddings, final norm and head of the 1-layer model that holds the layer."""
    return not name.startswith("layer_model.") or ".layers." in name


def load_eagle_draft(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> EagleDraft:
    """Read a draft written by :func:`save_eagle_draft`; ``dtype=None`` keeps the stored dtype. Eval mode."""
    config, tensors = read_with_config(path, METADATA_KEY, "EAGLE draft", FORMAT_VERSION)
    draft = EagleDraft(AutoConfig.for_model(**config["model_config"]), tensors.pop("vocab"), config["intermediate_size"])
    tensors["vocab"] = draft.vocab
    draft = draft.to(dtype=tensors["fc.weight"].dtype)
    missing, unexpected = draft.load_state_dict(tensors, strict=False)
    if unexpected or [name for name in missing if saved_tensor(name)]:
        raise ValueError(f"{path}: the EAGLE draft's tensors do not match its configuration ({missing=}, {unexpected=})")
    return draft.to(device=device, dtype=dtype).eval()


# ---- the strategy ------------------------------------------------------------------------------


def eagle_strategy(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    settings: DecodeSettings,
    *,
    draft: EagleDraft | None = None,
    num_draft: int = DEFAULT_NUM_DRAFT,
    alternatives: int = 0,
    lookup: int = 0,
    copy_lookup: int = 0,
    adaptive: bool = False,
    **options: Any,
) -> GenerateOutput:
    """The ``"eagle"`` strategy (see the module docstring). Options: ``draft`` (required),
    ``num_draft``: tokens the draft guesses per step (a chain); ``alternatives``: also verify,
    beside each of them, the draft's next ``alternatives`` best tokens in its place (leaves of the
    step's tree: no draft step added; 0: off); ``lookup``: also verify, on a
    second branch, the ``lookup`` tokens that followed the last occurrence of the text's last two
    tokens earlier in the text (prompt lookup; 0: off); ``copy_lookup``: with ``lookup``, the
    branch's length in steps whose last :data:`~dynexec_compile.decoding.lookahead.COPY_MATCH`
    tokens occurred earlier in the text (0: off; else more than ``lookup``). A copy step is taken
    when any row copies: on a CPU it pays at batch 1 (SmolLM2, batch 4: 0.35x dynexec greedy with
    ``copy_lookup=10``, 0.54x without; ``benchmarks/RESULTS.md``). Alternatives widen every step
    too: measured faster at batch 1 in fp32, slower on bf16 and int8 weights, whose few-row
    kernels' cost grows faster with rows. ``adaptive``: choose each step's shape — these guesses, the
    draft's alone without the lookup branch, or none (a plain one-token step) — by expected tokens
    per second: the step times measured on this engine and the draft's own probabilities
    (:mod:`~dynexec_compile.decoding.adaptive`); exact either way, only the speed changes — but the
    shapes depend on timings, so sampled tokens are not repeatable for a seed (their distribution
    is the model's) and counters such as tokens per forward vary from run to run. Off by default."""
    if options:
        raise TypeError(f"strategy='eagle' got unknown options {sorted(options)}; it takes draft=, num_draft=, "
                        "alternatives=, lookup=, copy_lookup= and adaptive=")
    if not isinstance(adaptive, bool):
        raise ValueError(f"strategy='eagle': adaptive must be True or False, got {adaptive!r}")
    if draft is None:
        raise ValueError("strategy='eagle' needs draft=EagleDraft (dynexec_compile.train_eagle_draft / load_eagle_draft)")
    check_draft_fits(model, draft)
    for name, value, low in (("num_draft", num_draft, 1), ("alternatives", alternatives, 0), ("lookup", lookup, 0),
                             ("copy_lookup", copy_lookup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"strategy='eagle': {name} must be an int >= {low}, got {value!r}")
    if 1 + alternatives > draft.vocab.numel():
        raise ValueError(f"strategy='eagle': alternatives={alternatives} needs more tokens than the draft's vocabulary "
                         f"of {draft.vocab.numel()} holds; use fewer")
    if copy_lookup and not (lookup and copy_lookup > lookup):
        raise ValueError(f"strategy='eagle': copy_lookup lengthens the lookup branch of the steps that copy: it needs "
                         f"lookup >= 1 and copy_lookup > lookup, got lookup={lookup}, copy_lookup={copy_lookup}")
    width = branch_tree(num_draft, alternatives, max(lookup, copy_lookup))[0].size  # the widest step
    engine = strategy_engine(
        model, input_ids, attention_mask, settings, "eagle", reserve=2 * width,
        key=("eagle", id(draft), weights_fingerprint(draft), num_draft, alternatives, lookup, copy_lookup),
        build=functools.partial(EagleEngine, draft=draft, num_draft=num_draft, alternatives=alternatives, lookup=lookup,
                                copy_lookup=copy_lookup),
    )
    proposer = _EagleProposer("eagle", engine, settings, engine.tree)
    if adaptive:
        proposer.chooser = engine.chooser
        proposer.chooser.begin()
    return decode_loop(proposer, input_ids, attention_mask, settings)


class _EagleProposer(DraftProposer):
    """EAGLE's proposer: the draft's guesses come out of the previous step's graph; with
    ``lookup``, a prompt-lookup branch per row (:class:`ContextLookup`, on the host) beside them.

    Attributes:
        copy_steps: steps that took the ``copy_lookup`` branch.
        pending: ``adaptive``: the ``(feature, token)`` pairs of plain steps the draft has not
            read yet (from position ``pending_base``); it reads them before its next guess.
    """

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        engine = self.engine
        logits, h, ids = engine.prefill_outputs(input_ids, attention_mask)  # [B, V], [B, L, D], [B, L]
        self.root = next_token(logits, self.settings)  # [B]
        self.guesses, self.confidence = engine.first_guesses(h, ids, self.root)  # [B, k, 1 + alternatives] each
        self.lookups, self.copy_steps = [], 0
        self.pending, self.pending_base = [], None
        if engine.lookup:
            lengths = engine.cache.lengths.tolist()
            self.lookups = [ContextLookup(engine.lookup, row[:n] + [root])
                            for row, n, root in zip(ids.tolist(), lengths, self.root.tolist(), strict=True)]
        return self.root

    def guess(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The draft's chain (with its alternatives), and the lookup branch where some row has a
        candidate (``copy_lookup`` tokens long where some row copies): a step without one runs
        the narrower draft-only shape. Each shape is a graph of its own."""
        engine, batch = self.engine, self.root.shape[0]
        copying = engine.copy_lookup > 0 and any(lookup.copying(COPY_MATCH) for lookup in self.lookups)
        span = engine.copy_lookup if copying else engine.lookup
        found = [lookup.candidates(1, span, COPY_MATCH if copying else 2) for lookup in self.lookups]
        span = span if any(found) else 0
        self.shape = engine.branches[span][0]
        if self.chooser is not None:
            self.shape = self._choose(span, found)
            if self.shape is self.plain:
                if not self.pending:
                    self.pending_base = engine.cache.lengths.clone()  # [B] the root's position
                self.valid = None
                return self.root[:, None], None
            if self.pending:  # the draft reads what the plain steps committed, then guesses afresh
                features, tokens = (torch.cat(parts, dim=1) for parts in zip(*self.pending, strict=True))
                self.guesses, self.confidence = engine.catch_up(features, tokens, self.pending_base)
                self.pending = []
            span = span if self.shape is engine.branches[span][0] else 0
        self.copy_steps += bool(copying and span)
        chain, others, lookup_nodes = engine.branches[span][1]
        self.lookup_node = lookup_nodes[0] if span else None  # its validity: whether the row has a candidate
        size = self.shape.tree.size
        tokens = self.root[:, None].repeat(1, size)  # [B, T]; unfilled lookup nodes: the root, never valid
        tokens[:, chain] = self.guesses[:, :, 0]
        tokens[:, others] = self.guesses[:, :, 1:].flatten(1)  # by depth, then rank: branch_tree's order
        self.valid = None
        if not span:
            return tokens, None
        self.valid = torch.ones(batch, size, dtype=torch.bool, device=tokens.device)
        for row, candidates in enumerate(found):
            if candidates:
                tokens[row, lookup_nodes] = torch.tensor(candidates[0], device=tokens.device)
            else:
                self.valid[row, lookup_nodes] = False
        return tokens, None

    def _choose(self, span: int, found: list[list[tuple[int, ...]]]) -> StepShape:
        """This step's shape by expected tokens per second (``adaptive``): the draft's expected
        accepted tokens per row from its probabilities (the chain's ``p_1 .. p_k``, each depth's
        guesses summed), scaled by its observed calibration (after plain steps, whose positions
        it has not read yet, its running mean); a row with a lookup candidate expects the larger
        of that and the span's observed acceptance."""
        engine, chooser, live = self.engine, self.chooser, self.live.float()  # [B]
        rows = live.sum().clamp(min=1)
        drafted, mean = self.expected_drafts(None if self.pending else self.confidence, engine.num_draft)
        options = [(engine.branches[0][0], 1 + mean), (self.plain, 1.0)]
        if span:
            has = torch.tensor([bool(f) for f in found], device=live.device)
            gain = torch.where(has, drafted.clamp(min=chooser.lookup_expectation(engine.branches[span][0], span)), drafted)
            options.insert(0, (engine.branches[span][0], 1 + float((gain * live).sum() / rows)))
        return chooser.choose(options)

    def accept(self, out: StepOut) -> None:
        plain = self.shape is self.plain
        if self.chooser is not None and len(self.pending) == 0:
            # the draft's first guesses against the model's token (fresh: no plain step since them);
            # the lookup branch's yield
            live = self.live
            has = self.valid[:, self.lookup_node] & live if self.valid is not None else torch.zeros_like(live)
            hits = self.chooser.first_hits(self.guesses[:, 0], self.confidence[:, 0], out.verdict.tokens[:, 0], live)
            self.chooser.observe(self.shape, float((out.verdict.accepted * has).sum()), int(has.sum()), *hits)
        if plain:
            self.pending.append(out.after)  # ([B, 1, D], [B, 1]): for the draft's next catch-up
        else:
            self.guesses, self.confidence = out.after
        if self.lookups:
            for lookup, run, kept in zip(self.lookups, out.verdict.tokens.tolist(), out.kept.tolist(), strict=True):
                lookup.extend(run[:kept])

    def extra(self, stats: GenerateStats) -> dict[str, Any]:
        engine = self.engine
        return {**super().extra(stats), "num_draft": engine.num_draft, "alternatives": engine.alternatives,
                # plain steps (adaptive) run no draft; their positions are read at the next catch-up
                "draft_forwards": (stats.steps - self.chooser.chosen.get(self.plain.name, 0)
                                   if self.chooser is not None else stats.steps) * engine.num_draft,
                "draft_vocab": int(engine.runner.vocab.numel()), "copy_steps": self.copy_steps,
                "adaptive_steps": dict(self.chooser.chosen) if self.chooser is not None else None}


__all__ = ["EagleDraft", "EagleEngine", "eagle_strategy", "load_eagle_draft", "save_eagle_draft"]
