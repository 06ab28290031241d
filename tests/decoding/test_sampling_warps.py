"""The sampling distribution equals transformers' warpers; draws follow the generator."""

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from dynexec_compile.decoding import SamplingParams, draw, sampling_probs, warp_logits


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, None, None), (0.7, None, None), (1.3, 5, None), (1.0, None, 0.8), (0.5, 20, 0.9), (2.0, 1, 0.3)],
)
def test_warps_equal_transformers(temperature, top_k, top_p):
    logits = torch.randn(3, 64) * 3
    logits[0, :4] = logits[0, 4]  # ties at the top-k boundary
    procs = LogitsProcessorList()
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_k is not None:
        procs.append(TopKLogitsWarper(top_k))
    if top_p is not None:
        procs.append(TopPLogitsWarper(top_p))
    expected = procs(torch.zeros(3, 1, dtype=torch.long), logits.clone())
    got = warp_logits(logits, SamplingParams(temperature, top_k, top_p))
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    finite = ~torch.isinf(expected)
    torch.testing.assert_close(got[finite], expected[finite], atol=0, rtol=0)
    torch.testing.assert_close(sampling_probs(logits, SamplingParams(temperature, top_k, top_p)), expected.softmax(-1))


def test_draw_is_reproducible_and_follows_probs():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]]).expand(4000, 4)
    a = draw(probs, torch.Generator().manual_seed(5))
    b = draw(probs, torch.Generator().manual_seed(5))
    c = draw(probs, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    freq = torch.bincount(a, minlength=4).float() / a.numel()
    assert freq[1] == 0
    torch.testing.assert_close(freq, probs[0], atol=0.03, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_bad_sampling_params_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
