"""How routers are scored, RouteLLM's way: quality against the share of calls to the strong model.

A two-candidate router reduces to a score per prompt ("how much does this prompt need the strong
model") and a threshold; every threshold sends some share ``x`` of the prompts to the strong
model. Sorting prompts by score gives the router's whole curve at once:

- ``quality(x)``: mean quality when the top-``x`` share by score goes to the strong model;
- ``PGR(x) = (quality(x) - q_cheap) / (q_strong - q_cheap)``: the performance gap recovered;
- ``APGR``: the area under ``PGR(x)`` for ``x`` in [0, 1] (RouteLLM's average performance gap
  recovered; random routing scores 0.5 in expectation, a perfect router close to 1);
- ``CPT(p)``: the smallest strong-call share at which ``PGR >= p`` (call-performance threshold).

Costs: a router that picks before running anything (classifier, random) costs
``(1 - x) c_cheap + x c_strong`` per prompt, plus its own overhead; a cascade always runs the
cheap model and pays the strong one on top for the share ``x`` it escalates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Curve:
    """A router's quality against its strong-call share, at every share ``k / N``.

    share: ``[N + 1]`` in [0, 1]; quality: ``[N + 1]`` mean quality there; pgr: ``[N + 1]``;
    threshold: ``[N + 1]`` the score above which prompts go strong at that share (+inf at 0).
    """

    share: torch.Tensor
    quality: torch.Tensor
    pgr: torch.Tensor
    threshold: torch.Tensor
    q_cheap: float
    q_strong: float

    @property
    def apgr(self) -> float:
        return float(torch.trapezoid(self.pgr, self.share))

    def cpt(self, target: float) -> float:
        """Smallest strong-call share with ``PGR >= target`` (1.0 when never reached)."""
        reached = (self.pgr >= target - 1e-9).nonzero()
        return float(self.share[reached[0, 0]]) if len(reached) else 1.0

    def cost(self, c_cheap: float, c_strong: float, cascade: bool, overhead: float = 0.0) -> torch.Tensor:
        """``[N + 1]`` mean cost per prompt at every share."""
        cheap = torch.ones_like(self.share) if cascade else 1.0 - self.share
        return cheap * c_cheap + self.share * c_strong + overhead

    def cheapest_at(self, quality: float, costs: torch.Tensor) -> int | None:
        """Index of the cheapest point whose quality is at least ``quality`` (None: none is)."""
        ok = (self.quality >= quality - 1e-9).nonzero().flatten()
        if not len(ok):
            return None
        return int(ok[costs[ok].argmin()])


def curve(score: torch.Tensor, q_cheap: torch.Tensor, q_strong: torch.Tensor) -> Curve:
    """The curve of a router that sends the prompts with the highest ``score`` to the strong model.

    Args:
        score: ``[N]`` higher = more in need of the strong model (ties broken by position).
        q_cheap, q_strong: ``[N]`` each candidate's quality on each prompt.
    """
    n = score.numel()
    if not (q_cheap.shape == q_strong.shape == score.shape == (n,)) or n == 0:
        raise ValueError(
            f"score, q_cheap and q_strong must be 1-D of one non-zero length, got {tuple(score.shape)}, "
            f"{tuple(q_cheap.shape)}, {tuple(q_strong.shape)}"
        )
    order = torch.sort(score.double(), descending=True, stable=True).indices
    gain = (q_strong.double() - q_cheap.double())[order]  # [N]
    total = torch.cat([torch.zeros(1, dtype=torch.float64), gain.cumsum(0)])  # [N + 1]
    quality = q_cheap.double().mean() + total / n
    qc, qs = float(q_cheap.double().mean()), float(q_strong.double().mean())
    gap = qs - qc
    if abs(gap) < 1e-12:
        raise ValueError(
            f"the cheap and strong candidates have the same mean quality ({qc:.4g}): there is no gap to recover"
        )
    pgr = (quality - qc) / gap
    sorted_score = score.double()[order]
    threshold = torch.cat([torch.tensor([float("inf")], dtype=torch.float64), sorted_score])
    share = torch.arange(n + 1, dtype=torch.float64) / n
    return Curve(share, quality, pgr, threshold, qc, qs)


def random_curve(q_cheap: torch.Tensor, q_strong: torch.Tensor, seeds: int = 20) -> Curve:
    """The random router's curve: the mean over ``seeds`` random orders (expected APGR 0.5)."""
    curves = [
        curve(torch.rand(q_cheap.numel(), generator=torch.Generator().manual_seed(s)), q_cheap, q_strong)
        for s in range(seeds)
    ]
    first = curves[0]
    quality = torch.stack([c.quality for c in curves]).mean(0)
    pgr = torch.stack([c.pgr for c in curves]).mean(0)
    return Curve(first.share, quality, pgr, first.share.clone(), first.q_cheap, first.q_strong)


def token_accuracy(output: list[int], reference: list[int]) -> float:
    """Share of positions where the generated tokens equal the reference continuation
    (compared over the reference's length; a missing token counts as wrong)."""
    if not len(reference):
        raise ValueError("token_accuracy needs a non-empty reference continuation")
    return sum(int(a == b) for a, b in zip(output, reference)) / len(reference)


def edit_similarity(output: str, reference: str) -> float:
    """1 - Levenshtein distance / the longer length, on characters of the two stripped strings
    (CodeXGLUE's line-completion "Edit Sim", in [0, 1]; 1.0 for two empty lines)."""
    a, b = output.strip(), reference.strip()
    if not a and not b:
        return 1.0
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return 1.0 - previous[-1] / max(len(a), len(b))


def exact_match(output: str, reference: str) -> float:
    """1.0 when the two strings are equal once stripped (CodeXGLUE's line-completion EM), else 0.0."""
    return float(output.strip() == reference.strip())
