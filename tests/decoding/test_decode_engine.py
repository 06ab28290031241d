"""DecodeEngine: prefill, the 1-token step and the generic fused step equal the stock forward."""

import pytest
import torch
from conftest import build_model, left_padded_batch
from transformers import GPT2Config, GPT2Model, T5Config, T5ForConditionalGeneration

from dynexec_compile.decoding import DecodeEngine, ModelDrafter, TreeSpec, chain_mask
from dynexec_compile.decoding.sampling import SamplingParams
from dynexec_compile.decoding.step import pack_prompts, prefill_bucket


def full_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of one unpadded row without any cache: ``[n, V]``."""
    with torch.no_grad():
        return model(input_ids=tokens[None]).logits[0]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prefill_decode_and_step_equal_the_stock_forward(attn):
    for kind in ("llama", "qwen2", "gpt2"):
        model = build_model(kind, attn=attn)
        ids, mask = left_padded_batch([5, 9])
        prompts = [ids[r, mask[r] == 1] for r in range(2)]
        engine = DecodeEngine(model, batch_size=2, max_len=48, compile=False)

        logits = engine.prefill(ids, mask)  # [B, V]
        for r in range(2):
            torch.testing.assert_close(logits[r], full_logits(model, prompts[r])[-1], atol=1e-5, rtol=1e-5)

        token = torch.tensor([[17], [33]])
        logits = engine.decode(token)
        assert engine.lengths.tolist() == [6, 10]
        prompts = [torch.cat([p, t]) for p, t in zip(prompts, token, strict=True)]
        for r in range(2):
            torch.testing.assert_close(logits[r], full_logits(model, prompts[r])[-1], atol=1e-5, rtol=1e-5)

        chain = torch.tensor([[4, 5, 6], [7, 8, 9]])
        positions = engine.lengths[:, None] + torch.arange(3)
        logits = engine.step(chain, positions, chain_mask(positions, engine.max_len, torch.float32))
        assert logits.shape == (2, 3, model.config.vocab_size)
        assert engine.lengths.tolist() == [6, 10], "step() commits nothing"
        for r in range(2):
            ref = full_logits(model, torch.cat([prompts[r], chain[r]]))[-3:]
            torch.testing.assert_close(logits[r], ref, atol=1e-5, rtol=1e-5)


def test_pack_prompts_moves_tokens_to_the_front():
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 0], [1, 2, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])
    packed, lengths = pack_prompts(ids, mask)
    assert lengths.tolist() == [2, 3, 4]
    assert packed[0, :2].tolist() == [5, 6] and packed[1, :3].tolist() == [7, 8, 9]
    assert packed[2].tolist() == [1, 2, 3, 4]


def test_prefill_buckets():
    assert [prefill_bucket(n) for n in (1, 16, 17, 100, 512, 513, 1100)] == [16, 16, 32, 128, 512, 1024, 1536]


def test_a_regional_prefill_pads_to_a_multiple_of_8(llama):
    """Regional compilation runs one dynamic-shape prefill graph: a 21-token prompt pads to 24
    slots, not to its 32 bucket (what a whole-step engine compiles per), and its logits are the
    model's."""
    ids = torch.randint(0, llama.config.vocab_size, (1, 21))
    engine = DecodeEngine(llama, 1, 24, backend="eager", regional=True)
    torch.testing.assert_close(engine.prefill(ids)[0], full_logits(llama, ids[0])[-1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="need 32 slots"):
        DecodeEngine(llama, 1, 24, backend="eager").prefill(ids)


def test_step_and_decode_reject_bad_arguments(llama):
    engine = DecodeEngine(llama, batch_size=2, max_len=32, compile=False)
    ids, mask = left_padded_batch([5, 7])
    engine.prefill(ids, mask)
    tokens = torch.ones(2, 2, dtype=torch.long)
    positions = engine.lengths[:, None] + torch.arange(2)
    good = chain_mask(positions, 32, torch.float32)
    with pytest.raises(ValueError, match="tokens must be"):
        engine.step(torch.ones(3, 2, dtype=torch.long), positions, good)
    with pytest.raises(ValueError, match="mask must be"):
        engine.step(tokens, positions, good.bool())
    with pytest.raises(ValueError, match="mask must be"):
        engine.step(tokens, positions, good[..., :16])
    with pytest.raises(ValueError, match="positions must"):
        engine.step(tokens, positions[:, :1], good)
    with pytest.raises(ValueError, match="slots must lie"):
        engine.step(tokens, positions, good, slots=positions + 30)
    with pytest.raises(ValueError, match="batch of 3 rows"):
        engine.prefill(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="need 64 slots"):
        engine.prefill(torch.ones(2, 40, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one token"):
        engine.prefill(ids, torch.zeros_like(mask))
    small = DecodeEngine(llama, batch_size=1, max_len=17, compile=False)
    small.prefill(torch.ones(1, 16, dtype=torch.long))
    small.decode(torch.ones(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="KV cache is full"):
        small.decode(torch.ones(1, 1, dtype=torch.long))


def test_models_that_cannot_decode_are_refused():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        DecodeEngine(torch.nn.Linear(2, 2), batch_size=1, max_len=8)
    with pytest.raises(ValueError, match="not a decoder-only causal LM"):
        DecodeEngine(GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2)).eval(), batch_size=1, max_len=8)
    t5 = T5ForConditionalGeneration(T5Config(num_layers=1, d_model=16, num_heads=2, d_ff=16, d_kv=8)).eval()
    with pytest.raises(ValueError, match="not a decoder-only causal LM"):
        DecodeEngine(t5, batch_size=1, max_len=8)
    training = build_model("llama").train()
    with pytest.raises(ValueError, match="training mode"):
        DecodeEngine(training, batch_size=1, max_len=8)
    with pytest.raises(ValueError, match="cuda_graphs=True needs"):
        DecodeEngine(build_model("llama"), batch_size=1, max_len=8, cuda_graphs=True)


def test_step_can_return_the_final_hidden_states(lm):
    engine = DecodeEngine(lm, batch_size=2, max_len=32, compile=False)
    ids, mask = left_padded_batch([4, 6])
    engine.prefill(ids, mask)
    positions = engine.lengths[:, None] + torch.arange(2)
    mask4 = chain_mask(positions, 32, torch.float32)
    tokens = torch.tensor([[5, 6], [7, 8]])
    logits, hidden = engine.step(tokens, positions, mask4, return_hidden=True)
    assert hidden.shape == (2, 2, lm.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(lm.get_output_embeddings()(hidden), logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(engine.step(tokens, positions, mask4), logits, atol=1e-5, rtol=1e-5)


def draft_chain(engine, first, k, sampling=None, generator=None, at=None):
    """A draft model's ``k`` drafts in one call (``ModelDrafter.propose`` on a chain) after
    ``first``: the root ``[B, 1]``, or a catch-up token and the root ``[B, 2]``."""
    drafter = ModelDrafter(engine, TreeSpec.chain(k))
    lengths = engine.lengths.clone() if at is None else at
    if first.shape[1] == 2:  # the catch-up token at the draft's length, the root after it
        drafter._lag.fill_(1)
        drafter._catch_up.copy_(first[:, 0])
        lengths = lengths + 1
    tokens, probs = drafter.propose(first[:, -1], lengths, sampling, generator)
    return tokens[:, 1:], None if probs is None else probs[:, 1:]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_draft_chain_equals_greedy_decoding_and_draws_reproducibly(kind):
    """k drafts from one drafting call are what k greedy steps of the stock model produce,
    from a first chain of one token or two (a catch-up token before the root)."""
    model = build_model(kind)
    ids, mask = left_padded_batch([5, 9])
    prompts = [ids[r, mask[r] == 1] for r in range(2)]
    engine = DecodeEngine(model, batch_size=2, max_len=48, compile=False)
    for first in ([[11], [12]], [[3, 11], [4, 12]]):
        engine.prefill(ids, mask)
        feed = torch.tensor(first)  # [B, n]
        drafts, probs = draft_chain(engine, feed, 4)
        assert probs is None and drafts.shape == (2, 4) and engine.lengths.tolist() == [5, 9], "nothing committed"
        for r in range(2):
            text = torch.cat([prompts[r], feed[r]])
            for i in range(4):
                expect = int(full_logits(model, text)[-1].argmax())
                assert int(drafts[r, i]) == expect
                text = torch.cat([text, torch.tensor([expect])])

    sampling = SamplingParams(temperature=0.8, top_k=20)
    engine.prefill(ids, mask)
    draws = [draft_chain(engine, torch.tensor([[11], [12]]), 3, sampling, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(draws[0][0], draws[1][0]), "a seeded generator reproduces the draws"
    probs = draws[0][1]
    assert probs.shape == (2, 3, model.config.vocab_size)
    chosen = probs.gather(2, draws[0][0][:, :, None])
    assert (chosen > 0).all(), "a draft is never a token its distribution excludes"
    assert ((probs > 0).sum(-1) <= 20).all(), "top-k is applied"
    with pytest.raises(ValueError, match="num_draft"):
        draft_chain(engine, torch.tensor([[11], [12]]), 0)
    with pytest.raises(ValueError, match="overflow"):
        draft_chain(engine, torch.tensor([[11], [12]]), 4, at=torch.full((2,), 46))


def _chain_then_commit(engine, tokens, keep):
    """A run_graph body: a chain forward at the committed lengths, its argmax, and a commit of
    ``keep[b]`` of its tokens."""
    slots = engine.cache.lengths[:, None] + torch.arange(tokens.shape[1])
    logits = engine.forward_logits(tokens, slots, slots, chain_mask(slots, engine.max_len, engine.cache.dtype))
    engine.cache.apply_commit(keep)
    return logits.argmax(dim=-1)


def test_run_graph_runs_a_body_as_one_compiled_graph_like_step_and_commit(llama):
    from torch._dynamo.testing import CompileCounterWithBackend

    ids, mask = left_padded_batch([5, 9])
    counter = CompileCounterWithBackend("eager")
    fused = DecodeEngine(llama, batch_size=2, max_len=32, backend=counter)
    plain = DecodeEngine(llama, batch_size=2, max_len=32, compile=False)
    fused.prefill(ids, mask)
    plain.prefill(ids, mask)
    graphs = counter.frame_count
    for chain, keep in [([[4, 5, 6], [7, 8, 9]], [3, 1]), ([[1, 2, 3], [9, 9, 9]], [0, 2])]:
        chain, keep = torch.tensor(chain), torch.tensor(keep)
        got = fused.run_graph("chain", _chain_then_commit, chain, keep, width=3)
        slots = plain.lengths[:, None] + torch.arange(3)
        want = plain.step(chain, slots, chain_mask(slots, plain.max_len, torch.float32)).argmax(dim=-1)
        plain.commit(keep)
        assert torch.equal(got, want) and torch.equal(fused.lengths, plain.lengths)
    assert counter.frame_count == graphs + 1, "the body compiles once, then replays"
    assert fused.forward_passes == plain.forward_passes == 3
    for layer, ref in zip(fused.cache.layers, plain.cache.layers, strict=True):
        n = int(plain.lengths.min())
        torch.testing.assert_close(layer.keys[:, :, :n], ref.keys[:, :, :n], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="KV cache is full"):
        fused.run_graph("chain", _chain_then_commit, chain, keep, width=40)
