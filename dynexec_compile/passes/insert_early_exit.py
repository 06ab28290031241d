"""``insert_early_exit``: decision points after blocks, with an exit head at each.

Matches: a partitioned graph (``partition_stages`` ran) whose outputs all come from the
suffix stage, one of them a logits tensor ``[B, C]`` (or ``[B, S, C]``, decided on the last
position) with the batch first. Afterwards (invariant): the graph is unchanged; the pass
leaves for the runtime the exit blocks, the env slot of the hidden state after each, and the
slot of the suffix's hidden-state input, so a "shared" exit head is the suffix stage itself
applied to an earlier hidden state. The runtime decides per call which heads exit
(``"auto"``: the trained off-ramps while the model has them attached); the pass's note says
which ones it found at compile time. Not in place.

Exit layers that do not exist are a ``ValueError`` (a user error, raised whatever ``strict``
says); a graph the runtime cannot serve (a KV cache among the outputs) is a ``PassError``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from dynexec_compile.exit_heads import find_exit_heads, resolve_heads
from dynexec_compile.passes import PassContext, PassError, PassResult
from dynexec_compile.passes.partition_stages import stages_of


@dataclass
class ExitSite:
    block: int  # exit after this block (0-based)
    hidden: str  # name of the hidden-state value leaving the block (original graph)


@dataclass
class EarlyExitPlan:
    sites: list[ExitSite]
    suffix_hidden: str  # the suffix's hidden-state input (the last block's output)
    logits_output: int  # index of the logits among the graph outputs
    num_blocks: int


def resolve_exit_layers(layers, num_blocks: int) -> list[int]:
    """``"all"`` -> every block but the last; explicit indices are checked."""
    if num_blocks < 2:
        raise ValueError(f"dynexec: early exit needs at least 2 blocks; this model has {num_blocks}")
    if layers == "all":
        return list(range(num_blocks - 1))
    bad = [i for i in layers if i >= num_blocks - 1]
    if bad:
        raise ValueError(
            f"dynexec: early_exit.layers={list(layers)} names block(s) {bad} but exits can follow blocks "
            f"0..{num_blocks - 2} of this model's {num_blocks} (the last block's exit is the model's own output)"
        )
    return list(layers)


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _example(node):
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def insert_early_exit(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    cfg, analysis = ctx.cfg.early_exit, ctx.analysis
    if "dynexec_stages" not in gm.meta:
        raise PassError("insert_early_exit: needs partition_stages to run first")
    layers = resolve_exit_layers(cfg.layers, analysis.num_blocks)
    stages = stages_of(gm)
    suffix = stages[-1]
    if suffix.name != "suffix":
        raise PassError("insert_early_exit: the graph has no suffix stage (no head after the last block)")
    # every graph output must come from the suffix: exited samples get the head's outputs
    for out in _as_tuple(gm.graph.output_node().args[0]):
        from_suffix = isinstance(out, fx.Node) and out.op == "call_function" and out.args and getattr(out.args[0], "target", None) == suffix.attr
        if not from_suffix:
            raise PassError(
                f"insert_early_exit: graph output {out.format_node() if isinstance(out, fx.Node) else out!r} does not "
                "come from the head (suffix) stage; early exit serves classifiers whose outputs are the head's "
                "(for generation with a KV cache use dynexec_compile.generate(strategy='self_speculative'))"
            )
    originals = _as_tuple(analysis.gm.graph.output_node().args[0])
    logits_index = next(
        (i for i, o in enumerate(originals) if isinstance(_example(o), torch.Tensor) and _example(o).is_floating_point() and _example(o).dim() in (2, 3)),
        None,
    )
    if logits_index is None:
        raise PassError("insert_early_exit: no logits output ([B, C] or [B, S, C]) to decide on")
    sites = [ExitSite(b, analysis.hidden_state_after(b).name) for b in layers]
    plan = EarlyExitPlan(sites, analysis.hidden_state_after(analysis.num_blocks - 1).name, logits_index, analysis.num_blocks)
    ctx.artifacts["early_exit"] = plan
    from dynexec_compile.runtime.early_exit import early_exit_runtime_factory

    ctx.artifacts["runtime"] = early_exit_runtime_factory(ctx, plan)
    heads = resolve_heads(cfg.heads, find_exit_heads(ctx.artifacts.get("example_inputs", [])))
    notes = [f"exits after blocks {layers} ({cfg.rule}, threshold {cfg.threshold}, heads {heads})"]
    return PassResult(gm, False, notes)
