"""Trained exit heads: training on a frozen backbone, safetensors round trip, attaching."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from dynexec_compile.exit_heads import (
    ExitHeads,
    LastTokenExitHead,
    MeanPoolExitHead,
    PoolerExitHead,
    attach_exit_heads,
    default_head_kind,
    detach_exit_heads,
    evaluate_exit_heads,
    find_exit_heads,
    get_exit_heads,
    load_exit_heads,
    save_exit_heads,
    train_exit_heads,
)
from tests.hf_models import classifier

FAMILIES = ("bert", "roberta", "albert", "distilbert", "llama")
SEQ = 8


def separable_batches(
    num_batches: int = 4, batch: int = 16, seed: int = 0, labels: bool = True
) -> list[dict]:
    """Class 0 sentences use tokens [4, 12), class 1 tokens [12, 20); the last 2 tokens of
    every other row are padding. Any token's hidden state tells the class apart."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_batches):
        y = torch.randint(0, 2, (batch,), generator=g)  # [B]
        low = torch.randint(4, 12, (batch, SEQ), generator=g)
        high = torch.randint(12, 20, (batch, SEQ), generator=g)
        ids = torch.where(y[:, None].bool(), high, low)  # [B, S]
        mask = torch.ones(batch, SEQ, dtype=torch.long)
        mask[::2, -2:] = 0
        ids = ids.masked_fill(mask == 0, 0)
        out.append({"input_ids": ids, "attention_mask": mask, **({"labels": y} if labels else {})})
    return out


@torch.no_grad()
def mean_exit_ce(model, heads: ExitHeads, batches: list[dict]) -> float:
    losses = []
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out = model(**inputs, output_hidden_states=True)
        for logits in heads.all_exit_logits(out.hidden_states, inputs["attention_mask"]).values():
            losses.append(F.cross_entropy(logits, batch["labels"]))
    return torch.stack(losses).mean().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_training_reduces_loss_and_leaves_backbone_unchanged(family):
    model = classifier(family)
    model.train()  # training flag must be restored, not left in eval
    before_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    batches = separable_batches()
    untrained = ExitHeads([0, 1], model.config.hidden_size, 2, default_head_kind(model)).eval()
    model.eval()
    loss_before = mean_exit_ce(model, untrained, batches)
    model.train()

    heads = train_exit_heads(model, batches, epochs=10, lr=1e-2, progress=False)

    assert model.training
    assert heads.layers == (0, 1) and not heads.training
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before_state[name]), f"{name} changed"
    model.eval()
    loss_after = mean_exit_ce(model, heads, batches)
    assert loss_after < 0.5 * loss_before, (loss_before, loss_after)
    accuracy = evaluate_exit_heads(model, heads, batches, progress=False)
    assert set(accuracy) == {0, 1, 2}  # block 2 = the model's own head
    assert accuracy[0] > 0.9 and accuracy[1] > 0.9


def test_head_kind_follows_the_model():
    assert default_head_kind(classifier("bert")) == "cls_tanh"
    assert default_head_kind(classifier("distilbert")) == "cls_tanh"
    assert default_head_kind(classifier("llama")) == "last_token_rmsnorm"
    heads = train_exit_heads(classifier("llama"), separable_batches(1), layers=[1], progress=False)
    assert isinstance(heads["1"], LastTokenExitHead)


def test_distillation_moves_exits_towards_the_final_prediction():
    model = classifier("bert")
    batches = separable_batches(labels=False)

    @torch.no_grad()
    def kl(heads):
        total = 0.0
        for batch in batches:
            out = model(**batch, output_hidden_states=True)
            teacher = F.softmax(out.logits, -1)
            for logits in heads.all_exit_logits(
                out.hidden_states, batch["attention_mask"]
            ).values():
                total += F.kl_div(F.log_softmax(logits, -1), teacher, reduction="batchmean").item()
        return total

    torch.manual_seed(0)
    fresh = ExitHeads([0, 1], 32, 2).eval()
    torch.manual_seed(0)
    trained = train_exit_heads(model, batches, epochs=10, lr=3e-3, loss="distill", progress=False)
    assert kl(trained) < 0.5 * kl(fresh)


def test_training_rejects_bad_arguments():
    model = classifier("bert")
    with pytest.raises(ValueError, match="valid exit layers are 0..1"):
        train_exit_heads(model, separable_batches(1), layers=[2], progress=False)
    with pytest.raises(ValueError, match="needs 'labels'"):
        train_exit_heads(model, separable_batches(1, labels=False), loss="ce", progress=False)
    with pytest.raises(ValueError, match="loss must be"):
        train_exit_heads(model, separable_batches(1), loss="mse", progress=False)
    with pytest.raises(ValueError, match="given heads exit at"):
        train_exit_heads(
            model, separable_batches(1), [0], heads=ExitHeads([0, 1], 32, 2), progress=False
        )
    with pytest.raises(TypeError, match="dicts of tensors"):
        train_exit_heads(model, [(torch.zeros(1, 4, dtype=torch.long),)], progress=False)


