"""strategy="speculative": token-identical to greedy, one target forward per step, caches
equal to a fresh prefill, no recompiles, sampling follows the target, bad drafts refused."""

import pytest
import torch
from conftest import VOCAB, build_model, left_padded_batch
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import dynexec_compile as dx
from dynexec_compile.decoding import (
    DecodeEngine,
    ModelDrafter,
    SamplingParams,
    TreeSpec,
    draft_verify_loop,
)
from dynexec_compile.decoding.generate import DecodeSettings
from dynexec_compile.decoding.sampling import sampling_probs

SHAPES = {"chain": {"num_draft": 3}, "tree": {"tree": [2, 2, 1]}}


def hf_greedy(model, ids, mask, max_new_tokens, **kwargs):
    kwargs = {"eos_token_id": [], "pad_token_id": 0, **kwargs}
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens, **kwargs)


def truncated_draft(target):
    """The target's first layer with its embeddings and head: a draft that agrees often, not always."""
    config = target.config.__class__.from_dict(target.config.to_dict())
    config.num_hidden_layers = 1
    draft = type(target)(config)
    draft.load_state_dict(target.state_dict(), strict=False)
    draft.set_attn_implementation(target.config._attn_implementation)
    return draft.eval()


def speculative(target, draft, ids, mask, max_new_tokens, **kwargs):
    kwargs = {"eos_token_id": [], "pad_token_id": 0, "compile": False, "num_draft": 3, **kwargs}
    if "tree" in kwargs:
        kwargs.pop("num_draft")
    return dx.generate(target, ids, mask, strategy="speculative", draft_model=draft, max_new_tokens=max_new_tokens, **kwargs)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_greedy_equals_transformers_with_a_partial_draft(lm, shape):
    draft = truncated_draft(lm)
    ids, mask = left_padded_batch([7, 12, 4])
    ref = hf_greedy(lm, ids, mask, 40)
    out = speculative(lm, draft, ids, mask, 40, **SHAPES[shape])
    assert len(set(ref[:, ids.shape[1] :].flatten().tolist())) >= 8, "degenerate model: the test could not fail"
    assert torch.equal(out.sequences, ref)
    extra = out.stats.extra
    assert 0.05 < extra["acceptance_rate"] < 0.95, "the draft must be right sometimes and wrong sometimes"
    assert {n for step in extra["accepted_drafts_per_step"] for n in step} > {0, 1}, "rows accept different counts"
    assert out.stats.forward_passes == out.stats.steps + 1 == extra["target_forwards"], "one target forward per step"
    depth = 3
    assert extra["draft_forwards"] == 1 + depth * out.stats.steps
    assert out.stats.tokens_per_forward > 1.0


def small_random_draft(kind: str):
    """A smaller model of the target's family with random weights and the same vocabulary."""
    torch.manual_seed(5)
    if kind == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=1024, bos_token_id=1,
                            eos_token_id=2)
        return GPT2LMHeadModel(config).eval()
    cls, config_cls = (LlamaForCausalLM, LlamaConfig) if kind == "llama" else (Qwen2ForCausalLM, Qwen2Config)
    config = config_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=1024)
    return cls(config).eval()


def test_greedy_with_a_smaller_random_draft(lm):
    ids, mask = left_padded_batch([9, 5])
    ref = hf_greedy(lm, ids, mask, 30)
    draft = small_random_draft(lm.config.model_type)
    for shape in SHAPES.values():
        calls = []
        hook = lm.register_forward_hook(lambda *args, calls=calls: calls.append(1))
        try:
            out = speculative(lm, draft, ids, mask, 30, **shape)
        finally:
            hook.remove()
        assert torch.equal(out.sequences, ref)
        assert len(calls) == out.stats.steps + 1, "one target forward per step (hooks fire: compile=False)"


