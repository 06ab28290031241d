"""A decoder-only LM's stack as parts: embeddings, any range of decoder layers, final norm + head.

Why: self-speculation drafts with the model's first ``E`` layers and verifies with layers
``E..L`` on the *same* hidden states and the *same* KV cache, and fused draft heads read the
final hidden state next to the logits. Both need the layers one by one rather than the
model's monolithic ``forward``.

The parts are found, not named per family: the decoder (``model.get_decoder()``), its
``ModuleList`` of ``num_hidden_layers`` decoder layers, its token embedding
(``get_input_embeddings``), a learned position table if it has one (GPT-2's ``wpe``, OPT's
offset table), its rotary module (any child whose class name holds ``Rotary``; Gemma-3's takes
the layer type), its one final norm, and the output embedding. Each layer is called with the
keyword arguments its own signature declares (``past_key_values`` or ``layer_past``,
``position_embeddings``, ...), the mask of its attention type (full or sliding window, see
:func:`~dynexec_compile.decoding.masks.layer_masks`). What the model's forward does around the
layers and that the stack reproduces from the config: Granite's ``embedding_multiplier``, OPT's
``project_in``, and the logit transforms (Gemma-2's ``final_logit_softcapping``, Cohere's
``logit_scale``, Granite's ``logits_scaling``).

Never a wrong answer: at construction the stack runs a short probe prompt both through the
model's own ``forward`` and through its parts, and raises ``NotImplementedError`` naming the
place (the embeddings, the layers, the head) where they differ; features it knows it cannot
serve (ALiBi, linear-attention or recurrent layers, layer inputs it cannot supply, OPT's
``project_out``) raise before that.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import OrderedDict

import torch
from torch import nn
from transformers import PreTrainedModel

from dynexec_compile.decoding.cache import SlotCache, attention_windows, layer_types
from dynexec_compile.decoding.masks import chain_mask, layer_masks

try:  # transformers >= 5: hidden states are recorded by hooks on the decoder layers
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # pragma: no cover - older transformers record them inside forward
    _active_collector = None

# decoder-layer arguments the stack supplies; any other required one raises
_SUPPLIED = {"hidden_states", "attention_mask", "position_ids", "past_key_values", "layer_past", "use_cache",
             "position_embeddings", "alibi", "output_attentions"}


class DecoderStack:
    """The parts of a decoder-only causal LM (see the module docstring); the model is not modified.

    Attributes:
        num_layers: ``L``, the decoder layers.
        hidden_size: ``D``.
        norm: the final norm the LM head reads after (``nn.Identity`` for a post-norm stack).
        lm_head: the head on the normed hidden state, ``[..., D] -> [..., V]``: the model's
            output embedding followed by its logit transform (soft-capping, scaling); its
            ``weight`` is the output embedding's.
        family: ``"llama"`` when the final norm is an RMS norm, ``"gpt2"`` otherwise (what
            self-speculation's exit-head initialisation asks).
    """

    def __init__(self, model: PreTrainedModel):
        config = model.config.get_text_config(decoder=True)
        self.config = config
        self._types = layer_types(config)  # raises for ALiBi and linear / chunked / recurrent layers
        self._windows = attention_windows(config)
        decoder = model.get_decoder()
        self.layers: nn.ModuleList = _find_layers(decoder, config)
        self.num_layers = len(self.layers)
        self._embed_tokens = model.get_input_embeddings()
        self._embed_scale = getattr(config, "embedding_multiplier", None)
        self._positions = _position_table(decoder, self._embed_tokens)
        self._project_in = getattr(decoder, "project_in", None)
        if getattr(decoder, "project_out", None) is not None:
            raise NotImplementedError(
                f"{type(model).__name__} projects its final hidden state (project_out) before the LM "
                "head; layer-range decoding reads the hidden state at the head's input"
            )
        rotaries = [m for m in decoder.children() if "Rotary" in type(m).__name__]
        self._rotary = rotaries[0] if len(rotaries) == 1 else None
        self._rotary_by_type = self._rotary is not None and "layer_type" in inspect.signature(self._rotary.forward).parameters
        self.norm: nn.Module = final_norm(decoder, model)
        self.family = "llama" if "RMS" in type(self.norm).__name__ else "gpt2"
        self.lm_head: nn.Module = LogitHead(model.get_output_embeddings(), config)
        self.hidden_size = int(config.hidden_size)
        self._layer_kwargs = [_layer_arguments(layer, type(model).__name__) for layer in self.layers]
        _probe(self, model)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Input hidden states of ``tokens`` at ``positions``: ``[B, T] -> [B, T, D]``."""
        h = self._embed_tokens(tokens)  # [B, T, D] (Gemma's scaled embedding scales inside)
        if self._project_in is not None:
            h = self._project_in(h)
        if self._embed_scale is not None:
            h = h * self._embed_scale
        if self._positions is not None:
            h = h + self._positions(positions)
        return h  # dropout: the model is in eval mode

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
            mask: ``[B, 1, T, S_max]`` additive full-attention mask over the cache slots;
                sliding-window layers get it narrowed to their window.
            positions: ``[B, T]`` position ids.
            cache: the :class:`SlotCache` the layers read and write.
            slots: ``[B, T]`` cache slots of the ``T`` tokens.
        Returns:
            ``[B, T, D]`` output of layer ``stop - 1`` (``h`` itself when the range is empty).
        """
        if start >= stop:
            return h
        masks = layer_masks(mask, positions, slots, self._windows)  # type -> [B, 1, T, S]
        rotary = self._position_embeddings(h, positions, start, stop)
        cache.set_write_slots(slots)
        capture = _capture_off()
        try:
            for i in range(start, stop):
                kind = self._types[i]
                names = self._layer_kwargs[i]
                kwargs = {names["cache"]: cache, "attention_mask": masks[kind]}
                if "position_ids" in names:
                    kwargs["position_ids"] = positions
                if "use_cache" in names:
                    kwargs["use_cache"] = True
                if "alibi" in names:
                    kwargs["alibi"] = None
                if rotary is not None and "position_embeddings" in names:
                    kwargs["position_embeddings"] = rotary[kind] if self._rotary_by_type else rotary
                out = self.layers[i](h, **kwargs)
                h = out[0] if isinstance(out, tuple) else out
        finally:
            cache.set_write_slots(None)
            _capture_restore(capture)
        return h

    def hidden(
        self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: SlotCache, slots: torch.Tensor
    ) -> torch.Tensor:
        """The final hidden state after the norm ``[B, T, D]`` (the LM head's input) of ``tokens``
        through every layer (arguments as for :meth:`run`)."""
        return self.norm(self.run(self.embed(tokens, positions), 0, self.num_layers, mask, positions, cache, slots))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The model's head on the last layer's output: ``[..., D] -> [..., V]``."""
        return self.lm_head(self.norm(h))

    def _position_embeddings(self, h: torch.Tensor, positions: torch.Tensor, start: int, stop: int):
        """RoPE ``(cos, sin)`` for ``positions`` (per layer type for Gemma-3), or ``None``."""
        if self._rotary is None:
            return None
        if self._rotary_by_type:
            return {t: self._rotary(h, positions, t) for t in dict.fromkeys(self._types[start:stop])}
        return self._rotary(h, positions)  # (cos, sin): [B, T, Dh]


class LogitHead(nn.Module):
    """The output embedding followed by the model's logit transform, as its forward applies it.

    Granite divides by ``logits_scaling``, Cohere multiplies by ``logit_scale``, Gemma-2/3
    soft-cap with ``final_logit_softcapping`` (``c * tanh(logits / c)``).
    """

    def __init__(self, out: nn.Module, config):
        super().__init__()
        self.out = out
        self.divide = getattr(config, "logits_scaling", None)
        self.multiply = getattr(config, "logit_scale", None)
        self.softcap = getattr(config, "final_logit_softcapping", None)

    @property
    def weight(self) -> torch.Tensor:
        return self.out.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.out(h)  # [..., V]
        if self.divide is not None:
            logits = logits / self.divide
        if self.multiply is not None:
            logits = logits * self.multiply
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's one list of decoder layers, found through its own ``get_decoder()``."""
    if not (hasattr(model, "get_decoder") and hasattr(model, "config")):
        raise ValueError(f"{type(model).__name__} has no list of repeated decoder layers (not a transformers decoder model)")
    return _find_layers(model.get_decoder(), model.config.get_text_config(decoder=True))


def _find_layers(decoder: nn.Module, config) -> nn.ModuleList:
    lists = [m for m in decoder.children() if isinstance(m, nn.ModuleList) and len(m) == config.num_hidden_layers]
    if len(lists) != 1:
        raise NotImplementedError(
            f"{type(decoder).__name__} has {len(lists)} ModuleLists of num_hidden_layers="
            f"{config.num_hidden_layers} modules; layer-range decoding needs exactly one list of decoder layers"
        )
    return lists[0]


def _position_table(decoder: nn.Module, tokens: nn.Module) -> nn.Module | None:
    """A learned position embedding beside the token embedding (GPT-2's ``wpe``, OPT's table)."""
    tables = [m for m in decoder.children() if isinstance(m, nn.Embedding) and m is not tokens]
    if len(tables) > 1:
        raise NotImplementedError(f"{type(decoder).__name__} has {len(tables)} extra embedding tables; expected at most one")
    if not tables:
        return None
    table = tables[0]
    if "position_ids" in inspect.signature(table.forward).parameters:  # OPT: (mask, past, position_ids)
        return _KeywordPositions(table)
    return table


class _KeywordPositions(nn.Module):
    """A position table whose forward takes ``position_ids=`` (and adds its own offset)."""

    def __init__(self, table: nn.Module):
        super().__init__()
        self.table = table

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.table(None, position_ids=positions)


def final_norm(decoder: nn.Module, model: nn.Module) -> nn.Module:
    norms = [m for m in decoder.children() if "Norm" in type(m).__name__ and not isinstance(m, nn.ModuleList)]
    if len(norms) > 1:
        raise NotImplementedError(
            f"{type(model).__name__}'s decoder has {len(norms)} norms outside its layers "
            f"({[type(m).__name__ for m in norms]}); layer-range decoding expects one final norm"
        )
    return norms[0] if norms else nn.Identity()


def _layer_arguments(layer: nn.Module, model_name: str) -> dict[str, str]:
    """Which of the supplied keyword arguments ``layer.forward`` declares; raise for others."""
    params = inspect.signature(layer.forward).parameters
    required = [
        n for n, p in params.items()
        if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ]
    unknown = [n for n in required if n not in _SUPPLIED]
    if unknown:
        raise NotImplementedError(
            f"{model_name}'s decoder layers need {unknown}, which layer-range decoding does not supply"
        )
    names = {n: n for n in params if n in _SUPPLIED}
    if "past_key_values" in params:
        names["cache"] = "past_key_values"
    elif "layer_past" in params:
        names["cache"] = "layer_past"
    else:
        raise NotImplementedError(f"{model_name}'s decoder layers take no past_key_values / layer_past cache")
    return names


@torch.no_grad()
def _probe(stack: DecoderStack, model: PreTrainedModel) -> None:
    """Run a short prompt through ``model.forward`` and through the parts; raise where they differ.

    Compares the first layer's input (what the model feeds its layers) with :meth:`embed`,
    then the logits of all layers in order with :meth:`logits`.
    """
    weight = next(model.parameters())
    length = 6
    tokens = (torch.arange(length, device=weight.device)[None, :] * 7 + 3) % int(stack.config.vocab_size)  # [1, P]
    seen: dict[str, torch.Tensor] = {}

    def grab(module, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]

    positions = torch.arange(length, device=weight.device)[None, :]  # [1, P]
    with _hooks_paused(model):
        handle = stack.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            expected = model(input_ids=tokens, use_cache=False).logits  # [1, P, V]
        finally:
            handle.remove()
        h = stack.embed(tokens, positions)
        cache = SlotCache(model.config, 1, length, dtype=weight.dtype, device=weight.device)
        mask = chain_mask(positions, length, weight.dtype)  # [1, 1, P, P]
        got = stack.logits(stack.run(h, 0, stack.num_layers, mask, positions, cache, positions))
    tol = 1e-4 if weight.dtype == torch.float32 else 3e-2
    if not _close(h, seen["h"], tol):
        raise NotImplementedError(
            f"{type(model).__name__}.forward feeds its first decoder layer something other than the "
            "token (+ position) embeddings layer-range decoding computes (an embedding scale or norm "
            "it does not know)"
        )
    if not _close(got, expected, tol):
        raise NotImplementedError(
            f"running {type(model).__name__}'s decoder layers in order and its head does not reproduce "
            f"its forward (max logit difference {float((got - expected).abs().max()):.3g}): its forward "
            "does something between the layers or at the head that layer-range decoding does not"
        )


@contextlib.contextmanager
def _hooks_paused(model: nn.Module):
    """Keep the probe invisible to forward hooks on the model's modules (a user's layer
    counters, transformers' output recorders): their hook tables are set aside for the
    probe and put back unchanged."""
    saved = [(m, m._forward_hooks, m._forward_pre_hooks) for m in model.modules()]
    try:
        for m, _, _ in saved:
            m._forward_hooks, m._forward_pre_hooks = OrderedDict(), OrderedDict()
        yield
    finally:
        for m, hooks, pre_hooks in saved:
            m._forward_hooks, m._forward_pre_hooks = hooks, pre_hooks


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    scale = float(b.abs().max().clamp(min=1.0))
    return a.shape == b.shape and bool(((a.float() - b.float()).abs() <= tol * scale).all())


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


__all__ = ["DecoderStack", "LogitHead"]
