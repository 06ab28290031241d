"""Self-distillation of small heads on a frozen causal LM: draft heads and LM exit heads.

Both are trained the same way: the backbone runs under ``torch.no_grad()`` on teacher-forced
text, a head is fitted to the model's own next-token distribution (KL divergence) — no
labels, and the head learns what the model will say, which is what verification accepts —
through the one loop heads on a frozen model share
(:func:`~dynexec_compile.training.optimize`). The model is never modified.

- :func:`train_draft_heads`: Medusa-style heads for ``strategy="draft_heads"``; head ``i`` at
  position ``t`` learns the model's distribution at ``t + i``;
- :func:`train_exit_lm_head`: an exit head over the vocabulary after layer ``E`` for
  ``strategy="self_speculative", exit_head="trained"`` (and CALM).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from dynexec_compile.decoding.draft_heads import DraftHeads, check_heads_fit
from dynexec_compile.decoding.eagle import DraftRunner, EagleDraft, check_draft_fits, saved_tensor
from dynexec_compile.decoding.layers import DecoderStack
from dynexec_compile.decoding.step import check_causal_lm
from dynexec_compile.exit_heads import ExitHeads
from dynexec_compile.training import optimize


def train_draft_heads(
    model: PreTrainedModel,
    data: torch.Tensor | Iterable[torch.Tensor],
    offsets: int = 3,
    *,
    heads: DraftHeads | None = None,
    num_layers: int = 1,
    steps: int | None = None,
    batch_size: int = 8,
    seq_len: int = 256,
    lr: float = 3e-3,
    temperature: float = 1.0,
    weight_decay: float = 0.0,
    progress: bool = True,
) -> DraftHeads:
    """Train ``offsets`` draft heads on a frozen causal LM by self-distillation; fp32, eval mode.

    Head ``i`` (``1 <= i <= offsets``) at position ``t`` is fitted to the model's own
    next-token distribution at position ``t + i`` (KL divergence, teacher-forced), i.e. the
    token ``t + 1 + i`` the model would predict. The model is never modified: it runs under
    ``torch.no_grad()`` and only the heads are optimised (AdamW, linear decay to 0).

    Args:
        model: a transformers causal LM in eval mode with a ``base_model`` returning the final
            (post-norm) hidden state, and an output projection.
        data: token ids: a 1-D stream (cut into ``seq_len`` windows, ``batch_size`` per step),
            a 2-D ``[N, S]`` tensor of sequences (``batch_size`` rows per step), or an
            iterable of ``[B, S]`` tensors (one step each) or of ``([B, S] ids, [B, S] bool
            mask)`` pairs: the mask marks the positions whose guesses are trained (e.g. from
            the last prompt token on, for heads that will draft answers, not prompts).
        offsets: ``k``, heads to train (ignored when ``heads`` is given).
        heads: heads to train further (a trained copy is returned; the given ones are unchanged).
        num_layers: residual blocks per new head.
        steps: optimiser steps; ``None`` = one pass over ``data`` (needs a tensor or a sized iterable).
        batch_size, seq_len: batching of tensor ``data``.
        lr, weight_decay: AdamW settings.
        temperature: softens teacher and student alike.
        progress: show a tqdm progress bar.
    """
    check_causal_lm(model)
    if temperature <= 0 or lr <= 0:
        raise ValueError(f"need lr > 0 and temperature > 0, got lr={lr}, temperature={temperature}")
    if heads is None:
        heads = DraftHeads(int(model.config.hidden_size), offsets, num_layers, int(model.config.vocab_size))
    else:
        heads = copy.deepcopy(check_heads_fit(model, heads))
    device = next(model.parameters()).device
    heads = heads.to(device=device, dtype=torch.float32).train()
    lm_head = model.get_output_embeddings()
    batches, total = token_batches(data, batch_size, seq_len, steps)
    optimize(
        list(heads.parameters()),
        batches,
        lambda batch: _distill_loss(model, heads, lm_head, batch, temperature),
        lr=lr,
        weight_decay=weight_decay,
        warmup=0.0,
        clip=None,
        max_steps=total,
        desc="draft heads",
        progress=progress,
    )
    return heads.eval()


def _distill_loss(
    model: PreTrainedModel,
    heads: DraftHeads,
    lm_head: nn.Module,
    batch: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    temperature: float,
) -> torch.Tensor:
    """Mean over heads of KL(model's distribution at ``t + i`` || head ``i`` at ``t``), over the
    positions ``t`` the batch's mask marks (all when it has none)."""
    ids, mask, start = _marked(batch, lm_head.weight.device)
    k, seq = heads.num_heads, ids.shape[1]
    if seq <= k:
        raise ValueError(f"training sequences need more than offsets={k} tokens, got {seq}")
    with torch.no_grad():
        h = model.base_model(input_ids=ids).last_hidden_state[:, start:].float()  # [B, S', D], after the final norm
        teacher = F.log_softmax(lm_head(h.to(lm_head.weight.dtype)).float() / temperature, dim=-1)  # [B, S', V]
    student = heads.features(h[:, :-1])  # [B, S'-1, k, D]
    weight = lm_head.weight.detach().float()  # [V, D], frozen: no gradient reaches the model
    losses = []
    for i in range(1, k + 1):
        span = seq - start - i  # positions t in [start, seq - i)
        features, target = student[:, :span, i - 1], teacher[:, i:]  # head i at t; the model at t + i
        if mask is not None:  # only the marked positions: [N, D], [N, V]
            marked = mask[:, start : start + span]
            features, target = features[marked], target[marked]
        log_q = F.log_softmax(F.linear(features, weight) / temperature, dim=-1)
        kl = F.kl_div(log_q, target, log_target=True, reduction="none").sum(-1)  # per position
        losses.append((kl.mean() if kl.numel() else kl.sum()) * temperature**2)
    return torch.stack(losses).mean()


def _marked(
    batch: torch.Tensor | tuple[torch.Tensor, torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """``(ids, mask, start)`` of a batch on ``device``: ``start`` is the first position any row
    marks (0 without a mask). Positions before it feed the context only, so a loss computes no
    LM head on them (it is most of the cost) and offsets everything by ``start``."""
    ids, mask = batch if isinstance(batch, tuple) else (batch, None)
    ids = ids.to(device)
    if mask is None:
        return ids, None, 0
    mask = mask.to(device)
    marked = mask.any(dim=0).nonzero()
    start = 0 if marked.numel() == 0 else min(int(marked[0]), ids.shape[1] - 1)
    return ids, mask, start


def train_exit_lm_head(
    model: PreTrainedModel,
    data: torch.Tensor | Iterable[torch.Tensor],
    exit_layer: int,
    *,
    head: str = "vocab",
    num_layers: int = 1,
    steps: int | None = None,
    batch_size: int = 8,
    seq_len: int = 256,
    lr: float = 1e-3,
    temperature: float = 1.0,
    progress: bool = True,
) -> ExitHeads | DraftHeads:
    """Train an exit head on block ``exit_layer - 1``'s output for ``exit_head="trained"``.

    It is fitted to the model's final next-token distribution at every position, or at the
    positions a batch's mask marks (KL divergence, teacher-forced). The model is never modified.

    - ``head="vocab"``: a ``last_token_rmsnorm`` head (RMSNorm -> Linear(D, V)) starting from
      the model's own LM head (and, for RMSNorm models, its final norm's scale); as large as
      the LM head.
    - ``head="adapter"``: ``num_layers`` residual blocks (``D x D`` each, starting as the
      identity) under the model's own final norm and LM head, which stay frozen
      (:class:`~dynexec_compile.decoding.self_speculative.AdapterExitHead`): a small file
      for a large vocabulary.

    Args:
        model: a causal LM in eval mode whose layers transformers exposes.
        data: token ids or ``(ids, mask)`` batches, as for :func:`train_draft_heads`.
        exit_layer: ``E``, the layers the draft runs.
        steps, batch_size, seq_len, lr, temperature, progress: as for ``train_draft_heads``.
    Returns:
        ``"vocab"``: :class:`ExitHeads` with one head at block ``exit_layer - 1`` (save it with
        ``save_exit_heads``); ``"adapter"``: a one-head :class:`DraftHeads` (``save_draft_heads``).
        fp32, eval mode; pass it as ``exit_heads=`` with the same ``exit_layer``.
    """
    from dynexec_compile.decoding.self_speculative import AdapterExitHead

    check_causal_lm(model)
    stack = DecoderStack(model)
    if isinstance(exit_layer, bool) or not isinstance(exit_layer, int) or not 1 <= exit_layer < stack.num_layers:
        raise ValueError(f"exit_layer must be an int in [1, {stack.num_layers - 1}], got {exit_layer!r}")
    if head not in ("vocab", "adapter"):
        raise ValueError(f"head must be 'vocab' or 'adapter', got {head!r}")
    vocab = int(model.config.vocab_size)
    device = next(model.parameters()).device
    if head == "adapter":
        heads = DraftHeads(stack.hidden_size, 1, num_layers, vocab).to(device=device, dtype=torch.float32).train()
        logits = AdapterExitHead(model, heads.blocks[0])
    else:
        eps = float(getattr(stack.norm, "variance_epsilon", getattr(stack.norm, "eps", 1e-6)))
        heads = ExitHeads([exit_layer - 1], stack.hidden_size, vocab, "last_token_rmsnorm", dropout=0.0, eps=eps)
        with torch.no_grad():
            heads.head(exit_layer - 1).out.weight.copy_(stack.lm_head.weight)
            if stack.family == "llama":
                heads.head(exit_layer - 1).norm.weight.copy_(stack.norm.weight)
        heads = heads.to(device=device, dtype=torch.float32).train()
        logits = heads.head(exit_layer - 1).classify

    batches, total = token_batches(data, batch_size, seq_len, steps)
    with _frozen(model):  # gradients reach the head only, never the model's own weights
        optimize(
            list(heads.parameters()),
            batches,
            lambda batch: _exit_lm_loss(model, logits, exit_layer, batch, temperature),
            lr=lr,
            weight_decay=0.0,
            warmup=0.0,
            clip=None,
            max_steps=total,
            desc=f"exit {head} (layer {exit_layer})",
            progress=progress,
        )
    return heads.eval()


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """``requires_grad`` off on the model's parameters for the block, then restored."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _exit_lm_loss(
    model: PreTrainedModel,
    head: Callable[[torch.Tensor], torch.Tensor],
    exit_layer: int,
    batch: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    temperature: float,
) -> torch.Tensor:
    """Mean KL(model's final distribution at ``t`` || ``head`` (``[.., D] -> [.., V]`` logits) on
    block ``exit_layer - 1``'s output at ``t``) over the positions the batch's mask marks (all
    when it has none)."""
    ids, mask, start = _marked(batch, next(model.parameters()).device)
    with torch.no_grad():
        # logits only from the first marked position on: the LM head is most of the cost
        keep = {"logits_to_keep": ids.shape[1] - start} if start else {}
        out = model(input_ids=ids, output_hidden_states=True, **keep)
        teacher = F.log_softmax(out.logits.float() / temperature, dim=-1)  # [B, S', V]
        h = out.hidden_states[exit_layer][:, start:].float()  # [B, S', D], block E-1's output
    student = F.log_softmax(head(h) / temperature, dim=-1)  # [B, S', V]
    kl = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)  # [B, S']
    if mask is not None:
        kl = kl[mask[:, start:]]
    return (kl.mean() if kl.numel() else kl.sum()) * temperature**2


def train_eagle_draft(
    model: PreTrainedModel,
    data: Iterable[torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    *,
    draft: EagleDraft | None = None,
    vocab: int | None = 8192,
    intermediate_size: int | None = None,
    epochs: int = 1,
    lr: float = 1e-3,
    cls_weight: float = 0.1,
    noise: float = 0.05,
    progress: bool = True,
) -> EagleDraft:
    """Train an EAGLE draft (:mod:`~dynexec_compile.decoding.eagle`) on a frozen causal LM; fp32.

    The model runs once over ``data`` under ``torch.no_grad()`` for its final hidden states
    ``f`` (kept in memory); the draft then learns, teacher-forced, ``f_{p+1}`` from
    ``(f_p, x_{p+1})`` at every position: a smooth-L1 loss on the feature plus ``cls_weight``
    times the cross-entropy between the model's distribution at ``p + 1`` and the draft's,
    both over the draft's vocabulary (EAGLE's two losses). ``noise``: uniform noise on the input
    features, as a fraction of their RMS, so that the draft tolerates its own guessed features.
    The model is never modified.

    Args:
        data: ``[B, S]`` token-id batches, or ``(ids, mask)`` pairs whose bool mask marks the
            positions whose next feature is trained (e.g. the answer, where drafting happens).
        draft: a draft to train further (a trained copy is returned); ``None``: a new one.
        vocab: the draft's vocabulary: the ``vocab`` most frequent tokens of ``data`` at the
            trained positions (``None``: the whole vocabulary).
        intermediate_size: the draft layer's MLP width (``None``: the model's).
    """
    check_causal_lm(model)
    if epochs < 1 or lr <= 0 or cls_weight < 0 or noise < 0:
        raise ValueError(f"need epochs >= 1, lr > 0, cls_weight >= 0, noise >= 0; got {epochs}, {lr}, {cls_weight}, {noise}")
    stack = DecoderStack(model)
    device = next(model.parameters()).device
    if torch.is_tensor(data):  # [N, S]: one sequence per step
        data = list(data.long().reshape(-1, data.shape[-1])[:, None])
    marked = []
    for batch in token_batches(data, 1, 1, None)[0]:
        ids, mask, _ = _marked(batch, device)
        if ids.shape[1] < 2:
            raise ValueError(f"training sequences need at least 2 tokens, got {ids.shape[1]}")
        marked.append((ids, torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()))
    features = _final_features(model, [row for ids, _ in marked for row in ids])
    batches, used = [], 0
    for ids, mask in marked:
        batches.append((ids, mask, torch.stack(features[used : used + ids.shape[0]])))
        used += ids.shape[0]
    if draft is None:
        config = model.config.get_text_config(decoder=True)
        chosen = None if vocab is None or vocab >= int(config.vocab_size) else _frequent_tokens(batches, vocab, int(config.vocab_size))
        draft = EagleDraft(config, chosen, intermediate_size)
    else:
        draft = copy.deepcopy(check_draft_fits(model, draft))
    draft = draft.to(device=device, dtype=torch.float32).eval()  # no dropout: the draft runs as it will decode
    runner = DraftRunner(draft, stack, 1, 1)
    params = [p for name, p in draft.named_parameters() if saved_tensor(name)]
    with _frozen(model):  # the draft embeds tokens with the model's embeddings: no gradient there
        optimize(params, batches, lambda batch: _eagle_loss(runner, batch, cls_weight, noise), lr=lr, epochs=epochs,
                 warmup=0.02, clip=1.0, desc="EAGLE draft", progress=progress)
    return draft


@torch.no_grad()
def _final_features(model: PreTrainedModel, rows: list[torch.Tensor], group: int = 8) -> list[torch.Tensor]:
    """The model's final (post-norm) hidden states ``[S_i, D]`` of each row, fp32; rows of
    similar lengths run ``group`` at a time, right-padded (causal: the padding comes after)."""
    out: list[torch.Tensor | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: rows[i].numel())
    for start in range(0, len(order), group):
        chunk = order[start : start + group]
        width = max(rows[i].numel() for i in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long, device=rows[chunk[0]].device)
        mask = torch.zeros_like(ids)
        for j, i in enumerate(chunk):
            ids[j, : rows[i].numel()], mask[j, : rows[i].numel()] = rows[i], 1
        h = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state.float()  # [G, S, D]
        for j, i in enumerate(chunk):
            out[i] = h[j, : rows[i].numel()]
    return out


def _frequent_tokens(batches: list, count: int, vocab_size: int) -> torch.Tensor:
    """The ``count`` most frequent tokens of the training text at the trained positions, by id
    (on self-generated answers, exactly what the model predicts there)."""
    hits = torch.zeros(vocab_size, dtype=torch.long)
    for ids, mask, _ in batches:
        hits += torch.bincount(ids[mask].cpu(), minlength=vocab_size)
    return torch.sort(torch.topk(hits, count).indices).values


def _eagle_loss(runner: DraftRunner, batch: tuple, cls_weight: float, noise: float) -> torch.Tensor:
    ids, mask, features = batch  # [B, S], [B, S], [B, S, D]
    batch_size, seq = ids.shape
    inputs = features[:, :-1]
    if noise:
        rms = inputs.pow(2).mean(dim=-1, keepdim=True).sqrt()
        inputs = inputs + noise * rms * (2 * torch.rand_like(inputs) - 1)
    runner.new_cache(batch_size, seq - 1)
    positions = torch.arange(seq - 1, device=ids.device)[None, :].expand(batch_size, -1)
    out = runner.pairs(inputs, ids[:, 1:], positions)  # [B, S - 1, D]
    marked = mask[:, 1:]  # pair p predicts the feature at p + 1
    guess, target = out[marked], features[:, 1:][marked]  # [N, D]
    if guess.numel() == 0:
        return out.sum() * 0
    loss = F.smooth_l1_loss(guess, target)
    if cls_weight:
        teacher = F.softmax(target @ runner.head.T, dim=-1)  # [N, vocab]
        loss = loss - cls_weight * (teacher * F.log_softmax(guess @ runner.head.T, dim=-1)).sum(-1).mean()
    return loss


def token_batches(
    data: torch.Tensor | Iterable[torch.Tensor], batch_size: int, seq_len: int, steps: int | None
) -> tuple[Iterator[torch.Tensor], int]:
    """``(iterator of [B, S] id batches, number of steps)`` for :func:`~dynexec_compile.training.optimize`."""
    if torch.is_tensor(data):
        if data.dtype not in (torch.int64, torch.int32) or data.ndim not in (1, 2):
            raise TypeError(f"data must be int token ids, 1-D or [N, S]; got {data.dtype} {tuple(data.shape)}")
        rows = data.long()
        if rows.ndim == 1:
            n = rows.numel() // seq_len
            if n == 0:
                raise ValueError(f"data holds {rows.numel()} tokens, fewer than seq_len={seq_len}")
            rows = rows[: n * seq_len].view(n, seq_len)
        per_pass = -(-rows.shape[0] // batch_size)
        total = steps or per_pass

        def cycle() -> Iterator[torch.Tensor]:
            for step in range(total):
                start = (step % per_pass) * batch_size
                yield rows[start : start + batch_size]

        return cycle(), total
    if steps is None and not hasattr(data, "__len__"):
        raise ValueError("data is an iterable without a length: pass steps=")
    total = steps or len(data)  # type: ignore[arg-type]

    def take() -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        for step, batch in enumerate(data):
            if step == total:
                return
            ids, mask = batch if isinstance(batch, tuple) and len(batch) == 2 else (batch, None)
            if not torch.is_tensor(ids) or ids.ndim != 2:
                raise TypeError(
                    f"each batch must be a [B, S] tensor of token ids or an (ids, mask) pair, got {type(batch).__name__}"
                )
            if mask is not None and (not torch.is_tensor(mask) or mask.shape != ids.shape):
                raise ValueError(f"a batch's mask must be a tensor shaped like its ids {tuple(ids.shape)}")
            yield batch

    return take(), total


__all__ = ["token_batches", "train_draft_heads", "train_eagle_draft", "train_exit_lm_head"]
