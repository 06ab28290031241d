"""dynexec: a torch.compile backend for dynamic execution of transformer models.

``torch.compile(model, backend="dynexec", options={...})`` finds the model's transformer
blocks in Dynamo's FX graph, rewrites the graph into stages with decision points between
them, lowers each stage with a real compiler and runs them with a small runtime.
"""

from dynexec_compile.config import DynexecConfig, EarlyExitConfig, ElasticConfig, parse_options
from dynexec_compile.elastic import (
    ElasticModel,
    ElasticPlan,
    Importance,
    elastic_level,
    elastic_stats,
    head_importance,
    level_param_slices,
    reorder_by_importance,
    set_elastic_level,
)

__all__ = [
    "DynexecConfig",
    "EarlyExitConfig",
    "ElasticConfig",
    "ElasticModel",
    "ElasticPlan",
    "Importance",
    "elastic_level",
    "elastic_stats",
    "head_importance",
    "level_param_slices",
    "reorder_by_importance",
    "set_elastic_level",
    "parse_options",
]
