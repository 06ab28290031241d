"""Recording every exit's logits, for calibration and threshold sweeps.

Choosing an exit threshold needs, for each validation sample, the score every exit *would*
give it; running the model once per candidate threshold would cost a full validation pass
each. Inside ``with record_exit_logits() as rec:`` the early-exit runtime lets no sample
leave: it runs every block, evaluates every exit head on the whole batch and appends the
logits to ``rec``, and returns the full model's outputs. Any threshold's exits can then be
replayed from the recording (``dynexec_compile.calibrate``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from dynexec_compile.config import EarlyExitConfig

_local = threading.local()


@dataclass
class RecordedCall:
    """The exits of one call of an early-exit compiled model."""

    cfg: EarlyExitConfig  # the settings it was compiled with
    num_blocks: int
    exit_blocks: list[int]  # blocks followed by an exit, in order
    exit_logits: torch.Tensor  # [B, E, C]: logits of exit e for each sample (fp32, CPU)
    final_logits: torch.Tensor  # [B, C]: the full model's logits (fp32, CPU)


@dataclass
class ExitRecording:
    """What the early-exit runtime appended while recording: one entry per compiled call."""

    calls: list[RecordedCall] = field(default_factory=list)


def active_recording() -> ExitRecording | None:
    """The recording the early-exit runtime should append to in this thread, if any."""
    return getattr(_local, "recording", None)


@contextmanager
def record_exit_logits() -> Iterator[ExitRecording]:
    """Make early-exit compiled models in this thread run every block and record every exit.

    Outputs inside the block are the full model's. Nesting replaces the outer recording until
    the inner block ends.
    """
    previous = active_recording()
    _local.recording = ExitRecording()
    try:
        yield _local.recording
    finally:
        _local.recording = previous
