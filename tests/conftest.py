"""Shared test fixtures: a clean Dynamo state per test, fp32 determinism, seeded RNG."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()
