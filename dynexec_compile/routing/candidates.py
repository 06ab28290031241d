"""What a router routes between: candidates that answer a list of prompts and say how sure they are.

A router never looks inside a model. It needs, per prompt, the answer and the model's own
confidence in it (for a cascade), so every candidate is a callable
``candidate(prompts) -> Answers``. Two adaptors cover the usual cases, and anything else with
that signature works too:

- :class:`ClassifierCandidate`: a sequence classifier (any ``transformers`` model returning
  ``.logits: [B, C]``, a ``torch.compile``'d one, an elastic model served at one ``level``).
- :class:`GeneratorCandidate`: a causal LM answering with ``max_new_tokens`` greedy tokens
  (optionally cut at a stop string, e.g. one line of code).
- :class:`ExitCandidates`: the exits of one early-exit model and the full model, a *nested*
  chain: a cascade over them continues from the hidden state where the previous exit stopped
  (the early-exit runtime runs it), so escalating pays only the blocks not yet run.

Confidences (higher = more confident, except ``entropy``), per prompt:
``max_prob`` (the top probability; for generation the mean over the generated tokens),
``entropy`` (nats; mean over tokens), ``logprob`` (the log-probability of the chosen answer;
for generation the mean token log-probability of the greedy continuation).

Answers also carry ``features``, a small vector per answer of the candidate's own uncertainty
(:func:`uncertainty_features`: quantiles of its token log-probabilities, mean entropy, answer
length), which a *learned* cascade (``Router(..., confidence="learned")``) maps to a deferral
decision: one mean over tokens loses what matters (Gupta et al. 2024, "Language model cascades:
token-level uncertainty and beyond").
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from dynexec_compile.runtime.stats import last_stats, record_stats

CONFIDENCES = ("max_prob", "entropy", "logprob")


@dataclass
class Answers:
    """A candidate's answers to ``N`` prompts.

    outputs: one answer per prompt (a class index, a list of generated token ids, ...).
    confidence: each of :data:`CONFIDENCES` -> ``[N]`` float tensor.
    features: ``[N, F]`` uncertainty features of each answer (for a learned cascade), or None.
    """

    outputs: list[Any]
    confidence: dict[str, torch.Tensor]
    features: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = len(self.outputs)
        for name in CONFIDENCES:
            if name not in self.confidence:
                raise ValueError(f"Answers.confidence lacks {name!r}; a candidate must give all of {CONFIDENCES}")
            if self.confidence[name].shape != (n,):
                raise ValueError(
                    f"Answers.confidence[{name!r}] has shape {tuple(self.confidence[name].shape)}; expected ({n},), one per output"
                )
        if self.features is not None and (self.features.dim() != 2 or self.features.shape[0] != n):
            raise ValueError(f"Answers.features has shape {tuple(self.features.shape)}; expected ({n}, F), one row per output")


class Candidate(Protocol):
    def __call__(self, prompts: Sequence[Any]) -> Answers: ...


def confidence_from_logits(logits: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Confidences of answers read off ``logits: [N, V]`` or ``[N, T, V]`` (the answer = argmax),
    averaged over the generated tokens ``T`` (only where ``mask: [N, T]`` is true): each ``[N]``."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [N, ..., V]
    top = logp.max(dim=-1).values  # [N, ...]
    entropy = -(logp.exp() * logp).sum(dim=-1)  # [N, ...]
    dims = tuple(range(1, top.dim()))
    if mask is not None and mask.shape != top.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}; expected {tuple(top.shape)}, one flag per generated token")

    def mean(t: torch.Tensor) -> torch.Tensor:
        if not dims:
            return t
        if mask is None:
            return t.mean(dim=dims)
        return (t * mask).sum(dim=dims) / mask.sum(dim=dims).clamp(min=1)

    return {"max_prob": mean(top.exp()), "entropy": mean(entropy), "logprob": mean(top)}


FEATURE_QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)


def uncertainty_features(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """What a learned cascade reads about each answer: ``[N, 8]`` = the quantiles
    :data:`FEATURE_QUANTILES` of the chosen tokens' log-probabilities, their mean, the mean
    entropy and log(1 + answered tokens), from ``logits: [N, V]`` or ``[N, T, V]`` (tokens
    where ``mask: [N, T]`` is true)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if logp.dim() == 2:
        logp = logp.unsqueeze(1)  # [N, 1, V]
    top = logp.max(dim=-1).values  # [N, T]
    entropy = -(logp.exp() * logp).sum(dim=-1)  # [N, T]
    mask = torch.ones_like(top, dtype=torch.bool) if mask is None else mask.reshape(top.shape)
    count = mask.sum(1).clamp(min=1)  # [N]
    held = torch.where(mask, top, torch.full_like(top, float("nan")))
    quantiles = torch.nanquantile(held, torch.tensor(FEATURE_QUANTILES), dim=1).T.nan_to_num(0.0)  # [N, Q]
    mean = lambda t: (t * mask).sum(1) / count  # noqa: E731
    return torch.cat([quantiles, mean(top)[:, None], mean(entropy)[:, None], torch.log1p(count.float())[:, None]], 1)


