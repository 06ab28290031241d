"""Per-level LoRAs: the shapes of a level, an untrained LoRA is the level itself (and the stock
model at 1.0), the eager hooks and the compiled graph compute the same thing, files round-trip
and refuse what does not fit, training moves the level toward the full model, and
``apply_plan`` rebuilds an order exactly."""

import copy

import pytest
import torch
from torch.func import functional_call

from dynexec_compile.elastic import (
    LevelLoRA,
    apply_plan,
    attach_level_loras,
    elastic_forward,
    install_level_lora,
    level_param_slices,
    level_params,
    lora_targets,
    plan_fingerprint,
    plan_to_dict,
    random_importance,
    reorder_by_importance,
    train_level_lora,
)
from dynexec_compile.elastic.fx import level_graph
from hf_models import causal_lm, classifier, encoder_inputs


def reordered(family: str):
    model = classifier("bert") if family == "bert" else causal_lm("llama")
    stock = copy.deepcopy(model)
    plan = reorder_by_importance(model, importance=random_importance(model))
    inputs = encoder_inputs(batch=3, seq=8, pad_last=3)
    if family == "llama":
        inputs["use_cache"] = False
    return model, stock, plan, inputs


def randomized(lora: LevelLoRA, seed: int = 0) -> LevelLoRA:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in lora.B:
            b.copy_(torch.randn(b.shape, generator=gen) * 0.2)
    return lora


def dynamo_graph(model, inputs):
    captured = []

    def backend(gm, example_inputs):
        captured.append((gm, example_inputs))
        return gm.forward

    torch.compile(model, backend=backend)(**inputs)
    return captured[0]


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_shapes_follow_the_level(family):
    model, _, plan, _ = reordered(family)
    lora = LevelLoRA.create(model, 0.5, rank=4, anchors=1)
    slices = level_param_slices(model, plan, 0.5, sorted(lora.anchors))
    assert lora.targets == lora_targets(model, plan, "blocks")
    for name, (a, b) in lora.pairs().items():
        out_f, in_f = model.get_submodule(name).weight.shape
        dim, k = slices.get(f"{name}.weight", (None, None))
        assert a.shape == (4, k if dim == 1 else in_f)
        assert b.shape == (k if dim == 0 else out_f, 4)
        assert not b.any()  # B = 0: the plain level
    anchor = plan.blocks[lora.anchors[0]].name + "."
    assert all(lora.pairs()[n][1].shape[0] == model.get_submodule(n).weight.shape[0] for n in lora.targets if n.startswith(anchor))


@pytest.mark.parametrize("family", ["bert", "llama"])
@torch.no_grad()
def test_zero_lora_is_the_level_and_at_full_level_the_stock_model(family):
    model, stock, plan, inputs = reordered(family)
    full = LevelLoRA.create(model, 1.0, rank=4)
    got = elastic_forward(model, 1.0, kwargs=inputs, lora=full).logits
    assert (got - stock(**inputs).logits).abs().max() <= 1e-5
    half = LevelLoRA.create(model, 0.5, rank=4)
    views = level_params(model, level_param_slices(model, plan, 0.5))
    plain = functional_call(model, views, (), inputs).logits
    assert torch.equal(elastic_forward(model, 0.5, kwargs=inputs, lora=half).logits, plain)
    with_lora = elastic_forward(model, 0.5, kwargs=inputs, lora=randomized(half)).logits
    assert (with_lora - plain).abs().max() > 1e-3  # the LoRA changes the output


@pytest.mark.parametrize("family", ["bert", "llama"])
@torch.no_grad()
def test_the_graph_form_equals_the_eager_form(family):
    model, _, _, inputs = reordered(family)
    lora = randomized(LevelLoRA.create(model, 0.5, rank=4, anchors=1))
    gm, example_inputs = dynamo_graph(model, inputs)
    sliced = level_graph(gm, example_inputs, 0.5, anchors=1, lora=lora)
    got = sliced(*example_inputs, *lora.tensors())[0]
    want = elastic_forward(model, 0.5, kwargs=inputs, lora=lora).logits
    assert (got - want).abs().max() <= 1e-5
    extra = [n for n in sliced.graph.nodes if n.op == "placeholder"][len(example_inputs):]
    assert len(extra) == len(lora.tensors())  # the LoRA tensors are inputs, not constants
    assert not [n for n in sliced.graph.nodes if n.op == "get_attr"]


