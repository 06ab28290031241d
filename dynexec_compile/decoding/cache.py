"""A preallocated KV cache with per-row write slots, usable by stock Hugging Face models.

Why our own cache rather than transformers' ``StaticCache``: ``StaticCache`` writes every row
of the batch at the same positions (one shared ``cumulative_length``), so a batch whose rows
accept different numbers of tokens per step (lookahead, speculative decoding) cannot use it.
``SlotCache`` writes the new keys/values of row ``b`` at the slots ``write_slots[b, :]`` that
the caller sets before the forward, and keeps a per-row committed length.

Layout invariant: the committed token at position ``i`` of row ``b`` lives in slot ``i`` of
row ``b`` (``0 <= i < lengths[b]``). Slots at or beyond ``lengths[b]`` hold scratch (rejected
candidates, prefill padding) that attention masks hide. A verification step writes its
candidates at slots ``>= lengths[b]``; :meth:`SlotCache.apply_commit` then gathers the accepted ones
to ``lengths[b] ..`` and advances ``lengths`` — keys/values are moved, never recomputed.

The buffers are allocated once at construction, so every forward sees the same tensor
shapes and addresses: one compiled graph per step shape, and CUDA graphs can capture the
in-place writes.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin


class SlotLayer(CacheLayerMixin):
    """Keys and values of one attention layer: ``[B, H_kv, S_max, Dh]`` buffers written in place.

    Args:
        keys: preallocated key buffer ``[B, H_kv, S_max, Dh]``.
        values: preallocated value buffer ``[B, H_kv, S_max, Dh_v]``.
    """

    is_compileable = True
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys = keys
        self.values = values
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """The buffers are allocated at construction; nothing is lazy."""

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        write_slots: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``T`` new tokens per row at ``write_slots`` and return the whole buffers.

        Args:
            key_states: ``[B, H_kv, T, Dh]`` keys of the new tokens.
            value_states: ``[B, H_kv, T, Dh_v]`` values of the new tokens.
            write_slots: ``[B, T]`` cache slots of the new tokens, distinct within a row.
        """
        if write_slots is None:
            raise RuntimeError(
                "SlotCache: no write slots are set for this forward; run the model through "
                "DecodeEngine, or call cache.set_write_slots(slots) before model(...)"
            )
        if key_states.shape[0] != self.keys.shape[0] or key_states.shape[1:2] != self.keys.shape[1:2]:
            raise ValueError(
                f"SlotCache: the model produced keys of shape {tuple(key_states.shape)} but the cache "
                f"holds [B={self.keys.shape[0]}, H_kv={self.keys.shape[1]}, S, Dh={self.keys.shape[3]}]; "
                "build the cache for this model's config and batch size"
            )
        index = _slot_index(write_slots, key_states.shape[1])
        self.keys.index_put_(index, key_states.to(self.keys.dtype))
        self.values.index_put_(index, value_states.to(self.values.dtype))
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Attention always spans the whole buffer: ``(S_max, 0)``."""
        return self.keys.shape[2], 0

    def get_seq_length(self) -> int:
        """Not tracked per layer; :meth:`SlotCache.get_seq_length` answers for the cache."""
        raise NotImplementedError("SlotLayer does not track lengths; ask the SlotCache")

    def get_max_length(self) -> int:
        return self.keys.shape[2]

    def reset(self) -> None:
        self.keys.zero_()
        self.values.zero_()


def _slot_index(slots: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Advanced index ``(b, h, s)`` selecting ``buf[b, h, slots[b, t]]`` as a ``[B, H, T]`` grid.

    Why ``index_put_`` rather than ``scatter_``: Inductor re-inplaces an ``index_put_`` on a
    graph input, but turns a ``scatter_`` into an out-of-place copy of the whole
    ``[B, H, S_max, Dh]`` buffer plus a copy back — per layer, per step.
    """
    batch = torch.arange(slots.shape[0], device=slots.device)[:, None, None]  # [B, 1, 1]
    head = torch.arange(heads, device=slots.device)[None, :, None]  # [1, H, 1]
    return batch, head, slots[:, None, :]  # slots: [B, 1, T]


