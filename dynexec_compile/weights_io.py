"""Small modules (exit heads, draft heads) saved as safetensors with their configuration.

Never pickle: the tensors go into a safetensors file and the configuration needed to rebuild
the module into its metadata as JSON under a per-kind key, with a format version, so a file
of one kind is refused by the other's loader with a message saying what it is not.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def save_with_config(
    module: torch.nn.Module, path: str | os.PathLike, key: str, config: dict[str, Any], dtype: torch.dtype | None = None
) -> None:
    """Write ``module``'s state dict (cast to ``dtype`` when given) with ``config`` under ``key``."""
    tensors = {
        name: (tensor.to(dtype) if dtype is not None else tensor).detach().cpu().contiguous()
        for name, tensor in module.state_dict().items()
    }
    save_tensors(tensors, path, key, config)


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, key: str, config: dict[str, Any]) -> None:
    """Write ``tensors`` with ``config`` under ``key`` (what :func:`read_with_config` reads)."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.fspath(path), metadata={key: json.dumps(config)})


def read_with_config(
    path: str | os.PathLike, key: str, what: str, format_version: int
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config, tensors)`` of a file written by :func:`save_with_config`.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file has no ``key`` metadata (not a ``what`` file) or another format version.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {what} file at {path}")
    with safe_open(path, framework="pt") as reader:
        metadata = reader.metadata() or {}
    if key not in metadata:
        raise ValueError(f"{path} is not a dynexec {what} file (no {key!r} metadata)")
    config = json.loads(metadata[key])
    if config.get("format_version") != format_version:
        raise ValueError(f"{path}: unsupported {what} format {config.get('format_version')!r}")
    return config, load_file(path)
