"""Trained early-exit heads: DeeBERT-style off-ramps, one small classifier per exit layer.

Early exit with ``"heads": "shared"`` reuses the model's own head on intermediate hidden
states; that works poorly on encoders whose head was only ever trained on the last layer.
``"heads": "trained"`` gives every exit layer its own small head ("off-ramp", DeeBERT, Xin et
al. 2020), trained here with the backbone frozen, so the model's own outputs never change:

    heads = train_exit_heads(model, dataloader)           # backbone frozen, tqdm progress
    save_exit_heads(heads, "heads.safetensors")           # safetensors + JSON config, no pickle
    attach_exit_heads(model, load_exit_heads("heads.safetensors"))

``attach_exit_heads`` is the one documented in-place edit of a user's model: it registers the
heads as the submodule ``model.dynexec_exit_heads``, so ``model.to()``/``.half()`` move them
with the model; ``get_exit_heads(model)`` finds them from the model and
``find_exit_heads(tensors)`` from its parameters (what a ``torch.compile`` backend sees).

Conventions: block ``i`` is the ``i``-th transformer block (0-based); its output is
``hidden_states[i + 1]`` of ``model(..., output_hidden_states=True)``. Exits sit after blocks
``0 .. L-2``: after the last block the model's own head is the exit (and some models, Llama,
report the last hidden state after their final norm, not the block output).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary
from tqdm.auto import tqdm

from dynexec_compile.training import optimize
from dynexec_compile.weights_io import read_with_config, save_with_config

HEAD_KINDS = ("cls_tanh", "mean_tanh", "last_token_rmsnorm")
ATTACH_NAME = "dynexec_exit_heads"
METADATA_KEY = "dynexec_exit_heads"
_HEADS_BY_PARAMETER: WeakIdKeyDictionary = WeakIdKeyDictionary()  # backbone parameter -> heads
FORMAT_VERSION = 1


class ExitHead(nn.Module):
    """One off-ramp: a block's output ``h: [B, S, D]`` -> class logits ``[B, num_labels]``.

    Subclasses choose which token summarises the sequence (``pool``) and how it is classified
    (``classify``); ``attention_mask: [B, S]`` (1 = token, 0 = padding) is optional.
    """

    kind: str = ""

    def pool(self, h: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define pool()")

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define classify()")

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        # h: [B, S, D] -> x: [B, D] -> logits: [B, num_labels]
        return self.classify(self.pool(h, attention_mask))


class PoolerExitHead(ExitHead):
    """BERT-family off-ramp (DeeBERT): first token -> Linear(D, D) -> tanh -> dropout -> Linear.

    The same shape as BERT's pooler + classifier, so an exit reads the hidden state the way
    the model's own head does. Right for BERT, RoBERTa, ALBERT and DistilBERT, whose
    classifiers all read the first token ([CLS] / <s>).
    """

    kind = "cls_tanh"

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, num_labels)

    def pool(self, h: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return h[:, 0]  # [B, D]

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(torch.tanh(self.dense(x))))  # [B, num_labels]


class MeanPoolExitHead(PoolerExitHead):
    """Like ``PoolerExitHead`` but reads the mean of the real tokens instead of the first one.

    Early blocks of a BERT have barely mixed the sentence into the first token (in MiniLM-L6,
    a sentence-embedding model trained with mean pooling, the first token of blocks 0..2 is
    one large outlier dimension and nothing else), while the token mean already carries the
    sentence: on SST-2 its exits after blocks 0..2 reach 77-83% where first-token exits stay at
    the majority class. ``attention_mask: [B, S]`` keeps padding out of the mean; without a
    mask every position counts.
    """

    kind = "mean_tanh"

    def pool(self, h: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None:
            return h.mean(dim=1)  # [B, D]
        mask = attention_mask.to(h.dtype).unsqueeze(-1)  # [B, S, 1]
        return (h * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # [B, D]


class LastTokenExitHead(ExitHead):
    """Causal-LM off-ramp: last real token -> RMSNorm (like the final norm) -> dropout -> Linear.

    A decoder's sequence classifier reads the last non-padding token, and its hidden states
    are only meaningful after the final RMSNorm, so the off-ramp carries its own norm.
    The last real token is found from ``attention_mask`` (left or right padding); without a
    mask the last position is used.
    """

    kind = "last_token_rmsnorm"

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.RMSNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, num_labels, bias=False)

    def pool(self, h: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        batch, seq = h.shape[:2]
        if attention_mask is None:
            return h[:, -1]  # [B, D]
        positions = torch.arange(seq, device=h.device)  # [S]
        last = torch.where(attention_mask.bool(), positions, -1).amax(dim=-1).clamp(min=0)  # [B]
        return h[torch.arange(batch, device=h.device), last]  # [B, D]

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(self.norm(x)))  # [B, num_labels]


class ExitHeads(nn.ModuleDict):
    """The off-ramps of one model, keyed by block index as a string (``heads["2"]``).

    Attributes:
        layers: the exit block indices, sorted.
        hidden_size: D, the width of the hidden states the heads read.
        num_labels: the number of classes each head predicts.
        kind: ``"cls_tanh"`` (BERT family, DeeBERT's choice), ``"mean_tanh"`` (BERT family,
            token mean instead of the first token) or ``"last_token_rmsnorm"`` (causal LMs).
    """

    def __init__(
        self,
        layers: Sequence[int],
        hidden_size: int,
        num_labels: int,
        kind: str = "cls_tanh",
        dropout: float = 0.1,
        eps: float = 1e-6,
    ):
        if kind not in HEAD_KINDS:
            raise ValueError(
                f"unknown exit-head kind {kind!r}; valid kinds: {', '.join(HEAD_KINDS)}"
            )
        layers = tuple(sorted({int(layer) for layer in layers}))
        if not layers or layers[0] < 0:
            raise ValueError(
                f"exit layers must be a non-empty list of block indices >= 0, got {layers}"
            )
        if hidden_size < 1 or num_labels < 2:
            raise ValueError(
                f"need hidden_size >= 1 and num_labels >= 2, got {hidden_size}, {num_labels}"
            )
        super().__init__(
            {
                str(layer): _make_head(kind, hidden_size, num_labels, dropout, eps)
                for layer in layers
            }
        )
        self.layers = layers
        self.hidden_size = hidden_size
        self.num_labels = num_labels
        self.kind = kind
        self.dropout_p = dropout
        self.eps = eps

    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild the heads; stored in the safetensors metadata."""
        return {
            "format_version": FORMAT_VERSION,
            "layers": list(self.layers),
            "hidden_size": self.hidden_size,
            "num_labels": self.num_labels,
            "kind": self.kind,
            "dropout": self.dropout_p,
            "eps": self.eps,
        }

    def head(self, layer: int) -> ExitHead:
        """The off-ramp after block ``layer``; ``KeyError`` naming the exits if there is none."""
        key = str(layer)
        if key not in self:
            raise KeyError(f"no exit head after block {layer}; exit layers: {list(self.layers)}")
        return self[key]

    def exit_logits(
        self, layer: int, h: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``[B, num_labels]`` of the exit after block ``layer`` from its output ``h: [B, S, D]``."""
        return self.head(layer)(h, attention_mask)

    def all_exit_logits(
        self, hidden_states: Sequence[torch.Tensor], attention_mask: torch.Tensor | None = None
    ) -> dict[int, torch.Tensor]:
        """Logits of every exit from a model's ``hidden_states`` tuple (``[i + 1]`` = block ``i``)."""
        return {
            layer: self.exit_logits(layer, hidden_states[layer + 1], attention_mask)
            for layer in self.layers
        }


def _make_head(
    kind: str, hidden_size: int, num_labels: int, dropout: float, eps: float
) -> ExitHead:
    if kind == "cls_tanh":
        return PoolerExitHead(hidden_size, num_labels, dropout)
    if kind == "mean_tanh":
        return MeanPoolExitHead(hidden_size, num_labels, dropout)
    return LastTokenExitHead(hidden_size, num_labels, dropout, eps)


# ---------------------------------------------------------------------------------------------
# Reading a model's shape


def model_dims(model: nn.Module) -> tuple[int, int]:
    """``(number of blocks, hidden size)`` from a Hugging Face model's config.

    ALBERT counts one block per application of its shared layer, as its hidden states do.
    """
    config = getattr(model, "config", None)
    if (
        config is None
        or not hasattr(config, "num_hidden_layers")
        or not hasattr(config, "hidden_size")
    ):
        raise TypeError(
            f"expected a Hugging Face transformers model with config.num_hidden_layers and "
            f"config.hidden_size, got {type(model).__name__}"
        )
    return int(config.num_hidden_layers), int(config.hidden_size)


def default_head_kind(model: nn.Module) -> str:
    """``"last_token_rmsnorm"`` for decoder-only classifiers, ``"cls_tanh"`` otherwise.

    Transformers names the head of decoder-only sequence classifiers (Llama, Mistral, Qwen2,
    GPT-2, ...) ``score`` and that of encoders ``classifier``; pass ``kind=`` to override.
    """
    return (
        "last_token_rmsnorm" if isinstance(getattr(model, "score", None), nn.Linear) else "cls_tanh"
    )


def resolve_exit_layers(model: nn.Module, layers: str | Iterable[int]) -> tuple[int, ...]:
    """Validate ``layers`` (``"all"`` or block indices) against the model; exits are blocks 0..L-2."""
    num_layers, _ = model_dims(model)
    valid = range(num_layers - 1)
    if num_layers < 2:
        raise ValueError(
            f"{type(model).__name__} has {num_layers} block(s); early exit needs at least 2"
        )
    if layers == "all":
        return tuple(valid)
    if isinstance(layers, str) or not isinstance(layers, Iterable):
        raise TypeError(f"layers must be 'all' or a list of block indices, got {layers!r}")
    resolved = tuple(sorted({_as_index(layer) for layer in layers}))
    bad = [layer for layer in resolved if layer not in valid]
    if not resolved or bad:
        raise ValueError(
            f"exit layers {list(resolved) or '[]'} invalid for {type(model).__name__} with "
            f"{num_layers} blocks: valid exit layers are 0..{num_layers - 2} (after the last "
            f"block, {num_layers - 1}, the model's own head is the exit)"
        )
    return resolved


def _as_index(layer: Any) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"exit layers must be ints, got {layer!r}")
    return layer