@torch.no_grad()
def test_installed_hooks_on_a_module_of_ones_own():
    model, _, _, inputs = reordered("llama")
    lora = randomized(LevelLoRA.create(model, 1.0, rank=2))
    own = copy.deepcopy(model)
    handles = install_level_lora(own, lora)
    want = elastic_forward(model, 1.0, kwargs=inputs, lora=lora).logits
    assert (own(**inputs).logits - want).abs().max() <= 1e-5
    for h in handles:
        h.remove()
    assert (own(**inputs).logits - model(**inputs).logits).abs().max() <= 1e-5


def test_files_round_trip_and_refuse_what_does_not_fit(tmp_path):
    model, stock, plan, inputs = reordered("bert")
    lora = randomized(LevelLoRA.create(model, 0.5, rank=4))
    path = tmp_path / "level_0.5.safetensors"
    lora.save(path)
    again = LevelLoRA.load(path, model)
    assert again.config() == lora.config()
    assert all(torch.equal(a, b) for a, b in zip(again.tensors(), lora.tensors()))

    other = copy.deepcopy(stock)
    reorder_by_importance(other, importance=random_importance(other, seed=7))
    with pytest.raises(ValueError, match="another head/neuron order"):
        LevelLoRA.load(path, other)
    with pytest.raises(ValueError, match="for level 0.5, not 0.25"):
        elastic_forward(model, 0.25, kwargs=inputs, lora=lora)
    with pytest.raises(ValueError, match="anchor blocks"):
        elastic_forward(model, 0.5, kwargs=inputs, lora=lora, anchors=1)
    with pytest.raises(ValueError, match="not a dynexec level LoRA file"):
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
        LevelLoRA.load(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="no elastic plan"):
        attach_level_loras(copy.deepcopy(stock), [lora])
    with pytest.raises(ValueError, match="matches no module"):
        LevelLoRA.create(model, 0.5, targets=["nope"])
    with pytest.raises(ValueError, match="rank must be"):
        LevelLoRA.create(model, 0.5, rank=0)


def test_gpt2_conv1d_is_refused():
    model = causal_lm("gpt2")
    reorder_by_importance(model, importance=random_importance(model))
    with pytest.raises(ValueError, match="Conv1D"):
        LevelLoRA.create(model, 0.5)


def test_apply_plan_rebuilds_the_order_and_fingerprint():
    model, stock, plan, inputs = reordered("llama")
    fresh = copy.deepcopy(stock)
    again = apply_plan(fresh, plan_to_dict(plan))
    assert plan_fingerprint(again) == plan_fingerprint(plan)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
    with pytest.raises(ValueError, match="original order"):
        apply_plan(fresh, plan_to_dict(plan))


def test_training_moves_the_level_toward_the_full_model():
    model, _, plan, _ = reordered("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    batches = [
        {"input_ids": torch.randint(3, 128, (8, 8), generator=gen), "attention_mask": torch.ones(8, 8, dtype=torch.long)}
        for _ in range(8)
    ]
    lora = LevelLoRA.create(model, 0.25, rank=4)

    @torch.no_grad()
    def gap() -> float:
        total = 0.0
        for b in batches:
            full = torch.log_softmax(model(**b).logits, -1)  # [B, S, V]
            level = torch.log_softmax(elastic_forward(model, 0.25, kwargs=b, lora=lora).logits, -1)
            total += torch.nn.functional.kl_div(level, full, log_target=True, reduction="sum").item()
        return total

    start = gap()
    run = train_level_lora(model, lora, batches, epochs=5, lr=1e-2, progress=False)
    assert run.steps == 40 and run.examples == 320 and run.cpu_seconds > 0
    assert gap() < 0.5 * start
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # backbone untouched
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not lora.training and not model.training
