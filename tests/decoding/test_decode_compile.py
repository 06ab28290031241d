"""Compiled decoding: one graph per step shape, no recompiles after warm-up, tokens unchanged.

The non-slow test counts compiles through Dynamo with the cheap ``eager`` backend (the graph
capture is what recompiles, whatever the backend); the Inductor runs are ``slow``.
"""

import pytest
import torch
from conftest import build_model, left_padded_batch
from torch._dynamo.testing import CompileCounterWithBackend

import dynexec_compile as dx
from dynexec_compile.decoding import DecodeEngine, chain_mask


def hf_greedy(model, ids, mask, max_new_tokens):
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=[], pad_token_id=0
        )


def test_300_tokens_compile_one_prefill_and_one_step_graph(llama):
    counter = CompileCounterWithBackend("eager")
    ids, mask = left_padded_batch([7, 12])
    out = dx.generate(llama, ids, mask, max_new_tokens=300, eos_token_id=[], backend=counter)
    assert counter.frame_count == 2, "one graph for the prefill bucket, one for the decode step"
    assert out.stats.compiles == 2 and out.stats.forward_passes == 300
    assert torch.equal(out.sequences, hf_greedy(llama, ids, mask, 300))

    ids2, mask2 = left_padded_batch([9, 15], seed=8)  # same prefill bucket (16), same cache length
    out2 = dx.generate(llama, ids2, mask2, max_new_tokens=300, eos_token_id=[], backend=counter)
    assert counter.frame_count == 2 and out2.stats.compiles == 0, "a prompt in the same bucket recompiled"
    assert torch.equal(out2.sequences, hf_greedy(llama, ids2, mask2, 300))

    out3 = dx.generate(llama, ids2, mask2, max_new_tokens=20, eos_token_id=[], backend=counter)
    assert out3.stats.compiles == 0, "a shorter generation reuses the engine with the longer cache"
    assert torch.equal(out3.sequences, out2.sequences[:, : ids2.shape[1] + 20])


def test_generic_step_compiles_once_per_width(llama):
    counter = CompileCounterWithBackend("eager")
    engine = DecodeEngine(llama, batch_size=2, max_len=64, backend=counter)
    reference = DecodeEngine(llama, batch_size=2, max_len=64, compile=False)
    ids, mask = left_padded_batch([5, 9])
    for e in (engine, reference):
        e.prefill(ids, mask)
    for i in range(4):
        chain = torch.randint(3, 128, (2, 3), generator=torch.Generator().manual_seed(i))
        positions = engine.lengths[:, None] + torch.arange(3)
        mask4 = chain_mask(positions, 64, torch.float32)
        torch.testing.assert_close(
            engine.step(chain, positions, mask4), reference.step(chain, positions, mask4), atol=1e-5, rtol=1e-5
        )
        counts = torch.tensor([i % 3 + 1, 2])
        if i % 2:  # keep a prefix of the chain in place
            engine.commit(counts)
            reference.commit(counts)
        else:  # gather chosen tokens (a graph of its own)
            kept = positions[:, [2, 0, 1]]
            engine.commit(counts, kept)
            reference.commit(counts, kept)
        assert torch.equal(engine.lengths, reference.lengths)
        for a, b in zip(engine.cache.layers, reference.cache.layers, strict=True):
            torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 3, "prefill + one step width + one commit width; new lengths do not recompile"


@pytest.mark.slow
def test_inductor_greedy_equals_transformers_without_recompiles():
    model = build_model("qwen2")
    counter = CompileCounterWithBackend("inductor")
    ids, mask = left_padded_batch([7, 12, 3])
    out = dx.generate(model, ids, mask, max_new_tokens=300, eos_token_id=[], backend=counter)
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, 300))
    assert counter.frame_count == 2 and out.stats.compiles == 2
    gen = torch.Generator().manual_seed(0)
    sampled = dx.generate(model, ids, mask, strategy="sample", max_new_tokens=50, generator=gen, backend=counter)
    assert counter.frame_count == 2, "sampling (and a shorter generation) reuses the compiled graphs"
    gen = torch.Generator().manual_seed(0)
    eager = dx.generate(model, ids, mask, strategy="sample", max_new_tokens=50, generator=gen, compile=False)
    assert torch.equal(sampled.sequences, eager.sequences)


