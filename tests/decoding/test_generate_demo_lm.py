"""Greedy decoding of the trained demo code LM (fp32) equals model.generate, both caches."""

import pytest
import torch

import dynexec_compile as dx
from dynexec_compile.models import heldout_prompts, load_demo_lm

# committed with the repository (models/code-lm): a missing model is an error, not a skip
MODEL, TOKENIZER = load_demo_lm("target")


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_greedy_on_heldout_code_equals_transformers(cache):
    prompts = heldout_prompts(3, 48, TOKENIZER)
    pad = MODEL.generation_config.pad_token_id
    ids = prompts.clone()
    mask = torch.ones_like(ids)
    ids[1, :10], mask[1, :10] = pad, 0  # rows of 48, 38 and 28 tokens, left-padded
    ids[2, :20], mask[2, :20] = pad, 0
    with torch.no_grad():
        ref = MODEL.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=48)
    out = dx.generate(MODEL, ids, mask, max_new_tokens=48, cache=cache, compile=False)
    assert len(set(ref[:, 48:].flatten().tolist())) >= 20
    assert torch.equal(out.sequences, ref)


@pytest.mark.slow
def test_compiled_greedy_on_heldout_code_equals_transformers():
    ids = heldout_prompts(1, 100, TOKENIZER)
    with torch.no_grad():
        ref = MODEL.generate(ids, do_sample=False, max_new_tokens=200, eos_token_id=[], pad_token_id=0)
    out = dx.generate(MODEL, ids, max_new_tokens=200, eos_token_id=[], pad_token_id=0)  # Inductor, frozen
    assert torch.equal(out.sequences, ref)
    again = dx.generate(MODEL, ids, max_new_tokens=200, eos_token_id=[], pad_token_id=0)
    assert again.stats.compiles == 0 and torch.equal(again.sequences, ref)
