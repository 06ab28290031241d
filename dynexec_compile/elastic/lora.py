"""Per-level LoRA recovery: a small low-rank correction per elastic level, on zero-copy levels.

A level keeps a prefix of every block's heads and neurons (``slicing.py``) and loses some
quality. A :class:`LevelLoRA` recovers part of it: for each target projection ``y = W x + b``
(``W`` the level's prefix *view* ``[out_k, in_k]``) the level computes

    y = W x + b + scale * B (A x),     A: [rank, in_k], B: [out_k, rank], scale = alpha / rank

with ``A`` and ``B`` trained on the reordered model *at that level* (backbone frozen). The
backbone stays zero-copy: the only new storage is the LoRA tensors; ``B`` starts at zero, so
an untrained LoRA is the level itself (and at level 1.0, the stock model).

Why the project's own LoRA and not peft's: peft gives every adapter of a module the base
layer's full shape, while a level's adapter has the level's shapes (``[rank, in_k]``,
``[out_k, rank]``); peft switches adapters by mutating module state (``set_adapter``), which
Dynamo guards on (a recompile per switch); and peft wraps the user's ``nn.Linear`` modules in
place (renaming ``q.weight`` to ``q.base_layer.weight``), while dynexec leaves the model
unmodified. Here the LoRA is three lines of math (:func:`lora_delta`) applied in two places
that share it: forward hooks for eager runs and training (:func:`elastic_forward`), and FX
nodes inserted after the level graph's ``linear`` calls for compiled runs (``fx.py``), where
``A``/``B`` are extra graph inputs, so swapping a LoRA of the same shape never recompiles.

The API (generic: BERT-like encoders and LLaMA-family causal LMs, any model ``find_blocks``
reads whose target projections are ``nn.Linear``; GPT-2's ``Conv1D`` is refused)::

    plan = reorder_by_importance(model, batches)                 # importance order (in place)
    lora = LevelLoRA.create(model, level=0.5, rank=8)            # B = 0: the plain level
    train_level_lora(model, lora, batches, epochs=1)             # distillation from the full model
    lora.save("level_0.5.safetensors")                           # safetensors, config as JSON metadata
    lora = LevelLoRA.load("level_0.5.safetensors", model)        # checks plan fingerprint and shapes
    out = elastic_forward(model, 0.5, kwargs=batch, lora=lora)   # eager: prefix views + LoRA hooks
    attach_level_loras(model, [lora, lora_025])                  # selected with the level:
    fast = torch.compile(model, backend="dynexec",
                         options={"elastic": {"levels": [1.0, 0.5, 0.25], "lora": "auto"}})
    with elastic_level(0.5):
        fast(**batch)                                            # level 0.5 + its LoRA, compiled
    dynexec_compile.elastic.fx.level_graph(gm, example_inputs, 0.5, lora=lora)   # the FX form

A LoRA belongs to one plan (the head and neuron order it was trained on: its fingerprint is
stored and checked), one level and one set of anchor blocks; using it elsewhere is a
``ValueError`` naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dynexec_compile.elastic.reorder import ElasticPlan, elastic_plan, lookup_plan
from dynexec_compile.elastic.slicing import (
    Anchors,
    choose_anchors,
    level_param_slices,
    level_params,
)
from dynexec_compile.weights_io import read_with_config, save_with_config

METADATA_KEY = "dynexec_level_lora"
FORMAT_VERSION = 1
TARGETS = ("blocks", "all-linear")


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """The LoRA term of one projection: ``scale * B (A x)``.

    x: [..., in_k], a: [rank, in_k], b: [out_k, rank] -> [..., out_k]. The one definition the
    eager hooks and the compiled graphs both call.
    """
    return F.linear(F.linear(x, a), b) * scale


def plan_fingerprint(plan: ElasticPlan) -> str:
    """A short hash of the plan's block names and head / key-value / neuron orders: two models
    reordered alike have the same fingerprint, and a LoRA trained on one fits the other."""
    payload = json.dumps(
        [[b.name for b in plan.blocks], plan.head_order, plan.kv_order, plan.neuron_order]
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def lora_targets(model: nn.Module, plan: ElasticPlan, targets: str | Sequence[str] = "blocks") -> tuple[str, ...]:
    """Module names a LoRA adapts.

    Args:
        targets: ``"blocks"`` (every projection the elastic levels slice: Q/K/V, the attention
            output, the MLP up/gate and down projections of every block), ``"all-linear"``
            (every ``nn.Linear`` except the output embeddings, e.g. a classifier's pooler and
            head too), or module names / name suffixes (``["query", "value"]``).

    Raises:
        ValueError: an unknown keyword, a name that matches no module, or a target that is not
            an ``nn.Linear`` (GPT-2's ``Conv1D`` is not supported).
    """
    modules = dict(model.named_modules())
    if isinstance(targets, str):
        if targets not in TARGETS:
            raise ValueError(
                f"dynexec elastic LoRA: targets={targets!r}; use one of {list(TARGETS)} or module names"
            )
        if targets == "blocks":
            names = [n for s in plan.blocks for n in (*s.head_in, s.head_out, *s.neuron_in, s.neuron_out)]
        else:
            output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            names = [n for n, m in modules.items() if isinstance(m, nn.Linear) and m is not output]
    else:
        names = []
        for t in targets:
            found = [n for n in modules if n == t or n.endswith("." + t)]
            if not found:
                raise ValueError(f"dynexec elastic LoRA: target {t!r} matches no module of {type(model).__name__}")
            names += [n for n in found if n not in names]
    for name in names:
        if type(modules[name]) is not nn.Linear:
            raise ValueError(
                f"dynexec elastic LoRA: target {name!r} is a {type(modules[name]).__name__}; only nn.Linear "
                "projections take a LoRA (GPT-2's fused Conv1D is not supported)"
            )
    return tuple(names)


def _level_shapes(
    model: nn.Module, plan: ElasticPlan, level: float, anchors: Sequence[int], names: Sequence[str]
) -> dict[str, tuple[int, int]]:
    """``{module: (in_k, out_k)}``: each target's input and output features at ``level``."""
    slices = level_param_slices(model, plan, level, anchors)
    shapes = {}
    for name in names:
        out_f, in_f = model.get_submodule(name).weight.shape
        dim, k = slices.get(f"{name}.weight", (None, None))[:2]
        shapes[name] = (k if dim == 1 else in_f, k if dim == 0 else out_f)
    return shapes


class LevelLoRA(nn.Module):
    """The LoRA of one elastic level: ``A [rank, in_k]``, ``B [out_k, rank]`` per target.

    Build one with :meth:`create` (shapes read from the model at the level) or :meth:`load`.

    Args:
        level: the elastic level it corrects, in (0, 1].
        shapes: ``{module name: (in_k, out_k)}``, the target's features at the level.
        rank: LoRA rank (>= 1).
        alpha: scaling numerator; the delta is multiplied by ``alpha / rank``.
        anchors: block indices kept whole at the level (part of what fixes the shapes).
        plan_id: :func:`plan_fingerprint` of the plan it was made for.
        seed: seed of ``A``'s initialisation (Kaiming-uniform, as in the LoRA paper and peft);
            ``B`` starts at zero.
    """

    def __init__(
        self,
        level: float,
        shapes: Mapping[str, tuple[int, int]],
        rank: int = 8,
        alpha: float | None = None,
        anchors: Sequence[int] = (),
        plan_id: str = "",
        seed: int = 0,
    ):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"dynexec elastic LoRA: rank must be an int >= 1, got {rank!r}")
        if not shapes:
            raise ValueError("dynexec elastic LoRA: no target modules")
        self.level = float(level)
        self.rank = rank
        self.alpha = float(2 * rank if alpha is None else alpha)
        self.anchors = tuple(sorted(anchors))
        self.plan_id = plan_id
        self.targets = tuple(shapes)
        gen = torch.Generator().manual_seed(seed)
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        for in_k, out_k in shapes.values():
            bound = 1.0 / math.sqrt(in_k)  # kaiming_uniform_(a=sqrt(5)) of a [rank, in_k] weight
            self.A.append(nn.Parameter(torch.rand(rank, in_k, generator=gen) * 2 * bound - bound))
            self.B.append(nn.Parameter(torch.zeros(out_k, rank)))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def create(
        cls,
        model: nn.Module,
        level: float,
        rank: int = 8,
        alpha: float | None = None,
        targets: str | Sequence[str] = "blocks",
        anchors: Anchors = 0,
        plan: ElasticPlan | None = None,
        seed: int = 0,
    ) -> LevelLoRA:
        """A fresh LoRA (``B = 0``) for ``model`` at ``level``, on the model's device and dtype.

        Args:
            model: the reordered model (its registered plan is used unless ``plan`` is given).
            level: the elastic level, in (0, 1].
            rank, alpha, seed: see the class.
            targets: see :func:`lora_targets`.
            anchors: the anchor blocks the level runs with (a count, ``"auto"`` or indices).
        """
        plan = plan or elastic_plan(model)
        anchor_set = sorted(choose_anchors(plan, anchors))
        shapes = _level_shapes(model, plan, level, anchor_set, lora_targets(model, plan, targets))
        lora = cls(level, shapes, rank, alpha, anchor_set, plan_fingerprint(plan), seed)
        ref = next(model.parameters())
        return lora.to(device=ref.device, dtype=ref.dtype)

    def pairs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module name: (A, B)}``."""
        return {name: (a, b) for name, a, b in zip(self.targets, self.A, self.B, strict=True)}

    def tensors(self) -> list[torch.Tensor]:
        """``[A_0, B_0, A_1, B_1, ...]`` in target order: the extra inputs of a level's graph."""
        return [t for a, b in zip(self.A, self.B, strict=True) for t in (a, b)]

    @property
    def signature(self) -> tuple:
        """What fixes a compiled graph: level, targets, shapes, scale (not the values)."""
        return (self.level, self.targets, tuple(tuple(t.shape) for t in self.tensors()), self.scale)

    def config(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "level": self.level,
            "rank": self.rank,
            "alpha": self.alpha,
            "anchors": list(self.anchors),
            "plan_id": self.plan_id,
            "targets": list(self.targets),
            "shapes": [[a.shape[1], b.shape[0]] for a, b in zip(self.A, self.B, strict=True)],
        }

    def check_fits(self, model: nn.Module, plan: ElasticPlan, level: float, anchors: Sequence[int]) -> None:
        """Raise ``ValueError`` unless this LoRA was made for ``plan`` at ``level`` with
        ``anchors`` and its shapes are ``model``'s at that level."""
        problems = []
        if self.level != level:
            problems.append(f"it is for level {self.level}, not {level}")
        if self.plan_id != plan_fingerprint(plan):
            problems.append(
                f"it was trained on another head/neuron order (plan {self.plan_id}, this model's is "
                f"{plan_fingerprint(plan)}); reorder the model as it was for training (apply_plan)"
            )
        if tuple(sorted(anchors)) != self.anchors:
            problems.append(f"it was made with anchor blocks {list(self.anchors)}, not {sorted(anchors)}")
        if not problems:
            want = _level_shapes(model, plan, level, anchors, self.targets)
            got = dict(zip(self.targets, self.config()["shapes"], strict=True))
            bad = [n for n in self.targets if tuple(got[n]) != want[n]]
            if bad:
                problems.append(f"{bad[0]!r} has (in, out) {tuple(got[bad[0]])}, the level needs {want[bad[0]]}")
        if problems:
            raise ValueError(f"dynexec elastic LoRA for level {self.level} does not fit: " + "; ".join(problems))

    def save(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """Write the tensors (cast to ``dtype`` when given, e.g. bf16 to ship) to a safetensors
        file, the configuration as JSON in its metadata."""
        save_with_config(self, path, METADATA_KEY, self.config(), dtype)

    @classmethod
    def load(
        cls, path: str | os.PathLike, model: nn.Module | None = None, plan: ElasticPlan | None = None,
        dtype: torch.dtype | None = None,
    ) -> LevelLoRA:
        """Read a LoRA written by :meth:`save`; with ``model``, check it fits the model's plan
        at its level (and move it to the model's device and dtype unless ``dtype`` is given)."""
        config, tensors = read_with_config(path, METADATA_KEY, "level LoRA", FORMAT_VERSION)
        shapes = {n: (i, o) for n, (i, o) in zip(config["targets"], config["shapes"], strict=True)}
        lora = cls(config["level"], shapes, config["rank"], config["alpha"], config["anchors"], config["plan_id"])
        lora.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
        if model is not None:
            plan = plan or elastic_plan(model)
            lora.check_fits(model, plan, lora.level, lora.anchors)
            ref = next(model.parameters())
            lora = lora.to(device=ref.device, dtype=dtype or ref.dtype)
        elif dtype is not None:
            lora = lora.to(dtype=dtype)
        return lora.eval()


# ----------------------------------------------------------------------------- attaching


# id(plan) -> (ref(plan), {level: LevelLoRA})
_ATTACHED: dict[int, tuple[weakref.ref, dict[float, LevelLoRA]]] = {}


def attach_level_loras(model: nn.Module, loras: Iterable[LevelLoRA]) -> None:
    """Serve each LoRA with its level: every compiled elastic run of ``model`` at that level
    (``options={"elastic": {"lora": "auto"}}``, the default) adds it. Replaces a LoRA attached
    before for the same level; other levels keep theirs. ``model`` is not modified (the LoRAs
    are recorded against its plan).

    Raises:
        ValueError: the model has no plan, or a LoRA does not fit it (see :meth:`LevelLoRA.check_fits`).
    """
    plan = lookup_plan(model)
    if plan is None:
        raise ValueError(
            "dynexec elastic LoRA: the model has no elastic plan; reorder it (reorder_by_importance or "
            "apply_plan) before attaching level LoRAs"
        )
    loras = list(loras)
    for lora in loras:
        if not isinstance(lora, LevelLoRA):
            raise TypeError(f"dynexec elastic LoRA: expected LevelLoRA, got {type(lora).__name__}")
        lora.check_fits(model, plan, lora.level, lora.anchors)
    entry = _ATTACHED.get(id(plan))
    if entry is None or entry[0]() is not plan:
        weakref.finalize(plan, _ATTACHED.pop, id(plan), None)
        entry = (weakref.ref(plan), {})
        _ATTACHED[id(plan)] = entry
    entry[1].update({lora.level: lora for lora in loras})


def detach_level_loras(model: nn.Module, levels: Iterable[float] | None = None) -> None:
    """Stop serving the LoRAs of ``levels`` (all when ``None``) with ``model``."""
    plan = lookup_plan(model)
    entry = _ATTACHED.get(id(plan)) if plan is not None else None
    if entry is None or entry[0]() is not plan:
        return
    for level in list(entry[1]) if levels is None else levels:
        entry[1].pop(float(level), None)


def attached_level_lora(plan: ElasticPlan, level: float) -> LevelLoRA | None:
    """The LoRA attached for ``plan``'s model at ``level``, or ``None``."""
    entry = _ATTACHED.get(id(plan))
    return entry[1].get(level) if entry is not None and entry[0]() is plan else None


def attached_levels(plan: ElasticPlan) -> list[float]:
    """Levels with an attached LoRA, largest first."""
    entry = _ATTACHED.get(id(plan))
    return sorted(entry[1], reverse=True) if entry is not None and entry[0]() is plan else []


# ----------------------------------------------------------------------------- eager runs


def install_level_lora(module: nn.Module, lora: LevelLoRA) -> list[torch.utils.hooks.RemovableHandle]:
    """Make each of ``lora``'s target submodules of ``module`` add the LoRA's delta to its output
    (forward hooks) until the returned handles are removed. For a module of your own whose
    weights are the level's (e.g. a draft model built from prefix views, with the same module
    names); for the user's model use :func:`lora_hooks` or :func:`elastic_forward`.

    Raises:
        ValueError: ``module`` lacks a target.
    """
    handles = []
    try:
        for name, (a, b) in lora.pairs().items():
            try:
                target = module.get_submodule(name)
            except AttributeError as err:
                raise ValueError(f"dynexec elastic LoRA: {type(module).__name__} has no module {name!r}") from err

            def hook(mod: nn.Module, args: tuple, output: torch.Tensor, a=a, b=b) -> torch.Tensor:
                return output + lora_delta(args[0], a, b, lora.scale)

            handles.append(target.register_forward_hook(hook))
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    return handles


@contextmanager
def lora_hooks(model: nn.Module, lora: LevelLoRA | None) -> Iterator[None]:
    """Inside the block, each target module of ``model`` adds ``lora``'s delta to its output
    (:func:`install_level_lora`, removed on exit). With the level's prefix views in place of the
    weights (``functional_call``) that is the level with its LoRA."""
    handles = install_level_lora(model, lora) if lora is not None else []
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def elastic_forward(
    model: nn.Module,
    level: float,
    args: tuple = (),
    kwargs: dict[str, Any] | None = None,
    *,
    lora: LevelLoRA | None = None,
    anchors: Anchors | None = None,
    plan: ElasticPlan | None = None,
) -> Any:
    """``model(*args, **kwargs)`` at elastic ``level`` (prefix views of the parameters), plus
    ``lora`` when given: the eager reference every compiled level is tested against, and the
    forward LoRA training runs. ``model`` is not modified.

    Args:
        anchors: anchor blocks; default the LoRA's when one is given, else none.
        plan: default the model's registered plan.

    Raises:
        ValueError: a bad level, or a LoRA that does not fit (another level, plan or anchors).
    """
    plan = plan or elastic_plan(model)
    if anchors is None:
        anchors = list(lora.anchors) if lora is not None else 0
    anchor_set = sorted(choose_anchors(plan, anchors))
    if lora is not None:
        lora.check_fits(model, plan, float(level), anchor_set)
    views = level_params(model, level_param_slices(model, plan, level, anchor_set))
    with lora_hooks(model, lora):
        return functional_call(model, views, args, kwargs or {})


# ----------------------------------------------------------------------------- training


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


def distillation_loss(
    student: Any, teacher: Any, batch: Mapping[str, Any], temperature: float = 1.0, label_weight: float = 0.5
) -> torch.Tensor:
    """The default LoRA training loss: KL divergence from the full model's distribution to the
    level's (softened by ``temperature``), plus ``label_weight`` times the model's own loss when
    the batch has ``labels``.

    Classifier logits ``[B, C]`` average over the batch; causal-LM logits ``[B, S, V]`` over
    the tokens the ``attention_mask`` keeps.
    """
    s, t = _logits(student).float(), _logits(teacher).float()
    log_p = F.log_softmax(s / temperature, dim=-1)
    kl = F.kl_div(log_p, F.log_softmax(t / temperature, dim=-1), log_target=True, reduction="none").sum(-1)
    mask = batch.get("attention_mask")
    if s.dim() == 3 and mask is not None:
        kl = (kl * mask).sum() / mask.sum().clamp_min(1)
    else:
        kl = kl.mean()
    loss = kl * temperature**2
    if label_weight and "labels" in batch and getattr(student, "loss", None) is not None:
        loss = (1 - label_weight) * loss + label_weight * student.loss
    return loss


@dataclass
class LoRATraining:
    """What :func:`train_level_lora` did: optimiser ``steps``, ``examples`` seen, the smoothed
    ``final_loss``, and the ``seconds`` / ``cpu_seconds`` it took (process CPU time)."""

    steps: int
    examples: int
    final_loss: float
    seconds: float
    cpu_seconds: float


def train_level_lora(
    model: nn.Module,
    lora: LevelLoRA,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    epochs: int = 1,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    warmup: float = 0.06,
    max_steps: int | None = None,
    loss_fn: Callable[[Any, Any, Mapping[str, Any]], torch.Tensor] | None = None,
    progress: bool = True,
) -> LoRATraining:
    """Train ``lora`` (in place) on ``model`` at ``lora.level``; the backbone stays frozen.

    Each step runs the full model (level 1.0, no LoRA, no gradient) as the teacher and the level
    with the LoRA as the student, and minimises ``loss_fn(student_out, teacher_out, batch)``
    (default :func:`distillation_loss`: KL to the full model, plus the task loss when batches
    carry ``labels``). AdamW on the LoRA tensors only, linear warm-up then linear decay
    (:func:`dynexec_compile.training.optimize`). The model's parameters, ``requires_grad``
    flags and train/eval mode are as before afterwards; the LoRA is left in eval mode.

    Args:
        batches: dicts of tensors for ``model(**batch)`` (a classifier's ``input_ids``,
            ``attention_mask``, optional ``labels``; a causal LM's ``input_ids`` ...).
        epochs, lr, weight_decay, warmup, max_steps: the optimisation.
        progress: show a tqdm progress bar.
    """
    from dynexec_compile.training import optimize

    plan = elastic_plan(model)
    lora.check_fits(model, plan, lora.level, lora.anchors)
    loss_fn = loss_fn or distillation_loss
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()  # dropout off: the student and its teacher see the same network

    def step_loss(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            teacher = model(**batch)
        student = elastic_forward(model, lora.level, kwargs=dict(batch), lora=lora, plan=plan)
        return loss_fn(student, teacher, batch)

    try:
        for p in flags:
            p.requires_grad_(False)
        lora.train()
        result = optimize(
            list(lora.parameters()), batches, step_loss, epochs=epochs, lr=lr, weight_decay=weight_decay,
            warmup=warmup, max_steps=max_steps, progress=progress, desc=f"LoRA level {lora.level}",
        )
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
        lora.eval()
    return LoRATraining(result.steps, result.examples, result.final_loss, result.seconds, result.cpu_seconds)
