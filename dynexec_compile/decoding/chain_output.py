"""Collecting the tokens a multi-token step emits, with ``model.generate``'s stopping rules.

A draft-and-verify step emits ``1 .. k + 1`` tokens per row. :class:`ChainOutput` writes
them into the ``[B, max_new_tokens]`` result, stops a row at its first EOS (the EOS kept,
later tokens dropped) or at ``max_new_tokens``, and fills stopped rows with the pad id — the
output ``model.generate`` gives, since greedy draft-and-verify emits exactly greedy's tokens.
"""

from __future__ import annotations

import torch

from dynexec_compile.decoding.generate import DecodeSettings


class ChainOutput:
    """The generated tokens of a batch, filled step by step.

    Attributes:
        tokens: ``[B, N]`` generated tokens (pad after a row's end).
        count: ``[B]`` tokens generated per row so far.
        finished: ``[B]`` rows that hit EOS or ``N`` tokens.
    """

    def __init__(self, batch: int, settings: DecodeSettings, device: torch.device):
        self.max_new = settings.max_new_tokens
        pad = settings.pad_token_id if settings.pad_token_id is not None else 0
        # [B, N + 1]: column N is scratch, where the tokens a row does not keep are written
        self._buffer = torch.full((batch, self.max_new + 1), pad, dtype=torch.long, device=device)
        self.count = torch.zeros(batch, dtype=torch.long, device=device)  # [B]
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)  # [B]
        self._eos = torch.tensor(settings.eos_token_ids, dtype=torch.long, device=device)  # [E]

    def emit(self, tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Append ``tokens[b, :counts[b]]`` to each unfinished row, stopping at EOS / ``N``.

        Args:
            tokens: ``[B, W]`` candidate tokens per row.
            counts: ``[B]`` how many of them the row emits this step.
        Returns:
            ``[B]`` tokens actually appended per row.
        """
        batch, width = tokens.shape
        j = torch.arange(width, device=tokens.device)[None, :]  # [1, W]
        keep = (j < counts[:, None]) & ~self.finished[:, None] & (self.count[:, None] + j < self.max_new)  # [B, W]
        if self._eos.numel():
            is_eos = torch.isin(tokens, self._eos) & keep  # [B, W]
            first = torch.where(is_eos.any(dim=1), is_eos.long().argmax(dim=1), width)  # [B]
            keep &= j <= first[:, None]
            self.finished |= is_eos.any(dim=1)
        dest = torch.where(keep, self.count[:, None] + j, self.max_new)  # [B, W]
        self._buffer.scatter_(1, dest, tokens)
        added = keep.sum(dim=1)  # [B]
        self.count += added
        self.finished |= self.count >= self.max_new
        return added

    @property
    def tokens(self) -> torch.Tensor:
        return self._buffer[:, : self.max_new]

    @property
    def done(self) -> bool:
        return bool(self.finished.all())

    def sequences(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, L + n]``: the prompts as given, then the generated tokens (``n`` = longest row)."""
        width = int(self.count.max())
        return torch.cat([input_ids.to(self.tokens.device), self.tokens[:, :width]], dim=1)


__all__ = ["ChainOutput"]
