"""generate(strategy="lookahead"): one fused forward per step, token-exact greedy, cache surgery,
fixed shapes, batches whose rows accept different counts, prompt lookup, argument errors."""

import pytest
import torch
from conftest import VOCAB, left_padded_batch
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import GPT2Config, GPT2LMHeadModel

import dynexec_compile as dx
from dynexec_compile.decoding import (
    ContextLookup,
    DecodeEngine,
    LookaheadConfig,
    NgramPool,
    TokenRuns,
    lookahead_decode,
    step_layout,
    step_mask,
)
from dynexec_compile.decoding.generate import DecodeSettings, cache_length

CONFIGS = [  # options of generate(strategy="lookahead"); {} = the defaults
    {},
    {"window": 4, "ngram": 4, "guesses": 4, "prompt_lookup": True},
    {"window": 3, "ngram": 2, "guesses": 2, "prompt_lookup": False},
    {"window": 2, "ngram": 5, "guesses": 3, "prompt_lookup": True},
    {"window": 5, "ngram": 3, "guesses": 0, "prompt_lookup": False},
    {"window": 0, "ngram": 5, "guesses": 2, "prompt_lookup": True},  # prompt lookup alone
]
PINNED = {"window": 4, "ngram": 4, "guesses": 4}  # the tests below need accepted runs; not the defaults


def hf_greedy(model, ids, mask, max_new_tokens, **kwargs):
    kwargs = {"eos_token_id": [], "pad_token_id": 0, **kwargs}
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens, **kwargs)


def lookahead(model, ids, mask, max_new_tokens, **kwargs):
    kwargs = {"eos_token_id": [], "pad_token_id": 0, "compile": False, **PINNED, **kwargs}
    return dx.generate(model, ids, mask, strategy="lookahead", max_new_tokens=max_new_tokens, **kwargs)


def runs_per_row(out, prompt_width):
    """Each row's generated tokens cut into the runs the steps kept (the prefill's token first)."""
    runs = []
    for r in range(out.sequences.shape[0]):
        generated = out.sequences[r, prompt_width:].tolist()
        counts = [1] + [step[r] for step in out.stats.accepted_per_step]
        starts = [sum(counts[:i]) for i in range(len(counts))]
        runs.append([generated[s : s + c] for s, c in zip(starts, counts) if c])
    return runs


# ---- the fused step -------------------------------------------------------------------


def describe_tokens(window, ngram, guesses):
    """The documented token order of a step, as (kind, a, b) with its relative position."""
    tokens = [("current", 0, 0, 0)]
    tokens += [("window", level, col, 1 + level + col) for level in range(ngram - 1) for col in range(window)]
    tokens += [("candidate", g, k, 1 + k) for g in range(guesses) for k in range(ngram - 1)]
    return tokens


def sees(query, key):
    """The paper's rule: window (l, j) sees level 0 at columns <= j and column j at levels 1..l;
    candidate (g, k) sees its own tokens 0..k; everything sees the current token."""
    (qkind, qa, qb, _), (kkind, ka, kb, _) = query, key
    if kkind == "current":
        return True
    if qkind == "window" and kkind == "window":
        return (ka == 0 and kb <= qb) or (kb == qb and 1 <= ka <= qa)
    if qkind == "candidate" and kkind == "candidate":
        return ka == qa and kb <= qb
    return False


@pytest.mark.parametrize(("window", "ngram", "guesses"), [(3, 4, 2), (1, 2, 1), (4, 3, 0), (0, 4, 2)])
def test_step_layout_is_the_papers_window_and_candidate_mask(window, ngram, guesses):
    layout = step_layout(window, ngram, guesses)
    tokens = describe_tokens(window, ngram, guesses)
    assert layout.width == len(tokens) == LookaheadConfig(window, ngram, guesses).step_tokens
    assert layout.offsets.tolist() == [t[3] for t in tokens]
    expected = torch.tensor([[sees(q, k) for k in tokens] for q in tokens])
    assert torch.equal(layout.visible, expected)
    # a window token's visible tokens are a causal chain: one per position, up to its own
    for q, row in zip(tokens, expected.tolist()):
        if q[0] == "window":
            seen = sorted(t[3] for t, v in zip(tokens, row) if v)
            assert seen == list(range(q[3] + 1))


