"""Decoding on a compiled, static-shape step: the KV cache, masks, sampling and ``generate``.

Lookahead and speculative strategies are loops of :meth:`DecodeEngine.step` +
:meth:`DecodeEngine.commit`, registered with :func:`register_strategy`.
"""

from dynexec_compile.decoding.cache import SlotCache
from dynexec_compile.decoding.generate import (
    DecodeSettings,
    GenerateOutput,
    GenerateStats,
    generate,
    get_engine,
    register_strategy,
)
from dynexec_compile.decoding.lookahead import (
    ContextLookup,
    LookaheadConfig,
    NgramPool,
    lookahead_decode,
    step_layout,
)
from dynexec_compile.decoding.masks import chain_mask, step_mask
from dynexec_compile.decoding.runs import TokenRuns
from dynexec_compile.decoding.sampling import SamplingParams, draw, sampling_probs, warp_logits
from dynexec_compile.decoding.step import DecodeEngine

__all__ = [
    "ContextLookup",
    "DecodeEngine",
    "DecodeSettings",
    "GenerateOutput",
    "GenerateStats",
    "LookaheadConfig",
    "NgramPool",
    "SamplingParams",
    "SlotCache",
    "TokenRuns",
    "chain_mask",
    "draw",
    "generate",
    "get_engine",
    "lookahead_decode",
    "register_strategy",
    "sampling_probs",
    "step_layout",
    "step_mask",
    "warp_logits",
]
