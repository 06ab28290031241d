"""Run a reordered model at any of several elastic levels, switching in microseconds.

Each level is a compiled variant of ``torch.func.functional_call(model, views, args, kwargs)``
where ``views`` are that level's prefix views (``slicing.level_params``): one set of weights,
no copies. A switch is an attribute write (or a thread-local override); the next call goes to
the other level's compiled code.

Every level gets its own copy of the closure's *code object*. Dynamo keeps its cache of
compiled graphs (and its recompile budget) per code object, so separate code objects mean a
switch never evaluates another level's guards and many levels never exhaust one budget.

The level a call runs at: the innermost ``with elastic_level(r):`` of the calling thread if
any, else the level set with :func:`set_elastic_level`, else the largest level. The dynexec
backend's runtime also takes latency targets: per call ``with elastic_slo(ms):`` (between the
two above: a thread's own request beats the global default), and ``elastic={"slo_ms": ...}``
when nothing else is asked (``runtime/elastic.py``). What the last
call in this thread ran at is in :func:`elastic_stats` (and ``ElasticModel.last_stats``), and in
``dynexec_compile.last_stats()`` under ``elastic_``-prefixed keys (``elastic_level``, ...).
"""

from __future__ import annotations

import threading
import types
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from dynexec_compile.elastic.lora import LevelLoRA
from dynexec_compile.elastic.reorder import ElasticPlan, elastic_plan, lookup_plan
from dynexec_compile.elastic.slicing import (
    Anchors,
    choose_anchors,
    level_param_slices,
    level_params,
)
from dynexec_compile.runtime import stats as dynexec_stats
from dynexec_compile.runtime.overrides import NOT_SET, current, overriding

_local = threading.local()
_LEVELS: dict[int, tuple[weakref.ref, float]] = {}  # id(plan) -> (ref(plan), level)
# id(plan) -> (ref(plan), levels some torch.compile(backend="dynexec") compiled for it)
_COMPILED: dict[int, tuple[weakref.ref, frozenset[float]]] = {}


def _check_level(level: Any) -> float:
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 < level <= 1.0:
        raise ValueError(f"dynexec elastic: level={level!r} must be a fraction in (0, 1]")
    return float(level)


@contextmanager
def elastic_level(level: float) -> Iterator[None]:
    """Run every elastic model called in this thread, inside the block, at ``level``.

    Thread-local and nestable; other threads keep their own level.
    """
    with overriding("elastic_level", _check_level(level)):
        yield


def _plan_of(target: Any) -> ElasticPlan:
    if isinstance(target, ElasticModel):
        return target.plan
    module = getattr(target, "_orig_mod", target)  # torch.compile's OptimizedModule wraps it
    if not isinstance(module, nn.Module):
        raise TypeError(
            "dynexec elastic: set_elastic_level needs an ElasticModel or a (compiled) model, got "
            f"{type(target).__name__}"
        )
    plan = lookup_plan(module)
    if plan is None:
        raise ValueError(
            "dynexec elastic: this model has no elastic plan; call reorder_by_importance(model, "
            "batches) (or elastic_plan(model)) before compiling it with elastic levels"
        )
    return plan


def register_compiled_levels(plan: ElasticPlan, levels: Sequence[float]) -> None:
    """Record that a dynexec compile serves ``levels`` for ``plan``'s model (the backend's
    runtime calls this), so :func:`set_elastic_level` can refuse a level nothing compiled."""
    entry = _COMPILED.get(id(plan))
    if entry is None or entry[0]() is not plan:
        weakref.finalize(plan, _COMPILED.pop, id(plan), None)
        entry = (weakref.ref(plan), frozenset())
    _COMPILED[id(plan)] = (entry[0], entry[1] | frozenset(levels))


def compiled_levels(plan: ElasticPlan) -> frozenset[float] | None:
    """Levels dynexec compiles of ``plan``'s model serve, or ``None`` before the first compile."""
    entry = _COMPILED.get(id(plan))
    return entry[1] if entry is not None and entry[0]() is plan else None


