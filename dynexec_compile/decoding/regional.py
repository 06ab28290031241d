"""Regional compilation: compile one decoder layer and reuse its code for every layer.

Why: compiling a decoding step as one graph unrolls every decoder layer into it, so Inductor's
work grows with the depth — on SmolLM2-135M (30 layers) one engine took minutes to compile
before its first token. The layers of a transformers decoder are instances of one class with
the same shapes; traced with their parameters as graph inputs (Dynamo's default for
``nn.Module`` attributes), one layer's graph serves all of them. So in this mode the step
itself runs eagerly (embedding, rotary tables, final norm, head, verification, cache
bookkeeping: a few cheap ops per step) and every layer call goes through ONE compiled
function per input shape — the compile cost of one layer, whatever the depth, and a new
process reads that small graph from Inductor's on-disk caches.

What it costs: no fusion across layers and no freezing (weights stay inputs), so it suits
models whose step is bound by streaming the weights from memory — which is where the
compile time of the whole graph hurts most. PyTorch's "regional compilation" recipe does the
same with ``layer.compile()``; that edits the user's modules for good, so here the compiled
call is installed on each layer only for the duration of an engine call and removed after.

How the cache fits: a layer writes its keys/values through ``past_key_values.update(k, v,
self.layer_idx)``. Passing the whole :class:`SlotCache` would make the compiled code depend
on ``layer_idx`` (one graph per layer); instead each layer is called with a one-layer view
holding that layer's two buffers and the step's write slots as plain tensors.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from dynexec_compile.decoding.cache import SlotCache, _slot_index
from dynexec_compile.decoding.layers import decoder_layers


class _LayerCache:
    """What one decoder layer sees as ``past_key_values``: its own slot buffers.

    ``update`` writes the new tokens' keys/values at the step's slots, as
    :meth:`SlotLayer.update` does, and returns the whole buffers for attention.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor):
        self.keys, self.values, self.slots = keys, values, slots

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        # key_states: [B, H_kv, T, Dh]; slots: [B, T]
        index = _slot_index(self.slots, key_states.shape[1])
        self.keys.index_put_(index, key_states.to(self.keys.dtype))
        self.values.index_put_(index, value_states.to(self.values.dtype))
        return self.keys, self.values


def _layer_call(
    layer: nn.Module, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, args: tuple, kwargs: dict, at: int
) -> Any:
    """One decoder layer's own forward over its one-layer cache view (the compiled region);
    the view goes where the model passed its cache: positional argument ``at``, or by name
    when ``at`` is past the positional arguments."""
    view = _LayerCache(keys, values, slots)
    if at < len(args):
        return layer._call_impl(*args[:at], view, *args[at + 1 :], **kwargs)
    return layer._call_impl(*args, **kwargs, past_key_values=view)


def private_copy(fn: Callable, tag: str) -> Callable:
    """``fn`` with a code object of its own, named after ``tag``.

    Dynamo keeps compiled graphs, and counts its recompile limit, per code object: a private
    code object keeps one engine's graphs (and frozen weights) apart from other engines', so
    skipping guards can only pick among the engine's own graphs, and a new engine always
    compiles against the model as it is now.
    """
    tag = re.sub(r"\W", "_", tag)
    renames = {"co_name": f"{fn.__name__}_{tag}"}
    if hasattr(fn.__code__, "co_qualname"):  # Python >= 3.11
        renames["co_qualname"] = f"{fn.__qualname__}_{tag}"
    code = fn.__code__.replace(**renames)
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


class RegionalLayers:
    """The decoder layers of ``model`` compiled once per shape and run over ``cache``.

    Args:
        model: the causal LM (not modified).
        cache: the engine's :class:`SlotCache`.
        compile_fn: ``(fn, dynamic) -> compiled fn``. Steps of a fixed width compile with
            static shapes (the hot path); the prefill compiles once with dynamic shapes, so
            every prompt-length bucket shares one graph.

    Use :meth:`installed` around a call of the model: inside it, each layer's ``__call__``
    goes through the shared compiled function; outside it, the model is untouched.
    """

    def __init__(self, model: nn.Module, cache: SlotCache, compile_fn: Callable[[Callable, bool], Callable]):
        self.layers = decoder_layers(model)
        if len(self.layers) != len(cache.layers):
            raise ValueError(
                f"regional compilation: {len(self.layers)} decoder layers but the cache holds "
                f"{len(cache.layers)} attention layers"
            )
        params = list(inspect.signature(self.layers[0].forward).parameters)
        if "past_key_values" not in params:
            raise ValueError(
                f"regional compilation: {type(self.layers[0]).__name__}.forward takes no past_key_values; "
                "use regional=False"
            )
        self._cache_at = params.index("past_key_values")  # where a positional cache argument sits
        tag = f"engine{id(cache):x}"
        self._static = compile_fn(private_copy(_layer_call, tag), False)
        self._dynamic = compile_fn(private_copy(_layer_call, tag + "_prefill"), True)
        self._compiled = self._static

    def _call(self, index: int, *args: Any, **kwargs: Any) -> Any:
        layer = self.layers[index]
        at = self._cache_at
        cache = args[at] if at < len(args) else kwargs.pop("past_key_values", None)
        if not isinstance(cache, SlotCache) or len(cache.layers) != len(self.layers):
            raise RuntimeError(
                f"regional compilation: decoder layer {index} ({type(layer).__name__}) was called "
                "without one of the engine's SlotCaches as past_key_values"
            )
        buffers = cache.layers[index]
        return self._compiled(layer, buffers.keys, buffers.values, cache._write_slots, args, kwargs, at)

    @contextlib.contextmanager
    def installed(self, dynamic: bool = False) -> Iterator[None]:
        """Route every layer call through the compiled function (the dynamic-shape one with
        ``dynamic``) for the duration of the block."""
        self._compiled = self._dynamic if dynamic else self._static
        saved = [layer._compiled_call_impl for layer in self.layers]
        for index, layer in enumerate(self.layers):
            layer._compiled_call_impl = functools.partial(self._call, index)
        # Dynamo gives equal sizes one symbol ("duck shaping"): a prompt bucket equal to the head
        # dim (64 on SmolLM2) would then be specialised with it, and the next bucket recompile.
        shapes = torch.fx.experimental._config.patch(use_duck_shape=False) if dynamic else contextlib.nullcontext()
        try:
            with shapes:
                yield
        finally:
            for layer, impl in zip(self.layers, saved):
                layer._compiled_call_impl = impl


__all__ = ["RegionalLayers", "decoder_layers", "private_copy"]
