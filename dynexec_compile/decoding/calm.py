"""``generate(..., strategy="calm", threshold=t, lossy=True)``: token-level early exit. LOSSY.

CALM (Schuster et al. 2022, "Confident Adaptive Language Modeling"): each generated token
leaves the decoder after the first block whose exit head is confident — its top softmax
probability (CALM's "softmax response") is at least ``threshold`` — and is predicted there.
Later tokens still attend to every layer, so the layers a token skipped need its keys and
values: CALM's *state propagation* fills them from the exit state, feeding the exited hidden
state through each skipped layer's key/value projections only (its input norm, ``k_proj`` /
``v_proj``, rotary embedding on the keys, the cache write), not through the layers.

**This changes the model's output.** A token predicted by an exit head is not the full
model's token whenever the two disagree, and the propagated keys/values are not the ones the
full model would compute, so even tokens predicted by the last layer drift. Hence the
explicit ``lossy=True``: without it the strategy refuses. Its cost is measured, not assumed:
``benchmarks/bench_calm.py`` reports layers per token against agreement with full greedy
output and against held-out perplexity, next to self-speculative decoding (exact).

Exit heads: the model's own final norm + LM head after every block (``exit_heads=None``), or
trained ones — ``ExitHeads`` of kind ``last_token_rmsnorm`` over the vocabulary, e.g. from
:func:`~dynexec_compile.distill.train_exit_lm_head` (one per exit layer),
exits then only after the blocks that have a head. The prompt runs through the full model
(prefill), so the first generated token is the full model's.

Scope: greedy, batch 1 (rows would leave at different layers), eager PyTorch (a Python loop
over the layers per token; no compiled graph yet), LLaMA-family layers (``llama``, ``qwen2``)
for the key/value path; other families raise ``NotImplementedError`` naming the family.
Padding in ``attention_mask`` is dropped (batch 1).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import rotate_half

from dynexec_compile.decoding.cache import SlotCache
from dynexec_compile.decoding.generate import (
    DecodeSettings,
    GenerateOutput,
    GenerateStats,
    cache_length,
    decode_loop,
)
from dynexec_compile.decoding.layers import DecoderStack
from dynexec_compile.decoding.masks import chain_mask
from dynexec_compile.decoding.runs import TokenRuns
from dynexec_compile.decoding.step import check_causal_lm, pack_prompts
from dynexec_compile.exit_heads import ExitHeads

KV_FAMILIES = ("llama", "qwen2")  # decoder layers with input_layernorm + self_attn.{k,v}_proj + RoPE


class CalmDecoder:
    """One row's CALM decoding state: a :class:`SlotCache`, the stack and the exit heads.

    Args:
        model: a ``llama`` / ``qwen2`` causal LM in eval mode (not modified).
        max_len: cache slots (prompt + generated tokens).
        threshold: exit when the exit head's top probability is ``>= threshold``, in (0, 1].
        exit_heads: trained heads (``last_token_rmsnorm`` over the vocabulary) or ``None`` for
            the model's own norm + head after every block but the last.
    """

    def __init__(self, model: PreTrainedModel, max_len: int, threshold: float, exit_heads: ExitHeads | None = None):
        check_causal_lm(model)
        family = getattr(model.config, "model_type", None)
        if family not in KV_FAMILIES:
            raise NotImplementedError(
                f"strategy='calm' fills skipped layers' keys/values through LLaMA-family attention "
                f"(model types {list(KV_FAMILIES)}); {family!r} layers need their own key/value path in "
                "dynexec_compile/decoding/calm.py"
            )
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
            raise ValueError(f"strategy='calm': threshold must be a probability in (0, 1], got {threshold!r}")
        self.stack = DecoderStack(model)
        self.layers = model.model.layers  # the model's own decoder layers (for their K/V projections)
        self.rotary = model.model.rotary_emb
        self.threshold = float(threshold)
        self.num_layers = self.stack.num_layers
        self.heads = self._exit_heads(model, exit_heads)  # {block: [.., D] -> [.., V]}
        weight = next(model.parameters())
        self.cache = SlotCache(model.config, 1, max_len, weight.dtype, weight.device)
        self.device = weight.device
        self.forward_passes = 0  # prefill + one per token (however many layers it ran)

    def _exit_heads(self, model: PreTrainedModel, heads: ExitHeads | None) -> dict[int, Any]:
        if heads is None:
            return {block: self.stack.logits for block in range(self.num_layers - 1)}
        vocab = int(model.config.vocab_size)
        if not isinstance(heads, ExitHeads) or heads.kind != "last_token_rmsnorm" or heads.num_labels != vocab:
            raise ValueError(
                "strategy='calm': exit_heads must be ExitHeads of kind 'last_token_rmsnorm' over the vocabulary "
                f"({vocab} outputs), e.g. from dynexec_compile.train_exit_lm_head; got {heads!r:.80}"
            )
        bad = [b for b in heads.layers if b >= self.num_layers - 1]
        if bad:
            raise ValueError(f"strategy='calm': exit heads after blocks {bad}; this model exits after 0..{self.num_layers - 2}")
        return {b: heads.head(b).classify for b in heads.layers}

    # --- one token ---------------------------------------------------------------------------

    def _args(self, position: int, width: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        positions = torch.arange(position, position + width, device=self.device)[None]  # [1, T]
        return positions, positions, chain_mask(positions, self.cache.max_len, self.cache.dtype)

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """The full model over ``prompt: [1, n]`` (keys/values at slots ``0..n-1``); logits ``[1, V]``."""
        positions, slots, mask = self._args(0, prompt.shape[1])
        h = self.stack.embed(prompt, positions)  # [1, n, D]
        h = self.stack.run(h, 0, self.num_layers, mask, positions, self.cache, slots)
        self.cache.lengths.fill_(prompt.shape[1])
        self.forward_passes += 1
        return self.stack.logits(h[:, -1])

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``token: [1]`` at the next position: ``(logits [1, V] of the exit it left at, layers run)``.

        Layer by layer; after a block with an exit head, a confident head ends the token there
        and the remaining layers get their keys/values from the exit state (:meth:`propagate`).
        """
        position = int(self.cache.lengths[0])
        positions, slots, mask = self._args(position)
        self.forward_passes += 1
        h = self.stack.embed(token[:, None], positions)  # [1, 1, D]
        for block in range(self.num_layers):
            h = self.stack.run(h, block, block + 1, mask, positions, self.cache, slots)
            head = self.heads.get(block)
            if head is None:
                continue
            logits = head(h[:, -1])  # [1, V]
            if logits.float().softmax(-1).amax().item() >= self.threshold:
                self.propagate(h, block + 1, positions, slots)
                self.cache.lengths.add_(1)
                return logits, block + 1
        self.cache.lengths.add_(1)
        return self.stack.logits(h[:, -1]), self.num_layers

    def propagate(self, h: torch.Tensor, start: int, positions: torch.Tensor, slots: torch.Tensor) -> None:
        """CALM's state propagation: write keys/values of layers ``start..L-1`` at ``slots``
        computed from the exit state ``h: [1, T, D]`` through each layer's input norm, key and
        value projections and rotary embedding — what its attention would cache for input ``h``."""
        cos, sin = self.rotary(h, position_ids=positions)  # [1, T, Dh] each
        cos, sin = cos[:, None], sin[:, None]  # [1, 1, T, Dh]: broadcast over heads
        for layer_index in range(start, self.num_layers):
            layer = self.layers[layer_index]
            attn = layer.self_attn
            x = layer.input_layernorm(h)  # [1, T, D]
            shape = (*x.shape[:-1], -1, attn.head_dim)
            keys = attn.k_proj(x).view(shape).transpose(1, 2)  # [1, H_kv, T, Dh]
            values = attn.v_proj(x).view(shape).transpose(1, 2)  # [1, H_kv, T, Dh]
            keys = keys * cos + rotate_half(keys) * sin
            self.cache.layers[layer_index].update(keys, values, slots)