def test_window_and_candidate_logits_equal_a_plain_forward_over_their_ancestors(llama):
    """The mask makes every step token see exactly its Jacobi ancestors / own prefix: its logits
    equal a stock forward over prompt + current + those ancestors."""
    window, ngram, guesses = 3, 3, 2
    layout = step_layout(window, ngram, guesses)
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    engine = DecodeEngine(llama, batch_size=1, max_len=64, compile=False)
    engine.prefill(ids, None)
    tokens = torch.randint(3, VOCAB, (1, layout.width), generator=torch.Generator().manual_seed(4))
    slots = engine.lengths[:, None] + torch.arange(layout.width)
    mask = step_mask(engine.lengths, slots, layout.visible, engine.max_len, torch.float32)
    logits = engine.step(tokens, engine.lengths[:, None] + layout.offsets, mask, slots)[0]  # [T, V]
    for q in range(layout.width):
        ancestors = [k for k in range(layout.width) if layout.visible[q, k]]
        chain = torch.cat([ids[0], tokens[0, ancestors]])[None]
        with torch.no_grad():
            ref = llama(chain).logits[0, -1]
        torch.testing.assert_close(logits[q], ref, atol=1e-5, rtol=1e-5)


def test_one_forward_per_step_with_the_layout_mask_and_positions(llama):
    ids, mask = left_padded_batch([7, 12])
    config = LookaheadConfig(window=3, ngram=4, guesses=2)
    settings = _settings(max_new_tokens=30)
    engine = DecodeEngine(llama, 2, cache_length(12, 30, config.step_tokens), compile=False)
    calls = []
    forward = engine.forward_logits  # every step forward goes through it (eager: compile=False)

    def spy(tokens, positions, slots, mask4):
        calls.append((tokens.shape, positions - engine.lengths[:, None], mask4 == 0, slots - engine.lengths[:, None], engine.lengths.clone()))
        return forward(tokens, positions, slots, mask4)

    engine.forward_logits = spy
    out = lookahead_decode(engine, ids, mask, settings, config)
    stats = out.stats
    assert stats.forward_passes == stats.steps + 1 == len(calls) + 1, "one forward per step (plus the prefill)"
    tokens = describe_tokens(3, 4, 2)
    for shape, rel_positions, allowed, rel_slots, lengths in calls:
        assert shape == (2, config.step_tokens)
        assert rel_positions.tolist() == [[t[3] for t in tokens]] * 2
        assert rel_slots.tolist() == [list(range(config.step_tokens))] * 2
        for b in range(2):
            n = int(lengths[b])
            assert allowed[b, 0, :, :n].all(), "every step token sees the committed prefix"
            expected = torch.tensor([[sees(q, k) for k in tokens] for q in tokens])
            assert torch.equal(allowed[b, 0, :, n : n + config.step_tokens], expected)
            assert not allowed[b, 0, :, n + config.step_tokens :].any(), "scratch slots stay hidden"
    assert max(max(s) for s in stats.accepted_per_step) > 1, "no guess was ever accepted: the test could not fail"
    assert torch.equal(out.sequences, hf_greedy(llama, ids, mask, 30))


# ---- token-exact greedy ---------------------------------------------------------------