SERVED_LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_types(config: PreTrainedConfig) -> list[str]:
    """Attention type of every decoder layer; raise for types the cache cannot serve exactly.

    ``config.layer_types`` when the config has it (Gemma-2/3, Qwen2/3, SmolLM3, ...); else
    every layer slides when ``config.sliding_window`` is set and the config class declares it
    (Mistral, Starcoder2, Mixtral, Phi-3: their forward then builds a sliding-window mask for
    all layers; a stray ``sliding_window`` key in another family's config is ignored, as that
    family's forward ignores it), else full.
    Raises ``NotImplementedError`` for ALiBi position biases, per-layer heterogeneous configs,
    keys/values shared between layers, and layer types other than full and sliding-window
    attention (linear attention, convolutions, recurrent, chunked).
    A sliding layer keeps every key in the :class:`SlotCache` and the mask hides the keys
    outside its window (:func:`~dynexec_compile.decoding.masks.sliding_window`).
    """
    config = config.get_text_config(decoder=True)
    if getattr(config, "alibi", False) or getattr(config, "use_alibi", False):
        raise NotImplementedError(
            "this model adds ALiBi position biases to its attention, which dynexec's decoding masks "
            "do not compute (Falcon with alibi=True); use a rotary or learned-position model"
        )
    if getattr(config, "is_heterogeneous", False):
        raise NotImplementedError(
            "this model's config sets per-layer overrides (per_layer_config: layers with their own head "
            "counts or windows), which dynexec's decoding cache and masks do not serve"
        )
    if getattr(config, "kv_sharing_modes", None) is not None:
        raise NotImplementedError(
            "this model shares keys/values between layers (kv_sharing_modes, Gemma-3n/4), which "
            "dynexec's decoding cache does not serve"
        )
    types = getattr(config, "layer_types", None)
    if types is None:
        slides = (
            _declares(config, "sliding_window")
            and getattr(config, "sliding_window", None) is not None
            and getattr(config, "use_sliding_window", True)
        )
        types = ["sliding_attention" if slides else "full_attention"] * config.num_hidden_layers
    unserved = sorted(set(types) - set(SERVED_LAYER_TYPES))
    if unserved:
        raise NotImplementedError(
            f"dynexec's decoding cache serves {list(SERVED_LAYER_TYPES)} layers; this model has {unserved} "
            "layers (linear-attention / recurrent / chunked layers need a cache and mask of their own)"
        )
    if "sliding_attention" in types and not getattr(config, "sliding_window", None):
        raise ValueError("the config has sliding_attention layers but no sliding_window size")
    return list(types)


def _declares(config: PreTrainedConfig, name: str) -> bool:
    """Whether ``name`` is a field of the config's class, not an extra key it merely stores."""
    return any(name in vars(k).get("__annotations__", {}) for k in type(config).__mro__)


def attention_windows(config: PreTrainedConfig) -> dict[str, int | None]:
    """Layer type -> sliding window (``None`` for full attention), for the types the model has."""
    config = config.get_text_config(decoder=True)
    kinds = dict.fromkeys(layer_types(config))
    return {k: (int(config.sliding_window) if k == "sliding_attention" else None) for k in kinds}


