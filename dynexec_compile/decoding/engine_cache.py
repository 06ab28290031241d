"""Reuse of decoding engines across ``generate`` calls (their compiled graphs with them).

One small LRU for every strategy: plain engines (:func:`~dynexec_compile.decoding.generate.get_engine`)
and engines that carry more than the model (draft heads, an exit layer and head). A later
call with the same model, batch size, compile settings and strategy key reuses an engine
whose cache is long enough — a recompile costs far more than attending over extra masked
slots — so it compiles nothing. Engines whose frozen weights went stale are dropped.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

from transformers import PreTrainedModel

from dynexec_compile.decoding.step import DecodeEngine

if TYPE_CHECKING:  # generate.py imports this module
    from dynexec_compile.decoding.generate import DecodeSettings

MAX_ENGINES = 8
_ENGINES: OrderedDict[tuple, DecodeEngine] = OrderedDict()


def settings_key(model: PreTrainedModel, batch_size: int, settings: DecodeSettings) -> tuple:
    """What makes two engines' graphs interchangeable, besides the strategy's own parts."""
    backend = id(settings.backend) if callable(settings.backend) else settings.backend
    options = tuple(sorted((settings.options or {}).items()))
    return (id(model), batch_size, settings.compile, backend, settings.mode, options, settings.cuda_graphs, settings.regional, settings.packed)


def cached_engine(
    model: PreTrainedModel,
    batch_size: int,
    max_len: int,
    settings: DecodeSettings,
    strategy_key: Hashable,
    build: Callable[[int], DecodeEngine],
) -> DecodeEngine:
    """An engine for ``(model, batch_size, settings, strategy_key)`` with ``>= max_len`` slots;
    ``build(max_len)`` makes one when none is cached."""
    for key in [k for k, e in _ENGINES.items() if e.model is model and e.frozen_weights_changed()]:
        del _ENGINES[key]  # its graphs hold the old weights
    wanted = (settings_key(model, batch_size, settings), strategy_key)
    fitting = [(k, e) for k, e in _ENGINES.items() if k[0] == wanted and e.model is model and e.max_len >= max_len]
    if fitting:
        key, engine = min(fitting, key=lambda item: item[1].max_len)
    else:
        engine = build(max_len)
        key = (wanted, max_len)
        _ENGINES[key] = engine
        while len(_ENGINES) > MAX_ENGINES:
            _ENGINES.popitem(last=False)
    _ENGINES.move_to_end(key)
    return engine


def engine_options(settings: DecodeSettings) -> dict:
    """:class:`DecodeEngine` keyword arguments from the shared settings."""
    return {
        "compile": settings.compile,
        "backend": settings.backend,
        "mode": settings.mode,
        "options": settings.options,
        "cuda_graphs": settings.cuda_graphs,
        "regional": settings.regional,
        "packed": settings.packed,
    }


__all__ = ["cached_engine", "engine_options", "settings_key"]
