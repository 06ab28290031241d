"""``slice_elastic_levels``: one graph per elastic level, its weights prefix views of the
parameters; the passes after it run on each level's graph.

Matches: a Dynamo graph of a model reordered by ``reorder_by_importance`` (or given an
original-order plan by ``elastic_plan``): with inlined ``nn.Module``s Dynamo lifts every
parameter to a graph input, so the model's :class:`~dynexec_compile.elastic.ElasticPlan` is
found from the example inputs (``lookup_plan``). Afterwards (invariant): the input graph is
unchanged and is the full model; the pass leaves for the runtime one graph per configured level
(:func:`~dynexec_compile.elastic.fx.level_graph`: ``torch.narrow(param, dim, 0, k)`` before the
first use of every sliced parameter, anchor blocks untouched), so every level reads views of the
one set of parameters. Levels whose slices coincide share one graph; a level that slices nothing
(1.0, or every block an anchor) is the input graph itself. A level served with a LoRA
(``attach_level_loras``) gets its graph with the LoRA's ``linear`` deltas when it first runs
with it. Not in place.

It is the first pass and it fans out: the passes after it in ``PASS_ORDER`` (stages, early
exit) do not run on the input graph but on each level's graph, when the backend compiles that
level (``ElasticRuntime``, the first time the level runs): elastic levels compose with every
other feature because each level is an ordinary dynexec compile of a smaller graph.

Why an error rather than slicing an unreordered model in its original order: prefixes of the
original head order keep far less quality than the importance order (SST-2 at 50%: 0.74 vs
0.83, ``benchmarks/RESULTS.md``), and a user who asked for elastic levels and silently got the
worse ones would not know. Slicing in the original order stays one explicit call away
(``elastic_plan(model)``), and the error says so.

GPT-2's fused ``c_attn`` (``Conv1D``, ``[Q | K | V]`` columns) keeps a prefix of each part: its
``addmm`` becomes one ``addmm`` per part over three views of the one weight (``fx.py``).

Errors: a model without a plan, or anchors it cannot honour, is a ``ValueError`` (a user error,
raised whatever ``strict`` says). A graph that cannot be sliced (a fused weight read other than
by ``addmm``, a reshape whose sizes cannot be re-derived) is a ``PassError``: by default the
backend warns and compiles the stock graph, ``strict=True`` raises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from dynexec_compile.elastic.fx import level_graph
from dynexec_compile.elastic.lora import LevelLoRA
from dynexec_compile.elastic.reorder import ElasticPlan, lookup_model, lookup_plan
from dynexec_compile.elastic.slicing import choose_anchors, level_param_slices
from dynexec_compile.passes import PassContext, PassError, PassResult


@dataclass
class ElasticGraphs:
    """What the pass leaves for the runtime.

    Args:
        plan: the model's plan (the key its level is requested under).
        levels: the configured levels, largest first.
        anchors: blocks kept whole at every level.
        slices: per level, ``{param_name: (dim, k)}`` or ``(dim, k, parts)`` for a fused
            projection (empty: the full graph).
        graphs: per level, the graph that runs it without a LoRA (levels with equal slices
            share one).
        gm, example_inputs: Dynamo's graph and example inputs (LoRA graphs are cut from them).
    """

    plan: ElasticPlan
    levels: tuple[float, ...]
    anchors: tuple[int, ...]
    slices: dict[float, dict[str, tuple[int, ...]]]
    graphs: dict[float, fx.GraphModule]
    gm: fx.GraphModule
    example_inputs: list

    def slices_key(self, level: float) -> tuple:
        """Equal for levels that slice the same parameters alike (they share a graph)."""
        return tuple(sorted(self.slices[level].items()))

    def graph(self, level: float, lora: LevelLoRA | None = None) -> fx.GraphModule:
        """The graph of ``level``, with ``lora``'s deltas when given (its tensors are extra
        inputs after Dynamo's, in ``lora.tensors()`` order)."""
        if lora is None:
            return self.graphs[level]
        try:
            return level_graph(self.gm, self.example_inputs, level, self.anchors, lora)
        except NotImplementedError as err:
            raise PassError(f"slice_elastic_levels: level {level} with its LoRA: {err}") from err


def slice_elastic_levels(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    cfg = ctx.cfg.elastic
    example_inputs = ctx.artifacts["example_inputs"]
    plan = lookup_plan(example_inputs)
    if plan is None:
        raise ValueError(
            "dynexec elastic: this model has no elastic plan, so its heads and neurons are in no "
            "importance order; call dynexec_compile.reorder_by_importance(model, batches) before "
            "torch.compile (or dynexec_compile.elastic.elastic_plan(model) to slice it in its "
            "original order)"
        )
    model = lookup_model(example_inputs)
    anchors = tuple(sorted(choose_anchors(plan, cfg.anchor_layers)))
    slices: dict[float, dict[str, tuple[int, ...]]] = {}
    graphs: dict[float, fx.GraphModule] = {}
    by_slices: dict[tuple, fx.GraphModule] = {(): gm}
    for level in cfg.levels:
        try:
            slices[level] = level_param_slices(model, plan, level, anchors)
            key = tuple(sorted(slices[level].items()))
            if key not in by_slices:
                by_slices[key] = level_graph(gm, example_inputs, level, anchors)
        except NotImplementedError as err:
            raise PassError(f"slice_elastic_levels: level {level}: {err}") from err
        graphs[level] = by_slices[key]
    graphs_left = ElasticGraphs(plan, cfg.levels, anchors, slices, graphs, gm, list(example_inputs))
    ctx.artifacts["elastic"] = graphs_left
    from dynexec_compile.runtime.elastic import elastic_runtime_factory

    ctx.artifacts["variant_runtime"] = elastic_runtime_factory(graphs_left, cfg, ctx.cfg.lowering)
    distinct = len({id(g) for g in graphs.values()})
    notes = [
        f"levels {list(cfg.levels)} as {distinct} graph(s); anchor blocks {list(anchors)}; "
        f"{max(len(s) for s in slices.values())} parameters sliced at the smallest level "
        f"(order: {plan.sorted_by or 'original'}); each level compiled with the passes after this "
        "one, when it first runs (graphs with static shapes or the eager lowering) or now"
    ]
    return PassResult(gm, False, notes)
