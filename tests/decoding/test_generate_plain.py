"""generate(strategy="greedy" | "sample"): token-identical to model.generate, EOS, batches, errors."""

import pytest
import torch
from conftest import build_model, left_padded_batch
from transformers import GPT2Config, GPT2Model

import dynexec_compile as dx


def hf_greedy(model, ids, mask, **kwargs):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, do_sample=False, **kwargs)


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_greedy_equals_transformers_on_a_left_padded_batch(lm, cache):
    ids, mask = left_padded_batch([7, 12, 4])
    ref = hf_greedy(lm, ids, mask, max_new_tokens=40, pad_token_id=0)
    out = dx.generate(lm, ids, mask, max_new_tokens=40, pad_token_id=0, cache=cache, compile=False)
    generated = ref[:, ids.shape[1] :]
    assert len(set(generated.flatten().tolist())) >= 8, "degenerate model: the test could not fail"
    assert torch.equal(out.sequences, ref)


def test_greedy_single_prompt_without_mask(lm):
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(4))
    ref = hf_greedy(lm, ids, None, max_new_tokens=30)
    assert torch.equal(dx.generate(lm, ids, max_new_tokens=30, compile=False).sequences, ref)


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_eos_mid_sequence_stops_that_row_and_pads_it(lm, cache):
    ids, mask = left_padded_batch([6, 10, 8], seed=2)
    width = ids.shape[1]
    free = hf_greedy(lm, ids, mask, max_new_tokens=24, eos_token_id=[], pad_token_id=0)
    # the EOS: a token some row r first generates as its 4th token or later
    r, stop = next(
        (r, k + 1)
        for r, row in enumerate(free[:, width:].tolist())
        for k, t in enumerate(row)
        if k >= 3 and row.index(t) == k
    )
    eos = free[r, width + stop - 1].item()
    ref = hf_greedy(lm, ids, mask, max_new_tokens=24, eos_token_id=eos, pad_token_id=0)
    out = dx.generate(lm, ids, mask, max_new_tokens=24, eos_token_id=eos, pad_token_id=0, cache=cache, compile=False)
    assert torch.equal(out.sequences, ref)
    assert ref.shape[1] > width + stop, "another row must still be generating when row r stops"
    assert (out.sequences[r, width + stop :] == 0).all()
    assert out.stats.new_tokens[r] == stop
    assert out.stats.accepted_per_step[stop - 1][r] == 0 and out.stats.accepted_per_step[stop - 2][r] == 1


def test_stopping_when_every_row_hit_eos_and_pad_defaults_to_eos(llama):
    ids, mask = left_padded_batch([5, 9], seed=5)
    free = hf_greedy(llama, ids, mask, max_new_tokens=20, eos_token_id=[], pad_token_id=0)
    gen = free[:, ids.shape[1] :]
    eos = [gen[0, 3].item(), gen[1, 4].item()]
    ref = hf_greedy(llama, ids, mask, max_new_tokens=20, eos_token_id=eos)  # pad defaults to eos[0]
    out = dx.generate(llama, ids, mask, max_new_tokens=20, eos_token_id=eos, compile=False)
    assert torch.equal(out.sequences, ref)
    assert out.sequences.shape[1] <= ids.shape[1] + 5


def test_stats_count_forwards_and_tokens(llama):
    ids, mask = left_padded_batch([5, 9])
    out = dx.generate(llama, ids, mask, max_new_tokens=12, eos_token_id=[], compile=False)
    stats = out.stats
    assert out.sequences.shape == (2, ids.shape[1] + 12)
    assert stats.strategy == "greedy" and stats.compiles == 0
    assert stats.forward_passes == 12 and stats.steps == 11
    assert stats.new_tokens == [12, 12] and stats.tokens_per_step == 1.0
    assert stats.tokens_per_forward == 1.0 and stats.tokens_per_second > 0


def test_sampling_reproduces_its_draws_and_top_k_1_is_greedy(llama):
    ids, mask = left_padded_batch([6, 11])

    def sample(seed, **kwargs):
        gen = torch.Generator().manual_seed(seed)
        return dx.generate(
            llama, ids, mask, strategy="sample", max_new_tokens=30, eos_token_id=[], generator=gen,
            compile=False, **kwargs,
        ).sequences

    a, b, c = sample(1, temperature=1.5), sample(1, temperature=1.5), sample(2, temperature=1.5)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    greedy = dx.generate(llama, ids, mask, max_new_tokens=30, eos_token_id=[], compile=False).sequences
    assert not torch.equal(a, greedy)
    assert torch.equal(sample(3, top_k=1), greedy)
    assert torch.equal(sample(4, top_p=1e-6), greedy)


def test_the_users_model_is_not_modified(llama):
    config = llama.config.to_dict()
    attributes = set(vars(llama))
    params = {k: v.clone() for k, v in llama.state_dict().items()}
    ids, mask = left_padded_batch([5, 9])
    dx.generate(llama, ids, mask, max_new_tokens=5, compile=False)
    dx.generate(llama, ids, mask, max_new_tokens=5, cache="dynamic", compile=False)
    assert llama.config.to_dict() == config and set(vars(llama)) == attributes and not llama.training
    assert llama.config._attn_implementation == "sdpa", "the engine traces eager attention only during its calls"
    assert all(torch.equal(v, params[k]) for k, v in llama.state_dict().items())


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"strategy": "beam"}, ValueError, "unknown strategy 'beam'"),
        ({"strategy": "speculative"}, ValueError, "needs draft_model"),
        ({"strategy": "draft_heads"}, ValueError, "needs heads="),
        ({"strategy": "self_speculative"}, ValueError, "needs exit_layer="),
        ({"strategy": "sample", "temperature": 0.0}, ValueError, "temperature"),
        ({"strategy": "sample", "top_p": 0.0}, ValueError, "top_p"),
        ({"strategy": "sample", "top_k": 0}, ValueError, "top_k"),
        ({"strategy": "sample", "do_sample": False}, ValueError, "use strategy='greedy'"),
        ({"do_sample": True}, ValueError, "use strategy='sample'"),
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens"),
        ({"cache": "paged"}, ValueError, "cache='paged'"),
        ({"eos_token_id": "x"}, ValueError, "eos_token_id"),
        ({"pad_token_id": 1.5}, ValueError, "pad_token_id"),
        ({"window": 3}, TypeError, "no options"),
    ],
)
def test_bad_arguments_raise(llama, kwargs, error, message):
    ids = torch.ones(1, 4, dtype=torch.long)
    kwargs = {"max_new_tokens": 4, "compile": False, **kwargs}
    with pytest.raises(error, match=message):
        dx.generate(llama, ids, **kwargs)


def test_a_model_without_lm_head_is_refused():
    model = GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2)).eval()
    with pytest.raises(ValueError, match="causal LM"):
        dx.generate(model, torch.ones(1, 4, dtype=torch.long), max_new_tokens=2)


def test_bf16_greedy_runs_and_mostly_agrees():
    """bf16 kernels round differently from HF's growing cache, so only near-agreement holds."""
    model = build_model("llama", dtype=torch.bfloat16)
    ids, mask = left_padded_batch([6, 9])
    ref = hf_greedy(model, ids, mask, max_new_tokens=16, pad_token_id=0)
    out = dx.generate(model, ids, mask, max_new_tokens=16, pad_token_id=0, compile=False)
    assert out.sequences.shape == ref.shape
    assert torch.equal(out.sequences[:, : ids.shape[1] + 1], ref[:, : ids.shape[1] + 1])