@pytest.mark.parametrize("options", CONFIGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_lookahead_equals_transformers_greedy_on_a_left_padded_batch(lm, options):
    ids, mask = left_padded_batch([7, 12, 4])
    ref = hf_greedy(lm, ids, mask, 48)
    kwargs = {"eos_token_id": [], "pad_token_id": 0, "compile": False, **options}
    out = dx.generate(lm, ids, mask, strategy="lookahead", max_new_tokens=48, **kwargs)
    assert len(set(ref[:, ids.shape[1] :].flatten().tolist())) >= 8, "degenerate model: the test could not fail"
    assert torch.equal(out.sequences, ref)
    assert out.stats.forward_passes == out.stats.steps + 1
    assert out.stats.new_tokens == [48, 48, 48]
    if out.stats.extra["guesses"]:
        assert max(max(s) for s in out.stats.accepted_per_step) > 1


def test_batch_rows_accept_different_counts_and_each_equals_its_own_greedy(lm):
    lengths = [5, 13, 9, 3]
    ids, mask = left_padded_batch(lengths, seed=6)
    out = lookahead(lm, ids, mask, 40)
    assert any(len(set(step)) > 1 for step in out.stats.accepted_per_step), "rows never accepted different counts"
    width = ids.shape[1]
    for r, n in enumerate(lengths):
        alone = hf_greedy(lm, ids[r : r + 1, width - n :], None, 40)
        assert torch.equal(out.sequences[r, width:], alone[0, n:]), f"row {r} differs from its own greedy decoding"


def test_eos_inside_an_accepted_run_stops_the_row_there(lm):
    ids, mask = left_padded_batch([6, 10, 8], seed=1)
    width = ids.shape[1]
    free = lookahead(lm, ids, mask, 40)
    # a token first generated by row r at index k < len(run) - 1 of the run kept at step s
    found = None
    for r, runs in enumerate(runs_per_row(free, width)):
        seen = set()
        for s, run in enumerate(runs):
            for k, t in enumerate(run):
                if found is None and t not in seen and k < len(run) - 1:
                    found = (r, s, k, t)
                seen.add(t)
    assert found is not None, "no multi-token run holds a new token: the test could not fail"
    r, s, k, eos = found
    ref = hf_greedy(lm, ids, mask, 40, eos_token_id=eos)
    out = lookahead(lm, ids, mask, 40, eos_token_id=eos)
    assert torch.equal(out.sequences, ref)
    assert out.stats.accepted_per_step[s - 1][r] == k + 1, "the run was not cut right after the EOS"
    produced = sum(len(run) for run in runs_per_row(free, width)[r][:s]) + k + 1
    assert out.stats.new_tokens[r] == produced and (out.sequences[r, width + produced :] == 0).all()


def test_max_new_tokens_inside_an_accepted_run_is_never_exceeded(lm):
    ids, mask = left_padded_batch([9], seed=2)
    width = ids.shape[1]
    runs = runs_per_row(lookahead(lm, ids, mask, 40), width)[0]
    ends = [sum(len(x) for x in runs[: i + 1]) for i in range(len(runs))]
    inside = [end - 1 for end, run in zip(ends, runs) if len(run) >= 3]
    assert inside, "no run of 3+ tokens: the test could not fail"
    for max_new in (1, 2, inside[0], inside[-1]):
        out = lookahead(lm, ids, mask, max_new)
        assert out.sequences.shape == (1, width + max_new)
        assert torch.equal(out.sequences, hf_greedy(lm, ids, mask, max_new))
        assert out.stats.new_tokens == [max_new]


def test_a_generation_up_to_gpt2s_last_position_keeps_guesses_in_range():
    """Near the end, window tokens would sit past GPT-2's learned positions: they are clamped
    (only guesses beyond what can be kept live there)."""
    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=48, initializer_range=0.2)
    model = GPT2LMHeadModel(config).eval()
    ids, mask = left_padded_batch([12, 8], seed=4)
    out = lookahead(model, ids, mask, 36, window=4, ngram=5, guesses=3)  # the longest row ends at position 47
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, 36))


def test_every_row_stopping_at_eos_ends_the_loop_and_pads(llama):
    ids, mask = left_padded_batch([5, 9], seed=5)
    free = hf_greedy(llama, ids, mask, 20)[:, ids.shape[1] :]
    eos = [free[0, 3].item(), free[1, 4].item()]
    ref = hf_greedy(llama, ids, mask, 20, eos_token_id=eos, pad_token_id=None)  # pad defaults to eos[0]
    out = dx.generate(llama, ids, mask, strategy="lookahead", max_new_tokens=20, eos_token_id=eos, compile=False)
    assert torch.equal(out.sequences, ref)


# ---- cache surgery, fixed shapes --------------------------------------------------------


