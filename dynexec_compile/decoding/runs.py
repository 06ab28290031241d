"""The generated tokens of every strategy: one output buffer, one stop rule, one stream.

Why one class: a step keeps a different number of tokens per row (one for plain decoding,
``1 .. k + 1`` for lookahead and draft-and-verify), and the run a row keeps must still stop
exactly where ``model.generate`` would: at the row's first EOS (EOS included,
``pad_token_id`` after it) and at ``max_new_tokens``, never past them. Every strategy's
tokens go through :meth:`TokenRuns.keep` (or :meth:`TokenRuns.append` for counts a compiled
step already cut with :func:`stop_counts`), so the stop rule and the streamer see the same
tokens for all of them.
"""

from __future__ import annotations

from typing import Any

import torch


class TokenRuns:
    """Per-row output buffer of a multi-token decoding loop, with EOS and length limits.

    Args:
        batch_size: rows ``B``.
        max_new_tokens: the most tokens a row may generate.
        width: the longest run one step may offer (``K``).
        eos_token_ids: a row stops after the first of these it keeps; empty: never.
        pad_token_id: fills a row after its EOS (``None`` only when there is no EOS).
        device: where the buffers live.
        streamer: an object with transformers' ``BaseStreamer`` protocol (``put``, ``end``);
            batch 1 only. Each :meth:`append` puts the tokens the row kept (1-D, never past
            its EOS, never padding); the caller puts the prompt first and calls ``end``.

    Attributes:
        produced: ``[B]`` tokens kept so far per row (EOS included).
        finished: ``[B]`` whether the row has kept an EOS.
    """

    def __init__(
        self,
        batch_size: int,
        max_new_tokens: int,
        width: int,
        eos_token_ids: tuple[int, ...],
        pad_token_id: int | None,
        device: torch.device,
        streamer: Any = None,
    ):
        if streamer is not None and batch_size != 1:
            raise ValueError(f"streamer= streams one sequence (batch size 1), got a batch of {batch_size} rows")
        if eos_token_ids and pad_token_id is None:
            raise ValueError("TokenRuns: rows that stop at EOS need a pad_token_id to fill them")
        fill = 0 if pad_token_id is None else pad_token_id
        self.max_new_tokens = max_new_tokens
        self.new = torch.full((batch_size, max_new_tokens + width), fill, dtype=torch.long, device=device)  # [B, M+K]
        self.produced = torch.zeros(batch_size, dtype=torch.long, device=device)  # [B]
        self.finished = torch.zeros(batch_size, dtype=torch.bool, device=device)  # [B]
        self.eos = torch.tensor(eos_token_ids, dtype=torch.long, device=device)  # [E]
        self.limit = torch.tensor(max_new_tokens, dtype=torch.long, device=device)  # 0-d, for traced code
        self._offsets = torch.arange(width, device=device)  # [K]
        self.streamer = streamer

    @property
    def done(self) -> torch.Tensor:
        """``[B]`` rows that will keep no more tokens (EOS kept, or ``max_new_tokens`` reached)."""
        return self.finished | (self.produced >= self.max_new_tokens)

    def all_done(self) -> bool:
        return bool(self.done.all())

    def keep(self, run: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Append the first ``counts[b]`` tokens of ``run[b]``, cut at EOS and ``max_new_tokens``.

        Args:
            run: ``[B, K']`` (``K' <= width``) tokens offered per row, in order.
            counts: ``[B]`` how many of them the row accepted (``<= K'``).
        Returns:
            ``[B]`` tokens actually kept: 0 for rows already done.
        """
        counts, hit = stop_counts(run, counts, self.produced, self.finished, self.limit, self.eos)
        self.append(run, counts, hit)
        return counts

    def append(self, run: torch.Tensor, counts: torch.Tensor, hit: torch.Tensor) -> None:
        """:meth:`keep` for counts already cut by :func:`stop_counts` (e.g. inside a compiled
        step): append ``run[b, :counts[b]]``; rows with ``hit`` are finished."""
        self.finished |= hit
        offsets = self._offsets[: run.shape[1]]  # [K']
        index = self.produced[:, None] + offsets  # [B, K']
        kept = torch.where(offsets < counts[:, None], run, self.new.gather(1, index))
        self.new.scatter_(1, index, kept)
        self.produced += counts
        if self.streamer is not None:
            count = int(counts[0])
            if count:
                self.streamer.put(run[0, :count].cpu())

    def sequences(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, L + n]``: the prompts as given, then the generated tokens; ``n`` is the longest
        row's count, shorter (finished) rows padded."""
        longest = int(self.produced.max())
        return torch.cat([input_ids.to(self.new.device), self.new[:, :longest]], dim=1)


def stop_counts(
    run: torch.Tensor,
    counts: torch.Tensor,
    produced: torch.Tensor,
    finished: torch.Tensor,
    limit: torch.Tensor,
    eos: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """How many of ``run``'s first ``counts`` tokens each row keeps: none once the row is done,
    at most ``limit - produced``, and up to and including its first EOS. Fixed-shape tensor
    work only, so a compiled step can decide (and commit) exactly what :meth:`TokenRuns.keep`
    will keep.

    Args:
        run: ``[B, K]`` tokens offered per row; counts: ``[B]`` accepted of them.
        produced: ``[B]`` kept so far; finished: ``[B]`` EOS kept; limit: 0-d ``max_new_tokens``.
        eos: ``[E]`` stop tokens (may be empty).
    Returns:
        ``(counts [B], hit [B])``: tokens kept, and whether an EOS is among them.
    """
    offsets = torch.arange(run.shape[1], device=run.device)  # [K]
    counts = torch.minimum(counts, limit - produced)
    counts = counts.masked_fill(finished | (produced >= limit), 0)  # [B]
    if eos.numel() == 0:
        return counts, torch.zeros_like(finished)
    is_eos = torch.isin(run, eos) & (offsets < counts[:, None])  # [B, K]
    hit = is_eos.any(dim=1)  # [B]
    return torch.where(hit, is_eos.long().argmax(dim=1) + 1, counts), hit
