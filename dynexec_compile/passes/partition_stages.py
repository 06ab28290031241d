"""``partition_stages``: split the graph at block boundaries into prefix, blocks, suffix.

Matches: a graph whose blocks were found by the analysis. Afterwards (invariant): the
returned top-level graph module calls one submodule per stage, in order (``prefix``,
``block0`` ... ``block{L-1}``, ``suffix``); every value crossing a boundary is an explicit
output of the stage that makes it and an input of the stages that read it; running the
top-level module computes exactly what the input graph computed. Not in place: the input
graph module is left as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
from torch.fx.passes.split_module import split_module

from dynexec_compile.passes import PassContext, PassError, PassResult, cleanup


@dataclass
class Stage:
    """One stage of a partitioned graph."""

    index: int  # 0 = prefix, i + 1 = block i, L + 1 = suffix
    name: str  # prefix | block{i} | suffix
    attr: str  # the submodule's name in the top-level module
    gm: fx.GraphModule

    @property
    def block(self) -> int | None:
        return None if self.name in ("prefix", "suffix") else self.index - 1


def stages_of(top: fx.GraphModule) -> list[Stage]:
    """The stages of a partitioned top-level module, in the order they run."""
    return top.meta["dynexec_stages"]


def partition_stages(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    analysis = ctx.analysis
    if not analysis.blocks:
        raise PassError("partition_stages: the analysis found no transformer blocks to cut between")
    stage_of = analysis.stage_of
    missing = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output") and n not in stage_of]
    if missing:
        raise PassError(f"partition_stages: no stage for node {missing[0].format_node()}")
    top = split_module(
        gm,
        None,
        lambda node: stage_of[node],
        keep_original_order=True,
        keep_original_node_name=True,
        tuple_return=True,
    )
    top.meta.update(gm.meta)
    stages = []
    for node in top.graph.nodes:
        if node.op != "call_module":
            continue
        index = int(node.target.rsplit("_", 1)[1])
        sub = top.get_submodule(node.target)
        stages.append(Stage(index, analysis.stage_name(index), node.target, sub))
    order = [s.index for s in stages]
    if order != sorted(order):
        raise PassError(f"partition_stages: stages would run out of order: {order}")
    top.meta["dynexec_stages"] = stages
    cleanup(top)
    notes = [
        f"{len(stages)} stages: " + ", ".join(f"{s.name} ({sum(1 for n in s.gm.graph.nodes if n.op not in ('placeholder', 'output'))} nodes)" for s in stages)
    ]
    return PassResult(top, True, notes)
