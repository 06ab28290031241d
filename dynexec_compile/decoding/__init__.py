"""Decoding on a compiled, static-shape step: the KV cache, masks, sampling and ``generate``.

Lookahead and speculative strategies are loops of :meth:`DecodeEngine.step` +
:meth:`DecodeEngine.commit`, registered with :func:`register_strategy`; draft-and-verify
strategies share one acceptance rule, :mod:`dynexec_compile.decoding.verify`.
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
from dynexec_compile.decoding.masks import chain_mask, step_mask
from dynexec_compile.decoding.sampling import SamplingParams, draw, sampling_probs, warp_logits
from dynexec_compile.decoding.speculative import (
    Drafter,
    ModelDrafter,
    check_same_vocabulary,
    draft_verify_loop,
)
from dynexec_compile.decoding.step import DecodeEngine
from dynexec_compile.decoding.verify import (
    TreeSpec,
    Verdict,
    as_tree,
    commit_verdict,
    draw_children,
    node_mask,
    tree_positions,
    verify,
    verify_greedy,
    verify_sampling,
)

__all__ = [
    "DecodeEngine",
    "DecodeSettings",
    "Drafter",
    "ModelDrafter",
    "check_same_vocabulary",
    "draft_verify_loop",
    "GenerateOutput",
    "GenerateStats",
    "SamplingParams",
    "SlotCache",
    "TreeSpec",
    "Verdict",
    "as_tree",
    "commit_verdict",
    "draw_children",
    "node_mask",
    "tree_positions",
    "verify",
    "verify_greedy",
    "verify_sampling",
    "chain_mask",
    "draw",
    "generate",
    "get_engine",
    "register_strategy",
    "sampling_probs",
    "step_mask",
    "warp_logits",
]