def concat_answers(parts: Sequence[Answers]) -> Answers:
    with_features = all(p.features is not None for p in parts)
    return Answers(
        [o for p in parts for o in p.outputs],
        {k: torch.cat([p.confidence[k] for p in parts]) for k in CONFIDENCES},
        torch.cat([p.features for p in parts]) if with_features and parts else None,
    )


def _level_context(level: float | None):
    if level is None:
        return contextlib.nullcontext()
    from dynexec_compile.elastic import elastic_level

    return elastic_level(level)


class ClassifierCandidate:
    """A sequence classifier answering sentences with class indices.

    Args:
        model: called as ``model(**tokenizer(batch))``; ``.logits`` (or ``[0]``) is ``[B, C]``.
        tokenizer: a ``transformers`` tokenizer for ``model``.
        level: run under ``dynexec_compile.elastic_level(level)`` (an elastic model compiled
            with ``options={"elastic": {"levels": [...]}}``); None: as it is.
        batch_size, max_length: batching and truncation; batches are padded to ``max_length``
            when ``pad_to_max_length`` (one static shape per compiled graph).
    """

    def __init__(
        self, model: Any, tokenizer: Any, level: float | None = None, batch_size: int = 32,
        max_length: int = 64, pad_to_max_length: bool = False, name: str | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.level = model, tokenizer, level
        self.batch_size, self.max_length, self.pad_to_max_length = batch_size, max_length, pad_to_max_length
        self.name = name or (f"classifier at elastic level {level}" if level is not None else "classifier")

    @torch.no_grad()
    def logits(self, sentences: Sequence[str]) -> torch.Tensor:
        """``[N, C]`` fp32 logits of ``sentences``."""
        out = []
        padding = "max_length" if self.pad_to_max_length else True
        for start in range(0, len(sentences), self.batch_size):
            chunk = list(sentences[start : start + self.batch_size])
            n = len(chunk)
            if self.pad_to_max_length:  # fill the last batch up: one compiled shape
                chunk += [chunk[-1]] * (self.batch_size - n)
            enc = self.tokenizer(chunk, padding=padding, truncation=True, max_length=self.max_length, return_tensors="pt")
            with _level_context(self.level):
                res = self.model(**enc)
            logits = res.logits if hasattr(res, "logits") else res[0]  # [B, C]
            out.append(logits[:n].float())
        return torch.cat(out) if out else torch.zeros(0, 0)

    def __call__(self, sentences: Sequence[str]) -> Answers:
        if not len(sentences):
            return Answers([], {k: torch.zeros(0) for k in CONFIDENCES})
        logits = self.logits(sentences)  # [N, C]
        return Answers(logits.argmax(-1).tolist(), confidence_from_logits(logits), uncertainty_features(logits))


class GeneratorCandidate:
    """A causal LM answering text prompts with ``max_new_tokens`` greedy tokens (HF ``generate``).

    Prompts are strings; they are tokenised without special tokens and left-padded per batch.
    Outputs: without ``stop``, the generated token ids (``list[int]``, exactly ``max_new_tokens``
    long: no early stop, so answers of every prompt are compared token by token); with ``stop``
    (e.g. ``"\n"``: complete one line), the decoded text before the first ``stop``, and the
    confidences are averaged over the tokens up to the one that holds it (the model's confidence
    in the answer it gave, not in what it would write after).
    """

    def __init__(
        self, model: Any, tokenizer: Any, max_new_tokens: int = 16, batch_size: int = 16, name: str | None = None,
        stop: str | None = None,
    ):
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
        if stop is not None and (not isinstance(stop, str) or not stop):
            raise ValueError(f"stop must be a non-empty string or None, got {stop!r}")
        self.model, self.tokenizer, self.stop = model, tokenizer, stop
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.name = name or f"causal LM ({max_new_tokens} greedy tokens)"

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        return [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]

    def cut(self, ids: Sequence[int]) -> tuple[str, int]:
        """The text of ``ids`` before ``stop`` and how many tokens reach it (all when it never comes)."""
        for i in range(len(ids)):
            text = self.tokenizer.decode(ids[: i + 1])
            if self.stop in text:
                return text.split(self.stop, 1)[0], i + 1
        return self.tokenizer.decode(ids), len(ids)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> Answers:
        if not len(prompts):
            return Answers([], {k: torch.zeros(0) for k in CONFIDENCES})
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        parts = []
        for start in range(0, len(prompts), self.batch_size):
            ids = self.encode(prompts[start : start + self.batch_size])
            width = max(len(i) for i in ids)
            input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids])  # [B, L], left-padded
            mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])  # [B, L]
            out = self.model.generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                min_new_tokens=self.max_new_tokens, do_sample=False, output_logits=True,
                return_dict_in_generate=True, pad_token_id=pad,
            )
            tokens = out.sequences[:, width:]  # [B, T]
            logits = torch.stack(out.logits, dim=1)  # [B, T, V]
            if self.stop is None:
                parts.append(Answers(tokens.tolist(), confidence_from_logits(logits), uncertainty_features(logits)))
                continue
            texts, kept = zip(*(self.cut(row) for row in tokens.tolist()))
            answered = torch.arange(tokens.shape[1]).unsqueeze(0) < torch.tensor(kept).unsqueeze(1)  # [B, T]
            parts.append(Answers(list(texts), confidence_from_logits(logits, answered), uncertainty_features(logits, answered)))
        return concat_answers(parts)


