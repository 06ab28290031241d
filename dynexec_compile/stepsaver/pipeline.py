"""A class-conditional diffusion pipeline over 8x8 handwritten digits, built from diffusers parts.

Why this pipeline: StepSaver needs an iterative generator whose cost is the number of
denoising steps, and no pretrained diffusion model can be had offline. scikit-learn ships the
8x8 digits set, so a small diffusers ``UNet2DModel`` (class-conditional through its
``num_class_embeds`` embedding; the last class is the "no digit" class for classifier-free
guidance) is trained here with diffusers' ``DDPMScheduler`` (``examples/train_stepsaver.py``),
and sampled with diffusers' ``DDIMScheduler`` (eta 0, deterministic, "trailing" timesteps so
even 2 steps start from pure noise) at any step count.

The UNet predicts v (``prediction_type="v_prediction"``), not the noise. Why, measured on a first
epsilon-prediction model trained the same way: with the cosine schedule, ᾱ at t=999 is ~0, so the
epsilon model's x0 estimate ``(x - sqrt(1-ᾱ) eps) / sqrt(ᾱ)`` explodes (Fréchet distances of 1e9)
unless DDIM clips it, and clipping x0 while stepping with the guided eps made images *worse* with
more steps (guidance 2: 100% of digits recognized at 10 steps, 33% at 100). v-prediction gives
x0 = sqrt(ᾱ) x - sqrt(1-ᾱ) v without a division, so no clipping is needed.

A prompt is a :class:`DigitPrompt`: the digit and the classifier-free guidance scale. The
guidance scale is part of the prompt because it is what makes the step count a property of the
prompt rather than of the digit alone: stronger guidance bends the sampling trajectory and needs
more DDIM steps to stay close to the many-step image.

Images are tensors ``[B, 1, 8, 8]`` in [-1, 1] (digits' 0..16 ink scaled by ``x / 8 - 1``).
Every image's start noise comes from its own seed (``torch.Generator().manual_seed(seed)``), so
an image does not depend on which other prompts share its batch (up to fp32 rounding of
batched convolutions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

IMAGE_SIZE = 8
NUM_DIGITS = 10
NUM_TRAIN_TIMESTEPS = 1000
SCHEDULE = {"num_train_timesteps": NUM_TRAIN_TIMESTEPS, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}


@dataclass(frozen=True)
class DigitPrompt:
    """What to draw: ``digit`` (0-9) with classifier-free ``guidance`` (1.0: the conditional
    model alone; larger: further from the unconditional prediction)."""

    digit: int
    guidance: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.digit, bool) or not isinstance(self.digit, int) or not 0 <= self.digit < NUM_DIGITS:
            raise ValueError(f"DigitPrompt.digit must be an int in 0..{NUM_DIGITS - 1}, got {self.digit!r}")
        if isinstance(self.guidance, bool) or not isinstance(self.guidance, (int, float)) or not math.isfinite(self.guidance) or self.guidance < 0:
            raise ValueError(f"DigitPrompt.guidance must be a finite number >= 0, got {self.guidance!r}")


def as_prompts(prompts: Sequence[DigitPrompt | int]) -> list[DigitPrompt]:
    """``prompts`` as DigitPrompts (a bare int is that digit at guidance 1.0)."""
    if isinstance(prompts, (str, bytes, DigitPrompt, int)) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of DigitPrompt (or digit ints), got {type(prompts).__name__}")
    return [p if isinstance(p, DigitPrompt) else DigitPrompt(p) for p in prompts]


def build_unet(block_out_channels: Sequence[int] = (32, 64), layers_per_block: int = 1) -> UNet2DModel:
    """The digits UNet: 8x8 -> 4x4 and back, ResNet blocks only (attention at 4x4 bought nothing
    measurable and costs 10%), one class embedding per digit plus the null class."""
    n = len(block_out_channels)
    return UNet2DModel(
        sample_size=IMAGE_SIZE,
        in_channels=1,
        out_channels=1,
        layers_per_block=layers_per_block,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("DownBlock2D",) * n,
        up_block_types=("UpBlock2D",) * n,
        norm_num_groups=8,
        num_class_embeds=NUM_DIGITS + 1,
    )


def training_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULE)


class DigitsPipeline:
    """``sample(prompts, steps, seeds)``: DDIM at ``steps`` steps, batched, with guidance per row.

    Args:
        unet: a ``UNet2DModel`` over ``[B, 1, 8, 8]`` with ``num_class_embeds == 11``.
        scheduler: the ``DDIMScheduler`` (its config is copied for every call, so calls with
            different step counts never share timestep state).
    """

    def __init__(self, unet: UNet2DModel, scheduler: DDIMScheduler | None = None) -> None:
        if unet.config.num_class_embeds != NUM_DIGITS + 1:
            raise ValueError(f"the digits UNet needs num_class_embeds={NUM_DIGITS + 1} (10 digits + the null class), got {unet.config.num_class_embeds}")
        self.unet = unet.eval()
        self.scheduler = scheduler or DDIMScheduler(**SCHEDULE, timestep_spacing="trailing", clip_sample=False)
        self.denoiser = self.unet  # what each step calls; ``compile()`` swaps in the compiled UNet

    @property
    def null_class(self) -> int:
        return NUM_DIGITS

    def compile(self, **kwargs) -> DigitsPipeline:
        """Run the UNet through ``torch.compile(unet, **kwargs)`` (one graph per batch shape)."""
        self.denoiser = torch.compile(self.unet, **kwargs)
        return self

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> DigitsPipeline:
        """The pipeline saved by :meth:`save_pretrained` (diffusers' own ``unet/`` and ``scheduler/`` folders)."""
        folder = Path(folder)
        if not (folder / "unet" / "config.json").is_file():
            raise FileNotFoundError(f"no digits pipeline at {folder} (expected unet/config.json; train one with examples/train_stepsaver.py)")
        unet = UNet2DModel.from_pretrained(folder / "unet", use_safetensors=True)
        return cls(unet, DDIMScheduler.from_pretrained(folder / "scheduler"))

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.unet.save_pretrained(folder / "unet", safe_serialization=True)
        self.scheduler.save_pretrained(folder / "scheduler")

    def noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """Start noise ``[B, 1, 8, 8]``, one generator per seed."""
        return torch.stack([torch.randn((1, IMAGE_SIZE, IMAGE_SIZE), generator=torch.Generator().manual_seed(int(s))) for s in seeds])

    @torch.no_grad()
    def sample(self, prompts: Sequence[DigitPrompt | int], steps: int, seeds: Sequence[int], batch_size: int | None = None) -> torch.Tensor:
        """Images ``[B, 1, 8, 8]`` in [-1, 1]: ``steps`` DDIM steps (eta 0) with classifier-free guidance.

        Raises:
            ValueError: ``steps`` not an int in 1..1000, or as many seeds as prompts not given.
        """
        prompts = as_prompts(prompts)
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"steps must be an int in 1..{NUM_TRAIN_TIMESTEPS} (the training schedule's length), got {steps!r}")
        seeds = list(seeds)
        if len(seeds) != len(prompts):
            raise ValueError(f"one seed per prompt: got {len(prompts)} prompts and {len(seeds)} seeds")
        if not prompts:
            return torch.empty(0, 1, IMAGE_SIZE, IMAGE_SIZE)
        batch_size = batch_size or len(prompts)
        return torch.cat([
            self._sample_batch(prompts[i : i + batch_size], steps, seeds[i : i + batch_size])
            for i in range(0, len(prompts), batch_size)
        ])

    def _sample_batch(self, prompts: list[DigitPrompt], steps: int, seeds: list[int]) -> torch.Tensor:
        scheduler = DDIMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(steps)
        device = next(self.unet.parameters()).device
        x = self.noise(seeds).to(device)  # x: [B, 1, 8, 8]
        b = len(prompts)
        digits = torch.tensor([p.digit for p in prompts], device=device)
        labels = torch.cat([digits, torch.full_like(digits, self.null_class)])  # [2B]: conditional, then unconditional
        w = torch.tensor([float(p.guidance) for p in prompts], device=device).view(b, 1, 1, 1)
        for t in scheduler.timesteps:
            v = self.denoiser(torch.cat([x, x]), t, class_labels=labels).sample  # v: [2B, 1, 8, 8]
            v_c, v_u = v[:b], v[b:]
            x = scheduler.step(v_u + w * (v_c - v_u), t, x).prev_sample
        return x.cpu()