def test_last_token_pooling_finds_the_last_real_token_with_either_padding():
    head = LastTokenExitHead(4, 2).eval()
    h = torch.arange(2 * 5 * 4, dtype=torch.float32).reshape(2, 5, 4)  # [B, S, D]
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    assert torch.equal(head.pool(h, right), torch.stack([h[0, 2], h[1, 4]]))
    assert torch.equal(head.pool(h, left), h[:, 4])
    assert torch.equal(head.pool(h, None), h[:, -1])
    assert torch.equal(PoolerExitHead(4, 2).pool(h, right), h[:, 0])


def test_mean_pooling_ignores_padding():
    head = MeanPoolExitHead(4, 2).eval()
    h = torch.randn(2, 5, 4)  # [B, S, D]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    pooled = head.pool(h, mask)
    torch.testing.assert_close(pooled[0], h[0, :3].mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled[1], h[1].mean(0), rtol=0, atol=1e-6)
    garbage = h.clone()
    garbage[0, 3:] = 1e4
    assert torch.equal(head(garbage, mask)[0], head(h, mask)[0])


@pytest.mark.parametrize("kind", ["cls_tanh", "mean_tanh", "last_token_rmsnorm"])
def test_save_load_round_trip_is_exact(tmp_path, kind):
    heads = ExitHeads([0, 2, 3], hidden_size=16, num_labels=3, kind=kind).eval()
    path = tmp_path / "heads.safetensors"
    save_exit_heads(heads, path)

    loaded = load_exit_heads(path)
    assert loaded.config() == heads.config()
    assert loaded.keys() == heads.keys()
    for (name, a), (_, b) in zip(
        heads.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    h = torch.randn(2, 5, 16)
    for layer in heads.layers:
        assert torch.equal(heads.exit_logits(layer, h), loaded.exit_logits(layer, h))
    with safe_open(str(path), framework="pt") as reader:
        assert json.loads(reader.metadata()["dynexec_exit_heads"])["layers"] == [0, 2, 3]


def test_save_in_bf16_and_load_in_fp32(tmp_path):
    heads = ExitHeads([0], 16, 2)
    path = tmp_path / "heads.safetensors"
    save_exit_heads(heads, path, dtype=torch.bfloat16)
    stored = load_exit_heads(path)
    assert next(stored.parameters()).dtype == torch.bfloat16
    as_fp32 = load_exit_heads(path, dtype=torch.float32)
    weight = heads["0"].dense.weight
    assert torch.equal(as_fp32["0"].dense.weight, weight.to(torch.bfloat16).float())


def test_load_rejects_files_that_are_not_exit_heads(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a dynexec exit-heads file"):
        load_exit_heads(path)
    with pytest.raises(FileNotFoundError):
        load_exit_heads(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("family", FAMILIES)
def test_attach_registers_a_submodule_that_moves_with_the_model(family):
    model = classifier(family)
    heads = ExitHeads([0, 1], model.config.hidden_size, 2, default_head_kind(model))
    assert get_exit_heads(model) is None

    assert attach_exit_heads(model, heads) is model
    assert get_exit_heads(model) is heads
    assert any(name.startswith("dynexec_exit_heads.") for name, _ in model.named_parameters())
    model.to(torch.float64)
    assert heads["0"].out.weight.dtype == torch.float64

    assert find_exit_heads(model.parameters()) is heads
    assert find_exit_heads([torch.zeros(2), 3]) is None

    assert detach_exit_heads(model) is heads
    assert get_exit_heads(model) is None
    assert find_exit_heads(model.parameters()) is None
    assert not any(name.startswith("dynexec_exit_heads.") for name, _ in model.named_parameters())


def test_attach_casts_heads_to_the_model_dtype():
    model = classifier("bert").to(torch.bfloat16)
    heads = attach_exit_heads(model, ExitHeads([0], 32, 2)).dynexec_exit_heads
    assert heads["0"].dense.weight.dtype == torch.bfloat16


def test_attach_validates_layers_hidden_size_and_labels():
    model = classifier("bert")  # 3 blocks: exits after blocks 0 and 1
    with pytest.raises(ValueError, match=r"valid exit layers are 0\.\.1"):
        attach_exit_heads(model, ExitHeads([0, 2], 32, 2))
    with pytest.raises(ValueError, match="hidden size 32"):
        attach_exit_heads(model, ExitHeads([0], 48, 2))
    with pytest.raises(ValueError, match="predict 3 labels"):
        attach_exit_heads(model, ExitHeads([0], 32, 3))
    with pytest.raises(TypeError, match="expected ExitHeads"):
        attach_exit_heads(model, torch.nn.Linear(2, 2))
    assert get_exit_heads(model) is None


def test_exit_heads_reject_bad_construction():
    with pytest.raises(ValueError, match="unknown exit-head kind"):
        ExitHeads([0], 8, 2, kind="mlp")
    with pytest.raises(ValueError, match="non-empty"):
        ExitHeads([], 8, 2)
    with pytest.raises(KeyError, match="exit layers: \\[0\\]"):
        ExitHeads([0], 8, 2).head(3)
