"""generate(strategy="lookahead", do_sample=True): lossless rejection sampling of the guessed n-grams.

The statistical tests run a tiny LLaMA over an 8-token vocabulary, many rows of one
left-padded batch of two prompts, and compare the joint distribution of three generated
tokens with the exact one computed from the model, under temperature, top-k and top-p. The
prompts are the model's own greedy continuations, which repeat themselves: the n-gram pool
and prompt lookup then guess tokens the model finds likely, and guesses get accepted (a
random prompt's guesses almost never are, and the test would prove little). The same test
must catch a wrong acceptance rule (a rejected guess left in the residual), so it can fail.
The rest: the trie merge, reproducible draws, cache surgery, one forward per step, no
recompiles.
"""

import importlib

import pytest
import torch
from conftest import SAMPLING_WARPS, chi_square_pvalue, left_padded_batch, tiny_sampling_lm
from conftest import exact_joint as conftest_exact_joint
from torch._dynamo.testing import CompileCounterWithBackend

import dynexec_compile as dx
from dynexec_compile.decoding import (
    DecodeEngine,
    LookaheadConfig,
    SamplingParams,
    lookahead_decode,
)
from dynexec_compile.decoding.generate import DecodeSettings, cache_length
from dynexec_compile.decoding.guess_trie import merge_guesses, verify_guesses

V, ROWS, N = 8, 2000, 3
# the package re-exports the function verify under the submodule's name
verify_module = importlib.import_module("dynexec_compile.decoding.verify")
OPTIONS = {"window": 2, "ngram": 4, "guesses": 3}
PARAMS = SAMPLING_WARPS


@pytest.fixture(scope="module")
def tiny():
    model = tiny_sampling_lm(V, 256)
    with torch.no_grad():  # prompts of lengths 9 and 7: greedy continuations of 1 and of 4
        prompts = [model.generate(torch.tensor([[t]]), do_sample=False, max_new_tokens=n - 1)[0].tolist() for t, n in ((1, 9), (4, 7))]
    return model, prompts


def batch_of(prompts, rows_each):
    """``rows_each`` copies of every prompt, interleaved, left-padded with 0."""
    width = max(map(len, prompts))
    ids = torch.zeros(rows_each * len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r in range(ids.shape[0]):
        prompt = prompts[r % len(prompts)]
        ids[r, width - len(prompt) :] = torch.tensor(prompt)
        mask[r, width - len(prompt) :] = 1
    return ids, mask


def exact_joint(model, prompt, params, n=N):
    return conftest_exact_joint(model, prompt, params, n)


def sample(model, ids, mask, params, seed, max_new_tokens=N, **kwargs):
    kwargs = {"eos_token_id": [], "pad_token_id": 0, "compile": False, **OPTIONS, **kwargs}
    return dx.generate(
        model, ids, mask, strategy="lookahead", do_sample=True, temperature=params.temperature, top_k=params.top_k,
        top_p=params.top_p, generator=torch.Generator().manual_seed(seed), max_new_tokens=max_new_tokens, **kwargs,
    )


def accepted_guesses(stats):
    return sum(n - 1 for step in stats.accepted_per_step for n in step if n > 1)


# ---- the trie -------------------------------------------------------------------------------


def test_guesses_sharing_a_prefix_merge_into_one_branching_path():
    guesses = [(3, 4, 5), (3, 4, 6), (7, 8, 9), (3, 1, 1)]
    columns = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]]
    trie = merge_guesses(2, guesses, columns)
    # BFS: root; 3, 7; (3,)4, (3,)1, (7,)8; (3,4)5, (3,4)6, (3,1)1, (7,8)9
    assert trie.tokens == (2, 3, 7, 4, 1, 8, 5, 6, 1, 9)
    assert trie.parents == (-1, 0, 0, 1, 1, 2, 3, 3, 4, 5)
    assert trie.index == (0, 1, 7, 2, 11, 8, 3, 6, 12, 9), "a node uses the step token where its prefix first occurs"
    assert trie.guessed == (False,) + (True,) * 9
    empty = merge_guesses(2, [], [])
    assert empty.parents == (-1, 0) and empty.guessed == (False, False), "no guesses: one filler, never accepted"


def test_a_sure_guess_is_accepted_and_its_slots_are_the_tries_path():
    """Logits that put all mass on the guessed path accept it across candidates: (3, 4) from the
    first candidate, then 6 from the second, whose slot is that candidate's."""
    trie = merge_guesses(2, [(3, 4, 5), (3, 4, 6)], [[1, 2, 3], [4, 5, 6]])
    logits = torch.full((1, 7, V), -30.0)
    for column, nxt in [(0, 3), (1, 4), (2, 6), (6, 1)]:  # after 2 -> 3, after 3 -> 4, after (3, 4) -> 6, then 1
        logits[0, column, nxt] = 30.0
    slots = torch.arange(10, 17)[None]
    run, accepted, run_slots = verify_guesses([trie], logits, slots, SamplingParams(), torch.Generator(), width=4)
    assert accepted.tolist() == [3] and run.tolist() == [[3, 4, 6, 1]]
    assert run_slots.tolist() == [[10, 11, 12, 16]]


