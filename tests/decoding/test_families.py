"""Every strategy on every decoder family transformers builds from a small config.

Token-identical to ``model.generate(do_sample=False)`` in fp32, on a batch of two prompts of
different lengths (left-padded), with generations longer than the sliding windows of
Mistral, Starcoder2 and Gemma-2/3 (so a lost window changes tokens). The layer stack that
self-speculation and draft heads run equals the model's forward; features the decoding
core cannot serve raise before anything is generated; the compiled path runs on three
families; sampling follows the target distribution on three families.
"""

import pytest
import torch
import transformers as T
from conftest import chi_square_pvalue, exact_joint, left_padded_batch
from families import AUTO_DEFAULT, AUTO_FAMILIES, FAMILIES, VOCAB, WINDOW, family_model
from transformers.masking_utils import sliding_window_causal_mask_function

import dynexec_compile as dx
from dynexec_compile.decoding import DraftHeads, SamplingParams
from dynexec_compile.decoding.cache import SlotCache
from dynexec_compile.decoding.layers import DecoderStack
from dynexec_compile.decoding.masks import chain_mask, sliding_window, step_mask

NEW = 24
LENGTHS = [5, 11]
STRATEGIES = ("greedy", "lookahead", "speculative", "draft_heads", "self_speculative", "eagle")
SLIDING = ("mistral", "starcoder2", "gemma2", "gemma3", "qwen2_window", "gpt_oss", "cohere2")
ALL_FAMILIES = FAMILIES + tuple(
    f if f in AUTO_DEFAULT else pytest.param(f, marks=pytest.mark.slow) for f in AUTO_FAMILIES
)


@pytest.fixture(scope="module")
def family():
    """family -> (model, prompts, mask, HF greedy sequences), built once per module."""
    built = {}

    def get(name):
        if name not in built:
            model = family_model(name)
            ids, mask = left_padded_batch(LENGTHS, seed=3)
            with torch.no_grad():
                ref = model.generate(
                    ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0
                )
            for row in ref[:, ids.shape[1]:]:  # a model repeating one token could not fail the test
                assert len(set(row.tolist())) >= 4, f"{name}: the random model's greedy continuation is degenerate"
            built[name] = model, ids, mask, ref
        return built[name]

    return get


def strategy_options(strategy: str, model) -> dict:
    if strategy == "speculative":
        return {"draft_model": family_model("llama", seed=1, num_hidden_layers=1), "num_draft": 3}
    if strategy == "draft_heads":
        torch.manual_seed(0)
        heads = DraftHeads(model.config.hidden_size, 2, vocab_size=VOCAB)
        with torch.no_grad():
            for p in heads.parameters():
                p.normal_(0, 0.1)
        return {"heads": heads}
    if strategy == "self_speculative":
        return {"exit_layer": 1, "num_draft": 3}
    if strategy == "eagle":  # an untrained draft layer of the family's own kind, and the lookup branch
        torch.manual_seed(0)
        return {"draft": dx.EagleDraft(model.config.get_text_config(decoder=True)), "num_draft": 3, "lookup": 2}
    return {}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_every_strategy_equals_transformers_greedy(name, strategy, family):
    model, ids, mask, ref = family(name)
    out = dx.generate(
        model, ids, mask, strategy=strategy, max_new_tokens=NEW, eos_token_id=[], compile=False,
        **strategy_options(strategy, model),
    )
    assert torch.equal(out.sequences, ref)


@pytest.mark.parametrize("name", SLIDING)
def test_the_sliding_window_changes_the_tokens(name, family, monkeypatch):
    """The families above would pass without their window only if it never mattered."""
    model, ids, mask, ref = family(name)
    assert model.config.sliding_window == WINDOW < LENGTHS[0] + NEW
    import dynexec_compile.decoding.step as step

    served = step.attention_windows
    monkeypatch.setattr(step, "attention_windows", lambda config: {k: None for k in served(config)})
    out = dx.generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=[], compile=False)
    assert not torch.equal(out.sequences, ref)


