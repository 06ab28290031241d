"""Per-thread statistics of the most recent dynexec call (``dynexec_compile.last_stats()``)."""

from __future__ import annotations

import threading
from typing import Any

_local = threading.local()


def record_stats(stats: dict[str, Any]) -> None:
    _local.stats = stats


def last_stats() -> dict[str, Any]:
    """Statistics of the most recent dynexec-compiled call in this thread (a copy).

    Keys depend on what ran: ``stages_run``; with early exit ``exit_layer`` (per sample, the
    block index after which it left; ``num_blocks - 1`` for samples that ran to the end),
    ``layers_executed``; with elastic sub-models ``elastic_level``. Empty before any call.
    """
    return dict(getattr(_local, "stats", {}))
