"""Choosing an early-exit threshold on validation data: ``calibrate_threshold``.

A threshold trades accuracy for layers, and the right one depends on the model, its exit
heads and the data, so it is measured, not guessed. Calibration runs the validation data
through the early-exit compiled model **once**, with every exit head evaluated on every
sample (``runtime.exit_recording``), and then replays any rule and threshold from those
recorded logits: which exit each sample would take, what it would predict, how many layers it
would run. Candidate thresholds are the midpoints between consecutive recorded scores, so
every distinct exit pattern is tried and the returned threshold sits as far from the nearest
sample's score as the data allows.

The replay is the runtime's own decision: entropy and max probability from the same
``exit_decision`` definition (``entropy < t`` exits, ``max_prob >= t`` exits), PABEE's
patience counted over consecutive exits exactly as ``runtime.exit_rules`` counts it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from dynexec_compile.backends.kernels.exit_decision import exit_decision_reference
from dynexec_compile.config import EXIT_HEADS, EXIT_RULES
from dynexec_compile.runtime.exit_recording import RecordedCall, record_exit_logits

UNIFORM_MARGIN = 0.05  # a threshold this close to the uniform distribution's score is a warning


@dataclass(frozen=True)
class OperatingPoint:
    """What one rule and threshold do on the recorded data.

    ``exits_per_layer[b]`` counts the samples that left after block ``b``; those that ran to
    the end count under the last block, ``num_blocks - 1``.
    """

    rule: str
    threshold: float | None  # entropy (nats) or probability; None for patience
    patience: int | None  # consecutive agreeing exits; None for entropy / max_prob
    accuracy: float  # against the labels, or agreement with the full model without labels
    mean_layers: float  # blocks run per sample
    num_blocks: int
    exits_per_layer: dict[int, int]

    @property
    def layer_reduction(self) -> float:
        """``num_blocks / mean_layers``: how many times fewer blocks than the full model."""
        return self.num_blocks / self.mean_layers


@dataclass(frozen=True)
class Calibration:
    """The threshold ``calibrate_threshold`` picked and what it measured there.

    Attributes:
        point: the chosen operating point (rule, threshold or patience, accuracy, layers).
        keep: the fraction of the full model's accuracy that had to be kept.
        metric: ``"accuracy"`` (labels given) or ``"agreement"`` (with the full model's
            predictions, when the data has no labels).
        full_accuracy: the full model's accuracy (1.0 for agreement).
        target: ``keep * full_accuracy``, the accuracy the point had to reach.
        num_samples: validation samples used.
        heads, exit_layers: the exit heads and the blocks followed by an exit.
    """

    point: OperatingPoint
    keep: float
    metric: str
    full_accuracy: float
    target: float
    num_samples: int
    heads: str
    exit_layers: tuple[int, ...]

    @property
    def rule(self) -> str:
        return self.point.rule

    @property
    def threshold(self) -> float | int:
        """The entropy / probability threshold, or the patience count for ``"patience"``."""
        return self.point.patience if self.point.rule == "patience" else self.point.threshold

    @property
    def accuracy(self) -> float:
        return self.point.accuracy

    @property
    def mean_layers(self) -> float:
        return self.point.mean_layers

    @property
    def layer_reduction(self) -> float:
        return self.point.layer_reduction

    def early_exit_options(self) -> dict[str, Any]:
        """The ``options={"early_exit": ...}`` dict that runs at this point."""
        opts: dict[str, Any] = {"rule": self.rule, "heads": self.heads, "layers": list(self.exit_layers)}
        if self.rule == "patience":
            opts["patience"] = self.point.patience
        else:
            opts["threshold"] = self.point.threshold
        return opts


@dataclass
class ExitScores:
    """Every exit's logits for every validation sample, from one recorded pass.

    Attributes:
        exit_logits: ``[N, E, C]`` logits of the E exits (fp32).
        final_logits: ``[N, C]`` the full model's logits.
        labels: ``[N]`` or ``None`` (then accuracy means agreement with the full model).
        exit_blocks: the block after which each exit sits (length E).
        num_blocks: blocks of the model.
        heads: ``"shared"`` or ``"trained"``.
        compiled_rule: the rule the model was compiled with (``"entropy"`` when compiled here).
    """

    exit_logits: torch.Tensor
    final_logits: torch.Tensor
    labels: torch.Tensor | None
    exit_blocks: list[int]
    num_blocks: int
    heads: str
    compiled_rule: str = "entropy"

    def __post_init__(self) -> None:
        n, e, c = self.exit_logits.shape
        flat = self.exit_logits.reshape(n * e, c)
        decision = exit_decision_reference(flat, "entropy", 0.0)
        self.entropy = decision.entropy.reshape(n, e)  # [N, E]
        self.max_prob = decision.max_prob.reshape(n, e)  # [N, E]
        self.exit_pred = decision.pred.reshape(n, e)  # [N, E]
        self.final_pred = self.final_logits.argmax(-1)  # [N]
        target = self.labels if self.labels is not None else self.final_pred
        self.exit_correct = self.exit_pred == target[:, None]  # [N, E]
        self.final_correct = self.final_pred == target  # [N]

    @property
    def num_samples(self) -> int:
        return self.exit_logits.shape[0]

    @property
    def metric(self) -> str:
        return "accuracy" if self.labels is not None else "agreement"

    @property
    def full_accuracy(self) -> float:
        return self.final_correct.float().mean().item()

    # --- replaying rules -----------------------------------------------------------------

    def fires(self, rule: str, thresholds: torch.Tensor) -> torch.Tensor:
        """``[K, N, E]``: whether each exit fires for each sample under each threshold."""
        if rule == "entropy":
            return self.entropy[None] < thresholds[:, None, None]
        if rule == "max_prob":
            return self.max_prob[None] >= thresholds[:, None, None]
        if rule == "patience":
            return self.agreeing_exits()[None] >= thresholds[:, None, None]
        raise ValueError(f"dynexec: unknown exit rule {rule!r}; use one of {list(EXIT_RULES)}")

    def agreeing_exits(self) -> torch.Tensor:
        """``[N, E]``: PABEE's counter at each exit (how many exits in a row before it agreed)."""
        count = torch.zeros_like(self.exit_pred)
        for e in range(1, self.exit_pred.shape[1]):
            same = self.exit_pred[:, e] == self.exit_pred[:, e - 1]
            count[:, e] = torch.where(same, count[:, e - 1] + 1, 0)
        return count

    def replay(self, rule: str, thresholds: Iterable[float]) -> list[OperatingPoint]:
        """The operating point of each threshold (patience counts for ``"patience"``)."""
        values = [float(t) for t in thresholds]
        points = []
        for start in range(0, len(values), 256):  # bounded [K, N, E] memory
            chunk = torch.tensor(values[start : start + 256], dtype=torch.float32)
            points += self._replay_chunk(rule, chunk)
        return points

    def exit_layer(self, rule: str, thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[K, N]`` block after which each sample leaves under each threshold (``num_blocks - 1``
        when it runs to the end), and ``[K, N]`` whether its prediction there is correct."""
        fires = self.fires(rule, thresholds)  # [K, N, E]
        any_fire = fires.any(-1)  # [K, N]
        first = fires.to(torch.uint8).argmax(-1)  # [K, N], first firing exit
        blocks = torch.tensor(self.exit_blocks)
        exit_block = torch.where(any_fire, blocks[first], self.num_blocks - 1)  # [K, N]
        correct = torch.where(
            any_fire, self.exit_correct.gather(1, first.T).T, self.final_correct[None]
        )  # [K, N]
        return exit_block, correct

    def _replay_chunk(self, rule: str, thresholds: torch.Tensor) -> list[OperatingPoint]:
        exit_block, correct = self.exit_layer(rule, thresholds)  # [K, N] each
        accuracy = correct.float().mean(-1)
        mean_layers = (exit_block + 1).float().mean(-1)
        points = []
        for k, t in enumerate(thresholds.tolist()):
            counts = torch.bincount(exit_block[k], minlength=self.num_blocks).tolist()
            points.append(OperatingPoint(
                rule=rule,
                threshold=None if rule == "patience" else t,
                patience=int(t) if rule == "patience" else None,
                accuracy=accuracy[k].item(),
                mean_layers=mean_layers[k].item(),
                num_blocks=self.num_blocks,
                exits_per_layer={b: c for b, c in enumerate(counts) if c},
            ))
        return points

    def candidates(self, rule: str) -> list[float]:
        """Every distinct exit pattern's threshold, from the most conservative (fewest exits)
        to the most aggressive: 0 / the full model first, every-sample-at-the-first-exit last."""
        if rule == "patience":
            num_exits = len(self.exit_blocks)
            return [float(p) for p in range(num_exits, 0, -1)]  # patience = E never fires
        scores = self.entropy if rule == "entropy" else self.max_prob
        values = torch.unique(scores[~scores.isnan()].double())  # sorted ascending
        if values.numel() == 0:
            return []
        mids = ((values[1:] + values[:-1]) / 2).tolist()
        lo, hi = values[0].item(), values[-1].item()
        if rule == "entropy":  # exit when entropy < t: 0 never fires, past the largest all do
            return [0.0, *mids, hi + max(1e-6, hi * 1e-3)]
        # exit when max_prob >= t (t in (0, 1]): above the largest none fire, below the smallest all do
        never = [min(1.0, (hi + 1.0) / 2)] if hi < 1.0 else []
        return [*never, *reversed(mids), lo / 2]

    def point(self, rule: str, threshold: float) -> OperatingPoint:
        """The operating point of one threshold (a patience count for ``"patience"``)."""
        return self.replay(rule, [threshold])[0]


def _check_keep(keep: Any) -> float:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"calibrate_threshold: keep must be a number in (0, 1], got {type(keep).__name__}")
    if math.isnan(keep) or not 0.0 < keep <= 1.0:
        raise ValueError(
            f"calibrate_threshold: keep={keep} is out of range; it is the fraction of the full "
            "model's accuracy to keep, in (0, 1] (e.g. 0.99)"
        )
    return float(keep)


def _batches(val_data: Any) -> list[Mapping[str, Any]]:
    if isinstance(val_data, Mapping):
        val_data = [val_data]
    if isinstance(val_data, (str, bytes)) or not isinstance(val_data, Iterable):
        raise TypeError(
            "calibrate_threshold: val_data must be an iterable of batches (dicts of tensors for "
            f"model(**batch), with 'labels' for accuracy), got {type(val_data).__name__}"
        )
    batches = list(val_data)
    if not batches:
        raise ValueError("calibrate_threshold: val_data is empty; pass at least one batch of validation data")
    for i, batch in enumerate(batches):
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"calibrate_threshold: batch {i} is a {type(batch).__name__}; batches must be dicts of "
                "tensors (input_ids, attention_mask, labels, ...)"
            )
    with_labels = sum("labels" in b for b in batches)
    if 0 < with_labels < len(batches):
        raise ValueError(
            f"calibrate_threshold: {with_labels} of {len(batches)} batches have 'labels'; give labels in "
            "every batch (accuracy) or in none (agreement with the full model)"
        )
    return batches


def _compile_for_recording(model: torch.nn.Module, heads: str, layers: Any, lowering: str):
    if heads not in EXIT_HEADS:
        raise ValueError(f"calibrate_threshold: heads={heads!r} is not valid; use one of {list(EXIT_HEADS)}")
    options = {
        "lowering": lowering,
        "strict": True,
        "early_exit": {"rule": "entropy", "threshold": 0.0, "heads": heads, "layers": layers},
    }
    return torch.compile(model, backend="dynexec", options=options, dynamic=True)


def record_exit_scores(
    compiled_or_model: Any,
    val_data: Any,
    *,
    heads: str = "auto",
    layers: str | list[int] = "all",
    lowering: str = "eager",
    forward_kwargs: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> ExitScores:
    """Run ``val_data`` once through the early-exit model and keep every exit's logits.

    Args:
        compiled_or_model: a model compiled with ``backend="dynexec"`` and ``early_exit``
            options (used as it is), or a Hugging Face classifier (compiled here with
            ``heads``, ``layers`` and ``lowering``; the model is not modified).
        val_data: a batch or an iterable of batches, dicts for ``model(**batch)`` with
            ``labels: [B]`` in every batch or in none.
        heads: for an uncompiled model, ``"auto"`` (the default, as in the compile options:
            the trained heads when attached with ``attach_exit_heads``, else the shared
            head), ``"shared"`` or ``"trained"``.
        layers: for an uncompiled model, ``"all"`` or the blocks followed by an exit.
        lowering: for an uncompiled model, the stage lowering used to record (``"eager"``:
            the scores are the same up to fp32 rounding and nothing has to be compiled).
        forward_kwargs: extra keyword arguments of every call (e.g. ``{"use_cache": False}``).
        progress: show a tqdm progress bar.

    Raises:
        ValueError: empty data, labels in some batches only, or a model that is not (and
            cannot be) compiled with early exit.
    """
    batches = _batches(val_data)
    compiled = _as_early_exit_model(compiled_or_model, heads, layers, lowering)
    calls: list[RecordedCall] = []
    labels = []
    with torch.no_grad():
        for batch in tqdm(batches, desc="recording exits", disable=not progress, unit="batch"):
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            with record_exit_logits() as recording:
                _call(compiled, {**inputs, **(forward_kwargs or {})})
            if len(recording.calls) != 1:
                raise ValueError(_not_early_exit_message(compiled_or_model, len(recording.calls)))
            calls.append(recording.calls[0])
            if "labels" in batch:
                labels.append(torch.as_tensor(batch["labels"]).reshape(-1).cpu())
    first = calls[0]
    return ExitScores(
        exit_logits=torch.cat([c.exit_logits for c in calls]),
        final_logits=torch.cat([c.final_logits for c in calls]),
        labels=torch.cat(labels) if labels else None,
        exit_blocks=first.exit_blocks,
        num_blocks=first.num_blocks,
        heads=first.cfg.heads,
        compiled_rule=first.cfg.rule,
    )


def _as_early_exit_model(obj: Any, heads: str, layers: Any, lowering: str):
    if isinstance(obj, torch._dynamo.eval_frame.OptimizedModule):
        return obj
    if not isinstance(obj, torch.nn.Module):
        raise TypeError(
            "calibrate_threshold: expected a model (torch.nn.Module) or a model compiled with "
            f"torch.compile(..., backend='dynexec'), got {type(obj).__name__}"
        )
    return _compile_for_recording(obj, heads, layers, lowering)


def _call(compiled, inputs: dict) -> None:
    from torch._dynamo.exc import BackendCompilerFailed

    try:
        compiled(**inputs)
    except BackendCompilerFailed as err:
        cause = err.__cause__ or err.inner_exception
        if isinstance(cause, ValueError):
            raise cause from None
        raise ValueError(
            f"calibrate_threshold: the model cannot be compiled with early exit: {cause}"
        ) from err


def _not_early_exit_message(obj: Any, calls: int) -> str:
    if calls == 0:
        return (
            "calibrate_threshold: the model ran without dynexec's early-exit runtime (compiled with another "
            "backend, without early_exit options, or dynexec fell back to the stock graph); pass the model "
            "itself, or compile it with torch.compile(model, backend='dynexec', options={'early_exit': {...}, "
            "'strict': True})"
        )
    return (
        f"calibrate_threshold: one call ran {calls} early-exit graphs (graph breaks split the model); "
        "calibration needs the whole model in one graph (fullgraph)"
    )


def calibrate_threshold(
    compiled_or_model: Any,
    val_data: Any,
    keep: float = 0.99,
    rule: str | None = None,
    *,
    heads: str = "auto",
    layers: str | list[int] = "all",
    lowering: str = "eager",
    forward_kwargs: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> Calibration:
    """Pick the exit threshold that keeps ``keep`` of the full model's accuracy.

    One pass over ``val_data`` records every exit's logits for every sample
    (:func:`record_exit_scores`); then every distinct threshold is replayed from the
    recording, from the most conservative (no exits) towards the most aggressive, and the
    last one before accuracy first falls below ``keep * full accuracy`` is returned: the
    fewest layers whose every more conservative threshold also holds the target, so the
    result does not hinge on one lucky threshold. Without labels the accuracy is the
    agreement with the full model's predictions.

    Args:
        compiled_or_model: an early-exit compiled model, or a classifier (see
            :func:`record_exit_scores` for ``heads``, ``layers``, ``lowering``).
        val_data: a batch or an iterable of batches (dicts for ``model(**batch)``, with
            ``labels`` in every batch or in none).
        keep: fraction of the full model's accuracy to keep, in (0, 1].
        rule: ``"entropy"``, ``"max_prob"`` or ``"patience"`` (then the patience count is
            calibrated); default the compiled model's rule, ``"entropy"`` for a model.
        forward_kwargs: extra keyword arguments of every call (``{"use_cache": False}``).
        progress: show a tqdm progress bar over the batches.

    Returns:
        a :class:`Calibration`: ``.threshold`` (the patience count for ``"patience"``),
        ``.accuracy`` and ``.mean_layers`` measured there, ``.early_exit_options()``.

    Raises:
        ValueError: ``keep`` outside (0, 1], empty data, an unknown rule, a model that is not
            and cannot be compiled with early exit.
    """
    keep = _check_keep(keep)
    if rule is not None and rule not in EXIT_RULES:
        raise ValueError(f"calibrate_threshold: rule={rule!r} is not valid; use one of {list(EXIT_RULES)}")
    scores = record_exit_scores(
        compiled_or_model, val_data, heads=heads, layers=layers, lowering=lowering,
        forward_kwargs=forward_kwargs, progress=progress,
    )
    return choose_threshold(scores, keep, rule or scores.compiled_rule)


def choose_threshold(scores: ExitScores, keep: float, rule: str) -> Calibration:
    """The calibration rule of :func:`calibrate_threshold` on already recorded scores."""
    keep = _check_keep(keep)
    candidates = scores.candidates(rule)
    points = scores.replay(rule, candidates)
    full_correct = int(scores.final_correct.sum())
    needed = keep * full_correct - 1e-9  # correct samples the point must keep
    chosen = None
    for point in points:
        if round(point.accuracy * scores.num_samples) < needed:
            break
        chosen = point
    if chosen is None:
        raise ValueError(
            f"calibrate_threshold: no {rule} threshold keeps {keep:.2%} of the full model's {scores.metric} "
            f"({scores.full_accuracy:.4f}): some exits give a top probability of exactly 1.0, which every "
            "max_prob threshold in (0, 1] lets leave; use rule='entropy'"
        )
    _warn_if_degenerate(chosen, scores, keep)
    return Calibration(
        point=chosen,
        keep=keep,
        metric=scores.metric,
        full_accuracy=scores.full_accuracy,
        target=keep * scores.full_accuracy,
        num_samples=scores.num_samples,
        heads=scores.heads,
        exit_layers=tuple(scores.exit_blocks),
    )


def uniform_distance(rule: str, threshold: float, num_classes: int) -> float:
    """How far a threshold is from the uniform distribution over ``num_classes``, as a
    fraction of its scale: ``(ln C - t) / ln C`` for entropy, ``(t - 1/C) / (1 - 1/C)`` for
    max_prob. 0 means "exit when the head is no better than a coin with C sides"; <= 0
    lets every sample leave, however undecided."""
    if rule == "entropy":
        return (math.log(num_classes) - threshold) / math.log(num_classes)
    if rule == "max_prob":
        return (threshold - 1 / num_classes) / (1 - 1 / num_classes)
    raise ValueError(f"uniform_distance: rule {rule!r} has no threshold on a distribution")


def _warn_if_degenerate(point: OperatingPoint, scores: ExitScores, keep: float) -> None:
    """Warn about calibrated points that are legal but almost certainly not what the user wants:
    one where no sample ever exits (the compiled model runs every block, with the runtime's
    overhead on top), and one whose threshold sits on almost flat distributions."""
    num_classes = scores.exit_logits.shape[-1]
    what = f"calibrate_threshold({point.rule}, keep={keep:g}, heads={scores.heads!r})"
    if point.mean_layers >= point.num_blocks:
        warnings.warn(
            f"{what}: no sample exits early at the calibrated point; every one of the "
            f"{scores.num_samples} validation samples runs all {point.num_blocks} blocks, so early exit "
            f"only adds overhead. The exits are not accurate enough to keep {keep:.1%} of the full "
            f"model's {scores.metric}: "
            + ("train exit heads (dynexec_compile.train_exit_heads + attach_exit_heads) and calibrate "
               "again, " if scores.heads == "shared" else "train the exit heads longer or on more data, ")
            + "lower keep, or try another rule.",
            UserWarning,
            stacklevel=3,
        )
        return
    if point.rule == "patience":
        return
    distance = uniform_distance(point.rule, point.threshold, num_classes)
    if distance < UNIFORM_MARGIN:
        uniform = (
            f"ln({num_classes}) = {math.log(num_classes):.4f} nats" if point.rule == "entropy"
            else f"1/{num_classes} = {1 / num_classes:.4f}"
        )
        where = (
            f"is within {distance:.1%} of the uniform distribution's {point.rule} ({uniform}): samples "
            "leave when their exit head is almost undecided"
            if distance > 0 else
            f"is past the uniform distribution's {point.rule} ({uniform}): it lets every sample leave at "
            "its first exit, however undecided the head is there"
        )
        warnings.warn(
            f"{what}: the calibrated threshold {point.threshold:.4f} {where}, so the point holds the "
            "accuracy only as far as those exits happen to be right on this validation set; it may not "
            "hold on other data. "
            + ("Train exit heads (dynexec_compile.train_exit_heads + attach_exit_heads) — the "
               "shared head was never trained on early hidden states — " if scores.heads == "shared"
               else "Train the exit heads longer, ")
            + "use rule='patience', or check the point on held-out data before relying on it.",
            UserWarning,
            stacklevel=3,
        )