def set_elastic_level(target: Any, level: float | None) -> None:
    """Make ``level`` the default level of ``target`` for all threads (``None``: remove it).

    ``target`` is an :class:`ElasticModel`, or a model (or ``torch.compile``'s wrapper of one)
    with a plan; the level is recorded against the model's plan, where a compiled runtime reads
    it with :func:`requested_level`. An ``ElasticModel`` checks the level is one it compiled; a
    model compiled with ``backend="dynexec"`` is checked against its configured levels once it
    has been compiled (``torch.compile`` compiles on the first call; before it, the first call
    checks).
    """
    plan = _plan_of(target)
    if level is None:
        _LEVELS.pop(id(plan), None)
        return
    level = _check_level(level)
    if isinstance(target, ElasticModel):
        target.check_level(level)
    known = compiled_levels(plan)
    if not isinstance(target, ElasticModel) and known is not None and level not in known:
        raise ValueError(
            f"dynexec elastic: level {level} was not compiled; this model was compiled with levels "
            f"{sorted(known, reverse=True)} (options={{'elastic': {{'levels': [...]}}}})"
        )
    entry = _LEVELS.get(id(plan))
    if entry is None or entry[0]() is not plan:
        weakref.finalize(plan, _LEVELS.pop, id(plan), None)
    _LEVELS[id(plan)] = (weakref.ref(plan), level)


def context_level() -> float | None:
    """The level of this thread's innermost ``elastic_level`` block, or ``None``."""
    level = current("elastic_level")
    return None if level is NOT_SET else level


def default_level(plan: ElasticPlan) -> float | None:
    """The level ``set_elastic_level`` made the default of ``plan``'s model, or ``None``."""
    entry = _LEVELS.get(id(plan))
    return entry[1] if entry is not None and entry[0]() is plan else None


def requested_level(plan: ElasticPlan, default: float) -> float:
    """The level a call for ``plan`` should run at in this thread (see the module docstring)."""
    level = context_level()
    if level is None:
        level = default_level(plan)
    return default if level is None else level


@contextmanager
def elastic_slo(ms: float | None) -> Iterator[None]:
    """Calls in this thread, inside the block, that name no level run at the largest level
    meeting ``ms`` milliseconds (``None``: no target, the largest level); overrides the compiled
    ``elastic={"slo_ms": ...}``. Thread-local and nestable."""
    if ms is not None and (isinstance(ms, bool) or not isinstance(ms, (int, float)) or not ms > 0):
        raise ValueError(f"dynexec elastic: slo ms={ms!r} must be a number > 0 or None")
    with overriding("elastic_slo", None if ms is None else float(ms)):
        yield


def context_slo() -> float | None | object:
    """The target of this thread's innermost ``elastic_slo`` block (``None``: no target), or
    ``NOT_SET`` outside any."""
    return current("elastic_slo")


def elastic_stats() -> dict[str, Any]:
    """What the last elastic call in this thread ran: ``level``, ``levels`` (compiled),
    ``heads`` and ``neurons`` kept per block, ``anchor_layers``; ``{}`` before any call."""
    return dict(getattr(_local, "stats", {}))


def record_stats(stats: dict[str, Any]) -> None:
    """Publish a call's elastic stats for :func:`elastic_stats` (used by the runtimes)."""
    _local.stats = stats


def describe_level(
    plan: ElasticPlan,
    slices: dict[str, tuple[int, int]],
    level: float,
    levels: Sequence[float],
    anchors: Sequence[int],
    lora: LevelLoRA | None = None,
) -> dict[str, Any]:
    """What ``level`` runs: query heads and neurons kept per block, the levels, the anchors,
    the rank of its LoRA (``None``: none)."""
    heads, neurons = [], []
    for spec in plan.blocks:
        q = slices.get(f"{spec.head_in[0]}.weight")
        n = slices.get(f"{spec.neuron_out}.weight")
        heads.append(q[1] // spec.head_dim if q else spec.num_heads)
        neurons.append(n[1] if n else spec.num_neurons)
    return {
        "level": level,
        "levels": tuple(levels),
        "heads": heads,
        "neurons": neurons,
        "anchor_layers": sorted(anchors),
        "lora_rank": None if lora is None else lora.rank,
    }


def _fresh_code(fn: Callable) -> Callable:
    """``fn`` with its own copy of the code object, so Dynamo gives it its own cache."""
    return types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )


