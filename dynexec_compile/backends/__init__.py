"""Lowering: turn each stage's FX graph into something fast.

``lower_stage(gm, example_inputs, cfg)`` returns a callable with the graph's calling
convention (positional tensors in, a tuple out). Identical stages (the same ops on inputs of
the same shapes, e.g. the blocks of one model) are lowered once and the compiled code is
shared: a model's L blocks cost one block's compile.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch
import torch.fx as fx

from dynexec_compile.config import DynexecConfig

StageFn = Callable[..., tuple]


def lower_graph(gm: fx.GraphModule, example_inputs: Sequence, lowering: str) -> StageFn:
    """Lower one graph with the named lowering (no sharing; see :class:`StageLowerer`)."""
    if lowering == "eager":
        from dynexec_compile.backends.eager import lower_eager

        return lower_eager(gm, example_inputs)
    if lowering == "inductor":
        from dynexec_compile.backends.inductor import lower_inductor

        return lower_inductor(gm, example_inputs)
    if lowering == "tensorrt":
        from dynexec_compile.backends.tensorrt import lower_tensorrt

        return lower_tensorrt(gm, example_inputs)
    raise ValueError(f"dynexec: unknown lowering {lowering!r}")


def structural_key(gm: fx.GraphModule, example_inputs: Sequence) -> str:
    """A key equal for two graphs that compute the same function of inputs with the same
    metadata: node ops, targets and constant arguments by position, not by name."""
    index = {}
    parts = []

    def ref(a):
        if isinstance(a, fx.Node):
            return f"%{index[a]}"
        if isinstance(a, (list, tuple)):
            return "(" + ",".join(ref(x) for x in a) + ")"
        if isinstance(a, dict):
            return "{" + ",".join(f"{k}:{ref(v)}" for k, v in sorted(a.items())) + "}"
        return repr(a)

    for i, node in enumerate(gm.graph.nodes):
        index[node] = i
        if node.op == "placeholder":  # inputs are told apart by position, not by name
            parts.append("placeholder")
            continue
        if node.op == "get_attr":  # a constant inside the graph: same only if the same object
            parts.append(f"get_attr:{id(getattr(gm, str(node.target), None))}")
            continue
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__qualname__", repr(node.target))
        module = getattr(node.target, "__module__", "")
        parts.append(f"{node.op}:{module}.{target}({ref(node.args)};{ref(node.kwargs)})")
    for x in example_inputs:
        if isinstance(x, torch.Tensor):
            parts.append(f"T{tuple(x.shape)}{tuple(x.stride())}{x.dtype}{x.device}{x.requires_grad}")
        else:
            parts.append(f"V{x!r}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class StageLowerer:
    """Lowers stages, sharing the compiled code of structurally identical stages."""

    def __init__(self, cfg: DynexecConfig):
        self.cfg = cfg
        self._cache: dict[str, StageFn] = {}
        self.compiled = 0
        self.reused = 0

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence) -> StageFn:
        key = structural_key(gm, example_inputs)
        fn = self._cache.get(key)
        if fn is not None:
            self.reused += 1
            return fn
        fn = lower_graph(gm, example_inputs, self.cfg.lowering)
        self._cache[key] = fn
        self.compiled += 1
        return fn