# ---- lossless -----------------------------------------------------------------------------------


@pytest.mark.parametrize("warp", sorted(PARAMS))
def test_sampled_tokens_follow_the_target_distribution(warp, tiny):
    model, prompts = tiny
    ids, mask = batch_of(prompts, ROWS // 2)
    out = sample(model, ids, mask, PARAMS[warp], seed=1)
    assert accepted_guesses(out.stats) > ROWS // 10, "guesses were rarely accepted: the test proves little"
    generated = out.sequences[:, ids.shape[1] :]
    for p, prompt in enumerate(prompts):
        pvalue = chi_square_pvalue(generated[p :: len(prompts)], V, exact_joint(model, prompt, PARAMS[warp]))
        assert pvalue > 1e-3, f"prompt {p}: p-value {pvalue:.2e}"


def test_later_tokens_follow_the_target_distribution(tiny):
    """Tokens 4-6, produced by later steps (whose guesses also come from the Jacobi window),
    against their exact marginal (the joint of six tokens summed over the first three)."""
    model, prompts = tiny
    params = PARAMS["top_k"]
    ids, mask = batch_of(prompts[1:], ROWS)
    out = sample(model, ids, mask, params, seed=9, max_new_tokens=6)
    assert sum(accepted_guesses_after_first_step(out.stats)) > ROWS // 10, "later steps rarely accepted guesses"
    marginal = exact_joint(model, prompts[1], params, n=6).sum(dim=(0, 1, 2))  # [V, V, V]
    assert chi_square_pvalue(out.sequences[:, -3:], V, marginal) > 1e-3


def test_the_chi_square_test_catches_a_rejected_guess_left_in_the_residual(tiny, monkeypatch):
    """Power: with the classic bug (after rejecting guess x, draw from p instead of p without x)
    guessed tokens come out too often, and the same test rejects the samples."""
    model, prompts = tiny
    monkeypatch.setattr(verify_module, "_residual", lambda p, q: p)
    ids, mask = batch_of(prompts, ROWS // 2)
    out = sample(model, ids, mask, PARAMS["temperature"], seed=1)
    generated = out.sequences[:, ids.shape[1] :]
    for p, prompt in enumerate(prompts):
        assert chi_square_pvalue(generated[p :: len(prompts)], V, exact_joint(model, prompt, PARAMS["temperature"])) < 1e-3
    assert chi_square_pvalue(generated[1::2], V, exact_joint(model, prompts[1], PARAMS["temperature"])) < 1e-6


@pytest.mark.parametrize("first", [0, 1])
def test_adaptive_prompt_lookup_samples_follow_the_target_distribution(first, tiny, monkeypatch):
    """``adaptive=True`` (window 0): steps alternate between the lookup layout and the plain
    one-token step, starting with either; the samples keep the target's distribution."""
    from dynexec_compile.decoding.adaptive import WidthChooser

    model, prompts = tiny
    choose = WidthChooser.choose  # offered: [the lookup layout, the plain step]
    monkeypatch.setattr(WidthChooser, "choose", lambda self, offered: choose(
        self, [offered[(sum(self.chosen.values()) + first) % 2]]))
    ids, mask = batch_of(prompts, ROWS // 2)
    out = sample(model, ids, mask, PARAMS["top_k"], seed=1, max_new_tokens=4, window=0, ngram=4, guesses=3, adaptive=True)
    assert set(out.stats.extra["adaptive_steps"]) == {"tree(-1,)", "lookahead(0, 4, 3)"}
    assert accepted_guesses(out.stats) > ROWS // 20, "guesses were rarely accepted: the test proves little"
    last = out.sequences[:, -3:]  # tokens 2-4: both kinds of step, against their exact marginal
    for p, prompt in enumerate(prompts):
        marginal = exact_joint(model, prompt, PARAMS["top_k"], n=4).sum(dim=0)  # [V, V, V]
        pvalue = chi_square_pvalue(last[p :: len(prompts)], V, marginal)
        assert pvalue > 1e-3, f"prompt {p}: p-value {pvalue:.2e}"


# ---- reproducible, batched, one forward per step, fixed shapes ---------------------------------


def test_the_same_seed_gives_the_same_tokens(tiny):
    model, prompts = tiny
    ids, mask = batch_of(prompts, 2)
    params = PARAMS["top_p"]
    first = sample(model, ids, mask, params, seed=5, max_new_tokens=40)
    again = sample(model, ids, mask, params, seed=5, max_new_tokens=40)
    other = sample(model, ids, mask, params, seed=6, max_new_tokens=40)
    assert torch.equal(first.sequences, again.sequences)
    assert first.stats.accepted_per_step == again.stats.accepted_per_step
    assert not torch.equal(first.sequences, other.sequences), "another seed should draw other tokens"


def test_rows_of_different_lengths_keep_only_their_accepted_path_in_the_cache(tiny):
    """Two rows of different lengths accept different counts; afterwards each row's cache equals
    a fresh prefill of its prompt and kept tokens (keys/values gathered, not recomputed)."""
    model, prompts = tiny
    ids, mask = batch_of(prompts, 1)
    config = LookaheadConfig(**OPTIONS)
    settings = _settings(max_new_tokens=60, sampling=PARAMS["temperature"], seed=3)
    engine = DecodeEngine(model, 2, cache_length(ids.shape[1], 60, config.step_tokens), compile=False)
    out = lookahead_decode(engine, ids, mask, settings, config)
    stats = out.stats
    assert stats.forward_passes == stats.steps + 1, "one forward per step (plus the prefill)"
    assert any(len(set(step)) > 1 for step in stats.accepted_per_step), "rows never accepted different counts"
    assert stats.new_tokens == [60, 60] and max(max(step) for step in stats.accepted_per_step) >= 3
    width = ids.shape[1]
    kept = [torch.cat([ids[r, width - len(p) :], out.sequences[r, width:-1]]) for r, p in enumerate(prompts)]
    assert engine.lengths.tolist() == [len(k) for k in kept]
    for r, tokens in enumerate(kept):
        fresh = DecodeEngine(model, 1, engine.max_len, compile=False)
        fresh.prefill(tokens[None], None)
        n = len(tokens)
        for layer, ref in zip(engine.cache.layers, fresh.cache.layers):
            torch.testing.assert_close(layer.keys[r, :, :n], ref.keys[0, :, :n], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(layer.values[r, :, :n], ref.values[0, :, :n], atol=1e-5, rtol=1e-5)


def test_sampling_without_guesses_and_near_zero_temperature(tiny):
    """``guesses=0`` still samples (every step keeps one token); a temperature near zero is greedy."""
    model, prompts = tiny
    ids, mask = batch_of(prompts, 1)
    out = sample(model, ids, mask, PARAMS["top_k"], seed=4, max_new_tokens=12, guesses=0)
    assert out.stats.accepted_per_step == [[1, 1]] * 11
    cold = sample(model, ids, mask, SamplingParams(temperature=1e-4), seed=4, max_new_tokens=30)
    greedy = dx.generate(
        model, ids, mask, strategy="lookahead", max_new_tokens=30, eos_token_id=[], pad_token_id=0, compile=False,
        **OPTIONS,
    )
    assert torch.equal(cold.sequences, greedy.sequences)
    assert accepted_guesses(cold.stats) > 0


def test_a_sampled_eos_stops_its_row_there_and_pads_the_rest(tiny):
    model, prompts = tiny
    ids, mask = batch_of(prompts, 8)
    eos = 6
    out = sample(model, ids, mask, PARAMS["temperature"], seed=10, max_new_tokens=30, eos_token_id=eos, pad_token_id=0)
    generated = out.sequences[:, ids.shape[1] :]
    stopped = 0
    for r in range(ids.shape[0]):
        row, n = generated[r].tolist(), out.stats.new_tokens[r]
        hits = [i for i, t in enumerate(row[:n]) if t == eos]
        if hits:
            stopped += 1
            assert hits == [n - 1], f"row {r}: generation must end at its first EOS"
            assert all(t == 0 for t in row[n:]), f"row {r}: padding after EOS"
        else:
            assert n == 30
    assert 0 < stopped < ids.shape[0], "some rows must stop at EOS and some not: the test could not fail"


def test_200_sampled_tokens_compile_prefill_step_and_commit_once(tiny):
    model, _ = tiny
    counter = CompileCounterWithBackend("eager")
    ids, mask = left_padded_batch([7, 12], seed=1)
    ids = ids % V
    params = PARAMS["temperature"]
    out = sample(model, ids, mask, params, seed=7, max_new_tokens=200, backend=counter, compile=True)
    assert counter.frame_count == 3, "one graph each for the prefill bucket, the fused step and the commit"
    assert out.stats.compiles == 3 and out.stats.forward_passes == out.stats.steps + 1
    assert accepted_guesses(out.stats) > 0
    again = sample(model, ids, mask, params, seed=8, max_new_tokens=200, backend=counter, compile=True)
    assert counter.frame_count == 3 and again.stats.compiles == 0, "a warm engine recompiled"


def accepted_guesses_after_first_step(stats):
    return [sum(n - 1 for n in step if n > 1) for step in stats.accepted_per_step[1:]]


def _settings(max_new_tokens: int, sampling: SamplingParams, seed: int) -> DecodeSettings:
    return DecodeSettings(
        max_new_tokens=max_new_tokens, eos_token_ids=(), pad_token_id=0, sampling=sampling,
        generator=torch.Generator().manual_seed(seed), cache="static", compile=False, backend="inductor", mode=None,
        options=None, cuda_graphs=None,
    )
