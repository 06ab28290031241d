"""StepSaver's step predictor and its self-induced labels.

Records (``induce_labels``): every training prompt is drawn ``draws`` times, each image from its
own noise seed, and sampled at every count of the step grid; per image and count we keep the
classifier's verdict (does it read the asked digit) and its feature vector. One seed per image:
images of different prompts that share a seed share their noise, and a set of them is less
diverse than the images a deployment generates, which moves the set-level Fréchet distance (the
first labels shared 20 seeds across 50 prompts: their 100-step set scored 12.8 against 11.4 for
960 images with their own seeds).

Labels (``assign_steps``): the quality criterion is a property of a *set* of images (accuracy of
the asked digit, Fréchet distance to the real digits;
:func:`~dynexec_compile.stepsaver.quality.matches`), so the label of a prompt is the fewest steps
it can run with while the whole training set still matches the 100-step set. Every prompt starts
at the *safe static count* (the smallest single count whose training set matches); then, best
first, the prompt whose next lower count saves the most image-steps per unit of Fréchet distance
moves down, as long as the set keeps matching. A prompt whose images barely move the set's statistics at few steps
(a plain 0 at low guidance) gets 1-2 steps; one whose few-step images drift (a 7 or 8) keeps the
safe count.

Why not a per-image label (the fewest steps whose image stays within a tolerance of the same
seed's 100-step image, with a risk knob per prompt; the session-7 predictor): a per-image
tolerance does not translate into the set criterion. Calibrated so the training set matched,
it reached 4.85 mean steps on 960 new images, barely below the safe static count 5, where the
set-level assignment reaches 3.8-4.1 at the same quality (measured on a development set of new
seeds; ``benchmarks/RESULTS.md``).

Margin: the assignment is tuned on the training images, so it ends at the edge of the criterion
*for them*; new seeds move the Fréchet ratio by a few percent either way. ``margin`` (default
0.3) narrows the Fréchet tolerance the training set must keep to ``(1 - margin) x`` 10%. Measured
on a development set (960 new images, seeds the benchmark does not use): margin 0 gives 3.54 mean
steps at 1.062x the 100-step Fréchet distance (the limit is 1.10x), margin 0.3 gives 3.74 steps
at 1.044x; at margin 0.5 no prompt can move, because the safe count itself sits at 1.063x on the
training images.

Predictor (``StepPredictor``): the table of assigned counts, one per digit and trained guidance
scale. A guidance scale between two trained ones gets the larger of their two counts (guidance
moves the count up or down depending on the digit, so interpolating toward fewer steps would be
a guess no label supports; an MLP over the prompt that interpolated did exactly that and missed
the criterion on the held-out scales). Outside the trained range: the safe static count, with a
warning. It is a lookup by construction, and says so: ten digits times five scales is all the
prompt space there is.
"""

from __future__ import annotations

import bisect
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dynexec_compile.stepsaver.pipeline import NUM_DIGITS, DigitPrompt, DigitsPipeline, as_prompts
from dynexec_compile.stepsaver.quality import (
    FRECHET_TOL,
    DigitQuality,
    QualityReport,
    frechet_distance,
    matches,
)
from dynexec_compile.weights_io import read_with_config, save_tensors

STEP_GRID = (1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 50, 100)
TRAIN_GUIDANCE = (1.0, 1.5, 2.0, 3.0, 4.0)
MARGIN = 0.3
LABELS_KEY = "dynexec_stepsaver_labels"
PREDICTOR_KEY = "dynexec_step_predictor"
FORMAT_VERSION = 3


class OutOfDomainWarning(UserWarning):
    """A prompt lies outside what the step predictor was trained on; the safe static count is used."""


