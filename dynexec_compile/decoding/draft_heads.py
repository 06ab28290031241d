"""Medusa-style draft heads: guess tokens 2..k+1 ahead from the final hidden state.

A causal LM's final hidden state at position ``t`` already determines its next token
``t + 1`` (through the LM head). Draft head ``i`` (``i = 1..k``) is a small residual block
``x + SiLU(W x + b)`` on that same hidden state, followed by the model's own LM head, and is
trained to predict token ``t + 1 + i``. With them, one forward of the target both verifies
the previous step's candidates and proposes the next ones (see ``draft_heads_decode.py``).

Why the model's own (tied, frozen) LM head rather than a projection per head, as Medusa-1
does: a ``[V, D]`` projection per head is ``V / D`` times the size of the residual block
(16x for the demo LM's 4096 x 256), so the heads would train slower on a CPU, ship k large
files and need an initialisation anyway (Medusa copies the LM head); sharing it keeps each
head to ``D^2 + D`` parameters and, with the residual weights initialised to zero, every
head starts out as the model's own next-token prediction — a sensible first guess for the
token after. The LM head is applied once to all heads' features together.

Training (:func:`~dynexec_compile.distill.train_draft_heads`) is self-distillation with the
backbone frozen: head ``i`` at position ``t`` learns the model's own next-token distribution
at position ``t + i``. Heads are saved as safetensors with their configuration in the file's
metadata.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from dynexec_compile.weights_io import read_with_config, save_with_config

METADATA_KEY = "dynexec_draft_heads"
FORMAT_VERSION = 1


class ResidualBlock(nn.Module):
    """``x + SiLU(W x + b)``; ``W`` and ``b`` start at zero, so the block starts as the identity."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))  # [..., D]


class DraftHeads(nn.Module):
    """``k`` draft heads reading the final (post-norm) hidden state; head ``i`` guesses offset ``i + 1``.

    Args:
        hidden_size: ``D`` of the model the heads read.
        num_heads: ``k``, future offsets ``2 .. k + 1`` (offset 1 is the model's own head).
        num_layers: residual blocks per head.
        vocab_size: ``V`` of the model's LM head (checked when the heads meet a model).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_layers: int = 1, vocab_size: int | None = None):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads), ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DraftHeads: {name} must be an int >= 1, got {value!r}")
        self.blocks = nn.ModuleList(
            nn.Sequential(*[ResidualBlock(hidden_size) for _ in range(num_layers)]) for _ in range(num_heads)
        )
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.vocab_size = vocab_size

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` final hidden states -> ``[..., k, D]`` inputs of the LM head, one per head."""
        return torch.stack([block(h) for block in self.blocks], dim=-2)

    def forward(self, h: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """``[..., D]`` -> ``[..., k, V]`` logits of the tokens ``2 .. k + 1`` ahead."""
        return lm_head(self.features(h))

    def config(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "hidden_size": self.hidden_size,
            "num_heads": self.num_heads,
            "num_layers": self.num_layers,
            "vocab_size": self.vocab_size,
        }


def check_heads_fit(model: PreTrainedModel, heads: Any) -> DraftHeads:
    """Raise ``TypeError``/``ValueError`` unless ``heads`` are :class:`DraftHeads` for ``model``."""
    if not isinstance(heads, DraftHeads):
        raise TypeError(
            f"heads must be DraftHeads (from train_draft_heads or load_draft_heads), got {type(heads).__name__}"
        )
    hidden, vocab = int(model.config.hidden_size), int(model.config.vocab_size)
    if heads.hidden_size != hidden or (heads.vocab_size is not None and heads.vocab_size != vocab):
        raise ValueError(
            f"draft heads were built for hidden size {heads.hidden_size} and vocabulary {heads.vocab_size}; "
            f"this {type(model).__name__} has {hidden} and {vocab}: train heads for this model"
        )
    return heads


# ---- saving and loading ------------------------------------------------------------------------


def save_draft_heads(heads: DraftHeads, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Write ``heads`` to a safetensors file (configuration in the metadata), optionally cast to ``dtype``."""
    if not isinstance(heads, DraftHeads):
        raise TypeError(f"expected DraftHeads, got {type(heads).__name__}")
    save_with_config(heads, path, METADATA_KEY, heads.config(), dtype)


def load_draft_heads(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> DraftHeads:
    """Read heads written by :func:`save_draft_heads`; ``dtype=None`` keeps the stored dtype. Eval mode."""
    config, tensors = read_with_config(path, METADATA_KEY, "draft-heads", FORMAT_VERSION)
    heads = DraftHeads(config["hidden_size"], config["num_heads"], config["num_layers"], config["vocab_size"])
    heads = heads.to(dtype=next(iter(tensors.values())).dtype)
    heads.load_state_dict(tensors, strict=True)
    return heads.to(device=device, dtype=dtype).eval()


__all__ = ["DraftHeads", "ResidualBlock", "check_heads_fit", "load_draft_heads", "save_draft_heads"]
