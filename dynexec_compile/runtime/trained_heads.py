"""Trained exit heads (DeeBERT off-ramps) as the exit heads of the early-exit runtime."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx

from dynexec_compile.passes import PassContext, PassError
from dynexec_compile.runtime.staged import StagePlan


def trained_head_fns(ctx: PassContext, ee_plan, plan: StagePlan, top: fx.GraphModule) -> dict[int, Callable]:
    """``{block: fn(hidden [A, S, D], env) -> logits [A, C]}`` from the heads attached to the
    model whose parameters this graph reads."""
    from dynexec_compile.exit_heads import find_exit_heads

    heads = find_exit_heads(ctx.artifacts.get("example_inputs", []))
    if heads is None:
        raise ValueError(
            "dynexec: early_exit.heads='trained' but no exit heads are attached to this model: "
            "train them with dynexec_compile.train_exit_heads(...) (or load_exit_heads(path)) and call "
            "dynexec_compile.attach_exit_heads(model, heads) before compiling"
        )
    missing = [s.block for s in ee_plan.sites if str(s.block) not in heads]
    if missing:
        raise PassError(f"insert_early_exit: no trained exit head after block(s) {missing}; the heads cover {list(heads.layers)}")
    names = [n.name for n in top.graph.nodes if n.op == "placeholder"]
    mask_slot = next((plan.value_slot[n] for n in names if "attention_mask" in n and "_parameters_" not in n), None)

    def make(block: int):
        head = heads.head(block)

        def run(hidden: torch.Tensor, env: list) -> torch.Tensor:
            with torch.no_grad():
                return head(hidden, env[mask_slot] if mask_slot is not None else None)

        return run

    return {s.block: make(s.block) for s in ee_plan.sites}
