"""StepSaver: run each prompt of a batch with its predicted number of denoising steps.

The Dynamic Execution paper's third technique: a small model reads the prompt and recommends
the fewest denoising steps that still give a good image. A batch of prompts is grouped by
predicted count; each group runs as one batch with one fixed count (a DDIM loop of that length
over the same UNet), and the images are put back in the prompts' order. Prompts the
predictor was not trained on get the static count that is safe for the whole training set, with
an :class:`~dynexec_compile.stepsaver.predictor.OutOfDomainWarning` saying so.

Compilation: the step count changes only how often the UNet runs, not its graph, so one
compiled UNet serves every count (``DigitsPipeline.compile()``); each new group *batch size* is a
new shape for Dynamo. Whether compiling pays for this tiny UNet on CPU is measured by
``dynexec bench stepsaver`` (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dynexec_compile.stepsaver.pipeline import DigitPrompt, DigitsPipeline, as_prompts
from dynexec_compile.stepsaver.predictor import StepPredictor


@dataclass
class StepSaverOutput:
    images: torch.Tensor  # [B, 1, 8, 8] in the prompts' order
    steps: list[int]  # the count each prompt ran with

    @property
    def mean_steps(self) -> float:
        return sum(self.steps) / max(len(self.steps), 1)


class StepSaver:
    """``StepSaver(pipeline, predictor)(prompts, seeds)`` -> :class:`StepSaverOutput`.

    Args:
        pipeline: a :class:`DigitsPipeline` (anything with ``sample(prompts, steps, seeds, batch_size)``).
        predictor: a :class:`StepPredictor` (anything with ``predict(prompts) -> list[int]``).
        batch_size: the most images one UNet batch holds (default: a whole group).
    """

    def __init__(self, pipeline: DigitsPipeline, predictor: StepPredictor, batch_size: int | None = None) -> None:
        if not callable(getattr(pipeline, "sample", None)):
            raise TypeError(f"StepSaver needs a pipeline with sample(prompts, steps, seeds), got {type(pipeline).__name__}")
        if not callable(getattr(predictor, "predict", None)):
            raise TypeError(f"StepSaver needs a predictor with predict(prompts) -> step counts, got {type(predictor).__name__}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.pipeline, self.predictor, self.batch_size = pipeline, predictor, batch_size

    def plan(self, prompts: Sequence[DigitPrompt | int]) -> dict[int, list[int]]:
        """Predicted count -> the indices of the prompts that run with it (ascending counts)."""
        steps = self.predictor.predict(as_prompts(prompts))
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(steps):
            groups.setdefault(int(n), []).append(i)
        return dict(sorted(groups.items()))

    def __call__(self, prompts: Sequence[DigitPrompt | int], seeds: Sequence[int]) -> StepSaverOutput:
        prompts = as_prompts(prompts)
        seeds = list(seeds)
        if len(seeds) != len(prompts):
            raise ValueError(f"one seed per prompt: got {len(prompts)} prompts and {len(seeds)} seeds")
        groups = self.plan(prompts)
        images: list[torch.Tensor | None] = [None] * len(prompts)
        steps = [0] * len(prompts)
        for n, idx in groups.items():
            out = self.pipeline.sample([prompts[i] for i in idx], n, [seeds[i] for i in idx], batch_size=self.batch_size)
            for j, i in enumerate(idx):
                images[i], steps[i] = out[j], n
        stacked = torch.stack(images) if images else torch.empty(0, 1, 8, 8)
        return StepSaverOutput(stacked, steps)
