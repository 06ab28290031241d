"""Capture a decoding step as a CUDA graph and replay it.

Why by hand rather than ``torch.compile(mode="reduce-overhead")``: the step is compiled with
whatever backend the user chose (Inductor today, dynexec's own backend next), and only
Inductor understands that mode. A captured graph needs fixed input addresses, so each input
signature gets static input buffers that every call copies into; the KV cache and the
lengths live at fixed addresses already (``SlotCache``), and the graph updates them in place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_map


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    outputs: object


class CudaGraphRunner:
    """Replays ``fn`` as one CUDA graph per distinct input signature (shapes and dtypes).

    Args:
        fn: the step; tensor positional arguments only, no host synchronisation inside.
        state: tensors ``fn`` mutates as bookkeeping (e.g. the cache's lengths): the warm-up
            runs before capture mutate them too, so they are saved and restored around it.
        warmup: eager runs before capture (lazy initialisation, compilation, autotuning).

    Outputs are cloned out of the graph's static buffers, so they stay valid after the next
    replay.
    """

    def __init__(self, fn: Callable, state: Sequence[torch.Tensor] = (), warmup: int = 3):
        self.fn = fn
        self.state = list(state)
        self.warmup = warmup
        self._captured: dict[tuple, _Captured] = {}

    @property
    def num_graphs(self) -> int:
        """Graphs captured so far."""
        return len(self._captured)

    def __call__(self, *args: torch.Tensor):
        key = tuple((tuple(a.shape), a.dtype, a.device) for a in args)
        entry = self._captured.get(key)
        if entry is None:
            entry = self._capture(args)
            self._captured[key] = entry
        for static, arg in zip(entry.inputs, args, strict=True):
            static.copy_(arg)
        entry.graph.replay()
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, entry.outputs)

    def _capture(self, args: Sequence[torch.Tensor]) -> _Captured:
        inputs = [a.clone() for a in args]
        saved = [t.clone() for t in self.state]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        for t, value in zip(self.state, saved, strict=True):
            t.copy_(value)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self.fn(*inputs)
        return _Captured(graph, inputs, outputs)