def test_greedy_with_a_perfect_draft_and_an_irregular_tree(llama):
    ids, mask = left_padded_batch([9, 5])
    ref = hf_greedy(llama, ids, mask, 30)
    for shape in SHAPES.values():
        perfect = speculative(llama, llama, ids, mask, 30, **shape)  # every draft accepted: the lag path
        assert torch.equal(perfect.sequences, ref)
        assert all(n == 3 for step in perfect.stats.extra["accepted_drafts_per_step"][:-1] for n in step)
    irregular = TreeSpec((-1, 0, 0, 0, 1, 1, 2, 4))  # leaves at depths 1, 2 and 3
    partial = speculative(llama, truncated_draft(llama), ids, mask, 30, tree=irregular)
    assert torch.equal(partial.sequences, ref) and partial.stats.extra["draft_forwards"] == 1 + 3 * partial.stats.steps


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_eos_mid_run_and_max_new_tokens_boundaries(shape):
    target = build_model("qwen2")
    draft = truncated_draft(target)
    ids, mask = left_padded_batch([6, 10, 8], seed=2)
    width = ids.shape[1]
    free = hf_greedy(target, ids, mask, 24)
    r, stop = next(  # an EOS: a token some row first generates as its 5th token or later
        (r, k + 1) for r, row in enumerate(free[:, width:].tolist()) for k, t in enumerate(row) if k >= 4 and row.index(t) == k
    )
    eos = free[r, width + stop - 1].item()
    ref = hf_greedy(target, ids, mask, 24, eos_token_id=eos)
    out = speculative(target, draft, ids, mask, 24, eos_token_id=eos, **SHAPES[shape])
    assert torch.equal(out.sequences, ref)
    assert ref.shape[1] > width + stop and out.stats.new_tokens[r] == stop
    for n in (1, 2, 3, 4, 5, 9):  # around the chain's 4 tokens per step, with a draft that is always right
        ref = hf_greedy(target, ids, mask, n)
        assert torch.equal(speculative(target, target, ids, mask, n, **SHAPES[shape]).sequences, ref), n
        assert torch.equal(speculative(target, draft, ids, mask, n, **SHAPES[shape]).sequences, ref), n


def _settings(**kwargs):
    base = dict(
        max_new_tokens=40, eos_token_ids=(), pad_token_id=0, sampling=None, generator=None, cache="static",
        compile=False, backend="inductor", mode=None, options=None, cuda_graphs=None,
    )
    return DecodeSettings(**{**base, **kwargs})


def _assert_cache_is_a_fresh_prefill(model, engine, rows_tokens):
    for b, tokens in enumerate(rows_tokens):
        n = int(engine.lengths[b])
        assert n <= len(tokens)
        fresh = DecodeEngine(model, batch_size=1, max_len=engine.max_len, compile=False)
        fresh.prefill(torch.tensor([tokens[:n]]))
        for got, ref in zip(engine.cache.layers, fresh.cache.layers, strict=True):
            torch.testing.assert_close(got.keys[b, :, :n], ref.keys[0, :, :n], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got.values[b, :, :n], ref.values[0, :, :n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_caches_after_commit_equal_a_fresh_prefill(shape):
    target = build_model("llama")
    draft = truncated_draft(target)
    tree = TreeSpec.chain(3) if shape == "chain" else TreeSpec.from_branching([2, 2, 1])
    ids, mask = left_padded_batch([7, 11])
    target_engine = DecodeEngine(target, batch_size=2, max_len=128, compile=False)
    drafter = ModelDrafter(DecodeEngine(draft, batch_size=2, max_len=128, compile=False), tree)
    out = draft_verify_loop(target_engine, drafter, ids, mask, _settings(), tree, "speculative")
    assert torch.equal(out.sequences, hf_greedy(target, ids, mask, 40))
    width = ids.shape[1]
    rows = [out.sequences[b, :width][mask[b] == 1].tolist() + out.sequences[b, width:].tolist() for b in range(2)]
    _assert_cache_is_a_fresh_prefill(target, target_engine, rows)
    _assert_cache_is_a_fresh_prefill(draft, drafter.engine, rows)
    assert (drafter.engine.lengths <= target_engine.lengths).all()
    assert (target_engine.lengths - drafter.engine.lengths <= 1).all(), "the draft lags by at most one token"


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_no_recompiles_after_warm_up(shape):
    target = build_model("llama")
    draft = truncated_draft(target)
    counter = CompileCounterWithBackend("eager")
    ids, mask = left_padded_batch([7, 12])
    out = speculative(target, draft, ids, mask, 200, backend=counter, compile=True, **SHAPES[shape])
    assert torch.equal(out.sequences, hf_greedy(target, ids, mask, 200))
    # prefills of both models, the target's whole verification step (forward, verification
    # and commit in one graph); the draft's whole chain or tree in one graph per first width,
    # 2 (root after a catch-up token) and 1; tree [2, 2, 1]: the draft cache's gathering commit
    expected = 5 if shape == "chain" else 6
    assert counter.frame_count == expected and out.stats.compiles == expected
    ids2, mask2 = left_padded_batch([9, 15], seed=8)  # same prefill bucket
    again = speculative(target, draft, ids2, mask2, 200, backend=counter, compile=True, **SHAPES[shape])
    assert again.stats.compiles == 0 and counter.frame_count == expected
    assert torch.equal(again.sequences, hf_greedy(target, ids2, mask2, 200))


def test_different_vocabularies_and_bad_options_are_refused(llama):
    ids = torch.ones(1, 4, dtype=torch.long)
    other = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=VOCAB * 2)).eval()
    with pytest.raises(ValueError, match="another vocabulary: vocab_size=256"):
        speculative(llama, other, ids, None, 4)
    eos = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, vocab_size=VOCAB, eos_token_id=7)).eval()
    with pytest.raises(ValueError, match="another vocabulary: eos_token_id=7"):
        speculative(llama, eos, ids, None, 4)
    with pytest.raises(ValueError, match="needs draft_model"):
        dx.generate(llama, ids, strategy="speculative", max_new_tokens=4, compile=False)
    with pytest.raises(TypeError, match="draft_model: model must be"):
        speculative(llama, torch.nn.Linear(2, 2), ids, None, 4)
    with pytest.raises(ValueError, match="cache='static'"):
        speculative(llama, llama, ids, None, 4, cache="dynamic")
    with pytest.raises(ValueError, match="num_draft=2 but the tree has 3"):
        dx.generate(llama, ids, strategy="speculative", draft_model=llama, tree=[1, 2], num_draft=2, max_new_tokens=4)