class ExitCandidates:
    """Router candidates from one early-exit classifier: an exit after each of ``blocks``, then the
    full model — a *nested* chain.

    Each candidate alone runs from the input to its exit (``compile`` with that one exit, always
    taken), which is what calibration needs. A ``Router(..., router="cascade")`` over candidates of
    one chain (in chain order, the full model last) does not run them one after another: it runs
    the early-exit runtime once, with its confidence and threshold as the exit rule, so an
    escalated prompt continues from the hidden state where the previous exit stopped, and a
    prompt that stops at candidate ``k`` costs ``costs[k]`` (the cost of running up to that exit),
    not the sum of every candidate tried.

    Args:
        model: a Hugging Face sequence classifier; with ``heads="trained"`` its trained exit heads
            attached (``dynexec_compile.attach_exit_heads``) after every block of ``blocks``.
            Not modified.
        tokenizer: its tokenizer.
        blocks: 0-based block indices with an exit candidate, increasing, below the last block.
        heads: the early-exit heads option (``"trained"``, ``"shared"`` or ``"auto"``).
        lowering: the stages' lowering (``"eager"``, ``"inductor"``, ...); the full candidate is
            ``model`` itself for ``"eager"``, else ``torch.compile(model, backend=lowering)``.
        batch_size, max_length, pad_to_max_length: batching, as :class:`ClassifierCandidate`.

    Attributes:
        candidates: the :class:`ClassifierCandidate` of every exit, then of the full model.
    """

    def __init__(
        self, model: Any, tokenizer: Any, blocks: Sequence[int], heads: str = "trained", lowering: str = "eager",
        batch_size: int = 16, max_length: int = 64, pad_to_max_length: bool = True,
    ):
        blocks = list(blocks)
        depth = int(model.config.num_hidden_layers)
        if not blocks or any(isinstance(b, bool) or not isinstance(b, int) for b in blocks) or blocks != sorted(set(blocks)) \
                or not 0 <= blocks[0] or blocks[-1] >= depth - 1:
            raise ValueError(
                f"blocks must be increasing block indices in 0..{depth - 2} (an exit after the last block is the full model), got {blocks}"
            )
        self.model, self.tokenizer, self.blocks = model, tokenizer, blocks
        self.heads, self.lowering = heads, lowering
        self.batching = {"batch_size": batch_size, "max_length": max_length, "pad_to_max_length": pad_to_max_length}
        self._cascades: dict[tuple[tuple[int, ...], str, float], Any] = {}
        full = model if lowering == "eager" else torch.compile(model, backend=lowering)
        self.candidates = [
            ClassifierCandidate(self._compile([b], "max_prob", _ALWAYS), tokenizer, name=f"exit after block {b}", **self.batching)
            for b in blocks
        ] + [ClassifierCandidate(full, tokenizer, name="full model", **self.batching)]
        for i, candidate in enumerate(self.candidates):
            candidate.chain, candidate.chain_index = self, i

    def _compile(self, blocks: Sequence[int], rule: str, threshold: float) -> _EarlyExitCall:
        options = {"lowering": self.lowering, "strict": True,
                   "early_exit": {"rule": rule, "threshold": threshold, "layers": list(blocks), "heads": self.heads}}
        # a symbolic batch: samples that exit leave the batch (compaction)
        return _EarlyExitCall(torch.compile(self.model, backend="dynexec", options=options, dynamic=True))

    @torch.no_grad()
    def cascade(
        self, prompts: Sequence[str], indices: Sequence[int], confidence: str, threshold: float
    ) -> tuple[Answers, list[int]]:
        """Run the nested cascade over the chain's candidates ``indices`` (increasing, ending with
        the full model): a prompt stops at the first exit whose ``confidence`` does not call for
        escalation (``max_prob >= threshold`` / ``entropy <= threshold``), else runs on. Returns the
        answers and, per prompt, the index (into ``indices``) of the candidate that answered."""
        indices = list(indices)
        if indices != sorted(set(indices)) or indices[-1] != len(self.blocks):
            raise ValueError(f"a nested cascade runs chain candidates in order and ends with the full model; got {indices}")
        if confidence not in ("max_prob", "entropy"):
            raise ValueError(
                f"a nested cascade exits by the early-exit rules max_prob or entropy; got confidence={confidence!r} "
                "(for a classifier, logprob ranks answers exactly like max_prob: use confidence='max_prob')"
            )
        never = threshold <= 0.0 if confidence == "max_prob" else threshold == math.inf
        always = threshold > 1.0 if confidence == "max_prob" else threshold < 0.0
        if never or always or len(indices) == 1:  # one candidate answers everything: run it alone
            k = 0 if never else len(indices) - 1
            return self.candidates[indices[k]](prompts), [k] * len(prompts)
        if confidence == "entropy":  # the runtime exits on entropy < t; the router stops on entropy <= t
            threshold = float(np.nextafter(np.float32(threshold), np.float32(np.inf)))
        blocks = tuple(self.blocks[i] for i in indices[:-1])
        key = (blocks, confidence, float(threshold))
        if key not in self._cascades:
            self._cascades[key] = self._compile(blocks, confidence, float(threshold))
        compiled = self._cascades[key]
        runner = ClassifierCandidate(compiled, self.tokenizer, **self.batching)
        position = {b: k for k, b in enumerate(blocks)}
        logits, stops = [], []
        for start in range(0, len(prompts), runner.batch_size):
            chunk = list(prompts[start : start + runner.batch_size])
            logits.append(runner.logits(chunk))
            exits = last_stats()["exit_layer"][: len(chunk)]  # block after which each sample left
            stops += [position.get(b, len(blocks)) for b in exits]
        logits = torch.cat(logits)  # [N, C]
        return Answers(logits.argmax(-1).tolist(), confidence_from_logits(logits), uncertainty_features(logits)), stops


