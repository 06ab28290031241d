"""Tiny random decoder-only LMs of many transformers families, for the family-matrix tests.

Each config is as small as the family allows (hidden 32-64, 2-4 layers, vocabulary 128) and
keeps the feature that makes the family different: Mistral's and Starcoder2's sliding window
shorter than a generation, Gemma-2/3's alternating windows and soft-capping, GPT-NeoX's
parallel residual, GPT-2's and OPT's learned positions, Mixtral's and Qwen2-MoE's experts,
Cohere's logit scale, Granite's multipliers. Initialisation is seeded per family.
"""

from __future__ import annotations

import torch
import transformers as T

VOCAB = 128
WINDOW = 8  # sliding windows: shorter than prompt + generation in every test

_ATTN = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _configs(vocab: int, window: int) -> dict[str, tuple[type, object]]:
    # a wide init: with the default 0.02 most random models repeat one token, and a test could not fail
    common = dict(vocab_size=vocab, initializer_range=0.2, max_position_embeddings=256, bos_token_id=1,
                   eos_token_id=2, pad_token_id=0)
    # Gemma scales its (tied) embeddings by sqrt(hidden): it varies with the default init
    small_init = {**common, "initializer_range": 0.02}
    return {
        "llama": (T.LlamaForCausalLM, T.LlamaConfig(**_ATTN, **common)),
        "qwen2": (T.Qwen2ForCausalLM, T.Qwen2Config(**_ATTN, **common)),
        "qwen3": (T.Qwen3ForCausalLM, T.Qwen3Config(**_ATTN, head_dim=16, **common)),
        "mistral": (T.MistralForCausalLM, T.MistralConfig(**_ATTN, sliding_window=window, **common)),
        "mixtral": (T.MixtralForCausalLM, T.MixtralConfig(**_ATTN, num_local_experts=4, num_experts_per_tok=2, **common)),
        "qwen2_moe": (T.Qwen2MoeForCausalLM, T.Qwen2MoeConfig(
            **_ATTN, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4,
            num_experts_per_tok=2, **common)),
        "phi3": (T.Phi3ForCausalLM, T.Phi3Config(**_ATTN, **common)),
        "gemma2": (T.Gemma2ForCausalLM, T.Gemma2Config(
            **{**_ATTN, "num_hidden_layers": 4}, head_dim=16, sliding_window=window,
            final_logit_softcapping=3.0, attn_logit_softcapping=5.0, **small_init)),
        "gemma3": (T.Gemma3ForCausalLM, T.Gemma3TextConfig(
            **{**_ATTN, "num_hidden_layers": 4}, head_dim=16, sliding_window=window, sliding_window_pattern=2,
            final_logit_softcapping=3.0, **small_init)),
        "gpt2": (T.GPT2LMHeadModel, T.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, vocab_size=vocab, n_positions=256, initializer_range=0.2, pad_token_id=0,
            bos_token_id=1, eos_token_id=2)),
        "gpt_neox": (T.GPTNeoXForCausalLM, T.GPTNeoXConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            use_parallel_residual=True, **common)),
        "opt": (T.OPTForCausalLM, T.OPTConfig(
            hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64,
            init_std=0.2, **common)),
        "falcon": (T.FalconForCausalLM, T.FalconConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=True,
            num_kv_heads=2, **common)),
        "stablelm": (T.StableLmForCausalLM, T.StableLmConfig(**_ATTN, **common)),
        "starcoder2": (T.Starcoder2ForCausalLM, T.Starcoder2Config(**_ATTN, sliding_window=window, **common)),
        "olmo2": (T.Olmo2ForCausalLM, T.Olmo2Config(**_ATTN, **common)),
        "granite": (T.GraniteForCausalLM, T.GraniteConfig(
            **_ATTN, embedding_multiplier=2.0, logits_scaling=2.0, residual_multiplier=0.5,
            attention_multiplier=0.2, **common)),
        "cohere": (T.CohereForCausalLM, T.CohereConfig(**_ATTN, logit_scale=0.5, **common)),
        "smollm3": (T.SmolLM3ForCausalLM, T.SmolLM3Config(**_ATTN, **common)),
    }


# More families, built through the Auto classes from the same small settings. The ones with a
# feature of their own run by default, the rest are marked slow in the tests.
_AUTO: dict[str, tuple[str, dict]] = {
    "qwen2_window": ("qwen2", dict(use_sliding_window=True, max_window_layers=1, sliding=True)),  # full, then sliding
    "gpt_oss": ("gpt_oss", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding=True)),  # sinks, alternating
    "cohere2": ("cohere2", dict(num_hidden_layers=4, sliding=True)),  # 3 sliding : 1 full
    "olmo3": ("olmo3", dict(num_hidden_layers=4, sliding=True)),
    "exaone4": ("exaone4", dict(num_hidden_layers=4, sliding=True)),
    "phi": ("phi", {}),
    "gemma": ("gemma", dict(initializer_range=0.1, head_dim=16, tie_word_embeddings=False)),  # untied: varied
    "qwen3_moe": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    "olmoe": ("olmoe", dict(num_experts=4, num_experts_per_tok=2)),
    "granitemoe": ("granitemoe", dict(num_local_experts=4, num_experts_per_tok=2)),
    "glm": ("glm", {}),
    "glm4": ("glm4", {}),
    "nemotron": ("nemotron", {}),
    "jetmoe": ("jetmoe", {}),
    "arcee": ("arcee", {}),
    "seed_oss": ("seed_oss", {}),
    "ernie4_5": ("ernie4_5", {}),
}
AUTO_DEFAULT = ("qwen2_window", "gpt_oss", "cohere2")

FAMILIES = tuple(_configs(VOCAB, WINDOW))
AUTO_FAMILIES = tuple(_AUTO)


def family_model(family: str, seed: int = 0, vocab: int = VOCAB, window: int = WINDOW, **overrides) -> torch.nn.Module:
    """The family's tiny LM in fp32, eval mode; ``overrides`` set config attributes."""
    if family in _AUTO:
        model_type, settings = _AUTO[family]
        settings = dict(settings)
        kwargs = {**_ATTN, "vocab_size": vocab, "initializer_range": 0.2, "max_position_embeddings": 256,
                  "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
        if settings.pop("sliding", False):  # only where the family declares a window: a stray
            kwargs["sliding_window"] = window  # key makes HF's generate disagree with its forward
        config = T.AutoConfig.for_model(model_type, **{**kwargs, **settings, **overrides})
        torch.manual_seed(seed)
        return T.AutoModelForCausalLM.from_config(config).eval()
    cls, config = _configs(vocab, window)[family]
    for name, value in overrides.items():
        setattr(config, name, value)
    torch.manual_seed(seed)
    return cls(config).eval()
