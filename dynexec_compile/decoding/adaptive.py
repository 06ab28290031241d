"""Each step's width from what it costs here and what it is expected to keep.

A step that verifies ``T`` guessed tokens per row costs more than a one-token step, and how
much more depends on the machine, the precision and the batch: on an AVX2 CPU with SmolLM2 in
fp32 a 5-token step cost 1.10x a 1-token step at batch 1 and 2.4x at batch 4, where the rows'
tokens no longer fit the memory-bound regime (``benchmarks/RESULTS.md``). A fixed width is
right for one of them only. :class:`WidthChooser` picks, before every step, the shape with the
most expected tokens per second among those the strategy offers (always including the plain
one-token step), from two measurements:

- the **cost** of each shape: the wall time of its step graph on this engine, a running
  average (the first call of a shape compiles and is not counted; a shape not yet timed is
  tried first);
- the **expected tokens** a row keeps from it, which the strategy estimates from its guesses:
  a draft's own probabilities, calibrated against how often its first guess was the model's
  token (EAGLE, draft heads), and each shape's observed acceptance on rows that had a looked-up
  guess (EAGLE's lookup branch, lookahead and prompt lookup). Those estimates are then scaled,
  per shape, by what the steps that took it kept against what was expected of them (a
  decaying sum): choosing a shape because its estimate is high makes its estimates too high
  on the steps that run it (at batch 4 on SmolLM2, EAGLE's lookup shape was expected to keep
  2.54 tokens per row and kept 2.2, enough to make it lose to the plain step).

A shape's cost and yield are measured only on the steps that run it, and both drift (the
machine's memory bandwidth, how predictable the text is): a shape scoring within
:data:`RETRY_WITHIN` of the best that has not run for :data:`RETRY_AFTER` choices runs once.
Without that, a chooser that fell back to plain steps on a stale estimate stayed there (EAGLE on
SmolLM2 at batch 1: 1.13x dynexec greedy against 1.45x for the fixed shape, session 19).

Any choice is exact: every shape is verified by the shared step, so greedy output stays
identical to greedy decoding and sampling stays lossless; only speed depends on the choice.
The choice depends on timings, so it is opt-in (``adaptive=True``): sampled tokens are then not
repeatable for a seed, and counters (tokens per forward) vary from run to run.
A chooser belongs to one engine: what it measured carries over to the engine's next requests.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dynexec_compile.decoding.verify import StepShape

EMA = 0.25  # weight of a new timing in a shape's running average
KEPT_DECAY = 0.95  # weight of the earlier steps in a shape's kept / expected sums (~20 steps)
RETRY_AFTER = 16  # steps after which a shape not chosen since, scoring within RETRY_WITHIN of the best, runs once
RETRY_WITHIN = 0.85


class WidthChooser:
    """Chooses each step's shape by expected tokens per second (see the module docstring).

    Attributes:
        costs: ``{shape name: seconds}`` (``None``: called once, not timed yet).
        hits, predicted: first-guess hits and the draft probabilities predicted for them, summed.
        accepted, counted: per shape name, tokens accepted on rows that had a looked-up guess, and those rows.
        chosen: ``{shape name: steps}`` since :meth:`begin` (one request).
        kept: per shape name, ``(tokens kept, tokens expected)`` per row on the steps that took
            it, decaying sums (:meth:`kept_on_step`).
    """

    def __init__(self) -> None:
        self.costs: dict[str, float | None] = {}
        self.hits = self.predicted = 0.0
        self.accepted: dict[str, float] = {}
        self.counted: dict[str, int] = {}
        self.chosen: dict[str, int] = {}
        self.kept: dict[str, tuple[float, float]] = {}
        self.last: tuple[str, float] | None = None  # the shape chosen last and what it was expected to keep
        self.steps = 0  # choices made
        self.when: dict[str, int] = {}  # per shape name, the choice that last took it

    def begin(self) -> None:
        """A new request: count its choices afresh (what was measured stays)."""
        self.chosen = {}

    @property
    def calibration(self) -> float:
        """Observed over predicted first-guess agreement (1 before anything was observed)."""
        return (self.hits + 2.0) / (self.predicted + 2.0)

    def lookup_expectation(self, shape: StepShape, span: int) -> float:
        """Tokens accepted on a row with a looked-up guess of ``span`` tokens in a step of
        ``shape``; before any was seen, all of them (optimistic, so that the shape gets tried)."""
        return (self.accepted.get(shape.name, 0.0) + span) / (self.counted.get(shape.name, 0) + 1.0)

    def draft_yield(self, confidence: torch.Tensor, cap: int) -> torch.Tensor:
        """``[B]`` drafted tokens each row is expected to keep: ``confidence`` ``[B, k, A]`` the
        draft's probabilities of its guesses at each depth (``[:, :, 0]`` the chain's), so depth
        ``d`` is reached with ``p_1 .. p_{d-1}`` and kept with the depth's summed mass; scaled by
        :attr:`calibration`, at most ``cap``."""
        top = confidence[:, :, 0].float()  # [B, k]
        reach = torch.cumprod(torch.cat([torch.ones_like(top[:, :1]), top[:, :-1]], dim=1), dim=1)  # [B, k]
        return ((reach * confidence.float().sum(dim=-1)).sum(dim=1) * self.calibration).clamp(max=cap)

    @staticmethod
    def first_hits(guesses: torch.Tensor, confidence: torch.Tensor, token: torch.Tensor,
                   live: torch.Tensor) -> tuple[float, float]:
        """``(hits, predicted)`` for :meth:`observe`: on the ``live`` rows, whether one of the
        first depth's ``guesses`` ``[B, A]`` was the model's ``token`` ``[B]``, and the
        probability mass ``confidence`` ``[B, A]`` the draft gave them."""
        hit = (guesses == token[:, None]).any(dim=1) & live
        return float(hit.sum()), float((confidence.float().sum(dim=1) * live).sum())

    def choose(self, options: Sequence[tuple[StepShape, float]]) -> StepShape:
        """The shape with the most ``expected tokens x its kept ratio / seconds``; one not yet timed first."""
        for shape, expected in options:
            if self.costs.get(shape.name) is None:
                choice, chosen = shape, expected
                break
        else:
            scores = [expected * self.kept_ratio(shape) / self.costs[shape.name] for shape, expected in options]
            best = max(range(len(options)), key=scores.__getitem__)
            # a close second not run for a while runs once: its cost and yield are measured only
            # when it runs, and both drift (the machine's bandwidth, the text's predictability)
            stale = [i for i, (shape, _) in enumerate(options) if scores[i] >= RETRY_WITHIN * scores[best]
                     and self.steps - self.when.get(shape.name, 0) >= RETRY_AFTER]
            choice, chosen = options[stale[0] if stale else best]
        self.steps += 1
        self.when[choice.name] = self.steps
        self.chosen[choice.name] = self.chosen.get(choice.name, 0) + 1
        self.last = (choice.name, chosen)
        return choice

    def kept_ratio(self, shape: StepShape) -> float:
        """Tokens the steps of ``shape`` kept over what was expected of them (1 before any ran;
        2 tokens of prior on each side)."""
        kept, expected = self.kept.get(shape.name, (0.0, 0.0))
        return (kept + 2.0) / (expected + 2.0)

    def kept_on_step(self, tokens: float) -> None:
        """The step of the shape :meth:`choose` returned last kept ``tokens`` per row."""
        name, expected = self.last
        kept, total = self.kept.get(name, (0.0, 0.0))
        self.kept[name] = (KEPT_DECAY * kept + tokens, KEPT_DECAY * total + expected)

    @contextlib.contextmanager
    def timing(self, shape: StepShape, device: torch.device) -> Iterator[None]:
        """Time what runs inside as a step of ``shape`` (:meth:`timed`; on CUDA, once it has run)."""
        start = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.timed(shape, time.perf_counter() - start)

    def timed(self, shape: StepShape, seconds: float) -> None:
        """Record a step of ``shape`` that took ``seconds`` (its first call is taken as a compile)."""
        if shape.name not in self.costs:
            self.costs[shape.name] = None
            return
        known = self.costs[shape.name]
        self.costs[shape.name] = seconds if known is None else (1 - EMA) * known + EMA * seconds

    def observe(self, shape: StepShape, accepted: float = 0.0, rows: int = 0, hits: float = 0.0,
                predicted: float = 0.0) -> None:
        """A step's outcome: ``accepted`` tokens on the ``rows`` that had a looked-up guess in a
        step of ``shape``, and a draft's first-guess ``hits`` against the ``predicted`` probability mass."""
        self.hits += hits
        self.predicted += predicted
        if rows:
            self.accepted[shape.name] = self.accepted.get(shape.name, 0.0) + accepted
            self.counted[shape.name] = self.counted.get(shape.name, 0) + rows
