"""Importance-ordered heads and neurons, and zero-copy elastic sub-models (issue 4).

Score heads/neurons/layers (``importance``), sort each block by importance in place
(``reorder``), then run any level as prefix *views* of the one set of weights (``slicing``,
``runtime``).
"""

from dynexec_compile.elastic.arch import BlockSpec, find_blocks
from dynexec_compile.elastic.importance import Importance, head_importance, random_importance
from dynexec_compile.elastic.reorder import (
    ElasticPlan,
    elastic_plan,
    lookup_plan,
    reorder_by_importance,
)
from dynexec_compile.elastic.runtime import (
    ElasticModel,
    elastic_level,
    elastic_stats,
    set_elastic_level,
)
from dynexec_compile.elastic.slicing import choose_anchors, level_param_slices, level_params

__all__ = [
    "BlockSpec",
    "ElasticModel",
    "ElasticPlan",
    "Importance",
    "choose_anchors",
    "elastic_level",
    "elastic_plan",
    "elastic_stats",
    "find_blocks",
    "head_importance",
    "random_importance",
    "level_param_slices",
    "level_params",
    "lookup_plan",
    "reorder_by_importance",
    "set_elastic_level",
]
