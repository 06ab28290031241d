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

Training (:func:`train_draft_heads`) is self-distillation with the backbone frozen: head
``i`` at position ``t`` learns the model's own next-token distribution at position
``t + i`` (KL divergence), on teacher-forced text — no labels, and the heads learn what the
target will say, which is what verification accepts. Heads are saved as safetensors with
their configuration in the file's metadata.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from dynexec_compile.decoding.step import check_causal_lm
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


# ---- training --------------------------------------------------------------------------------


def train_draft_heads(
    model: PreTrainedModel,
    data: torch.Tensor | Iterable[torch.Tensor],
    offsets: int = 3,
    *,
    heads: DraftHeads | None = None,
    num_layers: int = 1,
    steps: int | None = None,
    batch_size: int = 8,
    seq_len: int = 256,
    lr: float = 3e-3,
    temperature: float = 1.0,
    weight_decay: float = 0.0,
    progress: bool = True,
) -> DraftHeads:
    """Train ``offsets`` draft heads on a frozen causal LM by self-distillation; fp32, eval mode.

    Head ``i`` (``1 <= i <= offsets``) at position ``t`` is fitted to the model's own
    next-token distribution at position ``t + i`` (KL divergence, teacher-forced), i.e. the
    token ``t + 1 + i`` the model would predict. The model is never modified: it runs under
    ``torch.no_grad()`` and only the heads are optimised (AdamW, linear decay to 0).

    Args:
        model: a transformers causal LM in eval mode with a ``base_model`` returning the final
            (post-norm) hidden state, and an output projection.
        data: token ids: a 1-D stream (cut into ``seq_len`` windows, ``batch_size`` per step),
            a 2-D ``[N, S]`` tensor of sequences (``batch_size`` rows per step), or an
            iterable of ``[B, S]`` tensors (one step each) or of ``([B, S] ids, [B, S] bool
            mask)`` pairs: the mask marks the positions whose guesses are trained (e.g. from
            the last prompt token on, for heads that will draft answers, not prompts).
        offsets: ``k``, heads to train (ignored when ``heads`` is given).
        heads: heads to train further (a trained copy is returned; the given ones are unchanged).
        num_layers: residual blocks per new head.
        steps: optimiser steps; ``None`` = one pass over ``data`` (needs a tensor or a sized iterable).
        batch_size, seq_len: batching of tensor ``data``.
        lr, weight_decay: AdamW settings.
        temperature: softens teacher and student alike.
        progress: show a tqdm progress bar.
    """
    check_causal_lm(model)
    if temperature <= 0 or lr <= 0:
        raise ValueError(f"need lr > 0 and temperature > 0, got lr={lr}, temperature={temperature}")
    if heads is None:
        heads = DraftHeads(int(model.config.hidden_size), offsets, num_layers, int(model.config.vocab_size))
    else:
        heads = copy.deepcopy(check_heads_fit(model, heads))
    device = next(model.parameters()).device
    heads = heads.to(device=device, dtype=torch.float32).train()
    lm_head = model.get_output_embeddings()
    fit_heads(
        heads,
        _batches(data, batch_size, seq_len, steps),
        lambda batch: _distill_loss(model, heads, lm_head, batch, temperature),
        lr=lr,
        weight_decay=weight_decay,
        desc="draft heads",
        progress=progress,
    )
    return heads.eval()


def fit_heads(
    heads: nn.Module,
    batches: tuple[Iterator[torch.Tensor], int],
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    lr: float,
    weight_decay: float,
    desc: str,
    progress: bool,
) -> None:
    """The self-distillation loop heads on a frozen model share: AdamW, linear decay to 0 over
    the ``(iterator, total)`` of :func:`_batches`, ``loss_fn(ids)`` per step, a progress bar."""
    steps, total = batches
    optimizer = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total))
    with tqdm(total=total, desc=desc, disable=not progress, unit="step") as bar:
        for ids in steps:
            loss = loss_fn(ids)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")


