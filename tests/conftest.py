"""Shared test fixtures: a clean Dynamo state per test, fp32 determinism, seeded RNG.

Tests run torch on one intra-op thread (``DYNEXEC_TEST_THREADS`` overrides): the models here
are tiny, so a second thread buys nothing, and on a loaded machine OpenMP's spinning workers
get preempted — a 64-wide linear then takes ~30 ms instead of ~30 us.
"""

import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("DYNEXEC_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()
