"""Grouped-query attention without copied key/value heads: LLaMA's eager attention's numbers,
and the engines trace with it exactly where a family's eager attention is LLaMA's."""

import pytest
import torch
from conftest import left_padded_batch
from families import family_model
from transformers.models.gemma2 import modeling_gemma2
from transformers.models.llama import modeling_llama

import dynexec_compile as dx
from dynexec_compile.backends.attention import NAME, cpu_attention, grouped_attention
from dynexec_compile.decoding.step import DecodeEngine


class _Heads(torch.nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups


@pytest.mark.parametrize("mask_heads", [None, 1, "all", "one row"])
@pytest.mark.parametrize("heads, kv_heads, length", [(9, 3, 5), (4, 2, 1), (4, 4, 3), (6, 1, 2)])
def test_equals_llamas_eager_attention(heads, kv_heads, length, mask_heads):
    """Outputs and weights of ``eager_attention_forward`` with ``repeat_kv``, for grouped, plain
    multi-head and multi-query layouts, one or several query tokens, a mask shared by the heads,
    one per head, one for every row of the batch, or none."""
    torch.manual_seed(heads * 100 + length)
    batch, slots, dim = 2, 11, 8
    query = torch.randn(batch, heads, length, dim)
    key, value = torch.randn(batch, kv_heads, slots, dim), torch.randn(batch, kv_heads, slots, dim)
    mask = None
    if mask_heads is not None:
        mask = torch.randn(1 if mask_heads == "one row" else batch, heads if mask_heads == "all" else 1, length, slots)
        mask[..., -3:] = torch.finfo(torch.float32).min  # masked slots
    module = _Heads(heads // kv_heads).eval()
    out, weights = grouped_attention(module, query, key, value, mask, scaling=0.3, dropout=0.0)
    ref_out, ref_weights = modeling_llama.eager_attention_forward(module, query, key, value, mask, scaling=0.3, dropout=0.0)
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-6, atol=1e-6)
    # Gemma-2's: soft-capped scores (as Gemma-2 calls it: every option by name)
    module.head_dim = dim
    for scaling in (0.3, None):
        out, weights = grouped_attention(module, query, key, value, mask, dropout=0.0, scaling=scaling, softcap=2.0)
        ref_out, ref_weights = modeling_gemma2.eager_attention_forward(
            module, query, key, value, mask, dropout=0.0, scaling=scaling, softcap=2.0)
        torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(weights, ref_weights, rtol=1e-6, atol=1e-6)


def test_used_where_the_familys_eager_attention_is_llamas_or_gemma2s():
    """Mistral's eager attention is LLaMA's code, Gemma-3's is Gemma-2's: grouped. GPT-2 and
    GPT-NeoX have their own: they keep ``"eager"``."""
    assert modeling_gemma2.eager_attention_forward is not modeling_llama.eager_attention_forward
    for family in ("mistral", "gemma2", "gemma3"):
        assert cpu_attention(family_model(family)) == NAME, family
    for family in ("gpt2", "gpt_neox"):
        assert cpu_attention(family_model(family)) == "eager", family


def test_a_grouped_engine_decodes_transformers_greedy_tokens():
    """A CPU engine traces a LLaMA-family model with the grouped attention (2 key/value heads for
    4 query heads) and its multi-token steps keep HF greedy's tokens."""
    model = family_model("llama")
    assert DecodeEngine(model, batch_size=1, max_len=32, compile=False).compile_settings["attention"] == NAME
    ids, mask = left_padded_batch([7, 12])
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    for strategy in ("greedy", "lookahead"):
        out = dx.generate(model, ids, mask, strategy=strategy, max_new_tokens=16, eos_token_id=[], compile=False)
        assert torch.equal(out.sequences, ref), strategy
    assert model.config._attn_implementation != NAME  # set for the engine's calls only