def _model_num_labels(model: nn.Module) -> int:
    config = model.config
    num_labels = int(getattr(config, "num_labels", 0))
    problem = getattr(config, "problem_type", None)
    if num_labels < 2 or problem in ("regression", "multi_label_classification"):
        raise ValueError(
            f"exit heads need a single-label classifier (num_labels >= 2), got num_labels="
            f"{num_labels}, problem_type={problem!r}"
        )
    return num_labels


# ---------------------------------------------------------------------------------------------
# Training


def train_exit_heads(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    layers: str | Iterable[int] = "all",
    epochs: int = 1,
    lr: float = 5e-4,
    loss: str = "auto",
    *,
    heads: ExitHeads | None = None,
    kind: str | None = None,
    weight_decay: float = 0.01,
    temperature: float = 1.0,
    dropout: float = 0.1,
    progress: bool = True,
) -> ExitHeads:
    """Train one off-ramp per exit layer on a frozen model; returns the heads (fp32, eval mode).

    The backbone is never modified: it runs under ``torch.no_grad()`` in eval mode (its
    training flag is restored afterwards) and only the heads' parameters are optimised
    (AdamW, linear decay to 0 when the dataloader has a length).

    Args:
        model: a transformers ``*ForSequenceClassification`` (BERT, RoBERTa, ALBERT,
            DistilBERT, Llama, ...).
        dataloader: yields dicts of tensors for ``model(**batch)`` (``input_ids``,
            ``attention_mask``, ...), with ``labels: [B]`` for cross-entropy.
        layers: ``"all"`` (blocks 0..L-2) or a list of block indices.
        epochs: passes over ``dataloader``.
        lr: AdamW learning rate of the heads.
        loss: ``"ce"`` (cross-entropy on ``labels``), ``"distill"`` (KL to the model's own
            final predictions, self-distillation; needs no labels) or ``"auto"`` (``"ce"`` on
            batches with labels, ``"distill"`` on batches without).
        heads: existing heads to train further instead of fresh ones (moved in place to the
            model's device, fp32); ``layers`` must then be ``"all"`` or their layers.
        kind: head kind (see ``HEAD_KINDS``); default from the model (``default_head_kind``).
        weight_decay, dropout: regularisation of the heads.
        temperature: softening of both distributions for ``"distill"``.
        progress: show a tqdm progress bar.
    """
    if loss not in ("auto", "ce", "distill"):
        raise ValueError(f"loss must be 'auto', 'ce' or 'distill', got {loss!r}")
    if epochs < 1 or lr <= 0 or temperature <= 0:
        raise ValueError(
            f"need epochs >= 1, lr > 0, temperature > 0; got {epochs}, {lr}, {temperature}"
        )
    num_layers, hidden_size = model_dims(model)
    exit_layers = resolve_exit_layers(model, layers)
    device = _model_device(model)
    if heads is None:
        heads = ExitHeads(
            exit_layers,
            hidden_size,
            _model_num_labels(model),
            kind or default_head_kind(model),
            dropout,
        )
    else:
        _check_heads_fit(model, heads)
        if layers != "all" and exit_layers != heads.layers:
            raise ValueError(
                f"layers={list(exit_layers)} but the given heads exit at {list(heads.layers)}"
            )
    heads = heads.to(device=device, dtype=torch.float32)

    was_training = model.training
    model.eval()
    heads.train()
    try:
        optimize(
            list(heads.parameters()),
            dataloader,
            lambda batch: _exit_loss(model, heads, *_split_batch(batch, device), loss, temperature, num_layers),
            epochs=epochs,
            lr=lr,
            weight_decay=weight_decay,
            warmup=0.0,
            clip=None,
            desc="exit heads",
            progress=progress,
        )
    finally:
        model.train(was_training)
    return heads.eval()


