"""How much each attention head, MLP neuron and layer matters, measured on calibration data.

Elastic sub-models keep a *prefix* of every block's heads and neurons, so the prefix must hold
the ones that matter most. Two scores, both gathered with hooks so no model code changes and
the user's model comes back exactly as it was (hooks removed, ``requires_grad`` and train/eval
mode restored, no ``.grad`` written):

* ``"taylor"`` (Michel et al. 2019, "Are Sixteen Heads Really Better than One?"): a gate of
  ones multiplies each head's context vector right before the attention output projection, and
  each neuron's activation right before the MLP down projection; the score is the mean over
  examples of ``|dL/d gate|``, the first-order estimate of the loss change when the unit is
  removed. A per-layer gate interpolates between a block's input and output
  (``h_in + g * (h_out - h_in)``) for the layer score. ``L`` is the model's own loss when the
  batches carry ``labels``, ``loss_fn(outputs, target)`` when one is given, and otherwise the
  cross-entropy of the model to its own (detached) argmax predictions. The soft version, a KL
  divergence to its own detached distribution, is *not* used: at gate = 1 the model equals its
  target, and the gradient of ``KL(p_detached || p)`` there is exactly zero for every unit.
* ``"activation"``: the norm of each unit's contribution to the residual stream. For a head
  that is ``||W_o[:, head] @ ctx_head||`` (the head's slice of the output projection input times
  its columns, so a head with a small context but large output weights is not undervalued),
  for a neuron ``|a_i| * ||W_down[:, i]||``; both averaged over non-padding tokens. The layer
  score is the mean relative change ``||h_out - h_in|| / ||h_in||`` the block makes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dynexec_compile.elastic.arch import BlockSpec, find_blocks, out_dim

METHODS = ("taylor", "activation")
IMPORTANCE_KEY = "dynexec_importance"
IMPORTANCE_FORMAT = 1


@dataclass(frozen=True)
class Importance:
    """Scores from :func:`head_importance`; higher means more important.

    Args:
        heads: ``[L, H]`` one score per query head of every block.
        neurons: ``[L, I]`` one score per MLP neuron of every block.
        layers: ``[L]`` one score per block (used to choose anchor layers).
        method: ``"taylor"``, ``"activation"`` (or ``"random"``, :func:`random_importance`).
        num_examples: calibration examples (sequences) the scores average over.
    """

    heads: torch.Tensor
    neurons: torch.Tensor
    layers: torch.Tensor
    method: str
    num_examples: int

    def save(self, path: str | Path, calibration: str = "") -> None:
        """safetensors: the three score tensors; method and calibration in the metadata."""
        from dynexec_compile.weights_io import save_tensors

        tensors = {"heads": self.heads, "neurons": self.neurons, "layers": self.layers}
        config = {"format_version": IMPORTANCE_FORMAT, "method": self.method, "num_examples": self.num_examples,
                  "calibration": calibration}
        save_tensors(tensors, path, IMPORTANCE_KEY, config)

    @classmethod
    def load(cls, path: str | Path) -> Importance:
        from dynexec_compile.weights_io import read_with_config

        config, t = read_with_config(path, IMPORTANCE_KEY, "importance", IMPORTANCE_FORMAT)
        return cls(t["heads"], t["neurons"], t["layers"], config["method"], int(config["num_examples"]))


def random_importance(model: nn.Module, seed: int = 1) -> Importance:
    """Seeded random scores for ``model``'s heads, neurons and layers (``method="random"``):
    the random-order baseline importance orders are compared with, and an order far from the
    identity that exercises every index path of reordering and slicing."""
    blocks = find_blocks(model)
    gen = torch.Generator().manual_seed(seed)
    return Importance(
        heads=torch.rand(len(blocks), blocks[0].num_heads, generator=gen),
        neurons=torch.rand(len(blocks), blocks[0].num_neurons, generator=gen),
        layers=torch.rand(len(blocks), generator=gen),
        method="random",
        num_examples=0,
    )


class _Calibration:
    """Hooks that gate (Taylor) or measure (activation) every head, neuron and layer."""

    def __init__(self, model: nn.Module, blocks: list[BlockSpec], method: str):
        self.model, self.blocks, self.method = model, blocks, method
        self.mask: torch.Tensor | None = None  # [B, S] 1 for real tokens, or None
        self.gates: dict[tuple[str, int], list[torch.Tensor]] = {}
        self.sums = {
            "heads": torch.zeros(len(blocks), blocks[0].num_heads, dtype=torch.float64),
            "neurons": torch.zeros(len(blocks), blocks[0].num_neurons, dtype=torch.float64),
            "layers": torch.zeros(len(blocks), dtype=torch.float64),
        }
        self.count = 0  # examples (taylor) or tokens (activation) summed so far
        self.examples = 0
        self.handles: list[Any] = []

    def __enter__(self) -> _Calibration:
        for spec in self.blocks:
            head_out = self.model.get_submodule(spec.head_out)
            neuron_out = self.model.get_submodule(spec.neuron_out)
            self.handles += [
                head_out.register_forward_pre_hook(self._head_hook(spec)),
                neuron_out.register_forward_pre_hook(self._neuron_hook(spec)),
                self.model.get_submodule(spec.name).register_forward_hook(
                    self._layer_hook(spec), with_kwargs=True
                ),
            ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _gate(
        self, kind: str, layer: int, shape: tuple[int, ...], like: torch.Tensor
    ) -> torch.Tensor:
        gate = torch.ones(shape, dtype=like.dtype, device=like.device, requires_grad=True)
        self.gates.setdefault((kind, layer), []).append(gate)
        return gate

    def _token_mean(self, score: torch.Tensor) -> torch.Tensor:
        """score: [B, S, *U] -> [*U] summed over real tokens (divided later by the count)."""
        if self.mask is None or self.mask.shape != score.shape[:2]:
            return score.sum(dim=(0, 1))
        mask = self.mask.to(score.dtype).reshape(*self.mask.shape, *([1] * (score.dim() - 2)))
        return (score * mask).sum(dim=(0, 1))

    def _head_hook(self, spec: BlockSpec) -> Callable:
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            ctx = args[0]  # ctx: [B, S, H * d]
            heads = ctx.unflatten(-1, (spec.num_heads, spec.head_dim))  # [B, S, H, d]
            if self.method == "taylor":
                gate = self._gate("heads", spec.index, (ctx.shape[0], spec.num_heads), ctx)
                return ((heads * gate[:, None, :, None]).flatten(-2), *args[1:])
            weight = module.weight.detach()
            if out_dim(module) == 0:  # Linear [D, H*d]: gram[h] = W_h^T W_h  [H, d, d]
                w = weight.view(weight.shape[0], spec.num_heads, spec.head_dim)
                gram = torch.einsum("ohd,ohe->hde", w, w)
            else:  # Conv1D [H*d, D]
                w = weight.view(spec.num_heads, spec.head_dim, weight.shape[1])
                gram = torch.einsum("hdo,heo->hde", w, w)
            sq = torch.einsum("bshd,hde,bshe->bsh", heads, gram, heads)  # [B, S, H]
            self.sums["heads"][spec.index] += (
                self._token_mean(sq.clamp_min(0).sqrt()).double().cpu()
            )
            return None

        return hook

    def _neuron_hook(self, spec: BlockSpec) -> Callable:
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            act = args[0]  # act: [B, S, I]
            if self.method == "taylor":
                gate = self._gate("neurons", spec.index, (act.shape[0], spec.num_neurons), act)
                return (act * gate[:, None, :], *args[1:])
            col_norm = module.weight.detach().norm(dim=out_dim(module))  # [I]
            score = act.abs() * col_norm  # [B, S, I]
            self.sums["neurons"][spec.index] += self._token_mean(score).double().cpu()
            return None

        return hook

    def _layer_hook(self, spec: BlockSpec) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            h_in = args[0] if args else kwargs["hidden_states"]  # [B, S, D]
            h_out = output[0] if isinstance(output, tuple) else output  # [B, S, D]
            if self.method == "taylor":
                gate = self._gate("layers", spec.index, (h_in.shape[0],), h_in)
                gated = h_in + gate[:, None, None] * (h_out - h_in)
                return (gated, *output[1:]) if isinstance(output, tuple) else gated
            rel = (h_out - h_in).norm(dim=-1) / h_in.norm(dim=-1).clamp_min(1e-12)  # [B, S]
            self.sums["layers"][spec.index] += self._token_mean(rel).double().cpu()
            return None

        return hook

    def count_tokens(self, input_shape: torch.Size) -> None:
        """Add the batch's real tokens (activation scores are token means)."""
        fits = self.mask is not None and self.mask.shape == input_shape[:2]
        self.count += int(self.mask.sum()) if fits else input_shape[0] * input_shape[1]
        self.examples += input_shape[0]

    def collect_gradients(self, batch_size: int) -> None:
        """Add ``|dL/d gate|`` summed over the batch's examples, then forget the gates."""
        for (kind, layer), gates in self.gates.items():
            for gate in gates:
                if gate.grad is None:
                    raise RuntimeError(
                        f"dynexec elastic: the loss does not depend on the {kind} gate of "
                        f"block {layer}; pass a loss_fn that uses the model's output"
                    )
                self.sums[kind][layer] += gate.grad.abs().sum(0).double().cpu()
        self.gates.clear()
        self.count += batch_size
        self.examples += batch_size

    def result(self) -> Importance:
        if self.count == 0:
            raise ValueError("dynexec elastic: head_importance got no calibration batches")
        scores = {k: (v / self.count).float() for k, v in self.sums.items()}
        return Importance(method=self.method, num_examples=self.examples, **scores)


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _split_batch(batch: Any, device: torch.device) -> tuple[dict[str, Any], Any]:
    """(model keyword arguments, what loss_fn gets as its second argument)."""
    if isinstance(batch, tuple) and len(batch) == 2:
        inputs, target = _split_batch(batch[0], device)[0], batch[1]
        return inputs, _to(target, device)
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    if not isinstance(batch, Mapping):
        raise TypeError(
            "dynexec elastic: a calibration batch must be a dict of model keyword arguments "
            "(input_ids, attention_mask, labels, ...), an input_ids tensor, or a pair "
            f"(model inputs, loss_fn target), got {type(batch).__name__}"
        )
    inputs = {k: _to(v, device) for k, v in batch.items()}
    return inputs, inputs


