"""dynexec: a torch.compile backend for dynamic execution of transformer models.

``torch.compile(model, backend="dynexec", options={...})`` finds the model's transformer
blocks in Dynamo's FX graph, rewrites the graph into stages with decision points between
them, lowers each stage with a real compiler and runs them with a small runtime.
"""

from dynexec_compile.config import DynexecConfig, EarlyExitConfig, ElasticConfig, parse_options
from dynexec_compile.decoding import DecodeEngine, GenerateOutput, SlotCache, generate

__all__ = [
    "DecodeEngine",
    "DynexecConfig",
    "EarlyExitConfig",
    "ElasticConfig",
    "GenerateOutput",
    "SlotCache",
    "generate",
    "parse_options",
]
