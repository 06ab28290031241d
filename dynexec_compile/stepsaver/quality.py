"""Image quality, measured the same way everywhere: a digit classifier trained on real images.

Two numbers per set of generated images (the issue's quality metric):
- **accuracy**: the fraction the classifier reads as the asked digit;
- **Fréchet distance** (FID-style): between Gaussians fitted to the classifier's penultimate
  features of the generated images and of the real images (all 1,797 of the digits set; the
  benchmark's prompts cover the ten digits equally, as the real set does). Inception features
  mean nothing on 8x8 digits; a CNN trained on these digits is the honest stand-in.

And two numbers per image, for StepSaver's self-induced labels: the classifier's probability
of the asked digit and the feature vector (compared with the same seed's 100-step image).

The classifier trains in seconds on 80% of the real images (a fixed split); its accuracy on
the other 20% is recorded with it, so a reader can tell how far its verdicts carry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dynexec_compile.weights_io import read_with_config, save_with_config

CLASSIFIER_KEY = "dynexec_digit_classifier"
FORMAT_VERSION = 1
FEATURES = 64


def real_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits: ``(images [1797, 1, 8, 8] in [-1, 1], digits [1797])``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    return images, torch.tensor(data.target, dtype=torch.long)


def classifier_split(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train indices, held-out indices)``: a fixed 80/20 permutation of ``n`` images."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * n)
    return order[:cut], order[cut:]


class DigitClassifier(nn.Module):
    """Two 3x3 convolutions, a 2x2 pool, a 64-wide feature layer (the Fréchet features), logits."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64 * 4 * 4, FEATURES), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURES, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)  # [B, 64]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))  # [B, 10]


def train_classifier(images: torch.Tensor, digits: torch.Tensor, epochs: int = 30, seed: int = 0) -> DigitClassifier:
    """Adam on ``images [N, 1, 8, 8]``, batches of 64, with ±1 pixel shifts (the only augmentation
    that keeps a digit a digit)."""
    torch.manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=g)
        for i in range(0, len(images), 64):
            idx = order[i : i + 64]
            dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
            x = torch.roll(images[idx], shifts=(dy, dx), dims=(2, 3))
            loss = nn.functional.cross_entropy(model(x), digits[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def save_classifier(model: DigitClassifier, path: str | Path, heldout_accuracy: float) -> None:
    save_with_config(model, path, CLASSIFIER_KEY, {"format_version": FORMAT_VERSION, "heldout_accuracy": heldout_accuracy})


def load_classifier(path: str | Path) -> tuple[DigitClassifier, float]:
    """``(classifier in eval mode, its held-out accuracy on real images)``."""
    config, tensors = read_with_config(path, CLASSIFIER_KEY, "digit classifier", FORMAT_VERSION)
    model = DigitClassifier()
    model.load_state_dict(tensors)
    return model.eval(), float(config["heldout_accuracy"])


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a [N, D]`` and ``b [M, D]``."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(root).all():  # near-singular product: regularize as the FID reference code does
        eps = np.eye(len(cov_a)) * 1e-6
        root = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))


@dataclass(frozen=True)
class QualityReport:
    accuracy: float  # fraction classified as the asked digit
    frechet: float  # Fréchet distance to the real digits' features
    n: int


class DigitQuality:
    """The quality metric: ``report(images, digits)``, ``probability`` and ``features`` per image."""

    def __init__(self, classifier: DigitClassifier, heldout_accuracy: float | None = None) -> None:
        self.classifier = classifier.eval()
        self.heldout_accuracy = heldout_accuracy
        real, _ = real_digits()
        self.real_features = self.features(real).numpy()

    @classmethod
    def from_file(cls, path: str | Path) -> DigitQuality:
        return cls(*load_classifier(path))

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images)  # [B, 64]

    @torch.no_grad()
    def probability(self, images: torch.Tensor, digits: torch.Tensor) -> torch.Tensor:
        """The classifier's probability of the asked digit, per image: ``[B]``."""
        probs = self.classifier(images).softmax(-1)
        return probs.gather(1, digits.view(-1, 1)).squeeze(1)

    @torch.no_grad()
    def report(self, images: torch.Tensor, digits: torch.Tensor) -> QualityReport:
        if len(images) != len(digits):
            raise ValueError(f"one asked digit per image: got {len(images)} images and {len(digits)} digits")
        if len(images) < 2:
            raise ValueError("the Fréchet distance needs at least 2 images")
        accuracy = (self.classifier(images).argmax(-1) == digits).float().mean().item()
        return QualityReport(accuracy, frechet_distance(self.features(images).numpy(), self.real_features), len(images))


# The one definition of "the same quality as the reference" used by the labels, the safe static
# count and the benchmark: at most 1 point of accuracy lost and a Fréchet distance at most 10%
# above the reference's.
ACCURACY_TOL = 0.01
FRECHET_TOL = 0.10


def matches(report: QualityReport, reference: QualityReport, accuracy_tol: float = ACCURACY_TOL, frechet_tol: float = FRECHET_TOL) -> bool:
    """Whether ``report`` keeps ``reference``'s quality within the tolerances."""
    return report.accuracy >= reference.accuracy - accuracy_tol and report.frechet <= reference.frechet * (1 + frechet_tol)
