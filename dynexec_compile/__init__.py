"""dynexec: a torch.compile backend for dynamic execution of transformer models.

``torch.compile(model, backend="dynexec", options={...})`` finds the model's transformer
blocks in Dynamo's FX graph, rewrites the graph into stages with decision points between
them, lowers each stage with a real compiler and runs them with a small runtime.
"""

from dynexec_compile.config import DynexecConfig, EarlyExitConfig, ElasticConfig, parse_options
from dynexec_compile.elastic import ElasticPlan, Importance, head_importance, reorder_by_importance

__all__ = [
    "DynexecConfig",
    "EarlyExitConfig",
    "ElasticConfig",
    "ElasticPlan",
    "Importance",
    "head_importance",
    "reorder_by_importance",
    "parse_options",
]
