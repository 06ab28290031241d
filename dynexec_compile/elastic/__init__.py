"""Importance-ordered heads and neurons, and zero-copy elastic sub-models (issues 4, 17).

Score heads/neurons/layers (``importance``), sort each block by importance in place
(``reorder``), then run any level as prefix *views* of the one set of weights (``slicing``,
``runtime``), each level with its own small LoRA when it has one (``lora``).
"""

from dynexec_compile.elastic.arch import BlockSpec, find_blocks
from dynexec_compile.elastic.importance import Importance, head_importance, random_importance
from dynexec_compile.elastic.lora import (
    LevelLoRA,
    attach_level_loras,
    detach_level_loras,
    distillation_loss,
    elastic_forward,
    install_level_lora,
    lora_hooks,
    lora_targets,
    plan_fingerprint,
    train_level_lora,
)
from dynexec_compile.elastic.reorder import (
    ElasticPlan,
    apply_plan,
    elastic_plan,
    lookup_plan,
    plan_to_dict,
    reorder_by_importance,
)
from dynexec_compile.elastic.runtime import (
    ElasticModel,
    elastic_level,
    elastic_slo,
    elastic_stats,
    set_elastic_level,
)
from dynexec_compile.elastic.slicing import choose_anchors, level_param_slices, level_params
from dynexec_compile.elastic.slo import LatencyTarget, LevelLatency, choose_level, measure_ms

__all__ = [
    "BlockSpec",
    "ElasticModel",
    "ElasticPlan",
    "Importance",
    "LatencyTarget",
    "LevelLatency",
    "LevelLoRA",
    "apply_plan",
    "attach_level_loras",
    "choose_anchors",
    "choose_level",
    "detach_level_loras",
    "distillation_loss",
    "elastic_forward",
    "elastic_level",
    "elastic_plan",
    "elastic_slo",
    "elastic_stats",
    "find_blocks",
    "head_importance",
    "install_level_lora",
    "level_param_slices",
    "level_params",
    "lookup_plan",
    "lora_hooks",
    "lora_targets",
    "measure_ms",
    "plan_fingerprint",
    "plan_to_dict",
    "random_importance",
    "reorder_by_importance",
    "set_elastic_level",
    "train_level_lora",
]