def test_sampling_is_reproducible_and_top_k_1_is_greedy(llama):
    draft = truncated_draft(llama)
    ids, mask = left_padded_batch([6, 11])

    def sample(seed, **kwargs):
        gen = torch.Generator().manual_seed(seed)
        return speculative(llama, draft, ids, mask, 30, do_sample=True, generator=gen, **kwargs).sequences

    a, b, c = sample(1, temperature=1.5), sample(1, temperature=1.5), sample(2, temperature=1.5)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = hf_greedy(llama, ids, mask, 30)
    assert torch.equal(sample(3, top_k=1), greedy)
    assert torch.equal(sample(4, top_k=1, tree=[2, 2]), greedy)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_end_to_end_samples_follow_the_target_distribution(shape):
    """2,000 rows of one prompt on a vocabulary of 8: the first two sampled tokens' joint
    distribution matches the target's, computed exactly from its logits (chi-square)."""
    vocab = 8
    config = dict(intermediate_size=32, num_attention_heads=2, num_key_value_heads=1, vocab_size=vocab,
                  max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(11)
    target = LlamaForCausalLM(LlamaConfig(hidden_size=16, num_hidden_layers=2, initializer_range=0.5, **config)).eval()
    draft = LlamaForCausalLM(LlamaConfig(hidden_size=8, num_hidden_layers=1, initializer_range=0.5, **config)).eval()
    params = SamplingParams(temperature=1.2, top_p=0.95)
    rows, prompt = 2000, torch.tensor([[3, 5, 2]])
    gen = torch.Generator().manual_seed(0)
    out = speculative(target, draft, prompt.expand(rows, 3), None, 2, do_sample=True, generator=gen,
                      temperature=params.temperature, top_p=params.top_p, **SHAPES[shape])
    samples = out.sequences[:, 3:]
    with torch.no_grad():
        p1 = sampling_probs(target(prompt).logits[0, -1], params)  # [V]
        both = torch.cat([prompt.expand(vocab, 3), torch.arange(vocab)[:, None]], dim=1)
        p2 = sampling_probs(target(both).logits[:, -1], params)  # [V, V]
    joint = (p1[:, None] * p2).reshape(-1).double() * rows
    observed = torch.bincount(samples[:, 0] * vocab + samples[:, 1], minlength=vocab * vocab).double()
    assert observed[joint == 0].sum() == 0
    small = joint < 5
    obs = torch.cat([observed[~small], observed[small].sum()[None]])
    exp = torch.cat([joint[~small], joint[small].sum()[None]])
    stat = ((obs - exp) ** 2 / exp.clamp(min=1e-9)).sum()
    pvalue = torch.special.gammaincc(torch.tensor((len(exp) - 1) / 2, dtype=torch.float64), stat / 2)
    assert pvalue > 1e-3
    assert 0.05 < out.stats.extra["acceptance_rate"] < 0.95


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph replay of the speculative steps needs CUDA")
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_cuda_graphs_give_the_greedy_tokens(shape):
    target = build_model("llama").cuda()
    draft = truncated_draft(target).cuda()
    ids, mask = left_padded_batch([7, 12, 4])
    ids, mask = ids.cuda(), mask.cuda()
    ref = dx.generate(target, ids, mask, max_new_tokens=48, eos_token_id=[], pad_token_id=0, compile=False,
                      cuda_graphs=False).sequences
    for cuda_graphs in (False, True):
        out = speculative(target, draft, ids, mask, 48, cuda_graphs=cuda_graphs, **SHAPES[shape])
        assert torch.equal(out.sequences, ref)