def test_cache_after_lookahead_equals_a_fresh_prefill_of_the_kept_tokens(llama):
    ids, mask = left_padded_batch([6, 11, 3], seed=3)
    config = LookaheadConfig(window=3, ngram=4, guesses=3)
    engine = DecodeEngine(llama, 3, cache_length(11, 50, config.step_tokens), compile=False)
    out = lookahead_decode(engine, ids, mask, _settings(max_new_tokens=50), config)
    assert max(max(s) for s in out.stats.accepted_per_step) > 1, "nothing was gathered: the test could not fail"
    width, prompt_lengths = ids.shape[1], mask.sum(1)
    # committed: the prompt and every generated token but the last (the next step's input)
    kept = [torch.cat([ids[r, width - n :], out.sequences[r, width:-1]]) for r, n in enumerate(prompt_lengths.tolist())]
    assert engine.lengths.tolist() == [len(k) for k in kept]
    for r, tokens in enumerate(kept):
        fresh = DecodeEngine(llama, 1, engine.max_len, compile=False)
        fresh.prefill(tokens[None], None)
        n = len(tokens)
        for layer, ref in zip(engine.cache.layers, fresh.cache.layers):
            torch.testing.assert_close(layer.keys[r, :, :n], ref.keys[0, :, :n], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(layer.values[r, :, :n], ref.values[0, :, :n], atol=1e-5, rtol=1e-5)


def test_200_tokens_compile_the_prefill_and_the_whole_greedy_step_once(llama):
    counter = CompileCounterWithBackend("eager")
    ids, mask = left_padded_batch([7, 12])
    out = lookahead(llama, ids, mask, 200, backend=counter, compile=True)
    # the greedy step (forward, verification, stop rule, cache surgery) is ONE graph
    assert counter.frame_count == 2, "one graph each for the prefill bucket and the whole step"
    assert out.stats.compiles == 2 and out.stats.forward_passes == out.stats.steps + 1
    assert torch.equal(out.sequences, hf_greedy(llama, ids, mask, 200))
    ids2, mask2 = left_padded_batch([9, 15], seed=8)  # same prefill bucket and cache length
    again = lookahead(llama, ids2, mask2, 200, backend=counter, compile=True)
    assert counter.frame_count == 2 and again.stats.compiles == 0, "a warm engine recompiled"
    assert torch.equal(again.sequences, hf_greedy(llama, ids2, mask2, 200))


# ---- the n-gram pool and prompt lookup ---------------------------------------------------


def test_ngram_pool_keeps_the_most_recent_continuations_per_key():
    pool = NgramPool(ngram=3, capacity=2)
    pool.add_text([5, 1, 2, 5, 3, 4, 5, 1, 2])
    assert pool.candidates(5) == [(1, 2), (3, 4)]  # (1, 2) seen again: moved to the front
    assert pool.candidates(1) == [(2, 5)] and pool.candidates(9) == []
    pool.add(5, (7, 7))
    assert pool.candidates(5) == [(7, 7), (1, 2)], "capacity 2: the oldest continuation goes"
    assert len(NgramPool(ngram=3, capacity=0).candidates(5)) == 0


def test_context_lookup_continues_the_last_bigram_most_recent_first():
    context = ContextLookup(span=3, tokens=[1, 2, 3, 4, 5, 1, 2, 6, 7, 8, 9, 1])
    assert context.candidates(4) == [], "the last bigram (9, 1) occurred nowhere before"
    context.extend([2])
    assert context.candidates(4) == [(6, 7, 8), (3, 4, 5)], "(1, 2) continued, most recent first"
    assert context.candidates(1) == [(6, 7, 8)]
    context.extend([6, 7])
    assert context.candidates(4) == [(8, 9, 1)]
    context = ContextLookup(span=3, tokens=[4, 4, 4])
    assert context.candidates(2) == [(4, 4, 4)], "a continuation that runs into the end is padded"


def test_context_lookup_puts_longer_matches_first_and_sees_copies():
    context = ContextLookup(span=2, tokens=[7, 1, 2, 3, 4, 9, 8, 1, 2, 5, 6, 0, 7, 1, 2])
    assert context.candidates(2) == [(5, 6), (3, 4)], "the bigram (1, 2): most recent first"
    assert context.candidates(2, span=4, match=3) == [(3, 4, 9, 8), (5, 6, 0, 7)], "(7, 1, 2) matched first, 4 tokens"
    assert context.copying(3) and not context.copying(4)


def test_copy_steps_guess_longer_and_equal_transformers_greedy(llama):
    """With ``copy_ngram`` a step whose last tokens repeat an earlier passage guesses
    ``copy_ngram - 1`` tokens from it in a wider step: the prompt repeats the model's own greedy
    answer, so the copy is accepted past what ``ngram`` allows; tokens equal HF greedy."""
    base = torch.randint(3, VOCAB, (10,), generator=torch.Generator().manual_seed(3))
    answer = hf_greedy(llama, base[None], None, 24)[0, 10:]
    ids = torch.cat([base, answer, base])[None]
    ref = hf_greedy(llama, ids, None, 24)
    options = {"window": 0, "ngram": 3, "guesses": 1}
    out = lookahead(llama, ids, None, 24, **options, copy_ngram=9)
    plain = lookahead(llama, ids, None, 24, **options)
    assert torch.equal(out.sequences, ref) and torch.equal(plain.sequences, ref)
    assert out.stats.extra["copy_steps"] > 0 and plain.stats.extra["copy_steps"] == 0
    assert max(max(s) for s in out.stats.accepted_per_step) > 3, "no copy ran past ngram's 3 tokens: the test could not fail"
    assert out.stats.forward_passes < plain.stats.forward_passes
    # sampling (near-greedy, so that it keeps copying): the copy layout through the lossless
    # verification; the same generator state draws the same tokens
    sampled = [
        lookahead(llama, ids, None, 24, **options, copy_ngram=9, do_sample=True, temperature=0.05,
                  generator=torch.Generator().manual_seed(5))
        for _ in range(2)
    ]
    assert torch.equal(sampled[0].sequences, sampled[1].sequences) and sampled[0].stats.new_tokens == [24]
    assert sampled[0].stats.extra["copy_steps"] > 0


def test_copy_steps_on_a_padded_batch_equal_transformers_greedy(lm):
    ids, mask = left_padded_batch([7, 12, 4])
    ids = torch.cat([ids, ids[:, -6:]], dim=1)  # every row's last 6 tokens repeat
    mask = torch.cat([mask, torch.ones(3, 6, dtype=mask.dtype)], dim=1)
    options = {"window": 0, "ngram": 3, "guesses": 2, "copy_ngram": 6}
    out = dx.generate(lm, ids, mask, strategy="lookahead", max_new_tokens=30, eos_token_id=[], pad_token_id=0, compile=False, **options)
    assert torch.equal(out.sequences, hf_greedy(lm, ids, mask, 30)) and out.stats.extra["copy_steps"] > 0


def test_prompt_lookup_seeds_the_pool_from_the_prompt(llama):
    # a prompt that repeats itself: its continuation's first token is then in the prompt
    base = torch.randint(3, VOCAB, (12,), generator=torch.Generator().manual_seed(9))
    first = hf_greedy(llama, base[None], None, 1)[0, -1]
    ids = torch.cat([base, first[None], base])[None]
    ref = hf_greedy(llama, ids, None, 30)
    token = ref[0, ids.shape[1]].item()
    assert token in ids[0, :-3].tolist(), "the first generated token must occur in the prompt"
    on = lookahead(llama, ids, None, 30, prompt_lookup=True)
    off = lookahead(llama, ids, None, 30, prompt_lookup=False)
    assert torch.equal(on.sequences, ref) and torch.equal(off.sequences, ref)
    assert on.stats.extra["guesses_per_step"][0][0] > 0, "prompt n-grams were not offered at the first step"
    assert off.stats.extra["guesses_per_step"][0][0] == 0, "without prompt lookup the first step has no n-grams"


# ---- bookkeeping and errors ---------------------------------------------------------------


def test_token_runs_cut_at_eos_and_max_new_tokens():
    runs = TokenRuns(3, max_new_tokens=5, width=3, eos_token_ids=(9,), pad_token_id=0, device=torch.device("cpu"))
    kept = runs.keep(torch.tensor([[1, 2, 3], [4, 9, 5], [6, 7, 8]]), torch.tensor([3, 3, 1]))
    assert kept.tolist() == [3, 2, 1] and runs.finished.tolist() == [False, True, False]
    kept = runs.keep(torch.tensor([[1, 2, 3], [4, 4, 4], [6, 7, 8]]), torch.tensor([3, 3, 3]))
    assert kept.tolist() == [2, 0, 3], "row 0 is cut at max_new_tokens, row 1 finished"
    assert runs.all_done() is False and runs.keep(torch.tensor([[0], [0], [1]]), torch.tensor([1, 1, 1])).tolist() == [0, 0, 1]
    assert runs.all_done()
    assert runs.sequences(torch.zeros(3, 1, dtype=torch.long)).tolist() == [
        [0, 1, 2, 3, 1, 2],
        [0, 4, 9, 0, 0, 0],
        [0, 6, 6, 7, 8, 1],
    ]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"window": -1}, ValueError, "window must be an int >= 0"),
        ({"window": 0, "prompt_lookup": False}, ValueError, "window=0 guesses only from the text"),
        ({"window": 0, "guesses": 0}, ValueError, "window=0 guesses only from the text"),
        ({"ngram": 1}, ValueError, "ngram must be an int >= 2"),
        ({"guesses": -1}, ValueError, "guesses must be an int >= 0"),
        ({"window": 2.5}, ValueError, "window must be an int"),
        ({"prompt_lookup": "yes"}, ValueError, "prompt_lookup must be True or False"),
        ({"beam": 2}, ValueError, r"unknown option\(s\) \['beam'\]; valid options are \['adaptive', 'copy_ngram', 'guesses', 'ngram', 'prompt_lookup', 'window'\]"),
        ({"copy_ngram": -1}, ValueError, "copy_ngram must be an int >= 0"),
        ({"window": 1, "copy_ngram": 6}, ValueError, "copy_ngram widens the steps of prompt lookup alone"),
        ({"window": 0, "ngram": 4, "copy_ngram": 4}, ValueError, "copy_ngram widens the steps of prompt lookup alone"),
        ({"cache": "dynamic"}, ValueError, "needs cache='static'"),
    ],
)
def test_bad_lookahead_arguments_raise(llama, kwargs, error, message):
    with pytest.raises(error, match=message):
        dx.generate(llama, torch.ones(1, 4, dtype=torch.long), strategy="lookahead", max_new_tokens=4, compile=False, **kwargs)


