"""dynexec: a torch.compile backend for dynamic execution of transformer models.

``torch.compile(model, backend="dynexec", options={...})`` finds the model's transformer
blocks in Dynamo's FX graph, rewrites the graph into stages with decision points between
them, lowers each stage with a real compiler and runs them with a small runtime.
"""

from dynexec_compile.config import DynexecConfig, EarlyExitConfig, ElasticConfig, parse_options
from dynexec_compile.exit_heads import (
    ExitHeads,
    attach_exit_heads,
    detach_exit_heads,
    get_exit_heads,
    load_exit_heads,
    save_exit_heads,
    train_exit_heads,
)

__all__ = [
    "DynexecConfig",
    "EarlyExitConfig",
    "ElasticConfig",
    "ExitHeads",
    "attach_exit_heads",
    "detach_exit_heads",
    "get_exit_heads",
    "load_exit_heads",
    "parse_options",
    "save_exit_heads",
    "train_exit_heads",
]
