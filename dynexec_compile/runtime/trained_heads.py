"""Trained exit heads (DeeBERT off-ramps) as the exit heads of the early-exit runtime,
lowered like the stages.

An off-ramp runs after every exit block for every sample still in the batch, on the
critical path between stages, so it is compiled with the stage lowering (Inductor by
default) instead of running as eager PyTorch. Each head is traced (``make_fx``) into an FX
graph whose inputs are its parameters, the hidden state and the attention mask, with
Dynamo's fake example values of the stage that produced them: a symbolic batch stays
symbolic, so compaction does not recompile a head. Because the parameters are inputs, the
heads of one model are structurally identical and :class:`StageLowerer` compiles their code
once for all of them, as it does for the blocks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from dynexec_compile.backends import StageLowerer
from dynexec_compile.exit_heads import ExitHead, ExitHeads
from dynexec_compile.passes import PassContext, PassError
from dynexec_compile.runtime.staged import StagePlan


def _example(node: fx.Node):
    return node.meta.get("example_value", node.meta.get("val"))


def _slot_example(top: fx.GraphModule, plan: StagePlan, slot: int):
    """Dynamo's fake example value of an env slot (a graph input or a stage output)."""
    placeholders = [n for n in top.graph.nodes if n.op == "placeholder"]
    if slot < len(placeholders):
        return _example(placeholders[slot])
    for step in plan.steps:
        if slot in step.writes:
            return _example(step.stage.gm.graph.output_node().args[0][step.writes.index(slot)])
    raise RuntimeError(f"dynexec: no stage writes env slot {slot}")


def head_graph(head: ExitHead, hidden, mask) -> tuple[fx.GraphModule, list, list[torch.Tensor]]:
    """``(graph, example inputs, parameters)``: ``graph(*parameters, hidden[, mask]) -> (logits,)``.

    ``hidden: [B, S, D]`` and ``mask: [B, S]`` (or ``None``) are fake example values; the
    graph is traced in the head's current train/eval mode (eval for exit heads).
    """
    names = [name for name, _ in head.named_parameters()] + [name for name, _ in head.named_buffers()]
    tensors = [t.detach() for _, t in head.named_parameters()] + [t for _, t in head.named_buffers()]
    count = len(names)

    def run(*flat):
        state = dict(zip(names, flat[:count]))
        h = flat[count]  # [B, S, D]
        m = flat[count + 1] if mask is not None else None  # [B, S]
        return (torch.func.functional_call(head, state, (h, m)),)  # ([B, C],)

    fake_mode = hidden.fake_mode  # the stage's own examples' mode (not the tracing context's)
    fakes = [fake_mode.from_tensor(t, static_shapes=True) for t in tensors]
    examples = [*fakes, hidden] + ([mask] if mask is not None else [])
    with fake_mode, torch.no_grad():
        gm = make_fx(run)(*examples)
    return gm, examples, tensors


def trained_head_fns(
    ctx: PassContext, ee_plan, plan: StagePlan, top: fx.GraphModule, heads: ExitHeads | None
) -> dict[int, Callable]:
    """``{block: fn(hidden [A, S, D], env) -> logits [A, C]}`` from ``heads``, the heads attached
    to the model whose parameters this graph reads, each lowered with the stages' lowering."""
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
    mask_example = _slot_example(top, plan, mask_slot) if mask_slot is not None else None
    lowerer = StageLowerer(ctx.cfg)

    def make(block: int, hidden_slot: int) -> Callable:
        gm, examples, params = head_graph(heads.head(block), _slot_example(top, plan, hidden_slot), mask_example)
        fn = lowerer(gm, examples)

        def run(hidden: torch.Tensor, env: list) -> torch.Tensor:
            extra = (env[mask_slot],) if mask_slot is not None else ()
            with torch.no_grad():
                return fn(*params, hidden, *extra)[0]

        return run

    fns = {s.block: make(s.block, plan.value_slot[s.hidden]) for s in ee_plan.sites}
    ctx.artifacts["exit_head_compiles"] = (lowerer.compiled, lowerer.reused)
    return fns