def _exit_loss(
    model: nn.Module,
    heads: ExitHeads,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor | None,
    loss: str,
    temperature: float,
    num_layers: int,
) -> torch.Tensor:
    """Mean over exits of the per-exit loss; gradients reach the heads only."""
    if loss == "ce" and labels is None:
        raise ValueError(
            "loss='ce' needs 'labels' in every batch; use loss='distill' for unlabelled data"
        )
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    hidden_states = [h.float() for h in _hidden_states(out, num_layers)]
    logits = heads.all_exit_logits(hidden_states, inputs.get("attention_mask"))
    if loss == "ce" or (loss == "auto" and labels is not None):
        losses = [F.cross_entropy(x, labels) for x in logits.values()]
    else:
        teacher = F.softmax(out.logits.float() / temperature, dim=-1)  # [B, C]
        losses = [
            F.kl_div(F.log_softmax(x / temperature, dim=-1), teacher, reduction="batchmean")
            * temperature**2
            for x in logits.values()
        ]
    return torch.stack(losses).mean()


def _hidden_states(out: Any, num_layers: int) -> Sequence[torch.Tensor]:
    hidden_states = getattr(out, "hidden_states", None)
    if hidden_states is None or len(hidden_states) != num_layers + 1:
        got = "none" if hidden_states is None else len(hidden_states)
        raise ValueError(
            f"expected {num_layers + 1} hidden states from model(..., output_hidden_states=True), got {got}"
        )
    return hidden_states


