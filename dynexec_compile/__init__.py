"""dynexec: a torch.compile backend for dynamic execution of transformer models.

``torch.compile(model, backend="dynexec", options={...})`` finds the model's transformer
blocks in Dynamo's FX graph, rewrites the graph into stages with decision points between
them, lowers each stage with a real compiler and runs them with a small runtime.
"""

from dynexec_compile.config import DynexecConfig, EarlyExitConfig, ElasticConfig, parse_options
from dynexec_compile.models import demo_lm_path, heldout_prompts, load_demo_lm

__all__ = [
    "DynexecConfig",
    "EarlyExitConfig",
    "ElasticConfig",
    "parse_options",
    "demo_lm_path",
    "heldout_prompts",
    "load_demo_lm",
]
