"""The exit decision lowered like a stage equals its PyTorch definition, at any row count."""

import pytest
import torch

from dynexec_compile.backends.kernels.exit_decision import exit_decision_reference
from dynexec_compile.runtime.exit_rules import lower_exit_decision


def awkward_logits(rows: int, classes: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, classes, generator=g) * 4  # x: [A, C]
    if rows >= 3:
        x[1] = float("-inf")  # reads as uniform
        x[2, 0] = float("-inf")  # a masked-out class
    if rows >= 4:
        x[3, 1] = float("nan")  # never exits
    return x.to(dtype)


@pytest.mark.parametrize("lowering", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("rule, threshold", [("entropy", 0.5), ("max_prob", 0.6)])
def test_lowered_decision_equals_the_reference(lowering, rule, threshold):
    for dtype in (torch.float32, torch.bfloat16):
        fn = lower_exit_decision(rule, threshold, 5, dtype, lowering)
        for rows in (7, 1, 4, 33):  # one lowering serves every row count
            logits = awkward_logits(rows, 5, dtype)
            ref = exit_decision_reference(logits, rule, threshold).exit_mask
            assert torch.equal(fn(logits)[0], ref)