def _settings(max_new_tokens: int) -> DecodeSettings:
    return DecodeSettings(
        max_new_tokens=max_new_tokens, eos_token_ids=(), pad_token_id=0, sampling=None, generator=None,
        cache="static", compile=False, backend="inductor", mode=None, options=None, cuda_graphs=None,
    )


# ---- adaptive: prompt-lookup steps or plain ones, by expected tokens per second ----------------


def test_adaptive_prompt_lookup_is_exact_whichever_step_each_takes(lm, monkeypatch):
    from dynexec_compile.decoding.adaptive import WidthChooser

    ids, mask = left_padded_batch([7, 12, 4])
    ids = torch.cat([ids, ids[:, -6:]], dim=1)  # every row's last 6 tokens repeat: guesses, copies
    mask = torch.cat([mask, torch.ones(3, 6, dtype=mask.dtype)], dim=1)
    options = {"window": 0, "ngram": 3, "guesses": 2, "copy_ngram": 6, "adaptive": True}
    choose, turn = WidthChooser.choose, iter(range(10**6))
    # offered: [the lookup layout, the plain step]; steps take them in the pattern layout, plain, layout
    monkeypatch.setattr(WidthChooser, "choose", lambda self, offered: choose(self, [offered[next(turn) % 3 % 2]]))
    out = dx.generate(lm, ids, mask, strategy="lookahead", max_new_tokens=30, eos_token_id=[], pad_token_id=0,
                      compile=False, **options)
    assert torch.equal(out.sequences, hf_greedy(lm, ids, mask, 30))
    used = out.stats.extra["adaptive_steps"]
    assert "tree(-1,)" in used and len(used) == 3 and sum(used.values()) == out.stats.steps, used  # copy steps too
    assert out.stats.forward_passes == out.stats.steps + 1
    plain_steps = [i for i, g in enumerate(out.stats.extra["guesses_per_step"]) if g == [0, 0, 0]]
    assert all(max(out.stats.accepted_per_step[i]) <= 1 for i in plain_steps)
    assert max(max(step) for step in out.stats.accepted_per_step) > 1, "the lookup steps kept guesses"


