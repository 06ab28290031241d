"""The eager lowering: the FX graph's own generated Python, for tests and debugging."""

from __future__ import annotations

from collections.abc import Sequence

import torch.fx as fx


def lower_eager(gm: fx.GraphModule, example_inputs: Sequence):
    return gm.forward
