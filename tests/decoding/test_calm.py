"""strategy="calm": token-level early exit, lossy by design, with CALM's state propagation.

Exactness where nothing exits, the propagated keys/values against an independent projection
of the exit state (HF's own rotary code), the layer statistics, and the opt-in."""

import pytest
import torch
from conftest import VOCAB, build_model
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import dynexec_compile as dx
from dynexec_compile.decoding.calm import CalmDecoder, calm_nll


@pytest.fixture(scope="module")
def llama4():
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=1024,
    )
    return LlamaForCausalLM(config).eval()


def prompt(n=9, seed=3):
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def calm(model, ids, threshold, max_new_tokens=30, **options):
    return dx.generate(model, ids, None, strategy="calm", threshold=threshold, lossy=True, compile=False,
                       max_new_tokens=max_new_tokens, eos_token_id=[], **options)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_a_threshold_that_never_exits_is_hf_greedy(kind):
    model = build_model(kind)
    ids = prompt()
    out = calm(model, ids, threshold=1.0)
    with torch.no_grad():
        ref = model.generate(ids, do_sample=False, max_new_tokens=30, eos_token_id=[], pad_token_id=0)
    assert torch.equal(out.sequences, ref)
    layers = out.stats.extra["layers_per_token"]
    assert len(layers) == 29 and set(layers) == {model.config.num_hidden_layers}


def test_skipped_layers_keys_values_are_the_projection_of_the_exit_state(llama4):
    ids = prompt()
    decoder = CalmDecoder(llama4, 32, threshold=1e-9)  # always confident: every token leaves after block 0
    token = decoder.prefill(ids).argmax(-1)
    logits, layers = decoder.step(token)
    assert layers == 1
    n = ids.shape[1]
    with torch.no_grad():  # the exit state: block 0's output for the new token (its prefix is exact)
        full = llama4(torch.cat([ids, token[:, None]], 1), output_hidden_states=True)
        exit_state = full.hidden_states[1][:, -1:]  # [1, 1, D]
        assert torch.allclose(logits, llama4.lm_head(llama4.model.norm(exit_state[:, -1])), atol=1e-5)
        cos, sin = llama4.model.rotary_emb(exit_state, position_ids=torch.tensor([[n]]))
        for j in range(1, 4):
            layer = llama4.model.layers[j]
            x = layer.input_layernorm(exit_state)
            k = layer.self_attn.k_proj(x).view(1, 1, 2, 16).transpose(1, 2)
            v = layer.self_attn.v_proj(x).view(1, 1, 2, 16).transpose(1, 2)
            k, _ = apply_rotary_pos_emb(k, k, cos, sin)
            cached_k = decoder.cache.layers[j].keys[:, :, n : n + 1]
            cached_v = decoder.cache.layers[j].values[:, :, n : n + 1]
            assert cached_k.abs().amax() > 0 and cached_v.abs().amax() > 0  # filled, not zeros
            assert torch.allclose(cached_k, k, atol=1e-5) and torch.allclose(cached_v, v, atol=1e-5)
            full_k = full.past_key_values.layers[j].keys[:, :, n : n + 1]
            if j == 1:  # layer 1's input is the exit state: its keys are the full model's
                assert torch.allclose(cached_k, full_k, atol=1e-5)
            else:  # deeper layers' inputs differ from the exit state: approximated (lossy)
                assert (cached_k - full_k).abs().amax() > 1e-5
        # block 0's own keys/values are the real ones
        assert torch.allclose(decoder.cache.layers[0].keys[:, :, n], full.past_key_values.layers[0].keys[:, :, n], atol=1e-5)
    assert int(decoder.cache.lengths[0]) == n + 1


def test_layer_statistics_count_what_ran(llama4):
    ids = prompt(seed=5)
    hooks, calls = [], [0] * 4
    for i, layer in enumerate(llama4.model.layers):
        hooks.append(layer.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1)))
    try:
        probs = []
        for threshold in (1e-9, 1.0):
            calls[:] = [0] * 4
            out = calm(llama4, ids, threshold, max_new_tokens=12)
            layers = out.stats.extra["layers_per_token"]
            assert len(layers) == 11 and out.stats.new_tokens == [12]
            assert sum(calls) - 4 == sum(layers)  # minus the prefill's one call per layer
            probs.append(out.stats.extra["mean_layers"])
        assert probs == [1.0, 4.0]
        # in between: some tokens leave early, some do not, and the counts add up
        decoder_probs = []
        with torch.no_grad():
            logits = llama4(ids, output_hidden_states=True)
            for h in logits.hidden_states[1:4]:
                decoder_probs.append(llama4.lm_head(llama4.model.norm(h[:, -1])).softmax(-1).amax().item())
        calls[:] = [0] * 4
        out = calm(llama4, ids, sorted(decoder_probs)[1], max_new_tokens=20)
        stats = out.stats.extra
        assert sum(calls) - 4 == sum(stats["layers_per_token"])
        assert sum(stats["tokens_by_layers_run"].values()) == 19
        assert stats["mean_layers"] == pytest.approx(sum(stats["layers_per_token"]) / 19)
    finally:
        for h in hooks:
            h.remove()


def test_teacher_forced_nll_without_exits_is_the_models():
    model = build_model("llama")
    text = prompt(16, seed=7)
    nll, layers = calm_nll(model, text, 6, threshold=1.0)
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(model(text).logits[0, 5:-1], text[0, 6:], reduction="none")
    assert torch.allclose(torch.tensor(nll), ref, atol=1e-4) and layers == [2] * 9


def test_trained_exit_heads_and_the_opt_in(llama4):
    heads = dx.ExitHeads([1], 64, VOCAB, "last_token_rmsnorm", dropout=0.0).eval()
    with torch.no_grad():
        heads.head(1).out.weight.mul_(100.0)  # confident
    out = calm(llama4, prompt(), 0.5, max_new_tokens=8, exit_heads=heads)
    assert set(out.stats.extra["layers_per_token"]) == {2}  # only block 1 has a head
    with pytest.raises(ValueError, match="changes the model's output.*lossy=True"):
        dx.generate(llama4, prompt(), None, strategy="calm", threshold=0.5, compile=False, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"threshold must be a probability in \(0, 1\]"):
        calm(llama4, prompt(), 1.5)
    with pytest.raises(NotImplementedError, match="one row at a time"):
        calm(llama4, torch.cat([prompt(), prompt()]), 0.5)
    with pytest.raises(NotImplementedError, match="'gpt2'"):
        calm(build_model("gpt2"), prompt(), 0.5)
