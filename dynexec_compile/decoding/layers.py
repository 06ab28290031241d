"""A decoder-only LM's stack as parts: embeddings, any range of decoder layers, final norm + head.

Why: self-speculation drafts with the model's first ``E`` layers and verifies with layers
``E..L`` on the *same* hidden states and the *same* KV cache, and fused draft heads read the
final hidden state next to the logits. Both need the layers one by one rather than the
model's monolithic ``forward``. The parts are the model's own modules, called with the
arguments its own ``forward`` passes them (an additive 4-D mask over the cache slots,
position ids, RoPE cos/sin, the :class:`SlotCache`), so running every range in order is the
model's forward: tests check logits and greedy tokens against ``model.generate``.

Supported families (matched by ``config.model_type``; others raise ``NotImplementedError``):
``llama`` and ``qwen2`` (``model.model.{embed_tokens, layers, norm, rotary_emb}``), ``gpt2``
(``model.transformer.{wte, wpe, h, ln_f}``). Their logits are ``lm_head(norm(h))`` with no
scaling or soft-capping.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from dynexec_compile.decoding.cache import SlotCache

try:  # transformers >= 5: hidden states are recorded by hooks on the decoder layers
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # pragma: no cover - older transformers record them inside forward
    _active_collector = None

_FAMILIES = {"llama": "llama", "qwen2": "llama", "gpt2": "gpt2"}


class DecoderStack:
    """The parts of a supported causal LM (see the module docstring); the model is not modified.

    Attributes:
        num_layers: ``L``, the decoder layers.
        hidden_size: ``D``.
        lm_head: the model's output projection (tied or not), ``[..., D] -> [..., V]``.
        norm: the final norm the LM head reads after.
    """

    def __init__(self, model: PreTrainedModel):
        model_type = getattr(model.config, "model_type", None)
        family = _FAMILIES.get(model_type)
        if family is None:
            raise NotImplementedError(
                f"layer-range decoding supports model types {sorted(_FAMILIES)}, not {model_type!r} "
                "(dynexec_compile/decoding/layers.py needs that family's embedding, layer and norm names)"
            )
        self.family = family
        if family == "llama":
            base = model.model
            self.layers: nn.ModuleList = base.layers
            self.norm: nn.Module = base.norm
            self._embed_tokens, self._rotary = base.embed_tokens, base.rotary_emb
        else:
            base = model.transformer
            self.layers = base.h
            self.norm = base.ln_f
            self._wte, self._wpe, self._drop = base.wte, base.wpe, base.drop
        self.lm_head: nn.Module = model.get_output_embeddings()
        self.num_layers = len(self.layers)
        self.hidden_size = int(model.config.hidden_size)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Input hidden states of ``tokens`` at ``positions``: ``[B, T] -> [B, T, D]``."""
        if self.family == "llama":
            return self._embed_tokens(tokens)
        return self._drop(self._wte(tokens) + self._wpe(positions))

    def run(
        self,
        h: torch.Tensor,
        start: int,
        stop: int,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: SlotCache,
        slots: torch.Tensor,
    ) -> torch.Tensor:
        """Decoder layers ``start .. stop-1`` on ``h``, their keys/values written at ``slots``.

        Args:
            h: ``[B, T, D]`` input of layer ``start``.
            mask: ``[B, 1, T, S_max]`` additive mask over the cache slots.
            positions: ``[B, T]`` position ids.
            cache: the :class:`SlotCache` the layers read and write.
            slots: ``[B, T]`` cache slots of the ``T`` tokens.
        Returns:
            ``[B, T, D]`` output of layer ``stop - 1`` (``h`` itself when the range is empty).
        """
        if start >= stop:
            return h
        kwargs = {}
        if self.family == "llama":
            kwargs["position_embeddings"] = self._rotary(h, position_ids=positions)  # (cos, sin): [B, T, Dh]
        cache.set_write_slots(slots)
        capture = _capture_off()
        try:
            for layer in self.layers[start:stop]:
                h = layer(
                    h,
                    attention_mask=mask,
                    position_ids=positions,
                    past_key_values=cache,
                    use_cache=True,
                    **kwargs,
                )
        finally:
            cache.set_write_slots(None)
            _capture_restore(capture)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The model's head on the last layer's output: ``[..., D] -> [..., V]``."""
        return self.lm_head(self.norm(h))


def _capture_off() -> object:
    """Keep transformers' output-recording hooks inactive around layers called directly.

    Once a model ran with ``output_hidden_states=True``, its decoder layers carry hooks that
    read a context variable the model's own ``forward`` sets; called outside that forward,
    the hooks would read it unset, which Dynamo cannot trace. Setting it to ``None`` the way
    ``forward`` does (a ``CompileableContextVar``, which works under compilation) turns them
    off. Returns the token for :func:`_capture_restore`.
    """
    return None if _active_collector is None else _active_collector.set(None)


def _capture_restore(token: object) -> None:
    if _active_collector is not None:
        _active_collector.reset(token)


__all__ = ["DecoderStack"]
