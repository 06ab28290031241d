"""Decoding on a compiled, static-shape step: the KV cache, masks, sampling and ``generate``.

Every strategy is a proposer run by one loop (:func:`~dynexec_compile.decoding.generate.decode_loop`:
output, stop rule, streamer, statistics) over one verification step
(:func:`~dynexec_compile.decoding.verify.verify_step`: forward, greedy or lossless-sampling
acceptance, cache commit); a strategy is registered with :func:`register_strategy`.
"""

from dynexec_compile.decoding.cache import SlotCache
from dynexec_compile.decoding.calm import calm_strategy
from dynexec_compile.decoding.draft_heads import (
    DraftHeads,
    DraftHeadsEngine,
    draft_heads_strategy,
    load_draft_heads,
    save_draft_heads,
)
from dynexec_compile.decoding.eagle import (
    EagleDraft,
    eagle_strategy,
    load_eagle_draft,
    save_eagle_draft,
)
from dynexec_compile.decoding.generate import (
    DecodeSettings,
    GenerateOutput,
    GenerateStats,
    generate,
    register_strategy,
    strategy_engine,
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
from dynexec_compile.decoding.self_speculative import (
    SelfSpeculativeEngine,
    self_speculative_strategy,
)
from dynexec_compile.decoding.speculative import (
    ModelDrafter,
    check_same_vocabulary,
    draft_verify_loop,
)
from dynexec_compile.decoding.step import DecodeEngine
from dynexec_compile.decoding.verify import (
    StepShape,
    TreeSpec,
    Verdict,
    as_tree,
    draw_children,
    point_mass_probs,
    propose_children,
    verify,
    verify_sampling,
    verify_step,
)

register_strategy("calm", calm_strategy)
register_strategy("draft_heads", draft_heads_strategy)
register_strategy("eagle", eagle_strategy)
register_strategy("self_speculative", self_speculative_strategy)

__all__ = [
    "ContextLookup",
    "DecodeEngine",
    "DecodeSettings",
    "DraftHeads",
    "DraftHeadsEngine",
    "EagleDraft",
    "ModelDrafter",
    "check_same_vocabulary",
    "draft_verify_loop",
    "GenerateOutput",
    "GenerateStats",
    "LookaheadConfig",
    "NgramPool",
    "SamplingParams",
    "SelfSpeculativeEngine",
    "SlotCache",
    "StepShape",
    "TokenRuns",
    "TreeSpec",
    "Verdict",
    "as_tree",
    "draw_children",
    "point_mass_probs",
    "propose_children",
    "verify",
    "verify_step",
    "verify_sampling",
    "chain_mask",
    "draw",
    "generate",
    "load_draft_heads",
    "load_eagle_draft",
    "strategy_engine",
    "lookahead_decode",
    "register_strategy",
    "sampling_probs",
    "step_layout",
    "save_draft_heads",
    "save_eagle_draft",
    "step_mask",
    "warp_logits",
]
