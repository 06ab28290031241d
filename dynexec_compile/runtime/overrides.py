"""Per-thread, nestable overrides of what a compiled model does on its next calls.

``with elastic_level(0.5):``, ``with elastic_slo(5.0):`` and ``with exit_rule(...):`` all
push a value for the calling thread and pop it on exit; the runtimes read the innermost one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_local = threading.local()
NOT_SET = object()


@contextmanager
def overriding(name: str, value: Any) -> Iterator[None]:
    """Make ``value`` this thread's innermost ``name`` override inside the block."""
    stack = _local.__dict__.setdefault(name, [])
    stack.append(value)
    try:
        yield
    finally:
        stack.pop()


def current(name: str) -> Any:
    """This thread's innermost ``name`` override, or ``NOT_SET``."""
    stack = getattr(_local, name, None)
    return stack[-1] if stack else NOT_SET
