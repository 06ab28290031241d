"""Grouped-query attention that reads each key/value head once.

transformers' eager attention (``eager_attention_forward`` of LLaMA and the ~170 families that
share its code; of Gemma-2, with soft-capped scores, and the ~12 that share that) serves
grouped-query attention by copying every key/value head once per query head that reads it
(``repeat_kv``) before two matmuls. On a CPU step over several tokens those
copies are most of the attention's memory traffic: SmolLM2-135M has 9 query heads over 3
key/value heads, so each layer writes and reads its whole key/value cache three times over.
:func:`grouped_attention` computes the same thing without the copies: the query heads that
share a key/value head are folded into the query length (``[B, H, T, d] -> [B, KV, G*T, d]``,
head ``h = kv * G + g`` as ``repeat_kv`` orders them), so each matmul reads the cache as it is.
Every score is the same dot product; only a kernel's summation order may differ (fp32
rounding). Measured on one thread of an AVX2 EPYC, compiled, 9 / 3 heads of 64 over 384
slots: 4 rows x 2 tokens 742 -> 339 us per layer, 1 row x 5 tokens 305 -> 191 us, 1 x 1 the same.

:class:`~dynexec_compile.decoding.step.DecodeEngine` traces CPU models with it
(:func:`cpu_attention`) where the model's family uses one of those two eager attentions; other
families (GPT-2, GPT-NeoX, OPT, ...) keep their own.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.models.gemma2 import modeling_gemma2
from transformers.models.llama import modeling_llama

NAME = "dynexec_grouped"
# the eager attentions :func:`grouped_attention` computes (a family whose own is the same code is served)
SERVED = (modeling_llama.eager_attention_forward, modeling_gemma2.eager_attention_forward)


def grouped_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``eager_attention_forward`` of LLaMA, or of Gemma-2 (``softcap``: scores soft-capped
    as ``softcap * tanh(scores / softcap)`` before the mask; ``scaling`` None: ``head_dim ** -0.5``)
    — same arguments, same results up to fp32 rounding — with the query heads of a key/value head
    folded into the query length instead of copied key/value heads. Returns ``(output [B, T, H,
    d], weights [B, H, T, S])``."""
    batch, heads, length, dim = query.shape  # query: [B, H, T, d]; key, value: [B, KV, S, d]
    kv_heads, slots = key.shape[1], key.shape[2]
    group = heads // kv_heads
    if scaling is None:
        scaling = module.head_dim**-0.5
    scores = torch.matmul(query.reshape(batch, kv_heads, group * length, dim), key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:  # [B | 1, H | 1, T, S] additive; head h = (kv, g)
        scores = scores + attention_mask.expand(batch, heads, length, slots).reshape(batch, kv_heads, group * length, slots)
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)  # [B, KV, G*T, S]
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).reshape(batch, heads, length, dim)
    return out.transpose(1, 2).contiguous(), weights.reshape(batch, heads, length, slots)


def cpu_attention(model: PreTrainedModel) -> str:
    """The attention implementation a CPU engine traces ``model`` with: :data:`NAME` when its
    family's eager attention is LLaMA's or Gemma-2's (the same code, with the same ``repeat_kv``),
    else ``"eager"``."""
    family = getattr(sys.modules.get(type(model).__module__), "eager_attention_forward", None)
    same = any(_same_code(family, served) for served in SERVED) and _same_code(
        family.__globals__.get("repeat_kv"), modeling_llama.repeat_kv)
    return NAME if same else "eager"


def _same_code(fn: object, reference: object) -> bool:
    code, ref = getattr(fn, "__code__", None), reference.__code__
    return code is not None and (code.co_code, code.co_consts, code.co_names, code.co_varnames) == (
        ref.co_code, ref.co_consts, ref.co_names, ref.co_varnames)


AttentionInterface.register(NAME, grouped_attention)