@dataclass
class StepLabels:
    """Self-induced records: per image (a prompt's draw) and per grid count (the last is the reference)."""

    digits: torch.Tensor  # [N]
    guidance: torch.Tensor  # [N]
    seeds: torch.Tensor  # [N] the image's noise seed (one per image)
    draws: torch.Tensor  # [N] which of its prompt's draws the image is (0, 1, ...)
    grid: tuple[int, ...]
    correct: torch.Tensor  # [N, G] bool: the classifier reads the asked digit
    features: torch.Tensor  # [N, G, F] classifier features (stored in fp16)
    set_accuracy: torch.Tensor  # [G] over all N images
    set_frechet: torch.Tensor  # [G]

    @classmethod
    def from_images(
        cls, prompts: Sequence[DigitPrompt], seeds: Sequence[int], draws: Sequence[int], images: dict[int, torch.Tensor],
        quality: DigitQuality,
    ) -> StepLabels:
        """Records of ``images``: ``{count: [N, 1, 8, 8]}``, one per grid count (the largest is the reference)."""
        grid = tuple(sorted(images))
        digits = torch.tensor([p.digit for p in prompts])
        correct = torch.stack([quality.classifier(images[n]).argmax(-1) == digits for n in grid], 1)
        # [N, G, F], rounded to fp16 as saved, so a record scores the same before and after a save
        features = torch.stack([quality.features(images[n]) for n in grid], 1).half().float()
        labels = cls(digits, torch.tensor([float(p.guidance) for p in prompts]), torch.tensor(list(seeds)), torch.tensor(list(draws)),
                     grid, correct, features, torch.zeros(0), torch.zeros(0))
        labels._score_sets(quality)
        return labels

    def _score_sets(self, quality: DigitQuality) -> None:
        n = len(self.digits)
        reports = [self.report(torch.full((n,), g), quality) for g in range(len(self.grid))]
        self.set_accuracy = torch.tensor([r.accuracy for r in reports])
        self.set_frechet = torch.tensor([r.frechet for r in reports])

    def reference(self) -> QualityReport:
        """The set quality of the reference count (the grid's last)."""
        return QualityReport(float(self.set_accuracy[-1]), float(self.set_frechet[-1]), len(self.digits))

    def report(self, columns: torch.Tensor, quality: DigitQuality) -> QualityReport:
        """Set quality when image ``i`` is taken at grid column ``columns[i]``: ``columns: [N]``."""
        rows = torch.arange(len(self.digits))
        feats = self.features[rows, columns].double().numpy()  # [N, F]
        accuracy = float(self.correct[rows, columns].float().mean())
        return QualityReport(accuracy, frechet_distance(feats, quality.real_features), len(self.digits))

    def prompts(self) -> list[DigitPrompt]:
        """The distinct prompts, in first-seen order."""
        return list(dict.fromkeys(DigitPrompt(int(d), float(g)) for d, g in zip(self.digits, self.guidance)))

    def safe_steps(self) -> int:
        """The smallest grid count whose set quality matches the largest count's (the reference)."""
        ref = self.reference()
        for g, n in enumerate(self.grid):
            if matches(QualityReport(float(self.set_accuracy[g]), float(self.set_frechet[g]), len(self.digits)), ref):
                return n
        return self.grid[-1]

    def subset(self, mask: torch.Tensor, quality: DigitQuality) -> StepLabels:
        """The records of the images where ``mask [N]`` is true, their set quality recomputed."""
        rows = {k: getattr(self, k)[mask] for k in _PER_IMAGE}
        sub = StepLabels(**rows, grid=self.grid, set_accuracy=torch.zeros(0), set_frechet=torch.zeros(0))
        sub._score_sets(quality)
        return sub

    def save(self, path: str | Path) -> None:
        tensors = {k: getattr(self, k) for k in (*_PER_IMAGE, "set_accuracy", "set_frechet")}
        tensors["features"] = tensors["features"].half()  # classifier features: fp16 is plenty for a Fréchet distance
        save_tensors(tensors, path, LABELS_KEY, {"format_version": FORMAT_VERSION, "grid": list(self.grid)})

    @classmethod
    def load(cls, path: str | Path) -> StepLabels:
        meta, tensors = read_with_config(path, LABELS_KEY, "StepSaver labels", FORMAT_VERSION)
        tensors["features"] = tensors["features"].float()
        return cls(**tensors, grid=tuple(meta["grid"]))


_PER_IMAGE = ("digits", "guidance", "seeds", "draws", "correct", "features")


@torch.no_grad()
def induce_labels(
    pipeline: DigitsPipeline, quality: DigitQuality, prompts: Sequence[DigitPrompt], draws: int, first_seed: int = 0,
    grid: Sequence[int] = STEP_GRID, batch_size: int = 500,
) -> StepLabels:
    """Sample every prompt ``draws`` times at every count of ``grid`` (its last count is the
    reference); image ``i`` (prompt-major) from noise seed ``first_seed + i``."""
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws is the number of images per prompt, an int >= 1; got {draws!r}")
    ps = [p for p in as_prompts(prompts) for _ in range(draws)]
    seeds = [first_seed + i for i in range(len(ps))]
    images = {n: pipeline.sample(ps, n, seeds, batch_size=batch_size) for n in tqdm(sorted(grid), desc="labels: steps")}
    return StepLabels.from_images(ps, seeds, [i % draws for i in range(len(ps))], images, quality)