@pytest.mark.slow
def test_dynamic_cache_compiled_with_dynamic_shapes_equals_transformers(llama):
    ids, mask = left_padded_batch([7, 12])
    counter = CompileCounterWithBackend("eager")
    out = dx.generate(llama, ids, mask, max_new_tokens=40, eos_token_id=[], cache="dynamic", backend=counter)
    assert torch.equal(out.sequences, hf_greedy(llama, ids, mask, 40))
    assert 1 <= counter.frame_count <= 2, "the step compiles once with static shapes, at most once more dynamic"
    again = dx.generate(llama, ids, mask, max_new_tokens=40, eos_token_id=[], cache="dynamic", backend=counter)
    assert again.stats.compiles == 0 and torch.equal(again.sequences, out.sequences)


def test_engines_of_two_models_with_the_same_shapes_stay_apart(llama):
    """Compiled graphs are shared by code object; skipping guards on warm calls must still run
    each engine's own model and cache."""
    other = build_model("llama")
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    ids, mask = left_padded_batch([5, 9])
    counter = CompileCounterWithBackend("eager")
    engines = [DecodeEngine(m, batch_size=2, max_len=64, backend=counter) for m in (llama, other)]
    references = [DecodeEngine(m, batch_size=2, max_len=64, compile=False) for m in (llama, other)]
    tokens = []
    for engine, reference in zip(engines, references, strict=True):
        logits = engine.prefill(ids, mask)
        torch.testing.assert_close(logits, reference.prefill(ids, mask), atol=1e-5, rtol=1e-5)
        tokens.append(logits.argmax(-1))
    for _ in range(5):
        for i, (engine, reference) in enumerate(zip(engines, references, strict=True)):
            logits = engine.decode(tokens[i])
            torch.testing.assert_close(logits, reference.decode(tokens[i]), atol=1e-5, rtol=1e-5)
            tokens[i] = logits.argmax(-1)
    assert not torch.equal(references[0].cache.layers[0].keys, references[1].cache.layers[0].keys)


@pytest.mark.slow
def test_frozen_engine_refuses_changed_weights_and_generate_rebuilds():
    model = build_model("llama")
    ids, mask = left_padded_batch([5, 9])
    engine = DecodeEngine(model, batch_size=2, max_len=64)  # Inductor on CPU: frozen weights
    engine.prefill(ids, mask)
    before = dx.generate(model, ids, mask, max_new_tokens=8, eos_token_id=[])
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    with pytest.raises(RuntimeError, match="weights changed"):
        engine.prefill(ids, mask)
    after = dx.generate(model, ids, mask, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(after.sequences, hf_greedy(model, ids, mask, 8))
    assert not torch.equal(after.sequences, before.sequences)


def test_max_autotune_on_cpu_keeps_freezing_and_adds_the_gemm_autotuning(llama):
    """mode="max-autotune" on CPU cannot go to torch.compile as a mode (freezing and the CPU
    options would be lost): the engine turns it into Inductor options, freezing kept."""
    engine = DecodeEngine(llama, batch_size=1, max_len=32, mode="max-autotune")
    settings = engine.compile_settings
    assert settings["mode"] is None and settings["freeze"] is True
    assert settings["options"]["max_autotune"] is True
    assert settings["options"]["max_autotune_gemm_backends"] == "CPP,ATEN"
    assert settings["options"]["freezing"] is True
    plain = DecodeEngine(llama, batch_size=1, max_len=32)
    assert "max_autotune" not in plain.compile_settings["options"]


@pytest.mark.slow
def test_max_autotune_greedy_and_lookahead_equal_transformers(llama):
    ids, mask = left_padded_batch([7, 12])
    ref = hf_greedy(llama, ids, mask, 24)
    for strategy in ("greedy", "lookahead"):
        out = dx.generate(llama, ids, mask, strategy=strategy, max_new_tokens=24, eos_token_id=[], mode="max-autotune")
        assert torch.equal(out.sequences, ref), strategy
