"""A level for a latency target: profile each level where it runs, serve the largest that meets.

Latency depends on the machine, the load and the input's shape, so a table written elsewhere is
wrong here. The compiled elastic runtime therefore measures: the first time a call with given
input shapes has to choose, it times the levels from the largest down (``repeats`` calls each,
after a warm-up call that also lowers a level not used before) and stops at the first level
whose ``quantile`` of call times meets the target; the choice is remembered for those shapes.
A level that meets nothing falls back to the smallest level (and says so in the stats).

The pieces are plain functions so that any runtime uses the same rule: :class:`LevelLatency`
(a classifier's per-call time, or a causal LM's time to first token and per-token time),
:class:`LatencyTarget`, :func:`choose_level` (the rule, testable with a made-up profile) and
:func:`measure_ms` (the timing).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LatencyTarget:
    """What a request must meet; every given field must hold.

    Args:
        call_ms: one call (a classifier batch), or with ``new_tokens`` a whole generation
            (``ttft + (new_tokens - 1) * per_token``).
        ttft_ms: a causal LM's time to first token.
        per_token_ms: a causal LM's time per output token after the first.
        new_tokens: tokens the request generates (for ``call_ms`` of an LM).
    """

    call_ms: float | None = None
    ttft_ms: float | None = None
    per_token_ms: float | None = None
    new_tokens: int | None = None

    def __post_init__(self) -> None:
        given = [x for x in (self.call_ms, self.ttft_ms, self.per_token_ms) if x is not None]
        if not given or any(not (isinstance(x, (int, float)) and x > 0) for x in given):
            raise ValueError(
                f"dynexec elastic: a latency target needs call_ms, ttft_ms or per_token_ms > 0, got {self}"
            )


@dataclass(frozen=True)
class LevelLatency:
    """A level's measured latency: ``call_ms`` (classifier), or ``ttft_ms`` and
    ``per_token_ms`` (causal LM), in milliseconds."""

    level: float
    call_ms: float | None = None
    ttft_ms: float | None = None
    per_token_ms: float | None = None

    def total_ms(self, new_tokens: int | None) -> float | None:
        """One call, or a generation of ``new_tokens`` tokens."""
        if new_tokens is not None and self.ttft_ms is not None and self.per_token_ms is not None:
            return self.ttft_ms + max(0, new_tokens - 1) * self.per_token_ms
        return self.call_ms

    def meets(self, target: LatencyTarget) -> bool:
        """Whether every field ``target`` sets holds; a field the profile lacks raises."""
        checks = []
        if target.call_ms is not None:
            checks.append(("call_ms", self.total_ms(target.new_tokens), target.call_ms))
        if target.ttft_ms is not None:
            checks.append(("ttft_ms", self.ttft_ms, target.ttft_ms))
        if target.per_token_ms is not None:
            checks.append(("per_token_ms", self.per_token_ms, target.per_token_ms))
        for name, have, _ in checks:
            if have is None:
                raise ValueError(f"dynexec elastic: the target sets {name} but level {self.level}'s profile has no {name}")
        return all(have <= limit for _, have, limit in checks)


def choose_level(latencies: Iterable[LevelLatency], target: LatencyTarget | float) -> float:
    """The largest level whose latency meets ``target`` (a number is ``call_ms``); the smallest
    level when none does (the fastest there is).

    Raises:
        ValueError: no latencies.
    """
    if not isinstance(target, LatencyTarget):
        target = LatencyTarget(call_ms=target)
    ranked = sorted(latencies, key=lambda x: -x.level)
    if not ranked:
        raise ValueError("dynexec elastic: no level latencies to choose from")
    return next((x.level for x in ranked if x.meets(target)), ranked[-1].level)


def measure_ms(fn: Callable[[], Any], repeats: int = 10, warmup: int = 1, quantile: float = 0.9) -> float:
    """The ``quantile`` of ``repeats`` timed calls of ``fn`` (after ``warmup`` untimed ones), ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[min(len(times) - 1, max(0, math.ceil(quantile * len(times)) - 1))]


@dataclass
class LevelChooser:
    """Per input signature, the level that meets a target, profiled lazily (module docstring).

    Attributes:
        profiles: ``{signature: {level: LevelLatency}}``, what was measured.
    """

    levels: Sequence[float]
    quantile: float = 0.9
    repeats: int = 10
    profiles: dict[Hashable, dict[float, LevelLatency]] = field(default_factory=dict)

    def choose(self, signature: Hashable, target: LatencyTarget, run_level: Callable[[float], Any]) -> float:
        """The largest level meeting ``target`` for inputs of ``signature``; ``run_level(r)``
        runs the request at level ``r`` (timed while profiling)."""
        profile = self.profiles.setdefault(signature, {})
        for level in sorted(self.levels, reverse=True):
            if level not in profile:
                ms = measure_ms(lambda lv=level: run_level(lv), self.repeats, 1, self.quantile)
                profile[level] = LevelLatency(level, call_ms=ms)
            if profile[level].meets(target):
                break
        return choose_level(profile.values(), target)
