"""The elastic runtime: every level's graph lowered once, the level chosen per call.

``slice_elastic_levels`` leaves one graph per level, each reading prefix views of the same
parameters. This runtime lowers each distinct graph once, at compile time (so a switch never
compiles in the serving path), and on every call runs the level the calling thread asks for:
the innermost ``with elastic_level(r):``, else ``set_elastic_level(compiled, r)``, else the
largest configured level. Dynamo's guards do not depend on the level, so switching never
recompiles; a switch is a dictionary lookup. The level that ran is published in
``dynexec_compile.last_stats()`` (``elastic_level``, ``elastic_heads``, ...) and
``elastic_stats()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.fx as fx

from dynexec_compile.elastic.runtime import (
    describe_level,
    register_compiled_levels,
    requested_level,
)
from dynexec_compile.elastic.runtime import record_stats as record_elastic_stats
from dynexec_compile.passes.elastic import ElasticGraphs
from dynexec_compile.runtime.stats import record_stats

Lower = Callable[[fx.GraphModule], Callable]


class ElasticRuntime:
    """Calls the compiled graph of the requested level.

    Attributes:
        levels: the configured levels, largest first.
        fns: per level, its compiled callable (levels with equal slices share one).
        lowerings: how many graphs were lowered (distinct graphs, at most ``len(levels)``).
    """

    def __init__(self, graphs: ElasticGraphs, lower: Lower):
        self.graphs = graphs
        self.plan = graphs.plan
        self.levels = graphs.levels
        compiled: dict[int, Callable] = {}
        self.fns: dict[float, Callable] = {}
        for level in self.levels:
            gm = graphs.graphs[level]
            if id(gm) not in compiled:
                compiled[id(gm)] = lower(gm)
            self.fns[level] = compiled[id(gm)]
        self.lowerings = len(compiled)
        self._stats = {
            level: describe_level(self.plan, graphs.slices[level], level, self.levels, graphs.anchors)
            for level in self.levels
        }
        self._published = {
            level: {f"elastic_{k}": v for k, v in stats.items()} for level, stats in self._stats.items()
        }
        register_compiled_levels(self.plan, self.levels)

    def __call__(self, *args: Any) -> Any:
        level = requested_level(self.plan, self.levels[0])
        fn = self.fns.get(level)
        if fn is None:
            raise ValueError(
                f"dynexec elastic: level {level} was requested but this model was compiled with "
                f"levels {list(self.levels)}; request one of them, or add it to "
                "torch.compile(..., options={'elastic': {'levels': [...]}})"
            )
        out = fn(*args)
        record_elastic_stats(self._stats[level])
        record_stats(dict(self._published[level]))
        return out


def elastic_runtime_factory(graphs: ElasticGraphs) -> Callable[[fx.GraphModule, Lower], ElasticRuntime]:
    """The backend calls this with the final graph and its lowering function."""

    def build(gm: fx.GraphModule, lower: Lower) -> ElasticRuntime:
        del gm  # the level graphs are in ``graphs`` (the full one among them)
        return ElasticRuntime(graphs, lower)

    return build
