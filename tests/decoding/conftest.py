"""Tiny causal LMs from configs (random weights) whose greedy continuations are not degenerate.

Each fixture seeds its own initialisation, so the models — and the token sequences the tests
compare — are the same in every run. GPT-2 gets a larger init range: with the default 0.02 a
random GPT-2 repeats one token forever, and a test on it could not fail.
"""

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from dynexec_compile.decoding import SamplingParams, sampling_probs

VOCAB = 128


def build_model(kind: str, attn: str = "sdpa", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":  # grouped-query attention: 4 query heads share 2 key/value heads
        config = LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=1024,
        )
        model = LlamaForCausalLM(config)
    elif kind == "qwen2":
        config = Qwen2Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=1024,
        )
        model = Qwen2ForCausalLM(config)
    elif kind == "gpt2":  # absolute learned positions
        config = GPT2Config(
            n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=1024,
            initializer_range=0.2, bos_token_id=1, eos_token_id=2,
        )
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(kind)
    model.set_attn_implementation(attn)
    return model.to(dtype).eval()


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def lm(request):
    return build_model(request.param)


@pytest.fixture(scope="module")
def llama():
    return build_model("llama")


def left_padded_batch(lengths: list[int], seed: int = 1, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of the given lengths, left-padded as transformers expects for decoder-only LMs."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, VOCAB, (n,), generator=gen)
        mask[row, width - n :] = 1
    return ids, mask


def chi_square_pvalue(samples: torch.Tensor, vocab: int, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit of ``[n, L]`` token sequences over a vocabulary of
    ``vocab`` against their joint ``probs`` (``vocab ** L`` cells); cells with expected count
    < 5 pooled; 0 when a sequence of zero probability occurs."""
    n = samples.shape[0]
    codes = (samples * torch.tensor([vocab**i for i in reversed(range(samples.shape[1]))])).sum(1)
    observed = torch.bincount(codes, minlength=probs.numel()).double()
    expected = probs.reshape(-1).double() * n
    if observed[expected == 0].sum() > 0:
        return 0.0
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


# ---- lossless-sampling tests: a tiny vocabulary and the exact distribution of continuations ----

SAMPLING_WARPS = {
    "temperature": SamplingParams(temperature=1.5),
    "top_k": SamplingParams(temperature=0.8, top_k=5),
    "top_p": SamplingParams(top_p=0.85),
}


def tiny_sampling_lm(vocab: int, max_positions: int) -> LlamaForCausalLM:
    """A 2-layer LLaMA over ``vocab`` tokens, init range 0.3 so its distributions are far from
    uniform; seeded, so the same model in every run (later draws continue the seeded stream)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab, max_position_embeddings=max_positions, initializer_range=0.3,
    )
    return LlamaForCausalLM(config).eval()


def exact_joint(model, prompt: list[int], params: SamplingParams, n: int) -> torch.Tensor:
    """``[V] * n``: probability of each ``n``-token continuation of ``prompt`` under the warped model."""
    vocab = model.config.vocab_size
    joint = torch.ones(())
    prefixes = torch.tensor([prompt])  # [V**k, L + k]
    with torch.no_grad():
        for _ in range(n):
            nxt = sampling_probs(model(prefixes).logits[:, -1], params)  # [V**k, V]
            joint = joint[..., None] * nxt.view(*joint.shape, vocab)
            grown = torch.arange(vocab).repeat(prefixes.shape[0])[:, None]  # [V**(k+1), 1]
            prefixes = torch.cat([prefixes.repeat_interleave(vocab, dim=0), grown], dim=1)
    return joint


def random_choice(seed: int):
    """A ``WidthChooser.choose`` that picks any offered shape at random (seeded): every mix of
    shapes an ``adaptive=True`` strategy can take."""
    import random

    from dynexec_compile.decoding.adaptive import WidthChooser

    rng, choose = random.Random(seed), WidthChooser.choose
    return lambda self, options: choose(self, [rng.choice(list(options))])


def random_mix_twice(monkeypatch, model, ids, mask, seed: int = 3, **options) -> list:
    """Two ``generate`` runs under the same seeded random mix of shapes (compiled-path tests:
    the second must compile nothing)."""
    import dynexec_compile as dx
    from dynexec_compile.decoding.adaptive import WidthChooser

    runs = []
    for _ in range(2):
        monkeypatch.setattr(WidthChooser, "choose", random_choice(seed))
        runs.append(dx.generate(model, ids, mask, **options))
    return runs