def _self_prediction_loss(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy of the model to its own argmax, mean over tokens, summed over examples.

    logits: [B, C] or [B, S, V].
    """
    target = logits.detach().argmax(-1)  # [B] or [B, S]
    ce = F.cross_entropy(logits.flatten(0, -2).float(), target.flatten(), reduction="none")
    ce = ce.view(target.shape)
    if ce.dim() == 1:
        return ce.sum()
    if mask is None or mask.shape != ce.shape:
        return ce.mean(1).sum()
    mask = mask.to(ce.dtype)
    return ((ce * mask).sum(1) / mask.sum(1).clamp_min(1)).sum()


def _taylor_loss(
    outputs: Any, batch: dict[str, Any], target: Any, loss_fn: Callable | None, batch_size: int
) -> torch.Tensor:
    if loss_fn is not None:
        return loss_fn(outputs, target)
    loss = getattr(outputs, "loss", None)
    if "labels" in batch and loss is not None:
        return loss * batch_size  # HF losses are batch means; scale to per-example gradients
    logits = getattr(outputs, "logits", None)
    if logits is None:
        raise ValueError(
            f"dynexec elastic: method='taylor' needs a loss, but {type(outputs).__name__} has no "
            "loss or logits; pass labels in the batches, a loss_fn(outputs, batch) -> scalar, "
            "or use method='activation'"
        )
    return _self_prediction_loss(logits, batch.get("attention_mask"))


def _check_uniform(blocks: list[BlockSpec]) -> None:
    if len({(b.num_heads, b.num_neurons) for b in blocks}) != 1:
        raise ValueError(
            "dynexec elastic: blocks have different head or neuron counts; Importance holds "
            "[L, H] and [L, I] tensors and needs them equal across blocks"
        )


def head_importance(
    model: nn.Module,
    batches: Iterable[Any],
    method: str = "taylor",
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    progress: bool = True,
) -> Importance:
    """Score every attention head, MLP neuron and block of ``model`` on calibration batches.

    The model is not modified: hooks are removed, ``requires_grad`` and train/eval mode are
    restored, and no parameter ``.grad`` is written (only the gates get gradients).

    Args:
        model: a Hugging Face transformer (BERT, GPT-2, LLaMA/Qwen2 layouts; see ``arch.py``).
        batches: dicts of model keyword arguments (``input_ids``, ``attention_mask``,
            optional ``labels``), bare ``input_ids`` tensors ``[B, S]``, or pairs
            ``(model_inputs, target)`` whose ``target`` goes to ``loss_fn`` only (labels for
            a head that is not part of the model, e.g. a probe on a base encoder).
        method: ``"taylor"`` (``|dL/d gate|``) or ``"activation"`` (contribution norms).
        loss_fn: for ``"taylor"``, ``loss_fn(outputs, target) -> scalar``, summed over the
            batch's examples (``target`` is the pair's second element, else the batch dict); by default the model's loss with labels, else the
            cross-entropy to its own argmax predictions.
        progress: show a tqdm bar over the batches.

    Returns:
        :class:`Importance` with ``heads [L, H]``, ``neurons [L, I]`` and ``layers [L]``.
    """
    if method not in METHODS:
        raise ValueError(
            f"dynexec elastic: method={method!r} is not valid; use one of {list(METHODS)}"
        )
    blocks = find_blocks(model)
    _check_uniform(blocks)
    device = next(model.parameters()).device
    was_training = model.training
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    model.eval()
    model.requires_grad_(False)
    total = len(batches) if hasattr(batches, "__len__") else None
    try:
        with _Calibration(model, blocks, method) as calib:
            for raw in tqdm(
                batches, total=total, desc=f"importance ({method})", disable=not progress
            ):
                batch, target = _split_batch(raw, device)
                calib.mask = batch.get("attention_mask")
                shape = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape
                if method == "activation":
                    with torch.no_grad():
                        model(**batch)
                    calib.count_tokens(shape)
                    continue
                with torch.enable_grad():
                    outputs = model(**batch)
                    _taylor_loss(outputs, batch, target, loss_fn, shape[0]).backward()
                calib.collect_gradients(shape[0])
        return calib.result()
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad[name])
        model.train(was_training)