def _level_fn(model: nn.Module, views: dict[str, torch.Tensor]) -> Callable:
    def run_level(*args: Any, **kwargs: Any) -> Any:
        return functional_call(model, views, args, kwargs)

    return _fresh_code(run_level)


class ElasticModel:
    """A reordered model served at several elastic levels, each a compiled variant.

    The weights of every level are prefix views of ``model``'s parameters; ``model`` itself is
    not modified by this class (reorder it first with ``reorder_by_importance``). Level LoRAs
    are served by the dynexec backend (``torch.compile(model, backend="dynexec",
    options={"elastic": ...})``) and by :func:`~dynexec_compile.elastic.lora.elastic_forward`,
    not by this class.

    Args:
        model: the (reordered) model; any model with a supported layout works, unreordered
            it is sliced in its original head order.
        levels: fractions of heads and neurons kept, each in (0, 1].
        anchor_layers: blocks kept whole (a count, ``"auto"`` or block indices).
        backend: ``torch.compile`` backend for every level (a name or a callable), or
            ``None`` to run the views eagerly.
        plan: the model's plan; default: the one ``reorder_by_importance`` registered.
        compile_options: extra keyword arguments for ``torch.compile`` (``dynamic``, ``mode``...).
    """

    def __init__(
        self,
        model: nn.Module,
        levels: Sequence[float] = (1.0, 0.75, 0.5),
        anchor_layers: Anchors = 0,
        backend: str | Callable | None = "inductor",
        plan: ElasticPlan | None = None,
        compile_options: dict[str, Any] | None = None,
    ):
        if not levels:
            raise ValueError("dynexec elastic: levels must name at least one fraction in (0, 1]")
        self.model = model
        self.plan = plan or elastic_plan(model)
        self.levels = tuple(sorted({_check_level(x) for x in levels}, reverse=True))
        self.anchors = choose_anchors(self.plan, anchor_layers)
        self.slices = {
            lv: level_param_slices(model, self.plan, lv, sorted(self.anchors)) for lv in self.levels
        }
        self.views = {lv: level_params(model, self.slices[lv]) for lv in self.levels}
        self._fns = {
            lv: self._compile(self.views[lv], backend, compile_options) for lv in self.levels
        }
        self._stats = {
            lv: describe_level(self.plan, self.slices[lv], lv, self.levels, self.anchors)
            for lv in self.levels
        }
        self.level = self.levels[0]
        self.last_stats: dict[str, Any] = {}

    def _compile(
        self, views: dict[str, torch.Tensor], backend: str | Callable | None, options: dict | None
    ) -> Callable:
        fn = _level_fn(self.model, views)
        return fn if backend is None else torch.compile(fn, backend=backend, **(options or {}))

    def check_level(self, level: float) -> float:
        """``level`` if this model compiled it, else a ``ValueError`` naming the levels."""
        if level not in self._fns:
            raise ValueError(
                f"dynexec elastic: level {level} was not compiled; this model has levels {list(self.levels)}"
            )
        return level

    def set_level(self, level: float) -> None:
        """Default level for calls outside any ``elastic_level`` block (all threads)."""
        set_elastic_level(self, level)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        level = self.check_level(requested_level(self.plan, self.level))
        out = self._fns[level](*args, **kwargs)
        self.last_stats = self._stats[level]
        record_stats(self.last_stats)
        dynexec_stats.record_stats({f"elastic_{k}": v for k, v in self.last_stats.items()})
        return out