def _distill_loss(
    model: PreTrainedModel,
    heads: DraftHeads,
    lm_head: nn.Module,
    batch: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    temperature: float,
) -> torch.Tensor:
    """Mean over heads of KL(model's distribution at ``t + i`` || head ``i`` at ``t``), over the
    positions ``t`` the batch's mask marks (all when it has none)."""
    ids, mask = batch if isinstance(batch, tuple) else (batch, None)
    ids = ids.to(lm_head.weight.device)
    with torch.no_grad():
        h = model.base_model(input_ids=ids).last_hidden_state.float()  # [B, S, D], after the final norm
        teacher = F.log_softmax(lm_head(h.to(lm_head.weight.dtype)).float() / temperature, dim=-1)  # [B, S, V]
    k, seq = heads.num_heads, ids.shape[1]
    if seq <= k:
        raise ValueError(f"training sequences need more than offsets={k} tokens, got {seq}")
    student = heads.features(h[:, : seq - 1])  # [B, S-1, k, D]
    weight = lm_head.weight.detach().float()  # [V, D], frozen: no gradient reaches the model
    losses = []
    for i in range(1, k + 1):
        logits = F.linear(student[:, : seq - i, i - 1], weight)  # [B, S-i, V]: head i at t
        target = teacher[:, i:]  # [B, S-i, V]: the model at t + i
        log_q = F.log_softmax(logits / temperature, dim=-1)
        kl = F.kl_div(log_q, target, log_target=True, reduction="none").sum(-1)  # [B, S-i]
        if mask is None:
            losses.append(kl.mean() * temperature**2)
        else:
            marked = mask[:, : seq - i].to(device=kl.device, dtype=kl.dtype)  # [B, S-i]
            losses.append((kl * marked).sum() / marked.sum().clamp(min=1) * temperature**2)
    return torch.stack(losses).mean()


def _batches(
    data: torch.Tensor | Iterable[torch.Tensor], batch_size: int, seq_len: int, steps: int | None
) -> tuple[Iterator[torch.Tensor], int]:
    """``(iterator of [B, S] id batches, number of steps)`` for :func:`train_draft_heads`."""
    if torch.is_tensor(data):
        if data.dtype not in (torch.int64, torch.int32) or data.ndim not in (1, 2):
            raise TypeError(f"data must be int token ids, 1-D or [N, S]; got {data.dtype} {tuple(data.shape)}")
        rows = data.long()
        if rows.ndim == 1:
            n = rows.numel() // seq_len
            if n == 0:
                raise ValueError(f"data holds {rows.numel()} tokens, fewer than seq_len={seq_len}")
            rows = rows[: n * seq_len].view(n, seq_len)
        per_pass = -(-rows.shape[0] // batch_size)
        total = steps or per_pass

        def cycle() -> Iterator[torch.Tensor]:
            for step in range(total):
                start = (step % per_pass) * batch_size
                yield rows[start : start + batch_size]

        return cycle(), total
    if steps is None and not hasattr(data, "__len__"):
        raise ValueError("data is an iterable without a length: pass steps=")
    total = steps or len(data)  # type: ignore[arg-type]

    def take() -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        for step, batch in enumerate(data):
            if step == total:
                return
            ids, mask = batch if isinstance(batch, tuple) and len(batch) == 2 else (batch, None)
            if not torch.is_tensor(ids) or ids.ndim != 2:
                raise TypeError(
                    f"each batch must be a [B, S] tensor of token ids or an (ids, mask) pair, got {type(batch).__name__}"
                )
            if mask is not None and (not torch.is_tensor(mask) or mask.shape != ids.shape):
                raise ValueError(f"a batch's mask must be a tensor shaped like its ids {tuple(ids.shape)}")
            yield batch

    return take(), total


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


__all__ = ["DraftHeads", "ResidualBlock", "load_draft_heads", "save_draft_heads", "train_draft_heads"]
