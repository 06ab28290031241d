"""Running a partitioned graph: each stage lowered on its own, called in order.

For a plain staged graph the top-level FX module already is the right program (straight-line
Python calling stage after stage); lowering replaces each stage submodule by its compiled
callable as a direct function call, so the runtime adds one Python call per stage and
nothing else. Runtimes that decide between stages (early exit) walk the same stages with a
:class:`StagePlan`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx

from dynexec_compile.backends import StageLowerer
from dynexec_compile.passes.partition_stages import Stage, stages_of


def stage_example_inputs(stage_gm: fx.GraphModule) -> list:
    """Fake example inputs of a stage, from the metadata Dynamo left on its placeholders."""
    out = []
    for node in stage_gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("example_value", node.meta.get("val"))
        if val is None:
            raise RuntimeError(f"dynexec: stage input {node.format_node()} has no example value")
        out.append(val)
    return out


def lower_stages(top: fx.GraphModule, lowerer: StageLowerer) -> dict[str, Callable]:
    """Lower every stage of ``top``; returns ``{stage attr: compiled callable}``."""
    return {s.attr: lowerer(s.gm, stage_example_inputs(s.gm)) for s in stages_of(top)}


class _StageCall:
    """A compiled stage as a plain callable FX can reference from generated code."""

    def __init__(self, name: str, fn: Callable):
        self.__name__ = self.__qualname__ = f"dynexec_stage_{name}"
        self.__module__ = __name__
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)


def assemble(top: fx.GraphModule, compiled: dict[str, Callable]) -> fx.GraphModule:
    """A copy of the top-level module whose stage calls go straight to compiled code."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    names = {s.attr: s.name for s in stages_of(top)}
    for node in top.graph.nodes:
        if node.op == "call_module" and node.target in compiled:
            fn = _StageCall(names[node.target], compiled[node.target])
            new = graph.call_function(fn, tuple(env[a] for a in node.args))
            new.name = names[node.target]
            env[node] = new
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    runner = fx.GraphModule(torch.nn.Module(), graph, class_name="DynexecStaged")
    runner.meta.update(top.meta)
    return runner


@dataclass
class StageStep:
    """One stage in a :class:`StagePlan`: which env slots it reads and writes."""

    stage: Stage
    fn: Callable
    reads: list[int]  # env slots of its inputs, in its argument order
    writes: list[int]  # env slots of its outputs, in its output order


@dataclass
class StagePlan:
    """The stages of a partitioned graph as slot-addressed steps, for runtimes that act
    between stages. ``env`` starts as the graph inputs followed by empty slots."""

    steps: list[StageStep]
    num_inputs: int
    num_slots: int
    outputs: object  # the output structure, with slot indices in place of nodes
    value_slot: dict[str, int]  # node name in the original graph -> slot

    def run(self, args: Sequence, start: int = 0, stop: int | None = None, env: list | None = None) -> list:
        if env is None:
            env = list(args) + [None] * (self.num_slots - self.num_inputs)
        for step in self.steps[start:stop]:
            out = step.fn(*[env[i] for i in step.reads])
            for slot, value in zip(step.writes, out):
                env[slot] = value
        return env

    def collect_outputs(self, env: list):
        return fx.node.map_aggregate(self.outputs, lambda s: env[s] if isinstance(s, _Slot) else s)


def make_plan(top: fx.GraphModule, compiled: dict[str, Callable]) -> StagePlan:
    """Number every value of the top-level graph with an env slot and list the stage calls."""
    slot_of: dict[str, int] = {}  # top-level node name -> slot
    value_slot: dict[str, int] = {}  # node name in the original (unsplit) graph -> slot
    outputs_of: dict[str, list[int]] = {}
    steps: list[StageStep] = []
    stages = {s.attr: s for s in stages_of(top)}
    outputs: object = None
    num_inputs = 0
    next_slot = 0
    for node in top.graph.nodes:
        if node.op == "placeholder":
            slot_of[node.name] = value_slot[node.name] = next_slot
            next_slot += 1
            num_inputs += 1
        elif node.op == "call_module":
            stage = stages[node.target]
            num_out = len(stage.gm.graph.output_node().args[0])
            writes = list(range(next_slot, next_slot + num_out))
            next_slot += num_out
            outputs_of[node.name] = writes
            # stage outputs keep their original node names (split_module keep_original_node_name)
            for out_node, slot in zip(stage.gm.graph.output_node().args[0], writes):
                value_slot[out_node.name] = slot
            reads = [slot_of[a.name] for a in node.args]
            steps.append(StageStep(stage, compiled[node.target], reads, writes))
        elif node.op == "call_function" and node.target is operator.getitem:
            src, idx = node.args
            slot_of[node.name] = outputs_of[src.name][idx]
        elif node.op == "output":
            outputs = node.args[0]
        else:
            raise RuntimeError(f"dynexec: unexpected node in a staged graph: {node.format_node()}")
    outputs = fx.node.map_arg(outputs, lambda n: _Slot(slot_of[n.name]))
    return StagePlan(steps, num_inputs, next_slot, outputs, value_slot)


class _Slot(int):
    """An env slot inside the output structure (told apart from plain int constants)."""