def _split_batch(
    batch: Mapping[str, Any], device: torch.device
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Move a batch to ``device`` and take ``labels`` out of the model's inputs."""
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"batches must be dicts of tensors (input_ids, attention_mask, labels), got {type(batch).__name__}"
        )
    inputs = {
        key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()
    }
    labels = inputs.pop("labels", None)
    return inputs, labels


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def evaluate_exit_heads(
    model: nn.Module,
    heads: ExitHeads,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    progress: bool = True,
) -> dict[int, float]:
    """Accuracy of every exit on labelled batches, in one pass of the model.

    Returns ``{block index: accuracy}`` for each exit head, plus the last block's index
    (``L - 1``) for the model's own prediction, the exit of the full model.
    """
    num_layers, _ = model_dims(model)
    _check_heads_fit(model, heads)
    device = _model_device(model)
    was_training, heads_training = model.training, heads.training
    model.eval()
    heads.eval()
    param_dtype = next(heads.parameters()).dtype
    correct = dict.fromkeys((*heads.layers, num_layers - 1), 0)
    seen = 0
    try:
        for batch in tqdm(dataloader, desc="evaluate exits", disable=not progress, unit="batch"):
            inputs, labels = _split_batch(batch, device)
            if labels is None:
                raise ValueError("evaluate_exit_heads needs 'labels' in every batch")
            out = model(**inputs, output_hidden_states=True)
            hidden_states = _hidden_states(out, num_layers)
            logits = heads.all_exit_logits(
                [h.to(param_dtype) for h in hidden_states], inputs.get("attention_mask")
            )
            logits[num_layers - 1] = out.logits
            for layer, x in logits.items():
                correct[layer] += int((x.argmax(dim=-1) == labels).sum())
            seen += labels.numel()
    finally:
        model.train(was_training)
        heads.train(heads_training)
    if seen == 0:
        raise ValueError("evaluate_exit_heads got an empty dataloader")
    return {layer: count / seen for layer, count in correct.items()}


