"""The target sampling distribution: temperature, top-k, top-p, and draws from it.

One definition shared by plain sampling and by speculative rejection sampling, so that
"lossless" always refers to the same distribution. The warps are applied in the order, and
with the tie and boundary rules, of transformers' ``TemperatureLogitsWarper``,
``TopKLogitsWarper`` and ``TopPLogitsWarper`` (tested against them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How logits become a sampling distribution.

    Args:
        temperature: divides the logits; > 0.
        top_k: keep the ``top_k`` largest logits (ties with the k-th kept); ``None`` keeps all.
        top_p: keep the smallest set of most likely tokens whose probability reaches
            ``top_p``; in (0, 1]; ``None`` or 1.0 keeps all.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t) or t <= 0:
            raise ValueError(f"temperature must be a number > 0, got {t!r}; for greedy decoding use strategy='greedy'")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {k!r}")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0):
            raise ValueError(f"top_p must be None or a number in (0, 1], got {p!r}")


def warp_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p; filtered entries become ``-inf``.

    Args:
        logits: ``[..., V]``.
    Returns:
        ``[..., V]`` warped logits (float32 or the input's dtype).
    """
    shape = logits.shape
    scores = logits.reshape(-1, shape[-1])  # [N, V]
    if params.temperature != 1.0:
        scores = scores / params.temperature
    if params.top_k is not None:
        k = min(params.top_k, scores.shape[-1])
        kth = torch.topk(scores, k).values[..., -1:]  # [N, 1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if params.top_p is not None and params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)  # ascending, as transformers
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)  # [N, V]
        drop_sorted = cum <= (1 - params.top_p)
        drop_sorted[..., -1:] = False  # keep at least the most likely token
        drop = drop_sorted.scatter(1, order, drop_sorted)
        scores = scores.masked_fill(drop, -math.inf)
    return scores.reshape(shape)


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The target distribution ``softmax(warp(logits))`` in float32, ``[..., V]``."""
    return warp_logits(logits.float(), params).softmax(dim=-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per distribution: ``[..., V]`` probabilities -> ``[...]`` int64 tokens."""
    flat = probs.reshape(-1, probs.shape[-1])  # [N, V]
    tokens = torch.multinomial(flat, 1, generator=generator)  # [N, 1]
    return tokens.reshape(probs.shape[:-1])