_ALWAYS = 1e-9  # a max_prob exit threshold every answer meets: the exit is always taken
RECOMPILE_LIMIT = 64


class _EarlyExitCall:
    """One early-exit compile of the chain's model, checked to have run through dynexec.

    Every exit candidate and every cascade threshold is its own ``torch.compile`` of the same
    ``forward``; Dynamo keeps at most ``recompile_limit`` (8) graphs per function and then runs
    it *eagerly*, which here would silently answer with the full model. Calls raise that limit
    while they run, and a call that did not go through the early-exit runtime is an error.
    """

    def __init__(self, compiled: Any):
        self.compiled = compiled

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        record_stats({})
        limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        with torch._dynamo.config.patch(recompile_limit=limit):
            out = self.compiled(*args, **kwargs)
        if "exit_layer" not in last_stats():
            raise RuntimeError(
                "dynexec: an ExitCandidates model ran without the early-exit runtime (Dynamo fell back to eager, "
                f"e.g. past its recompile limit of {limit} graphs for this forward); its answers would be the full "
                "model's. Use fewer exit blocks or raise torch._dynamo.config.recompile_limit"
            )
        return out


def nested_chain(candidates: Sequence[Any]) -> ExitCandidates | None:
    """The :class:`ExitCandidates` chain ``candidates`` come from, in chain order and ending with
    its full model; None when they are not such a chain (independent candidates)."""
    chain = getattr(candidates[0], "chain", None)
    if chain is None or any(getattr(c, "chain", None) is not chain for c in candidates):
        return None
    indices = [c.chain_index for c in candidates]
    if indices != sorted(set(indices)) or indices[-1] != len(chain.blocks):
        return None
    return chain


def check_candidate(candidate: Any, position: int) -> None:
    if isinstance(candidate, torch.nn.Module) or not callable(candidate):
        raise TypeError(
            f"candidate {position} is a {type(candidate).__name__}; a router candidate is a callable "
            "prompts -> Answers: wrap a model with dynexec_compile.routing.ClassifierCandidate(model, tokenizer) "
            "or GeneratorCandidate(model, tokenizer)"
        )