def _prompt(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if input_ids.shape[0] != 1:
        raise NotImplementedError(
            f"strategy='calm' decodes one row at a time (rows leave at different layers); got batch "
            f"{input_ids.shape[0]}: call generate per prompt"
        )
    packed, lengths = pack_prompts(input_ids, attention_mask)
    return packed[:, : int(lengths[0])]


def calm_strategy(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    settings: DecodeSettings,
    *,
    threshold: float | None = None,
    lossy: bool = False,
    exit_heads: ExitHeads | None = None,
    **options: Any,
) -> GenerateOutput:
    """The ``"calm"`` strategy (see the module docstring): LOSSY token-level early exit.

    Options: ``threshold`` (top-probability exit threshold in (0, 1], required), ``lossy=True``
    (required: the output differs from the model's), ``exit_heads`` (trained
    ``last_token_rmsnorm`` heads over the vocabulary; default the model's own norm + head).
    ``stats.extra`` holds ``layers_per_token`` (per generated token after the first),
    ``mean_layers`` and ``tokens_by_layers_run``.
    """
    if options:
        raise TypeError(f"strategy='calm' got unknown options {sorted(options)}; it takes threshold=, lossy=, exit_heads=")
    if lossy is not True:
        raise ValueError(
            "strategy='calm' changes the model's output (tokens leave at early layers, skipped layers' "
            "keys/values are approximated); pass lossy=True to accept that, or use an exact strategy "
            "('greedy', 'self_speculative', 'lookahead')"
        )
    if threshold is None:
        raise ValueError("strategy='calm' needs threshold= (exit when the top probability is >= threshold)")
    if settings.sampling is not None:
        raise NotImplementedError("strategy='calm' is greedy only; pass do_sample=False")
    prompt = _prompt(input_ids, attention_mask)
    decoder = CalmDecoder(model, cache_length(prompt.shape[1], settings.max_new_tokens), threshold, exit_heads)
    return decode_loop(_CalmProposer(decoder, exit_heads is None), input_ids, attention_mask, settings)


class _CalmProposer:
    """CALM as the shared loop runs it: one token per step, from the exit it left at."""

    name, width = "calm", 1

    def __init__(self, decoder: CalmDecoder, shared: bool):
        self.engine, self.shared = decoder, shared
        self.layers: list[int] = []  # per generated token after the first: the layers it ran

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        self.token = self.engine.prefill(_prompt(input_ids, attention_mask).to(self.engine.device)).argmax(-1)  # [1]
        return self.token

    def step(self, runs: TokenRuns) -> torch.Tensor:
        logits, layers = self.engine.step(self.token)
        self.token = logits.argmax(-1)  # [1]
        self.layers.append(layers)
        return runs.keep(self.token[:, None], torch.ones_like(self.token))

    def extra(self, stats: GenerateStats) -> dict[str, Any]:
        layers, num_layers = self.layers, self.engine.num_layers
        return {"threshold": self.engine.threshold, "lossy": True, "exit_heads": "shared" if self.shared else "trained",
                "layers_per_token": list(layers), "num_layers": num_layers,
                "mean_layers": sum(layers) / len(layers) if layers else float(num_layers),
                "tokens_by_layers_run": {n: layers.count(n) for n in sorted(set(layers))}}


@torch.no_grad()
def calm_nll(
    model: PreTrainedModel,
    tokens: torch.Tensor,
    prompt_len: int,
    threshold: float,
    exit_heads: ExitHeads | None = None,
) -> tuple[list[float], list[int]]:
    """Teacher-forced CALM on given text: the negative log-likelihood of each of
    ``tokens[prompt_len:]`` (``tokens: [1, N]``) under the exit CALM takes at the token before
    it, and the layers each of those predictions ran. The prompt runs through the full model;
    the first continuation token is the full model's prediction. For held-out perplexity."""
    tokens = tokens.to(next(model.parameters()).device)
    decoder = CalmDecoder(model, cache_length(tokens.shape[1], 1), threshold, exit_heads)
    logits = decoder.prefill(tokens[:, :prompt_len])
    nll, layers = [], []
    for i in range(prompt_len, tokens.shape[1]):
        nll.append(-logits.float().log_softmax(-1)[0, tokens[0, i]].item())
        if i + 1 < tokens.shape[1]:
            logits, run = decoder.step(tokens[:, i])
            layers.append(run)
    return nll, layers


__all__ = ["CalmDecoder", "calm_nll", "calm_strategy"]
