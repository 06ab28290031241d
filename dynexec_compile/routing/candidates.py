"""What a router routes between: candidates that answer a list of prompts and say how sure they are.

A router never looks inside a model. It needs, per prompt, the answer and the model's own
confidence in it (for a cascade), so every candidate is a callable
``candidate(prompts) -> Answers``. Two adaptors cover the usual cases, and anything else with
that signature works too:

- :class:`ClassifierCandidate`: a sequence classifier (any ``transformers`` model returning
  ``.logits: [B, C]``, a ``torch.compile``'d one, an elastic model served at one ``level``).
- :class:`GeneratorCandidate`: a causal LM answering with ``max_new_tokens`` greedy tokens.

Confidences (higher = more confident, except ``entropy``), per prompt:
``max_prob`` (the top probability; for generation the mean over the generated tokens),
``entropy`` (nats; mean over tokens), ``logprob`` (the log-probability of the chosen answer;
for generation the mean token log-probability of the greedy continuation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

CONFIDENCES = ("max_prob", "entropy", "logprob")


@dataclass
class Answers:
    """A candidate's answers to ``N`` prompts.

    outputs: one answer per prompt (a class index, a list of generated token ids, ...).
    confidence: each of :data:`CONFIDENCES` -> ``[N]`` float tensor.
    """

    outputs: list[Any]
    confidence: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        n = len(self.outputs)
        for name in CONFIDENCES:
            if name not in self.confidence:
                raise ValueError(f"Answers.confidence lacks {name!r}; a candidate must give all of {CONFIDENCES}")
            if self.confidence[name].shape != (n,):
                raise ValueError(
                    f"Answers.confidence[{name!r}] has shape {tuple(self.confidence[name].shape)}; expected ({n},), one per output"
                )


class Candidate(Protocol):
    def __call__(self, prompts: Sequence[Any]) -> Answers: ...


def confidence_from_logits(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Confidences of answers read off ``logits: [..., V]`` (the answer = argmax), averaged over
    every dimension between the first and the last (generated tokens): each ``[N]``."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [N, ..., V]
    top = logp.max(dim=-1).values  # [N, ...]
    entropy = -(logp.exp() * logp).sum(dim=-1)  # [N, ...]
    dims = tuple(range(1, top.dim()))

    def mean(t: torch.Tensor) -> torch.Tensor:
        return t.mean(dim=dims) if dims else t

    return {"max_prob": mean(top.exp()), "entropy": mean(entropy), "logprob": mean(top)}


def concat_answers(parts: Sequence[Answers]) -> Answers:
    return Answers(
        [o for p in parts for o in p.outputs],
        {k: torch.cat([p.confidence[k] for p in parts]) for k in CONFIDENCES},
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
        return Answers(logits.argmax(-1).tolist(), confidence_from_logits(logits))


class GeneratorCandidate:
    """A causal LM answering text prompts with ``max_new_tokens`` greedy tokens (HF ``generate``).

    Prompts are strings; they are tokenised without special tokens and left-padded per batch.
    Outputs are the generated token ids (``list[int]``, exactly ``max_new_tokens`` long: no
    early stop, so answers of every prompt are compared token by token).
    """

    def __init__(
        self, model: Any, tokenizer: Any, max_new_tokens: int = 16, batch_size: int = 16, name: str | None = None,
    ):
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.name = name or f"causal LM ({max_new_tokens} greedy tokens)"

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        return [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]

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
            parts.append(Answers(tokens.tolist(), confidence_from_logits(logits)))
        return concat_answers(parts)


def check_candidate(candidate: Any, position: int) -> None:
    if isinstance(candidate, torch.nn.Module) or not callable(candidate):
        raise TypeError(
            f"candidate {position} is a {type(candidate).__name__}; a router candidate is a callable "
            "prompts -> Answers: wrap a model with dynexec_compile.routing.ClassifierCandidate(model, tokenizer) "
            "or GeneratorCandidate(model, tokenizer)"
        )