def test_adaptive_prompt_lookup_follows_the_measured_costs_and_needs_window_0(llama):
    from dynexec_compile.decoding.generate import _ENGINES

    ids, mask = left_padded_batch([9, 14], seed=4)
    ids = torch.cat([ids, ids[:, -8:]], dim=1)
    mask = torch.cat([mask, torch.ones(2, 8, dtype=mask.dtype)], dim=1)
    common = {"window": 0, "ngram": 4, "guesses": 1, "adaptive": True}
    reference = hf_greedy(llama, ids, mask, 24)
    first = lookahead(llama, ids, mask, 24, **common)
    engine = next(e for e in reversed(_ENGINES.values()) if e.model is llama)
    shapes = list(first.stats.extra["adaptive_steps"])
    assert torch.equal(first.sequences, reference) and len(shapes) == 2
    steps = {}
    for cheap in shapes:
        engine.chooser.costs.update({name: 1e-4 if name == cheap else 10.0 for name in shapes})
        out = lookahead(llama, ids, mask, 24, **common)
        assert torch.equal(out.sequences, reference) and out.stats.extra["adaptive_steps"] == {cheap: out.stats.steps}
        steps[cheap] = out.stats.steps
    assert steps.pop("tree(-1,)") == 23 and steps.popitem()[1] < 23, "plain steps keep a token each, lookup ones more"
    with pytest.raises(ValueError, match="adaptive .* needs window=0"):
        lookahead(llama, ids, mask, 24, window=2, ngram=3, guesses=1, adaptive=True)
    with pytest.raises(ValueError, match="adaptive must be True or False"):
        lookahead(llama, ids, mask, 24, **{**common, "adaptive": 1})
