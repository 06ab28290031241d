"""Small Hugging Face models built from configs (random weights) for the elastic tests."""

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 128


def tiny_bert(layers: int = 3) -> BertModel:
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        num_hidden_layers=layers,
        num_attention_heads=6,
        intermediate_size=96,
        max_position_embeddings=64,
    )
    return BertModel(cfg).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=48,
        n_layer=3,
        n_head=6,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(layers: int = 3) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=96,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(layers: int = 3) -> Qwen2ForCausalLM:
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(cfg).eval()


FACTORIES = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama, "qwen2": tiny_qwen2}


def make_batch(batch: int = 3, seq: int = 11, pad: bool = True) -> dict[str, torch.Tensor]:
    """input_ids [B, S] and an attention_mask whose last row is right-padded."""
    ids = torch.randint(1, VOCAB, (batch, seq))
    mask = torch.ones_like(ids)
    if pad:
        mask[-1, seq - 3 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def model_output(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(params=sorted(FACTORIES))
def arch_model(request):
    return request.param, FACTORIES[request.param]()
