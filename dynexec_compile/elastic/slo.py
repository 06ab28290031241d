"""A level for a latency target: profile each level where it runs, serve the largest that meets.

Latency depends on the machine, the load and the input's shape, so a table written elsewhere is
wrong here. The compiled elastic runtime therefore measures: the first time a call with given
input shapes has to choose, it times the levels from the largest down (``repeats`` calls each,
after a warm-up call that also lowers a level not used before) and stops at the first level
whose estimated ``quantile`` meets the target. Then every call it serves is timed too, as a
measurement of the machine's load, so the estimates follow the load up and down
(:class:`LevelChooser`). When no level meets the target the smallest runs (and says so in the
stats).

The pieces are plain functions so that any runtime uses the same rule: :class:`LevelLatency`
(a classifier's per-call time, or a causal LM's time to first token and per-token time),
:class:`LatencyTarget`, :func:`choose_level` (the rule, testable with a made-up profile) and
:func:`measure_ms` (the timing).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


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


def sync() -> None:
    """Wait for queued CUDA work, so a wall-clock time covers it."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def measure_times(fn: Callable[[], Any], repeats: int = 10, warmup: int = 1) -> list[float]:
    """Milliseconds of ``repeats`` timed calls of ``fn`` after ``warmup`` untimed ones (CUDA
    work is waited for)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (the smallest value at or above a fraction ``q``)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def measure_ms(fn: Callable[[], Any], repeats: int = 10, warmup: int = 1, q: float = 0.9) -> float:
    """The ``q`` quantile of ``repeats`` timed calls of ``fn`` (after ``warmup`` untimed ones), ms."""
    return quantile(measure_times(fn, repeats, warmup), q)


@dataclass
class LevelChooser:
    """Per input signature, the largest level meeting a target under the machine's load now.

    A level is profiled once per signature (``repeats`` timed calls, lazily, from the largest
    level down): its *base* time is the median of those calls divided by the load factor of
    the moment. Every call the runtime serves afterwards (at a profiled level) is an
    observation ``observed / base`` of the load factor; the last ``window`` of them, across
    levels and signatures (load is the machine's), give the estimate of a level now:
    ``base * quantile(observations)``. So when other work slows the machine every level's
    estimate grows and the choice steps down, and it steps back up when the load goes,
    without timing levels that are not being served.

    Attributes:
        profiles: ``{signature: {level: LevelLatency}}``, the estimates when each level was
            profiled.
    """

    levels: Sequence[float]
    quantile: float = 0.9
    repeats: int = 10
    window: int = 50
    profiles: dict[Hashable, dict[float, LevelLatency]] = field(default_factory=dict)
    _base: dict[tuple, float] = field(default_factory=dict, repr=False)
    _ratios: deque = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._ratios = deque(maxlen=self.window)

    def _load(self, q: float) -> float:
        return quantile(self._ratios, q) if self._ratios else 1.0

    def estimate(self, signature: Hashable, level: float) -> LevelLatency | None:
        """``level``'s latency for ``signature`` under the current load, or ``None`` before it
        was profiled."""
        base = self._base.get((signature, level))
        return None if base is None else LevelLatency(level, call_ms=base * self._load(self.quantile))

    def observe(self, signature: Hashable, level: float, ms: float) -> None:
        """A served call's time, when its level was profiled for its signature."""
        base = self._base.get((signature, level))
        if base is not None:
            self._ratios.append(ms / base)

    def profile(self, signature: Hashable, level: float, run: Callable[[], Any]) -> LevelLatency:
        times = measure_times(run, self.repeats, 1)
        base = quantile(times, 0.5) / self._load(0.5)
        self._base[(signature, level)] = base
        self._ratios.extend(t / base for t in times)
        latency = self.estimate(signature, level)
        self.profiles.setdefault(signature, {})[level] = latency
        return latency

    def choose(self, signature: Hashable, target: LatencyTarget, run_level: Callable[[float], Any]) -> float:
        """The largest level meeting ``target`` for inputs of ``signature`` now; ``run_level(r)``
        runs the request at level ``r`` (timed while profiling a level not seen before)."""
        estimates = []
        for level in sorted(self.levels, reverse=True):
            latency = self.estimate(signature, level)
            if latency is None:
                latency = self.profile(signature, level, lambda lv=level: run_level(lv))
            estimates.append(latency)
            if latency.meets(target):
                break
        return choose_level(estimates, target)
