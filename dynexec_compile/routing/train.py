"""Train a classifier router for your own pair of models, with no human preference labels.

RouteLLM trains its routers on human preference data between two hosted models; for a pair of
your own models the labels can be *self-induced*: run both models on unlabelled prompts, score
both answers with your quality metric (against a reference when you have one, else against the
strong model's answer), and label a prompt "needs the strong model" when the cheap answer scores
below the strong one by more than ``tolerance``. A small MLP learns those labels: over the
prompts' MiniLM embeddings (``router="classifier"``: decides before any model runs), or over
the cheap answer's own uncertainty features (``router="cascade"``: a learned deferral rule, run
after the cheap model). ``dynexec bench routing`` uses exactly this recipe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dynexec_compile.routing.candidates import Answers
from dynexec_compile.routing.router import Router, RouterClassifier
from dynexec_compile.training import Minibatches, optimize


@dataclass
class RouterLabels:
    """Per prompt: each model's quality and whether the cheap answer falls short (the label)."""

    q_cheap: torch.Tensor  # [N]
    q_strong: torch.Tensor  # [N]
    needs_strong: torch.Tensor  # [N] float 0/1
    cheap: Answers
    strong: Answers


def label_prompts(
    cheap: Callable[[Sequence[Any]], Answers],
    strong: Callable[[Sequence[Any]], Answers],
    prompts: Sequence[Any],
    metric: Callable[[Any, Any], float],
    references: Sequence[Any] | None = None,
    tolerance: float = 0.0,
) -> RouterLabels:
    """Run both models on ``prompts`` and label each: ``q_cheap < q_strong - tolerance``.

    ``references``: one per prompt for ``metric(output, reference)``; None: the strong model's
    answer is the reference (the cheap answer is good enough when it matches the strong one).
    """
    if references is not None and len(references) != len(prompts):
        raise ValueError(f"{len(references)} references for {len(prompts)} prompts; give one per prompt or None")
    a_cheap, a_strong = cheap(prompts), strong(prompts)
    refs = a_strong.outputs if references is None else list(references)
    q_cheap = torch.tensor([float(metric(o, r)) for o, r in zip(a_cheap.outputs, refs)], dtype=torch.float64)
    q_strong = torch.tensor([float(metric(o, r)) for o, r in zip(a_strong.outputs, refs)], dtype=torch.float64)
    needs = (q_cheap < q_strong - tolerance).double()
    return RouterLabels(q_cheap, q_strong, needs, a_cheap, a_strong)


def fit_router_classifier(
    x: torch.Tensor,
    y: torch.Tensor,
    hidden: int = 64,
    epochs: int = 60,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> RouterClassifier:
    """Train :class:`RouterClassifier` on embeddings ``x: [N, D]`` and labels ``y: [N]`` in [0, 1]
    (binary cross-entropy, positives re-weighted to balance the classes; :func:`~dynexec_compile.training.optimize`)."""
    if x.dim() != 2 or y.shape != (x.shape[0],) or x.shape[0] < 2:
        raise ValueError(f"x must be [N, D] and y [N] with N >= 2, got {tuple(x.shape)} and {tuple(y.shape)}")
    torch.manual_seed(seed)
    model = RouterClassifier(x.shape[1], hidden)
    model.mean.copy_(x.mean(0))
    model.std.copy_(x.std(0).clamp(min=1e-6))
    positives = float(y.sum())
    pos_weight = torch.tensor((len(y) - positives) / max(positives, 1.0))
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    x, y = x.float(), y.float()
    model.train()
    with torch.enable_grad():  # callers often run under no_grad (inference code around it)
        optimize(list(model.parameters()), Minibatches(len(y), batch_size, seed),
                 lambda idx: loss_fn(model.logits(x[idx]), y[idx]), epochs=epochs, lr=lr,
                 weight_decay=weight_decay, warmup=0.0, clip=None, progress=progress, desc="training the router")
    return model.eval()


def train_router(
    cheap: Callable[[Sequence[Any]], Answers],
    strong: Callable[[Sequence[Any]], Answers],
    prompts: Sequence[str],
    metric: Callable[[Any, Any], float],
    references: Sequence[Any] | None = None,
    *,
    router: str = "classifier",
    costs: Sequence[float] | None = None,
    embedder: Any = None,
    tolerance: float = 0.0,
    hidden: int = 64,
    epochs: int = 60,
    seed: int = 0,
    progress: bool = True,
) -> Router:
    """A :class:`Router` between ``cheap`` and ``strong`` trained on self-induced labels
    (:func:`label_prompts`). Calibrate it before use
    (``router.calibrate(held_out_data, quality=0.95, metric=metric)``).

    Args:
        cheap, strong: candidates (callables ``prompts -> Answers``).
        prompts: unlabelled training prompts (text: the embedder reads them).
        metric: ``metric(output, reference) -> float``, higher is better.
        references: one per prompt, or None to score against the strong model's answers.
        router: ``"classifier"`` (an MLP over the prompt's embedding; only one model runs per
            prompt) or ``"cascade"`` (a learned deferral rule over the cheap answer's
            ``Answers.features``: ``Router(..., confidence="learned")``).
        embedder: ``texts -> [N, D]``; None: MiniLM-L6 mean-pooled (``SentenceEmbedder``).
            Unused by ``router="cascade"``.
    """
    from dynexec_compile.routing.embed import SentenceEmbedder

    if router not in ("classifier", "cascade"):
        raise ValueError(f"train_router trains router='classifier' or router='cascade' (a learned deferral rule), got {router!r}")
    labels = label_prompts(cheap, strong, prompts, metric, references, tolerance)
    if not 0 < float(labels.needs_strong.sum()) < len(prompts):
        raise ValueError(
            f"every one of the {len(prompts)} training prompts got the same label "
            f"(needs the strong model: {bool(labels.needs_strong[0])}); nothing to learn: give more varied prompts "
            "or change tolerance"
        )
    if router == "cascade":
        if labels.cheap.features is None:
            raise ValueError("a learned cascade reads the cheap candidate's Answers.features; its answers have none")
        clf = fit_router_classifier(labels.cheap.features.float(), labels.needs_strong, hidden=hidden, epochs=epochs, seed=seed, progress=progress)
        return Router([cheap, strong], costs, "cascade", confidence="learned", classifier=clf, seed=seed)
    embedder = embedder or SentenceEmbedder()
    x = embedder(list(prompts), progress=progress) if isinstance(embedder, SentenceEmbedder) else embedder(list(prompts))
    classifier = fit_router_classifier(x, labels.needs_strong, hidden=hidden, epochs=epochs, seed=seed, progress=progress)
    return Router([cheap, strong], costs, "classifier", classifier=classifier, embedder=embedder, seed=seed)
