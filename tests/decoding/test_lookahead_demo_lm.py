"""Lookahead decoding of the trained demo code LM (fp32) equals model.generate; prompt lookup
offers the prompt's n-grams before the Jacobi window has produced any."""

import pytest
import torch

import dynexec_compile as dx
from dynexec_compile.models import heldout_prompts, load_demo_lm

# committed with the repository (models/code-lm): a missing model is an error, not a skip
MODEL, TOKENIZER = load_demo_lm("target")


def hf_greedy(ids, mask, max_new_tokens):
    with torch.no_grad():
        return MODEL.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens)


def test_lookahead_on_heldout_code_equals_transformers_with_and_without_prompt_lookup():
    prompts = heldout_prompts(3, 48, TOKENIZER)
    pad = MODEL.generation_config.pad_token_id
    ids, mask = prompts.clone(), torch.ones_like(prompts)
    ids[1, :10], mask[1, :10] = pad, 0  # rows of 48, 38 and 28 tokens, left-padded
    ids[2, :20], mask[2, :20] = pad, 0
    ref = hf_greedy(ids, mask, 48)
    assert len(set(ref[:, 48:].flatten().tolist())) >= 20
    outs = {}
    for prompt_lookup in (True, False):
        out = dx.generate(
            MODEL, ids, mask, strategy="lookahead", max_new_tokens=48, prompt_lookup=prompt_lookup, compile=False
        )
        assert torch.equal(out.sequences, ref)
        assert out.stats.forward_passes == out.stats.steps + 1
        outs[prompt_lookup] = out.stats
    # the window yields its first n-grams after N-1 steps; until then only prompt lookup guesses
    early = outs[True].extra["ngram"] - 1
    assert sum(map(sum, outs[True].extra["guesses_per_step"][:early])) > 0, "the prompt's n-grams were not offered"
    assert sum(map(sum, outs[False].extra["guesses_per_step"][:early])) == 0, "guesses before the window made any"
    assert outs[True].tokens_per_forward > 1, "no guess was ever accepted on code"


@pytest.mark.slow
def test_compiled_lookahead_on_heldout_code_equals_transformers_without_recompiles():
    ids = heldout_prompts(1, 100, TOKENIZER)
    with torch.no_grad():
        ref = MODEL.generate(ids, do_sample=False, max_new_tokens=200, eos_token_id=[], pad_token_id=0)
    kwargs = {"strategy": "lookahead", "max_new_tokens": 200, "eos_token_id": [], "pad_token_id": 0}
    out = dx.generate(MODEL, ids, **kwargs)  # Inductor, frozen weights
    assert torch.equal(out.sequences, ref) and out.stats.tokens_per_forward > 1
    again = dx.generate(MODEL, ids, **kwargs)
    assert again.stats.compiles == 0 and torch.equal(again.sequences, ref)


def test_sampled_lookahead_on_heldout_code_is_reproducible_and_cold_sampling_is_greedy():
    """On the trained LM: the same seed draws the same tokens with guesses accepted, and at a
    temperature near zero sampling keeps exactly the greedy tokens (and as many per forward)."""
    ids = heldout_prompts(1, 48, TOKENIZER)
    kwargs = {"strategy": "lookahead", "max_new_tokens": 48, "eos_token_id": [], "pad_token_id": 0, "compile": False}

    def sample(temperature, seed):
        gen = torch.Generator().manual_seed(seed)
        return dx.generate(MODEL, ids, do_sample=True, temperature=temperature, generator=gen, **kwargs)

    warm, again = sample(0.6, 0), sample(0.6, 0)
    assert torch.equal(warm.sequences, again.sequences)
    assert warm.stats.forward_passes == warm.stats.steps + 1 and warm.stats.tokens_per_forward > 1
    cold, greedy = sample(1e-3, 1), dx.generate(MODEL, ids, **kwargs)
    assert torch.equal(cold.sequences, greedy.sequences)
    assert cold.stats.forward_passes == greedy.stats.forward_passes
