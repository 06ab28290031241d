"""dynexec: a torch.compile backend for dynamic execution of transformer models.

``torch.compile(model, backend="dynexec", options={...})`` finds the model's transformer
blocks in Dynamo's FX graph, rewrites the graph into stages with decision points between
them, lowers each stage with a real compiler and runs them with a small runtime.
"""

from dynexec_compile.calibrate import Calibration, calibrate_threshold
from dynexec_compile.config import (
    DecodingConfig,
    DynexecConfig,
    EarlyExitConfig,
    ElasticConfig,
    parse_options,
)
from dynexec_compile.decoding import (
    DecodeEngine,
    DraftHeads,
    EagleDraft,
    GenerateOutput,
    SlotCache,
    TreeSpec,
    generate,
    load_draft_heads,
    load_eagle_draft,
    save_draft_heads,
    save_eagle_draft,
)
from dynexec_compile.distill import train_draft_heads, train_eagle_draft, train_exit_lm_head
from dynexec_compile.elastic import (
    ElasticModel,
    ElasticPlan,
    Importance,
    LevelLoRA,
    attach_level_loras,
    elastic_level,
    elastic_slo,
    elastic_stats,
    head_importance,
    level_param_slices,
    reorder_by_importance,
    set_elastic_level,
    train_level_lora,
)
from dynexec_compile.elastic.prompt import PromptElastifier, PromptScorer, profile_ttft
from dynexec_compile.elastic.prompt_tasks import LongPrompt
from dynexec_compile.elastic.self_draft import draft_extra_bytes, elastic_draft
from dynexec_compile.exit_heads import (
    ExitHeads,
    attach_exit_heads,
    detach_exit_heads,
    get_exit_heads,
    load_exit_heads,
    save_exit_heads,
    train_exit_heads,
)
from dynexec_compile.explain import explain
from dynexec_compile.hf import DynexecGenerateOutput, compile, hf_generate, wrap_generate
from dynexec_compile.models import demo_lm_path, heldout_prompts, load_demo_lm
from dynexec_compile.routing import Router, train_router
from dynexec_compile.runtime.exit_rules import exit_rule
from dynexec_compile.runtime.stats import last_stats

__all__ = [
    "demo_lm_path",
    "heldout_prompts",
    "load_demo_lm",
    "DecodeEngine",
    "DraftHeads",
    "EagleDraft",
    "load_draft_heads",
    "load_eagle_draft",
    "save_draft_heads",
    "save_eagle_draft",
    "train_draft_heads",
    "train_eagle_draft",
    "train_exit_lm_head",
    "GenerateOutput",
    "SlotCache",
    "TreeSpec",
    "generate",
    "Calibration",
    "DecodingConfig",
    "DynexecGenerateOutput",
    "compile",
    "hf_generate",
    "wrap_generate",
    "DynexecConfig",
    "EarlyExitConfig",
    "ElasticConfig",
    "ElasticModel",
    "ElasticPlan",
    "ExitHeads",
    "Importance",
    "LevelLoRA",
    "attach_exit_heads",
    "attach_level_loras",
    "calibrate_threshold",
    "detach_exit_heads",
    "LongPrompt",
    "PromptElastifier",
    "PromptScorer",
    "profile_ttft",
    "draft_extra_bytes",
    "elastic_draft",
    "elastic_level",
    "elastic_slo",
    "elastic_stats",
    "exit_rule",
    "explain",
    "get_exit_heads",
    "head_importance",
    "last_stats",
    "level_param_slices",
    "load_exit_heads",
    "parse_options",
    "reorder_by_importance",
    "Router",
    "train_router",
    "save_exit_heads",
    "set_elastic_level",
    "train_exit_heads",
    "train_level_lora",
    "DigitPrompt",
    "DigitsPipeline",
    "StepPredictor",
    "StepSaver",
]

# StepSaver needs the optional ``stepsaver`` extra (diffusers, scikit-learn): imported on first use
_STEPSAVER = ("DigitPrompt", "DigitsPipeline", "StepPredictor", "StepSaver")


def __getattr__(name: str):
    if name in _STEPSAVER:
        from dynexec_compile import stepsaver

        return getattr(stepsaver, name)
    raise AttributeError(f"module 'dynexec_compile' has no attribute {name!r}")
