"""Regional compilation: one compiled decoder layer serves every layer, tokens unchanged.

Dynamo's graph capture is what recompiles, whatever the backend, so the counts use the cheap
``eager`` backend; the Inductor run is ``slow``.
"""

import pytest
import torch
from conftest import build_model, left_padded_batch
from test_decode_compile import hf_greedy
from torch._dynamo.testing import CompileCounterWithBackend

import dynexec_compile as dx
from dynexec_compile.decoding import DecodeEngine, step
from dynexec_compile.decoding.regional import decoder_layers


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2"])
def test_regional_greedy_equals_hf_and_compiles_one_layer_per_shape(kind):
    model = build_model(kind)
    counter = CompileCounterWithBackend("eager")
    ids, mask = left_padded_batch([7, 12])
    out = dx.generate(model, ids, mask, max_new_tokens=40, eos_token_id=[], backend=counter, regional=True)
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, 40))
    # one graph for the prefill (dynamic lengths) and one for the 1-token step, whatever the depth
    assert counter.frame_count == 2 and out.stats.compiles == 2
    ids2, mask2 = left_padded_batch([20, 3], seed=5)  # another prefill bucket: no new graph
    out2 = dx.generate(model, ids2, mask2, max_new_tokens=40, eos_token_id=[], backend=counter, regional=True)
    assert out2.stats.compiles == 0
    assert torch.equal(out2.sequences, hf_greedy(model, ids2, mask2, 40))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_unequal_prompts_prefill_row_by_row_with_the_batched_numbers(kind):
    """Prompts 32 tokens apart: the regional prefill runs each row padded to its own multiple of
    8 (the sum of the rows' lengths, not 3 x the longest) and leaves the logits, cache slots and
    lengths of the batched prefill; one forward counted; tokens equal HF greedy."""
    model = build_model(kind)
    lengths = [5, 37, 12]
    ids, mask = left_padded_batch(lengths)
    assert step._rows_apart(lengths, 40) and not step._rows_apart([7, 12], 16)
    rows = DecodeEngine(model, 3, 64, backend="eager", regional=True)
    batched = DecodeEngine(model, 3, 64, compile=False)
    torch.testing.assert_close(rows.prefill(ids, mask), batched.prefill(ids, mask), rtol=1e-5, atol=1e-5)
    assert torch.equal(rows.cache.lengths, batched.cache.lengths) and rows.forward_passes == 1
    for mine, its in zip(rows.cache.layers, batched.cache.layers, strict=True):
        for row, n in enumerate(lengths):
            torch.testing.assert_close(mine.keys[row, :, :n], its.keys[row, :, :n], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(mine.values[row, :, :n], its.values[row, :, :n], rtol=1e-5, atol=1e-5)
    out = dx.generate(model, ids, mask, max_new_tokens=30, eos_token_id=[], backend="eager", regional=True)
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, 30))


@pytest.mark.parametrize(
    "strategy, options",
    [
        ("lookahead", {"window": 1, "ngram": 3, "guesses": 1}),
        ("self_speculative", {"exit_layer": 1, "num_draft": 3}),
        ("draft_heads", {"tree": [2, 1]}),
    ],
)
def test_regional_multi_token_strategies_equal_hf(llama, strategy, options):
    if strategy == "draft_heads":
        from dynexec_compile.decoding.draft_heads import DraftHeads

        torch.manual_seed(0)
        heads = DraftHeads(llama.config.hidden_size, 2, vocab_size=llama.config.vocab_size)
        for p in heads.parameters():
            torch.nn.init.normal_(p, std=0.5)  # guesses that are sometimes right, sometimes not
        options = {**options, "heads": heads}
    ids, mask = left_padded_batch([9, 4])
    out = dx.generate(
        llama, ids, mask, strategy=strategy, max_new_tokens=30, eos_token_id=[], backend="eager", regional=True, **options
    )
    assert torch.equal(out.sequences, hf_greedy(llama, ids, mask, 30))


def test_regional_leaves_the_model_untouched_even_after_an_error(llama):
    engine = DecodeEngine(llama, batch_size=2, max_len=64, backend="eager", regional=True)
    ids, mask = left_padded_batch([5, 9])
    engine.prefill(ids, mask)
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(llama))
    with pytest.raises(ValueError, match="cache is full"):
        for _ in range(100):
            engine.decode(torch.zeros(2, 1, dtype=torch.long))
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(llama))
    logits = llama(input_ids=ids, attention_mask=mask).logits  # the model still runs as before
    assert torch.isfinite(logits).all()


def test_regional_is_automatic_from_the_size_threshold(llama, monkeypatch):
    assert not DecodeEngine(llama, 1, 32, backend="eager").compile_settings["regional"]
    monkeypatch.setattr(step, "REGIONAL_MIN_BYTES", 1)
    resolved = DecodeEngine(llama, 1, 32).compile_settings
    assert resolved["regional"] and not resolved["freeze"]
    assert not DecodeEngine(llama, 1, 32, compile=False).compile_settings["regional"]


def test_regional_refuses_what_it_cannot_do(llama):
    with pytest.raises(ValueError, match="needs compile=True"):
        DecodeEngine(llama, 1, 32, compile=False, regional=True)
    with pytest.raises(ValueError, match="freeze=True needs the whole-step graphs"):
        DecodeEngine(llama, 1, 32, regional=True, freeze=True)


def test_decoder_layers_finds_the_stack(llama):
    assert decoder_layers(llama) is llama.model.layers
    gpt2 = build_model("gpt2")
    assert decoder_layers(gpt2) is gpt2.transformer.h
    with pytest.raises(ValueError, match="no list of repeated decoder layers"):
        decoder_layers(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_regional_inductor_equals_hf(llama):
    ids, mask = left_padded_batch([7, 12])
    out = dx.generate(llama, ids, mask, max_new_tokens=30, eos_token_id=[], regional=True)
    assert torch.equal(out.sequences, hf_greedy(llama, ids, mask, 30))
    assert out.stats.compiles == 2


def test_a_cached_engine_survives_a_dynamo_reset(llama):
    """torch._dynamo.reset() clears the compiled code of engines that stay cached: their warm
    shapes (run with guards skipped) must compile again instead of failing."""
    ids, mask = left_padded_batch([6, 10])
    first = dx.generate(llama, ids, mask, max_new_tokens=12, eos_token_id=[], backend="eager", regional=True)
    torch._dynamo.reset()
    second = dx.generate(llama, ids, mask, max_new_tokens=12, eos_token_id=[], backend="eager", regional=True)
    assert torch.equal(first.sequences, second.sequences)
    assert torch.equal(second.sequences, hf_greedy(llama, ids, mask, 12))
