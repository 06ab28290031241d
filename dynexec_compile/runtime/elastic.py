"""The elastic runtime: the level (and its LoRA) chosen per call, each compiled on first use.

``slice_elastic_levels`` leaves one graph per level, each reading prefix views of the same
parameters. On every call this runtime picks the level: the innermost ``with
elastic_level(r):`` of the calling thread; else the thread's ``with elastic_slo(ms):`` target;
else ``set_elastic_level(compiled, r)``; else the compiled ``elastic={"slo_ms": ...}``; else the
largest level. A latency target runs the largest level that meets it for the call's input
shapes (``elastic/slo.py``). With the
level comes its LoRA when one is attached (``attach_level_loras``; ``elastic={"lora": ...}``).

Each (level graph, LoRA shapes) pair is compiled once by the backend's whole pipeline on the
level's graph (``compile_variant``: block analysis, the passes after ``slice_elastic_levels``
such as stages and early exit, lowering): the first time it runs, for a graph with static
shapes or the eager lowering; up front (inside the backend call) for a graph with symbolic
sizes lowered by Inductor or TensorRT, because those compilers add shape guards while they
lower and only guards added inside the backend call are installed by Dynamo; and up front for
every graph with ``precompile=True``. A lazy compile re-enters Dynamo's tracing context of the
original compile. Dynamo's guards
do not depend on the level, so switching never recompiles the Dynamo graph; after a level's
first run a switch is a dictionary lookup. The LoRA's tensors are passed as extra graph
inputs: attaching another LoRA of the same shapes reuses the compiled code.

What ran is published in ``dynexec_compile.last_stats()`` (``elastic_level``, ``elastic_heads``,
``elastic_lora_rank``, ``elastic_slo_ms``, ``elastic_estimated_ms``, ...) and ``elastic_stats()``.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.fx as fx

from dynexec_compile.config import ElasticConfig
from dynexec_compile.elastic.lora import LevelLoRA, attached_level_lora
from dynexec_compile.elastic.runtime import (
    context_level,
    context_slo,
    default_level,
    describe_level,
    register_compiled_levels,
)
from dynexec_compile.elastic.runtime import record_stats as record_elastic_stats
from dynexec_compile.elastic.slo import LatencyTarget, LevelChooser, sync
from dynexec_compile.passes.elastic import ElasticGraphs
from dynexec_compile.runtime.overrides import NOT_SET
from dynexec_compile.runtime.stats import last_stats, record_stats

log = logging.getLogger("dynexec")
CompileVariant = Callable[[str, fx.GraphModule, list], Callable]


class ElasticRuntime:
    """Calls the compiled graph of the requested level (with its LoRA).

    Attributes:
        levels: the configured levels, largest first.
        lowerings: level graphs compiled so far (each distinct graph and LoRA shape once).
        chooser: the latency profile behind ``slo_ms`` (``chooser.profiles``).
    """

    def __init__(self, graphs: ElasticGraphs, cfg: ElasticConfig, lowering: str, compile_variant: CompileVariant):
        self.graphs = graphs
        self.cfg = cfg
        self.plan = graphs.plan
        self.levels = graphs.levels
        self._compile_variant = compile_variant
        self._tracing = torch._guards.TracingContext.try_get()  # re-entered by lazy compiles
        self._compiled: dict[tuple, Callable] = {}
        self.lowerings = 0
        self.chooser = LevelChooser(self.levels, cfg.slo_quantile, cfg.profile_repeats)
        self._data_slots = [
            i for i, x in enumerate(graphs.example_inputs) if not isinstance(x, torch.nn.Parameter)
        ]
        self._stats: dict[tuple, dict[str, Any]] = {}
        register_compiled_levels(self.plan, self.levels)
        # A compiler that specialises on symbolic sizes (Inductor, TensorRT) adds shape guards
        # while it lowers; only inside the backend call does Dynamo install them. So a graph
        # with symbolic sizes gets every level lowered now; eager lowering and static graphs
        # lower each level on first use.
        self.lazy = not cfg.precompile and (lowering == "eager" or not _symbolic(graphs.example_inputs))
        self._compiling_now = True
        if not self.lazy:
            for level in self.levels:
                self._fn(level, self._lora(level))
        self._compiling_now = False

    # --- what a call runs ------------------------------------------------------------------

    def _lora(self, level: float) -> LevelLoRA | None:
        if self.cfg.lora == "off":
            return None
        lora = attached_level_lora(self.plan, level)
        if lora is None and self.cfg.lora == "required" and level < 1.0:
            raise ValueError(
                f"dynexec elastic: level {level} has no LoRA and this model was compiled with "
                "elastic={'lora': 'required'}; attach one with attach_level_loras(model, [lora]) "
                "(train it with train_level_lora, or load it with LevelLoRA.load)"
            )
        if lora is not None and lora.anchors != self.graphs.anchors:
            raise ValueError(
                f"dynexec elastic: the LoRA attached for level {level} was made with anchor blocks "
                f"{list(lora.anchors)}, this model was compiled with {list(self.graphs.anchors)}"
            )
        return lora

    def _fn(self, level: float, lora: LevelLoRA | None) -> Callable:
        """The compiled callable of ``level`` with ``lora``'s shapes, compiled on first use."""
        key = (self.graphs.slices_key(level), None if lora is None else lora.signature)
        fn = self._compiled.get(key)
        if fn is None and not (self.lazy or self._compiling_now):
            raise ValueError(
                f"dynexec elastic: level {level} with {'a LoRA of new shapes' if lora else 'no LoRA'} was not "
                "compiled: this graph has symbolic sizes, so its levels were compiled with it, with the LoRAs "
                "attached then; attach the LoRAs before the first call (or call torch._dynamo.reset() and "
                "call again), or use lowering='eager'"
            )
        if fn is None:
            gm = self.graphs.graph(level, lora)
            inputs = [*self.graphs.example_inputs, *(lora.tensors() if lora is not None else ())]
            shape_env = getattr(getattr(self._tracing, "fake_mode", None), "shape_env", None)
            guards = len(shape_env.guards) if shape_env is not None else 0
            with torch._guards.tracing(self._tracing) if self._tracing is not None else nullcontext():
                fn = self._compile_variant(f"level {level}", gm, inputs)
            if shape_env is not None and len(shape_env.guards) > guards and _symbolic(self.graphs.example_inputs):
                _warn(
                    f"dynexec elastic: compiling level {level} on first use added "
                    f"{len(shape_env.guards) - guards} shape guard(s) after Dynamo installed its "
                    "guards; compile with elastic={'precompile': True} to have them checked"
                )
            self._compiled[key] = fn
            self.lowerings += 1
        return fn

    def _signature(self, args: tuple) -> tuple:
        return tuple(
            tuple(args[i].shape) if isinstance(args[i], torch.Tensor) else args[i] for i in self._data_slots
        )

    def _level(self, args: tuple) -> tuple[float, float | None]:
        """(level, latency target in ms or None) of this call: the thread's ``elastic_level``,
        else its ``elastic_slo``, else ``set_elastic_level``'s default, else ``slo_ms``, else
        the largest level."""
        level, slo = context_level(), None
        if level is None:
            slo = context_slo()
            if slo is NOT_SET:
                level = default_level(self.plan)
                slo = self.cfg.slo_ms if level is None else None
        if level is not None:
            if level not in self.levels:
                raise ValueError(
                    f"dynexec elastic: level {level} was requested but this model was compiled with "
                    f"levels {list(self.levels)}; request one of them, or add it to "
                    "torch.compile(..., options={'elastic': {'levels': [...]}})"
                )
            return level, None
        if slo is None:
            return self.levels[0], None
        target = LatencyTarget(call_ms=slo)
        return self.chooser.choose(self._signature(args), target, lambda lv: self._run(lv, args)), slo

    def _run(self, level: float, args: tuple) -> Any:
        lora = self._lora(level)
        fn = self._fn(level, lora)
        return fn(*args, *lora.tensors()) if lora is not None else fn(*args)

    def __call__(self, *args: Any) -> Any:
        level, slo = self._level(args)
        lora = self._lora(level)
        record_stats({})  # what the level's own runtime (early exit) records for this call stays
        start = time.perf_counter()
        out = self._run(level, args)
        stats = self._describe(level, lora)
        record_elastic_stats({**stats, "slo_ms": slo})
        published = {f"elastic_{k}": v for k, v in stats.items()}
        if slo is not None:  # the served call is a measurement of the load now
            sync()
            signature = self._signature(args)
            self.chooser.observe(signature, level, (time.perf_counter() - start) * 1e3)
            estimate = self.chooser.estimate(signature, level).call_ms
            published.update(elastic_slo_ms=slo, elastic_estimated_ms=estimate, elastic_slo_met=estimate <= slo)
        record_stats({**last_stats(), **published})
        return out

    def _describe(self, level: float, lora: LevelLoRA | None) -> dict[str, Any]:
        key = (level, None if lora is None else lora.rank)
        if key not in self._stats:
            self._stats[key] = describe_level(
                self.plan, self.graphs.slices[level], level, self.levels, self.graphs.anchors, lora
            )
        return self._stats[key]


_warned: set[str] = set()


def _warn(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.warning(msg)
        warnings.warn(msg, stacklevel=3)


def _symbolic(example_inputs: list) -> bool:
    """Whether any graph input has a symbolic size (a dynamic batch or sequence length)."""
    return any(
        isinstance(x, torch.SymInt)
        or (isinstance(x, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in x.shape))
        for x in example_inputs
    )


def elastic_runtime_factory(graphs: ElasticGraphs, cfg: ElasticConfig, lowering: str) -> Callable[[CompileVariant], ElasticRuntime]:
    """The backend calls this with its per-variant compile function."""

    def build(compile_variant: CompileVariant) -> ElasticRuntime:
        return ElasticRuntime(graphs, cfg, lowering, compile_variant)

    return build