# ---------------------------------------------------------------------------------------------
# Saving and loading (safetensors; the config lives in the file's metadata as JSON)


def save_exit_heads(
    heads: ExitHeads, path: str | os.PathLike, dtype: torch.dtype | None = None
) -> None:
    """Write ``heads`` to a safetensors file, optionally cast to ``dtype`` (e.g. bf16 to ship)."""
    if not isinstance(heads, ExitHeads):
        raise TypeError(f"expected ExitHeads, got {type(heads).__name__}")
    save_with_config(heads, path, METADATA_KEY, heads.config(), dtype)


def load_exit_heads(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> ExitHeads:
    """Read heads written by ``save_exit_heads``; ``dtype=None`` keeps the stored dtype. Eval mode."""
    config, tensors = read_with_config(path, METADATA_KEY, "exit-heads", FORMAT_VERSION)
    stored_dtype = next(iter(tensors.values())).dtype
    heads = ExitHeads(
        config["layers"],
        config["hidden_size"],
        config["num_labels"],
        config["kind"],
        config["dropout"],
        config["eps"],
    )
    heads = heads.to(dtype=stored_dtype)
    heads.load_state_dict(tensors, strict=True)
    return heads.to(device=device, dtype=dtype or stored_dtype).eval()


# ---------------------------------------------------------------------------------------------
# Attaching to a model


def attach_exit_heads(model: nn.Module, heads: ExitHeads) -> nn.Module:
    """Register ``heads`` on ``model`` as ``model.dynexec_exit_heads``. EDITS ``model`` IN PLACE.

    This is dynexec's one in-place edit of a user's model: the heads become a submodule, so
    ``model.to()``/``.half()`` move them and ``model.state_dict()`` includes them. The heads
    are moved (in place) to the device and dtype of the model's parameters; attaching again
    replaces the previous heads. Returns ``model``.

    Raises:
        ValueError: an exit layer the model does not have (the message names the valid
            range), a hidden size or label count that differs from the model's.
    """
    if not isinstance(heads, ExitHeads):
        raise TypeError(
            f"expected ExitHeads (from train_exit_heads or load_exit_heads), got {type(heads).__name__}"
        )
    _check_heads_fit(model, heads)
    detach_exit_heads(model)
    param = next(model.parameters())
    heads.to(device=param.device, dtype=param.dtype)
    for backbone_param in model.parameters():
        _HEADS_BY_PARAMETER[backbone_param] = heads
    model.add_module(ATTACH_NAME, heads)
    return model


def detach_exit_heads(model: nn.Module) -> ExitHeads | None:
    """Remove and return the heads attached to ``model`` (``None`` if there were none)."""
    heads = get_exit_heads(model)
    if heads is not None:
        delattr(model, ATTACH_NAME)
        for param in model.parameters():
            _HEADS_BY_PARAMETER.pop(param, None)
    return heads


def get_exit_heads(model: nn.Module) -> ExitHeads | None:
    """The heads attached to ``model`` by ``attach_exit_heads``, or ``None``. One dict lookup."""
    heads = model._modules.get(ATTACH_NAME)
    return heads if isinstance(heads, ExitHeads) else None


def find_exit_heads(tensors: Iterable[torch.Tensor]) -> ExitHeads | None:
    """The heads attached to the model owning any of ``tensors`` (its parameters), or ``None``.

    For code that sees a model's parameters but not the model, e.g. a ``torch.compile``
    backend, which receives the parameters among a graph's example inputs. One weak-keyed
    dict lookup per tensor; the registry keeps neither the model nor its parameters alive.
    """
    for tensor in tensors:
        heads = _HEADS_BY_PARAMETER.get(tensor) if isinstance(tensor, torch.Tensor) else None
        if heads is not None:
            return heads
    return None


def resolve_heads(heads: str, attached: ExitHeads | None) -> str:
    """The exit heads an ``early_exit.heads`` setting means for a model: ``"auto"`` is
    ``"trained"`` when off-ramps are attached (``attached`` is what ``get_exit_heads`` or
    ``find_exit_heads`` found), else ``"shared"``; ``"shared"`` and ``"trained"`` are kept.

    The one place ``"auto"`` is decided, used by the compiler and by calibration alike, so
    options written by hand and a calibrated point run the same heads. ``"trained"`` without
    attached heads is left to the runtime, whose error says how to attach them.
    """
    from dynexec_compile.config import EXIT_HEADS

    if heads not in EXIT_HEADS:
        raise ValueError(f"dynexec: early_exit.heads={heads!r} is not valid; use one of {list(EXIT_HEADS)}")
    if heads == "auto":
        return "trained" if attached is not None else "shared"
    return heads


def _check_heads_fit(model: nn.Module, heads: ExitHeads) -> None:
    num_layers, hidden_size = model_dims(model)
    resolve_exit_layers(model, heads.layers)
    if heads.hidden_size != hidden_size:
        raise ValueError(
            f"exit heads read hidden size {heads.hidden_size}, but {type(model).__name__} has "
            f"hidden size {hidden_size}"
        )
    num_labels = _model_num_labels(model)
    if heads.num_labels != num_labels:
        raise ValueError(f"exit heads predict {heads.num_labels} labels, the model {num_labels}")


__all__ = [
    "HEAD_KINDS",
    "ExitHead",
    "ExitHeads",
    "LastTokenExitHead",
    "MeanPoolExitHead",
    "PoolerExitHead",
    "attach_exit_heads",
    "default_head_kind",
    "detach_exit_heads",
    "evaluate_exit_heads",
    "find_exit_heads",
    "get_exit_heads",
    "load_exit_heads",
    "model_dims",
    "resolve_exit_layers",
    "resolve_heads",
    "save_exit_heads",
    "train_exit_heads",
]
