"""The one optimisation loop of dynexec's small training jobs (fine-tuning, level LoRAs, exit
heads, draft heads, LM exit heads, the prompt scorer, the router classifier; heads on a frozen
model use ``warmup=0, clip=None``).

AdamW, linear warm-up then linear decay to 0 over the steps actually run, gradient clipping,
a tqdm bar with the smoothed loss, and the wall-clock and process CPU time it took (the
figures a model card reports).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm


@dataclass
class TrainResult:
    steps: int
    examples: int
    final_loss: float  # exponentially smoothed (0.98)
    seconds: float
    cpu_seconds: float


class Minibatches:
    """Index minibatches ``[b]`` over ``n`` rows, reshuffled on every pass: the re-iterable, sized
    ``batches`` of :func:`optimize` for data held in memory (``loss_fn`` indexes it)."""

    def __init__(self, n: int, size: int, seed: int = 0):
        self.n, self.size, self.gen = n, size, torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(self.n / self.size)

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.gen).split(self.size))


def _batch_size(batch: Any) -> int:
    if isinstance(batch, Mapping):
        batch = next(iter(batch.values()))
    elif isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    return int(batch.shape[0]) if isinstance(batch, torch.Tensor) and batch.dim() else 1


def optimize(
    params: Iterable[torch.Tensor] | list[dict[str, Any]],
    batches: Iterable[Any],
    loss_fn: Callable[[Any], torch.Tensor],
    *,
    epochs: int = 1,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    warmup: float = 0.06,
    max_steps: int | None = None,
    clip: float | None = 1.0,
    progress: bool = True,
    desc: str = "train",
) -> TrainResult:
    """Minimise ``loss_fn(batch)`` over ``epochs`` passes of ``batches``.

    Args:
        params: the tensors to optimise, or AdamW parameter groups (dicts).
        batches: re-iterable (a list or a DataLoader); with a length the schedule spans
            ``epochs * len(batches)`` steps (or ``max_steps`` when smaller).
        warmup: fraction of the steps of linear warm-up.
        clip: gradient-norm clipping (``None``: off).

    Raises:
        ValueError: ``epochs < 1``, ``lr <= 0`` or no batches.
    """
    if epochs < 1 or lr <= 0:
        raise ValueError(f"optimize: need epochs >= 1 and lr > 0, got {epochs} and {lr}")
    params = list(params)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    tensors = [p for g in params for p in g["params"]] if params and isinstance(params[0], dict) else params
    total = epochs * len(batches) if hasattr(batches, "__len__") else max_steps
    if max_steps is not None and total is not None:
        total = min(total, max_steps)
    if total == 0:
        raise ValueError("optimize: no batches to train on")
    warm = max(1, int(warmup * total)) if total else 1
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min((step + 1) / warm, max(0.0, (total - step) / max(1, total - warm))) if total else 1.0,
    )
    running, steps, examples = float("nan"), 0, 0
    start, cpu_start = time.perf_counter(), time.process_time()
    with tqdm(total=total, desc=desc, unit="step", mininterval=10, disable=not progress) as bar:
        for _ in range(epochs):
            for batch in batches:
                loss = loss_fn(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(tensors, clip)
                optimizer.step()
                schedule.step()
                value = loss.item()
                running = value if steps == 0 else 0.98 * running + 0.02 * value
                steps += 1
                examples += _batch_size(batch)
                bar.update(1)
                bar.set_postfix(loss=f"{running:.4f}", refresh=False)
                if steps == total:
                    break
            if steps == total:
                break
    return TrainResult(steps, examples, running, time.perf_counter() - start, time.process_time() - cpu_start)