def assign_steps(
    labels: StepLabels, quality: DigitQuality, margin: float = MARGIN, start: int | None = None,
) -> tuple[dict[DigitPrompt, int], QualityReport]:
    """The fewest grid steps per prompt that keep ``labels``' set matching its reference with the
    Fréchet tolerance narrowed by ``margin`` (see the module docstring). Every prompt starts at
    ``start`` (default: the safe static count); then, best first, one prompt at a time moves one
    grid count down: of the moves that keep the set matching, the one that saves the most
    image-steps per unit of Fréchet distance it adds, until no move keeps it. Returns
    ``({prompt: count}, the set's report)``."""
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0.0 <= margin < 1.0:
        raise ValueError(f"margin is the share of the Fréchet tolerance kept in reserve, in [0, 1); got {margin!r}")
    tol = FRECHET_TOL * (1.0 - margin)
    ref = labels.reference()
    keys = labels.prompts()
    index = {k: i for i, k in enumerate(keys)}
    owner = torch.tensor([index[DigitPrompt(int(d), float(g))] for d, g in zip(labels.digits, labels.guidance)])  # [N]
    start = labels.safe_steps() if start is None else start
    column = torch.full((len(keys),), labels.grid.index(start))  # [P]
    images = torch.bincount(owner, minlength=len(keys))  # [P]
    current = labels.report(column[owner], quality)
    while True:  # best first: the move that saves the most image-steps per unit of Fréchet distance
        best, best_score = None, -math.inf
        for k in range(len(keys)):
            if column[k] == 0:
                continue
            trial = column.clone()
            trial[k] -= 1
            rep = labels.report(trial[owner], quality)
            if not matches(rep, ref, frechet_tol=tol):
                continue
            saved = float((labels.grid[int(column[k])] - labels.grid[int(trial[k])]) * images[k])
            score = saved / max(rep.frechet - current.frechet, 1e-9)
            if score > best_score:
                best, best_score = (trial, rep), score
        if best is None:
            break
        column, current = best
    counts = {key: labels.grid[int(column[i])] for i, key in enumerate(keys)}
    return counts, current


class StepPredictor:
    """Prompt -> a grid step count: a table over digits and trained guidance scales (module
    docstring). ``predict(prompts)`` warns and falls back to ``safe_steps`` out of domain.

    Args:
        table: ``{DigitPrompt: count}`` for every digit at every scale of ``guidance``.
        safe_steps: the static count safe for the whole training set (the fallback).
    """

    def __init__(self, table: dict[DigitPrompt, int], safe_steps: int) -> None:
        scales = sorted({float(p.guidance) for p in table})
        missing = [DigitPrompt(d, g) for d in range(NUM_DIGITS) for g in scales if DigitPrompt(d, g) not in table]
        if not table or missing:
            raise ValueError(f"StepPredictor needs a count for every digit at every trained guidance scale; missing {missing[:5]}")
        self.table = {DigitPrompt(p.digit, float(p.guidance)): int(n) for p, n in table.items()}
        self.guidance = tuple(scales)
        self.safe_steps = int(safe_steps)

    @property
    def guidance_range(self) -> tuple[float, float]:
        return self.guidance[0], self.guidance[-1]

    def in_domain(self, prompt: DigitPrompt) -> bool:
        lo, hi = self.guidance_range
        return lo <= prompt.guidance <= hi

    def count(self, prompt: DigitPrompt) -> int:
        """A prompt's count: its table entry at a trained scale, the larger of its two neighbours
        between trained scales, ``safe_steps`` outside them."""
        if not self.in_domain(prompt):
            return self.safe_steps
        i = bisect.bisect_left(self.guidance, prompt.guidance)
        if math.isclose(self.guidance[i], prompt.guidance, abs_tol=1e-9):
            return self.table[DigitPrompt(prompt.digit, self.guidance[i])]
        return max(self.table[DigitPrompt(prompt.digit, self.guidance[i - 1])], self.table[DigitPrompt(prompt.digit, self.guidance[i])])

    def predict(self, prompts: Sequence[DigitPrompt | int]) -> list[int]:
        """One step count per prompt; prompts outside the trained guidance range get
        ``safe_steps`` with an :class:`OutOfDomainWarning` that names them."""
        prompts = as_prompts(prompts)
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
        return [self.count(p) for p in prompts]


def train_predictor(labels: StepLabels, quality: DigitQuality, margin: float = MARGIN) -> tuple[StepPredictor, QualityReport]:
    """The step predictor of ``labels``: :func:`assign_steps` over its prompts, the safe static
    count as the fallback. Returns the predictor and the training set's quality at its counts."""
    counts, report = assign_steps(labels, quality, margin)
    return StepPredictor(counts, labels.safe_steps()), report


def save_predictor(model: StepPredictor, path: str | Path) -> None:
    """safetensors: the table (digit, guidance, steps per row); the fallback count in the metadata."""
    rows = sorted(model.table.items(), key=lambda kv: (kv[0].digit, kv[0].guidance))
    tensors = {"digits": torch.tensor([p.digit for p, _ in rows]), "guidance": torch.tensor([p.guidance for p, _ in rows]),
               "steps": torch.tensor([n for _, n in rows])}
    save_tensors(tensors, path, PREDICTOR_KEY, {"format_version": FORMAT_VERSION, "safe_steps": model.safe_steps})


def load_predictor(path: str | Path) -> StepPredictor:
    meta, t = read_with_config(path, PREDICTOR_KEY, "step predictor", FORMAT_VERSION)
    table = {DigitPrompt(int(d), float(g)): int(n) for d, g, n in zip(t["digits"], t["guidance"], t["steps"])}
    return StepPredictor(table, meta["safe_steps"])
