"""The graph passes and their order.

Every pass is ``pass_fn(gm, ctx) -> PassResult`` (torch.fx's PassBase/PassResult shape, with a
context carrying the settings and the block analysis). ``PASS_ORDER`` is the one list the
backend runs; print it with ``python -m dynexec_compile.passes``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch.fx as fx

from dynexec_compile.analysis.blocks import BlockAnalysis
from dynexec_compile.config import DynexecConfig


@dataclass
class PassResult:
    """What a pass returns: the (possibly new) graph module, whether it changed, and notes a
    person can read in ``explain()`` (what it matched, what it did)."""

    gm: fx.GraphModule
    modified: bool
    notes: list[str] = field(default_factory=list)


@dataclass
class PassContext:
    """What every pass may read: the settings and the block analysis of the input graph.

    A pass that fans out (one graph per variant, e.g. per elastic level) leaves a
    ``"variant_runtime"`` artifact: the passes after it do not run on this graph, and the
    backend hands the factory a function that compiles a variant's graph with them.
    """

    cfg: DynexecConfig
    analysis: BlockAnalysis
    artifacts: dict = field(default_factory=dict)  # what a pass leaves for the runtime


class PassError(RuntimeError):
    """A pass could not apply; the message names the pass and, where it can, the node."""


def _is_impure(node: fx.Node) -> bool:
    # torch.fx treats every call_method as pure, but Dynamo graphs keep in-place methods
    # (a static KV cache's ``index_copy_``) whose results nobody reads.
    if node.op == "call_method" and str(node.target).endswith("_"):
        return True
    if node.op == "call_module":  # a stage or a compiled callable: never dropped here
        return True
    if node.op == "call_function" and getattr(node.target, "__name__", "").endswith("_"):
        return True
    return node.is_impure()


def cleanup(gm: fx.GraphModule) -> fx.GraphModule:
    """The clean-up every changing pass ends with: dead code elimination (keeping in-place
    ops), lint, recompile."""
    gm.graph.eliminate_dead_code(is_impure_node=_is_impure)
    gm.graph.lint()
    gm.recompile()
    return gm


def _pass_order() -> list[tuple[str, Callable[[fx.GraphModule, PassContext], PassResult], Callable[[DynexecConfig], bool]]]:
    from dynexec_compile.passes.elastic import slice_elastic_levels
    from dynexec_compile.passes.insert_early_exit import insert_early_exit
    from dynexec_compile.passes.partition_stages import partition_stages

    # (name, pass, when it runs). slice_elastic_levels fans out: the passes after it run on
    # each level's graph (passes/elastic.py), so it comes first.
    return [
        ("slice_elastic_levels", slice_elastic_levels, lambda cfg: cfg.elastic is not None),
        ("partition_stages", partition_stages, lambda cfg: cfg.needs_stages),
        ("insert_early_exit", insert_early_exit, lambda cfg: cfg.early_exit is not None),
    ]


PASS_ORDER = _pass_order()


def describe_pass_order() -> str:
    return "\n".join(f"{i}. {name}" for i, (name, _, _) in enumerate(PASS_ORDER, 1))
