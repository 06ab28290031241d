"""The Inductor lowering: Triton kernels on GPU, C++/OpenMP on CPU.

Called from inside Dynamo's backend call, with the stage's fake example inputs, through
Inductor's own entry point (``compile_fx``), the same one ``torch.compile`` uses.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch.fx as fx


def lower_inductor(gm: fx.GraphModule, example_inputs: Sequence):
    from torch._inductor.compile_fx import compile_fx

    # compile_fx takes ownership of (and may mutate) its graph module: give it a copy so the
    # stage graph stays inspectable and can be lowered again.
    owned = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    return compile_fx(owned, list(example_inputs))