@pytest.mark.parametrize("window", [1, 3, 8])
def test_sliding_window_mask_is_transformers_convention(window):
    """Query at position q sees key k iff ``k <= q`` and ``k > q - window``, as masking_utils says;
    a step's scratch tokens (a tree's nodes) are windowed by their positions, not their slots."""
    slots = torch.arange(12)[None, :]  # [1, 12] prefill: slot == position
    got = sliding_window(chain_mask(slots, 16, torch.float32), slots, slots, window)[0, 0] == 0  # [12, 16]
    hf = sliding_window_causal_mask_function(window)
    i = torch.tensor
    want = torch.tensor([[bool(hf(i(0), i(0), i(q), i(k))) for k in range(16)] for q in range(12)])
    assert torch.equal(got, want)
    # two tree nodes at depth 1 (position 10) in slots 10 and 11; the second sees the committed
    # prefix and itself; its window is counted from position 10
    lengths, tree_slots, positions = torch.tensor([10]), torch.tensor([[10, 11]]), torch.tensor([[10, 10]])
    visible = torch.eye(2, dtype=torch.bool)
    got = sliding_window(step_mask(lengths, tree_slots, visible, 16, torch.float32), positions, tree_slots, window)
    seen = (got[0, 0, 1] == 0).nonzero().flatten().tolist()
    assert seen == [k for k in range(10) if k > 10 - window] + [11]


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_the_layer_stack_is_the_models_forward(name):
    """Embeddings, every layer range in order and the head equal ``model(...)`` (fp32 logits)."""
    model = family_model(name)
    stack = DecoderStack(model)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(9)[None, :].expand(2, 9)
    with torch.no_grad():
        want = model(ids).logits  # [2, 9, V]
        cache = SlotCache(model.config, 2, 16)
        mask = chain_mask(positions, 16, torch.float32)
        h = stack.embed(ids, positions)
        for start in range(stack.num_layers):  # one layer at a time, as a self-speculative step does
            h = stack.run(h, start, start + 1, mask, positions, cache, positions)
        got = stack.logits(h)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _falcon_alibi():
    return T.FalconForCausalLM(T.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True, vocab_size=VOCAB))


def _minimax_linear_attention():
    return T.MiniMaxForCausalLM(T.MiniMaxConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, num_local_experts=2, num_experts_per_tok=1, vocab_size=VOCAB,
        layer_types=["linear_attention", "full_attention"]))


def _lfm2_convolutions():
    return T.Lfm2ForCausalLM(T.Lfm2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, layer_types=["conv", "full_attention"]))


def _llama4_chunked_attention():
    return T.Llama4ForCausalLM(T.Llama4TextConfig(
        hidden_size=32, intermediate_size=64, intermediate_size_mlp=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=2, vocab_size=VOCAB, attention_chunk_size=8))


def _t5_encoder_decoder():
    return T.T5ForConditionalGeneration(T.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=VOCAB))


@pytest.mark.parametrize(
    "build, error, match",
    [
        (_falcon_alibi, NotImplementedError, "ALiBi"),
        (_minimax_linear_attention, NotImplementedError, "linear_attention"),
        (_lfm2_convolutions, NotImplementedError, "conv"),
        (_llama4_chunked_attention, NotImplementedError, "chunked_attention"),
        (_t5_encoder_decoder, ValueError, "not a decoder-only"),
    ],
    ids=["alibi", "linear_attention", "convolution", "chunked_attention", "encoder_decoder"],
)
@pytest.mark.parametrize("strategy", ["greedy", "self_speculative"])
def test_what_the_core_cannot_serve_raises_before_generating(build, error, match, strategy):
    torch.manual_seed(0)
    model = build().eval()
    ids, mask = left_padded_batch([4, 6])
    options = {"exit_layer": 1} if strategy == "self_speculative" else {}
    with pytest.raises(error, match=match):
        dx.generate(model, ids, mask, strategy=strategy, max_new_tokens=4, compile=False, **options)


