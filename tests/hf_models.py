"""Small Hugging Face models from configs (random weights) for the tests.

Exactness does not need trained weights; every family dynexec claims to support is here.
"""

from __future__ import annotations

import torch
import transformers as T

VOCAB = 128

_COMMON = dict(vocab_size=VOCAB, max_position_embeddings=128)


def encoder_config(family: str):
    if family == "bert":
        return T.BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, **_COMMON)
    if family == "roberta":
        return T.RobertaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, pad_token_id=1, **_COMMON)
    if family == "albert":
        return T.AlbertConfig(embedding_size=16, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, **_COMMON)
    if family == "distilbert":
        return T.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=3, n_heads=4, hidden_dim=64, max_position_embeddings=128)
    raise KeyError(family)


def decoder_config(family: str):
    if family == "llama":
        return T.LlamaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, **_COMMON)
    if family == "qwen2":
        return T.Qwen2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, **_COMMON)
    if family == "gpt2":
        return T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=128)
    raise KeyError(family)


ENCODERS = ("bert", "roberta", "albert", "distilbert")
DECODERS = ("llama", "gpt2", "qwen2")

_CLASSIFIERS = {
    "bert": T.BertForSequenceClassification,
    "roberta": T.RobertaForSequenceClassification,
    "albert": T.AlbertForSequenceClassification,
    "distilbert": T.DistilBertForSequenceClassification,
    "llama": T.LlamaForSequenceClassification,
}
_LMS = {"llama": T.LlamaForCausalLM, "gpt2": T.GPT2LMHeadModel, "qwen2": T.Qwen2ForCausalLM}


def classifier(family: str, num_labels: int = 2, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = decoder_config(family) if family in DECODERS else encoder_config(family)
    cfg.num_labels = num_labels
    if family == "llama":
        cfg.pad_token_id = 0
    return _CLASSIFIERS[family](cfg).eval()


def causal_lm(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return _LMS[family](decoder_config(family)).eval()


def encoder_inputs(batch: int = 2, seq: int = 8, pad_last: int = 0, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad_last:
        mask[-1, seq - pad_last :] = 0
    return {"input_ids": ids, "attention_mask": mask}