def attention_geometry(config: PreTrainedConfig) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of a decoder config; raise for unsupported layouts.

    GPT-2's names (``n_layer``, ``n_head``, ``n_embd``) are mapped by its config's
    ``attribute_map``; models without ``num_key_value_heads`` use plain multi-head attention.
    Layer types other than full and sliding-window attention raise (:func:`layer_types`).
    """
    config = config.get_text_config(decoder=True)
    layer_types(config)
    num_layers = config.num_hidden_layers
    num_heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return num_layers, kv_heads, head_dim


class SlotCache(Cache):
    """A ``transformers.Cache`` of preallocated per-layer buffers written at per-row slots.

    Args:
        config: the model's config (decoder part is used).
        batch_size: rows ``B``.
        max_len: slots per row ``S_max``; committed tokens plus the widest step must fit.
        dtype: dtype of keys and values (the model's dtype).
        device: where the buffers live.

    Attributes:
        lengths: ``[B]`` int64, committed tokens per row (slots ``0 .. lengths[b]-1``).
    """

    def __init__(
        self,
        config: PreTrainedConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"SlotCache: batch_size={batch_size} and max_len={max_len} must be >= 1")
        num_layers, kv_heads, head_dim = attention_geometry(config)
        shape = (batch_size, kv_heads, max_len, head_dim)
        layers = [
            SlotLayer(
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
            )
            for _ in range(num_layers)
        ]
        super().__init__(layers=layers)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._write_slots: torch.Tensor | None = None
        if device is not None and torch.device(device).type == "cuda":
            # Fixed addresses: compiled graphs and CUDA graphs may update these in place.
            for layer in layers:
                torch._dynamo.mark_static_address(layer.keys)
                torch._dynamo.mark_static_address(layer.values)
            torch._dynamo.mark_static_address(self.lengths)

    @property
    def max_len(self) -> int:
        """Slots per row, ``S_max``."""
        return self.layers[0].keys.shape[2]

    @property
    def batch_size(self) -> int:
        return self.layers[0].keys.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].keys.dtype

    @property
    def device(self) -> torch.device:
        return self.layers[0].keys.device

    def set_write_slots(self, write_slots: torch.Tensor | None) -> None:
        """Set the ``[B, T]`` slots where the next forward writes its ``T`` tokens per row."""
        self._write_slots = write_slots

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Called by the model's attention: write at the current write slots, return full buffers."""
        return self.layers[layer_idx].update(key_states, value_states, self._write_slots)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The longest committed row. Rows differ; models get explicit ``position_ids``."""
        return int(self.lengths.max())

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.max_len, 0

    def reset(self) -> None:
        super().reset()
        self.lengths.zero_()

    def apply_commit(self, counts: torch.Tensor, accepted_slots: torch.Tensor | None = None) -> None:
        """Keep the accepted tokens of a verification step and advance each row's length.

        Row ``b`` keeps ``counts[b]`` tokens; the ``i``-th kept token's keys/values are gathered
        from slot ``accepted_slots[b, i]`` to slot ``lengths[b] + i``. Without
        ``accepted_slots`` the accepted tokens already sit at ``lengths[b] ..`` (a chain
        accepted up to a point) and only the lengths move. Fixed-shape tensor work only,
        traceable; :meth:`check_commit` checks the arguments.

        Args:
            counts: ``[B]`` int64, tokens kept per row, ``0 <= counts[b] <= A``.
            accepted_slots: ``[B, A]`` int64, slots of the kept tokens in order; entries past
                ``counts[b]`` are ignored.
        """
        if accepted_slots is not None:
            src, dest = commit_indices(self.lengths, counts, accepted_slots, self.max_len)
            # Every kept token already in place (e.g. only the step's first token kept): no move.
            # Checked on the host only where that costs no device sync and nothing is traced.
            in_place = src.device.type == "cpu" and not torch.compiler.is_compiling() and torch.equal(src, dest)
            if not in_place:
                heads = {layer.keys.shape[1] for layer in self.layers}
                index = {h: (_slot_index(src, h), _slot_index(dest, h)) for h in heads}  # the same for every layer
                for layer in self.layers:
                    move_slots(layer.keys, *index[layer.keys.shape[1]])
                    move_slots(layer.values, *index[layer.values.shape[1]])
        self.lengths.add_(counts)

    def check_commit(self, counts: torch.Tensor, accepted_slots: torch.Tensor | None) -> None:
        """Raise ``ValueError`` unless :meth:`apply_commit` can take these arguments."""
        if counts.shape != self.lengths.shape:
            raise ValueError(f"commit: counts must have shape [B]={tuple(self.lengths.shape)}, got {tuple(counts.shape)}")
        if bool((counts < 0).any()) or bool((self.lengths + counts > self.max_len).any()):
            raise ValueError(
                f"commit: counts {counts.tolist()} with lengths {self.lengths.tolist()} must be >= 0 "
                f"and fit in max_len={self.max_len}"
            )
        if accepted_slots is None:
            return
        if accepted_slots.ndim != 2 or accepted_slots.shape[0] != self.lengths.shape[0]:
            raise ValueError(f"commit: accepted_slots must be [B, A], got {tuple(accepted_slots.shape)}")
        if bool((counts > accepted_slots.shape[1]).any()):
            raise ValueError(f"commit: counts {counts.tolist()} exceed A={accepted_slots.shape[1]} accepted slots")
        if bool(((accepted_slots < 0) | (accepted_slots >= self.max_len)).any()):
            raise ValueError(f"commit: accepted_slots must lie in [0, {self.max_len})")


def commit_indices(
    lengths: torch.Tensor, counts: torch.Tensor, accepted_slots: torch.Tensor, max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Source and destination slots ``[B, A]`` for :meth:`SlotCache.apply_commit`, fixed shape.

    Entries past a row's count repeat its last kept move (same source, same destination), so
    duplicate destinations always receive identical values; a row keeping nothing copies one
    slot onto itself.
    """
    num = accepted_slots.shape[1]
    i = torch.arange(num, device=lengths.device)[None, :]  # [1, A]
    last = (counts - 1).clamp(min=0)[:, None]  # [B, 1]
    j = torch.minimum(i, last)  # [B, A]
    src = accepted_slots.gather(1, j)  # [B, A]
    dest = lengths[:, None] + j  # [B, A]
    none_kept = counts[:, None] == 0  # [B, 1]
    dest = torch.where(none_kept, lengths.clamp(max=max_len - 1)[:, None], dest)
    src = torch.where(none_kept, dest, src)
    return src, dest


def move_slots(buf: torch.Tensor, src: tuple[torch.Tensor, ...], dest: tuple[torch.Tensor, ...]) -> None:
    """``buf[b, :, dest[b, i]] = buf[b, :, src[b, i]]`` for all ``i`` at once (gather, then
    write); ``src`` and ``dest`` are :func:`_slot_index` grids of ``[B, A]`` slots."""
    moved = buf[src]  # buf: [B, H, S, Dh] -> [B, H, A, Dh], a copy
    buf.index_put_(dest, moved)
