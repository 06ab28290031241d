"""StepSaver for diffusion generators: a predicted number of denoising steps per prompt.

- :mod:`.pipeline`: the class-conditional digits pipeline (diffusers UNet2DModel, DDIM sampling
  at any step count), its prompts and the committed weights' folder;
- :mod:`.quality`: the digit classifier, accuracy of the asked digit, Fréchet distance;
- :mod:`.predictor`: self-induced labels and the step predictor;
- :mod:`.stepsaver`: ``StepSaver(pipeline, predictor)``, grouping prompts by predicted count.
"""

from pathlib import Path

from dynexec_compile.stepsaver.pipeline import DigitPrompt, DigitsPipeline
from dynexec_compile.stepsaver.predictor import (
    STEP_GRID,
    OutOfDomainWarning,
    StepLabels,
    StepPredictor,
    assign_steps,
    induce_labels,
    load_predictor,
    save_predictor,
    train_predictor,
)
from dynexec_compile.stepsaver.quality import (
    DigitQuality,
    QualityReport,
    frechet_distance,
    matches,
    real_digits,
)
from dynexec_compile.stepsaver.stepsaver import StepSaver, StepSaverOutput

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "stepsaver-digits"


def load_demo() -> tuple[DigitsPipeline, StepPredictor, DigitQuality]:
    """The committed digits pipeline, its step predictor and quality metric (models/stepsaver-digits)."""
    if not (MODEL_DIR / "predictor.safetensors").is_file():
        raise FileNotFoundError(f"no trained StepSaver demo at {MODEL_DIR}; train it with examples/train_stepsaver.py")
    return (
        DigitsPipeline.from_pretrained(MODEL_DIR),
        load_predictor(MODEL_DIR / "predictor.safetensors"),
        DigitQuality.from_file(MODEL_DIR / "classifier.safetensors"),
    )


__all__ = [
    "MODEL_DIR",
    "STEP_GRID",
    "DigitPrompt",
    "DigitQuality",
    "DigitsPipeline",
    "OutOfDomainWarning",
    "QualityReport",
    "StepLabels",
    "StepPredictor",
    "StepSaver",
    "StepSaverOutput",
    "frechet_distance",
    "assign_steps",
    "induce_labels",
    "load_demo",
    "load_predictor",
    "matches",
    "real_digits",
    "save_predictor",
    "train_predictor",
]
