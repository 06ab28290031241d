"""Additive float attention masks over the cache slots of a :class:`SlotCache`.

Every decoding step (plain, lookahead, speculative chain or tree) attends over the whole
``S_max``-slot buffer, so its mask is ``[B, 1, T, S_max]``: 0 where query ``t`` may see slot
``j``, the dtype's most negative finite value elsewhere. Why float and not bool: transformers'
eager attention *adds* the mask to the scores, so a boolean 4-D mask is silently wrong there;
and why the finite minimum rather than ``-inf``: a query that sees nothing (a padding row)
then gets uniform weights instead of NaN, and NaN in a scratch slot can never leak into a
real row through ``0 * NaN``. transformers 5 passes a 4-D mask to attention unchanged
(``masking_utils._preprocess_mask_arguments``).
"""

from __future__ import annotations

import torch


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean ``allowed`` -> additive float mask (0 visible, ``finfo(dtype).min`` hidden)."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    hidden = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, hidden)


def chain_mask(slots: torch.Tensor, max_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Mask of a causal chain of tokens written at consecutive slots ``lengths[b] + t``.

    Token ``t`` sees every slot up to its own: the committed prefix, the chain's earlier
    tokens and itself. Covers prefill, the 1-token step and a speculative chain.

    Args:
        slots: ``[B, T]`` slots of the step's tokens, ``slots[b, t] = lengths[b] + t``.
        max_len: ``S_max``.
    Returns:
        ``[B, 1, T, S_max]`` additive mask.
    """
    keys = torch.arange(max_len, device=slots.device)  # [S]
    allowed = keys[None, None, :] <= slots[:, :, None]  # [B, T, S]
    return additive(allowed[:, None], dtype)


def step_mask(
    lengths: torch.Tensor,
    slots: torch.Tensor,
    visible: torch.Tensor,
    max_len: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Mask of queries that see the committed prefix plus chosen step tokens.

    Query ``t`` of row ``b`` sees slot ``j`` iff ``j < lengths[b]`` (committed prefix) or
    ``j = slots[b, u]`` for a step token ``u`` with ``visible[b, t, u]``. Lookahead (Jacobi
    window + n-gram candidates) and tree verification are this mask with their own
    ``visible``; a chain is ``visible = tril(ones)``; a drafter that grows a tree level by
    level queries one level (``Tq`` rows of ``visible``) against every node written so far.

    Args:
        lengths: ``[B]`` committed lengths (the prefix every query sees).
        slots: ``[B, T]`` slots of the step's tokens, distinct within a row, ``>= lengths[b]``.
        visible: ``[Tq, T]`` or ``[B, Tq, T]`` bool, ``visible[.., t, u]``: query ``t`` sees token
            ``u`` (include a query's own token: a token sees itself).
        max_len: ``S_max``.
    Returns:
        ``[B, 1, Tq, S_max]`` additive mask.
    """
    batch, width = slots.shape
    queries = visible.shape[-2]
    keys = torch.arange(max_len, device=slots.device)  # [S]
    prefix = keys[None, None, :] < lengths[:, None, None]  # [B, 1, S]
    visible = visible.to(device=slots.device, dtype=torch.bool).expand(batch, queries, width)
    own = torch.zeros(batch, queries, max_len, dtype=torch.bool, device=slots.device)  # [B, Tq, S]
    own.scatter_(2, slots[:, None, :].expand(batch, queries, width), visible)
    return additive((prefix | own)[:, None], dtype)


def key_positions(positions: torch.Tensor, slots: torch.Tensor, max_len: int) -> torch.Tensor:
    """Position of the key in every cache slot: ``[B, S_max]``.

    Committed slot ``j`` holds position ``j`` (the :class:`SlotCache` layout invariant); the
    step's own tokens sit at ``slots`` with ``positions`` (a tree node's slot is past its
    depth). Other scratch slots get their index, and the full mask hides them anyway.
    """
    batch = slots.shape[0]
    keys = torch.arange(max_len, device=slots.device).expand(batch, max_len)  # [B, S]
    return keys.scatter(1, slots, positions)


def sliding_window(mask: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, window: int) -> torch.Tensor:
    """``mask`` narrowed to a sliding window: query at position ``p`` sees keys at ``p - window < k``.

    transformers' convention (``masking_utils.sliding_window_overlay``: ``kv_idx > q_idx -
    sliding_window``), so a token sees itself and the ``window - 1`` positions before it.

    Args:
        mask: ``[B, 1, T, S_max]`` additive full-attention mask.
        positions: ``[B, T]`` positions of the step's tokens; slots: ``[B, T]`` their slots.
    """
    keys = key_positions(positions, slots, mask.shape[-1])  # [B, S]
    near = keys[:, None, :] > positions[:, :, None] - window  # [B, T, S]
    hidden = torch.full((), torch.finfo(mask.dtype).min, dtype=mask.dtype, device=mask.device)
    return torch.where(near[:, None], mask, hidden)


def layer_masks(
    mask: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, windows: dict[str, int | None]
) -> dict[str, torch.Tensor]:
    """The mask of each attention layer type, keyed as transformers keys them.

    Args:
        mask: ``[B, 1, T, S_max]`` additive full-attention mask of a step.
        windows: layer type -> sliding window (``None``: full attention), from
            :func:`~dynexec_compile.decoding.cache.attention_windows`.
    Returns:
        ``{"full_attention": mask, "sliding_attention": narrowed, ...}`` for the types present.
    """
    return {kind: mask if w is None else sliding_window(mask, positions, slots, w) for kind, w in windows.items()}


def model_mask(masks: dict[str, torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
    """What a model's ``forward`` takes as ``attention_mask``: the one mask when every layer has
    the same type (Mistral, Starcoder2: their forward takes no dict), else the dict keyed by
    layer type (Gemma-2/3, Qwen2 with ``max_window_layers``: their forward takes one)."""
    return next(iter(masks.values())) if len(masks) == 1 else masks