def test_configs_the_cache_cannot_serve_raise():
    """Per-layer heterogeneous configs and keys/values shared between layers (Gemma-3n/4)."""
    mixed = T.LlamaConfig(**{k: v for k, v in family_model("llama").config.to_dict().items() if k in (
        "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size")},
        num_hidden_layers=2, per_layer_config={0: {"num_key_value_heads": 1}})
    with pytest.raises(NotImplementedError, match="per_layer_config"):
        SlotCache(mixed, batch_size=1, max_len=8)
    shared = family_model("llama").config
    shared.kv_sharing_modes = ["store", "reuse"]
    with pytest.raises(NotImplementedError, match="kv_sharing_modes"):
        SlotCache(shared, batch_size=1, max_len=8)


def test_layer_stack_refuses_what_it_cannot_reproduce():
    """XGLM scales its embeddings and adds sinusoidal positions inside its forward; OPT-350m
    projects the last hidden state before the head: both raise instead of drafting wrongly."""
    torch.manual_seed(0)
    xglm = T.XGLMForCausalLM(T.XGLMConfig(d_model=32, ffn_dim=64, num_layers=2, attention_heads=4, vocab_size=VOCAB)).eval()
    with pytest.raises(NotImplementedError, match="first decoder layer"):
        DecoderStack(xglm)
    opt = family_model("opt", word_embed_proj_dim=32)
    with pytest.raises(NotImplementedError, match="project_out"):
        DecoderStack(opt)


def test_the_probe_is_invisible_to_the_users_hooks():
    model = family_model("gemma2")
    calls = []
    handle = model.model.layers[0].register_forward_hook(lambda *args: calls.append(1))
    try:
        DecoderStack(model)
    finally:
        handle.remove()
    assert calls == []


@pytest.mark.parametrize(
    "name, strategy",
    [("mistral", "greedy"), ("gemma2", "lookahead"), ("gpt_neox", "self_speculative")],
)
def test_compiled_path_equals_transformers(name, strategy, family):
    model, ids, mask, ref = family(name)
    out = dx.generate(
        model, ids, mask, strategy=strategy, max_new_tokens=NEW, eos_token_id=[], compile=True, backend="eager",
        **strategy_options(strategy, model),
    )
    assert torch.equal(out.sequences, ref)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma2", "mistral"])
def test_inductor_path_equals_transformers(name, family):
    model, ids, mask, ref = family(name)
    out = dx.generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=[], compile=True, backend="inductor")
    assert torch.equal(out.sequences, ref)


# ---- sampling: a vocabulary of 8, the exact joint distribution of 3 new tokens ----------------

V, ROWS, N = 8, 2000, 3
PROMPT = [1, 5, 2, 7]


@pytest.mark.parametrize("name", ["gemma2", "mistral", "gpt_neox"])
def test_self_speculative_sampling_follows_the_target_distribution(name):
    """Gemma-2's soft-capped logits, Mistral's window (4, shorter than prompt + 3) and GPT-NeoX's
    parallel residual all shape the distribution the draft-and-verify loop must reproduce."""
    overrides = {"initializer_range": 0.3} if name != "gemma2" else {"final_logit_softcapping": 1.0, "initializer_range": 0.1}
    model = family_model(name, vocab=V, window=4, **overrides)
    params = SamplingParams(temperature=1.5)
    out = dx.generate(
        model, torch.tensor([PROMPT]).expand(ROWS, -1), strategy="self_speculative", exit_layer=1, num_draft=2,
        do_sample=True, temperature=params.temperature, generator=torch.Generator().manual_seed(1),
        max_new_tokens=N, eos_token_id=[], compile=False,
    )
    samples = out.sequences[:, len(PROMPT):]
    assert 0.05 < out.stats.extra["acceptance_rate"] < 0.95, "drafts must be both accepted and rejected"
    assert chi_square_pvalue(samples, V, exact_joint(model, PROMPT, params, N)) > 1e-3
    assert chi_square_pvalue(samples, V, exact_joint(model, PROMPT, SamplingParams(temperature=1.0), N)) < 1e-6
