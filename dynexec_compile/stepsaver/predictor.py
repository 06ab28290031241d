"""StepSaver's step predictor and its self-induced labels.

Labels (``induce_labels``): every training prompt, with every seed, is sampled at every count
of the step grid; the per-image quality is the classifier's probability of the asked digit and
the classifier-feature vector. An image at ``n`` steps is *good* when its probability is at
most ``prob_tol`` below the same seed's 100-step image and its features lie within
``feature_tol`` of that image's (``feature_tol`` is a fraction of the median feature distance
between two real images of the same digit, so it reads as "much closer to its own 100-step
image than to another drawing of the digit"). The label of a (prompt, seed) is the fewest
steps from which every larger count of the grid is good ("stays within tolerance").

The same run measures set-level quality at every count (accuracy, Fréchet distance over all
training images); the smallest count that :func:`~dynexec_compile.stepsaver.quality.matches`
the 100-step set is the *safe static count*: the honest single-count baseline and the fallback
for prompts the predictor was not trained on.

Predictor (``StepPredictor``): a two-layer MLP over the prompt embedding — the trained UNet's own
class embedding of the digit (standardized) and the guidance scale — fitted with the pinball
loss to the ``quantile`` (default 0.9) of log2 of the labels, so for 90% of seeds the predicted
count is enough; the output is rounded up to the grid so batches group into few counts. Why an
MLP and not a table: a prompt is a digit *and* a continuous guidance scale, and the model has to
answer for guidance scales it never saw between the trained ones. The digit part alone has
only ten values; over those it is a table in disguise, and we say so.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from dynexec_compile.stepsaver.pipeline import NUM_DIGITS, DigitPrompt, DigitsPipeline, as_prompts
from dynexec_compile.stepsaver.quality import DigitQuality, QualityReport, matches, real_digits
from dynexec_compile.weights_io import read_with_config, save_with_config

STEP_GRID = (2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 50, 100)
TRAIN_GUIDANCE = (1.0, 1.5, 2.0, 3.0, 4.0)
PROB_TOL = 0.05
FEATURE_TOL = 0.25
LABELS_KEY = "dynexec_stepsaver_labels"
PREDICTOR_KEY = "dynexec_step_predictor"
FORMAT_VERSION = 1


class OutOfDomainWarning(UserWarning):
    """A prompt lies outside what the step predictor was trained on; the safe static count is used."""


@dataclass
class StepLabels:
    """Self-induced labels: per (prompt, seed) image and per grid count."""

    digits: torch.Tensor  # [N]
    guidance: torch.Tensor  # [N]
    seeds: torch.Tensor  # [N]
    grid: tuple[int, ...]
    prob: torch.Tensor  # [N, G] classifier probability of the asked digit
    distance: torch.Tensor  # [N, G] feature distance to the same seed's reference image
    needed: torch.Tensor  # [N] the label: fewest grid steps that stay within tolerance
    set_accuracy: torch.Tensor  # [G] over all N images
    set_frechet: torch.Tensor  # [G]
    feature_scale: float  # median same-digit real feature distance
    prob_tol: float
    feature_tol: float

    def safe_steps(self) -> int:
        """The smallest grid count whose set quality matches the largest count's (the reference)."""
        ref = QualityReport(float(self.set_accuracy[-1]), float(self.set_frechet[-1]), len(self.digits))
        for g, n in enumerate(self.grid):
            if matches(QualityReport(float(self.set_accuracy[g]), float(self.set_frechet[g]), len(self.digits)), ref):
                return n
        return self.grid[-1]

    def save(self, path: str | Path) -> None:
        tensors = {k: getattr(self, k).contiguous() for k in ("digits", "guidance", "seeds", "prob", "distance", "needed", "set_accuracy", "set_frechet")}
        meta = {"format_version": FORMAT_VERSION, "grid": list(self.grid), "feature_scale": self.feature_scale, "prob_tol": self.prob_tol, "feature_tol": self.feature_tol}
        save_file(tensors, str(path), metadata={LABELS_KEY: json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> StepLabels:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(LABELS_KEY, "null") or "null")
            if meta is None:
                raise ValueError(f"{path} is not a dynexec StepSaver labels file (no {LABELS_KEY!r} metadata)")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        return cls(**tensors, grid=tuple(meta["grid"]), feature_scale=meta["feature_scale"], prob_tol=meta["prob_tol"], feature_tol=meta["feature_tol"])


def same_digit_feature_scale(quality: DigitQuality) -> float:
    """Median feature distance between two real images of the same digit."""
    images, digits = real_digits()
    feats = quality.features(images)
    medians = []
    for d in range(NUM_DIGITS):
        f = feats[digits == d]
        dist = torch.cdist(f, f)
        medians.append(dist[~torch.eye(len(f), dtype=torch.bool)].median())
    return float(torch.stack(medians).median())


def needed_steps(prob: torch.Tensor, distance: torch.Tensor, grid: Sequence[int], prob_tol: float, max_distance: float) -> torch.Tensor:
    """Per row, the fewest grid steps from which every larger count is good: ``[N]``.

    prob, distance: ``[N, G]``, the last column being the reference count.
    """
    good = (prob >= prob[:, -1:] - prob_tol) & (distance <= max_distance)  # [N, G]
    # stays good from column g on: reverse cumulative AND
    stays = torch.flip(torch.cumprod(torch.flip(good.int(), [1]), 1), [1]).bool()
    first = stays.int().argmax(1)  # the reference column is always good, so some column is
    return torch.tensor(grid)[first]


@torch.no_grad()
def induce_labels(
    pipeline: DigitsPipeline, quality: DigitQuality, prompts: Sequence[DigitPrompt], seeds: Sequence[int],
    grid: Sequence[int] = STEP_GRID, prob_tol: float = PROB_TOL, feature_tol: float = FEATURE_TOL,
    batch_size: int = 500,
) -> StepLabels:
    """Sample every (prompt, seed) at every count of ``grid`` (its last count is the reference)."""
    grid = tuple(sorted(grid))
    rows = [(p, s) for p in as_prompts(prompts) for s in seeds]
    ps, ss = [p for p, _ in rows], [s for _, s in rows]
    digits = torch.tensor([p.digit for p in ps])
    probs, feats, reports = [], [], []
    for n in tqdm(grid, desc="labels: steps"):
        images = pipeline.sample(ps, n, ss, batch_size=batch_size)
        probs.append(quality.probability(images, digits))
        feats.append(quality.features(images))
        reports.append(quality.report(images, digits))
    prob = torch.stack(probs, 1)  # [N, G]
    distance = torch.stack([(f - feats[-1]).norm(dim=1) for f in feats], 1)  # [N, G]
    scale = same_digit_feature_scale(quality)
    return StepLabels(
        digits=digits, guidance=torch.tensor([p.guidance for p in ps]), seeds=torch.tensor(ss), grid=grid,
        prob=prob, distance=distance, needed=needed_steps(prob, distance, grid, prob_tol, feature_tol * scale),
        set_accuracy=torch.tensor([r.accuracy for r in reports]), set_frechet=torch.tensor([r.frechet for r in reports]),
        feature_scale=scale, prob_tol=prob_tol, feature_tol=feature_tol,
    )


class StepPredictor(nn.Module):
    """Prompt -> a grid step count. ``predict(prompts)`` warns and falls back out of domain.

    Args:
        embedding: ``[10, E]`` the digits' prompt embeddings (standardized inside).
        grid: the step counts it answers with.
        guidance_range: the guidance scales it was trained over (inclusive).
        safe_steps: the static count safe for the whole training set (the fallback).
    """

    def __init__(self, embedding: torch.Tensor, grid: Sequence[int], guidance_range: tuple[float, float], safe_steps: int, hidden: int = 32, quantile: float = 0.9) -> None:
        super().__init__()
        mean, std = embedding.mean(0, keepdim=True), embedding.std(0, keepdim=True) + 1e-6
        self.register_buffer("embedding", (embedding - mean) / std)  # [10, E]
        self.grid = tuple(int(n) for n in grid)
        self.guidance_range = (float(guidance_range[0]), float(guidance_range[1]))
        self.safe_steps = int(safe_steps)
        self.hidden, self.quantile = hidden, quantile
        self.mlp = nn.Sequential(nn.Linear(embedding.shape[1] + 1, hidden), nn.GELU(), nn.Linear(hidden, 1))

    @classmethod
    def from_unet(cls, pipeline: DigitsPipeline, **kwargs) -> StepPredictor:
        """A predictor over ``pipeline``'s own class embeddings of the ten digits."""
        return cls(pipeline.unet.class_embedding.weight[:NUM_DIGITS].detach().clone(), **kwargs)

    def forward(self, digits: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """log2 of the step count: ``[B]``."""
        lo, hi = self.guidance_range
        g = (guidance.float() - (lo + hi) / 2) / max((hi - lo) / 2, 1e-6)  # [-1, 1] over the trained range
        return self.mlp(torch.cat([self.embedding[digits], g.unsqueeze(1)], 1)).squeeze(1)

    def in_domain(self, prompt: DigitPrompt) -> bool:
        lo, hi = self.guidance_range
        return lo <= prompt.guidance <= hi

    def to_grid(self, log2_steps: torch.Tensor) -> list[int]:
        """The smallest grid count at least ``2 ** log2_steps`` (the largest if none is)."""
        grid = torch.tensor(self.grid, dtype=torch.float32)
        need = torch.exp2(log2_steps).unsqueeze(1)  # [B, 1]
        idx = (grid.unsqueeze(0) < need - 1e-4).sum(1).clamp(max=len(self.grid) - 1)
        return [self.grid[i] for i in idx.tolist()]

    @torch.no_grad()
    def predict(self, prompts: Sequence[DigitPrompt | int]) -> list[int]:
        """One step count per prompt; prompts outside the training domain get ``safe_steps``
        with an :class:`OutOfDomainWarning` that names them."""
        prompts = as_prompts(prompts)
        if not prompts:
            return []
        out = self.to_grid(self(torch.tensor([p.digit for p in prompts]), torch.tensor([p.guidance for p in prompts])))
        outside = [i for i, p in enumerate(prompts) if not self.in_domain(p)]
        if outside:
            lo, hi = self.guidance_range
            shown = ", ".join(f"#{i} {prompts[i]}" for i in outside[:5]) + (" ..." if len(outside) > 5 else "")
            warnings.warn(
                f"StepSaver: {len(outside)} prompt(s) outside the step predictor's training set "
                f"(guidance scales {lo:g}..{hi:g}): {shown}; using the static count that is safe for "
                f"the whole training set, {self.safe_steps} steps",
                OutOfDomainWarning, stacklevel=2,
            )
            for i in outside:
                out[i] = self.safe_steps
        return out

    def config(self) -> dict:
        return {"format_version": FORMAT_VERSION, "grid": list(self.grid), "guidance_range": list(self.guidance_range),
                "safe_steps": self.safe_steps, "hidden": self.hidden, "quantile": self.quantile, "embedding_dim": int(self.embedding.shape[1])}


def pinball(pred: torch.Tensor, target: torch.Tensor, q: float) -> torch.Tensor:
    diff = target - pred
    return torch.maximum(q * diff, (q - 1) * diff).mean()


def train_predictor(pipeline: DigitsPipeline, labels: StepLabels, quantile: float = 0.9, iters: int = 3000, seed: int = 0) -> StepPredictor:
    """Fit the MLP to the ``quantile`` of log2(labels) with the pinball loss (full batch, Adam)."""
    torch.manual_seed(seed)
    g = labels.guidance.float()
    model = StepPredictor.from_unet(pipeline, grid=labels.grid, guidance_range=(float(g.min()), float(g.max())), safe_steps=labels.safe_steps(), quantile=quantile)
    opt = torch.optim.Adam(model.mlp.parameters(), lr=3e-3, weight_decay=1e-4)
    target = torch.log2(labels.needed.float())
    for _ in range(iters):
        loss = pinball(model(labels.digits, g), target, quantile)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def save_predictor(model: StepPredictor, path: str | Path) -> None:
    save_with_config(model, path, PREDICTOR_KEY, model.config())


def load_predictor(path: str | Path) -> StepPredictor:
    config, tensors = read_with_config(path, PREDICTOR_KEY, "step predictor", FORMAT_VERSION)
    model = StepPredictor(torch.zeros(NUM_DIGITS, config["embedding_dim"]), config["grid"], tuple(config["guidance_range"]), config["safe_steps"], config["hidden"], config["quantile"])
    model.load_state_dict(tensors)  # the stored embedding is already standardized
    return model.eval()

