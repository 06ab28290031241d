"""Zero-copy slicing: every sliced weight is a view of the full parameter, and the 50% level
equals a copy of the *original* model with the same heads and neurons physically removed."""

import copy

import pytest
import torch
from conftest import make_batch, model_output, tiny_bert, tiny_gpt2, tiny_llama, tiny_qwen2
from torch.func import functional_call
from transformers.pytorch_utils import prune_linear_layer

from dynexec_compile.elastic import elastic_plan, random_importance, reorder_by_importance
from dynexec_compile.elastic.arch import head_feature_index
from dynexec_compile.elastic.slicing import (
    choose_anchors,
    kept_units,
    level_param_slices,
    level_params,
)


def _replace(model, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def physically_pruned(original, plan, level, anchors):
    """A copy of the unreordered model with the plan's first heads/neurons kept (stock way)."""
    pruned = copy.deepcopy(original)
    for spec in plan.blocks:
        if spec.index in anchors:
            continue
        kv = kept_units(spec.num_kv_heads, level)
        heads = torch.tensor(plan.head_order[spec.index][: kv * spec.group_size])
        kv_heads = torch.tensor(plan.kv_order[spec.index][:kv])
        neurons = torch.tensor(plan.neuron_order[spec.index][: kept_units(spec.num_neurons, level)])
        q_idx, kv_idx = (
            head_feature_index(heads, spec.head_dim),
            head_feature_index(kv_heads, spec.head_dim),
        )
        q, k, v = spec.head_in
        for name, idx in ((q, q_idx), (k, kv_idx), (v, kv_idx)):
            _replace(pruned, name, prune_linear_layer(pruned.get_submodule(name), idx, dim=0))
        _replace(
            pruned,
            spec.head_out,
            prune_linear_layer(pruned.get_submodule(spec.head_out), q_idx, dim=1),
        )
        for name in spec.neuron_in:
            _replace(pruned, name, prune_linear_layer(pruned.get_submodule(name), neurons, dim=0))
        _replace(
            pruned,
            spec.neuron_out,
            prune_linear_layer(pruned.get_submodule(spec.neuron_out), neurons, dim=1),
        )
    return pruned


@pytest.mark.parametrize(
    "factory", [tiny_bert, tiny_llama, tiny_qwen2], ids=["bert", "llama", "qwen2"]
)
@torch.no_grad()
def test_half_level_equals_physically_pruned_original(factory):
    model = factory()
    original = copy.deepcopy(model)
    plan = reorder_by_importance(model, importance=random_importance(model))
    anchors = choose_anchors(plan, 1)
    assert len(anchors) == 1
    slices = level_param_slices(model, plan, 0.5, anchors=1)
    views = level_params(model, slices)
    batch = make_batch()
    got = functional_call(model, views, (), batch)
    got = got.logits if hasattr(got, "logits") else got.last_hidden_state
    want = model_output(physically_pruned(original, plan, 0.5, anchors), batch)
    assert (got - want).abs().max().item() <= 1e-5
    full = model_output(model, batch)
    assert (got - full).abs().max().item() > 1e-3  # the level really is a smaller model


def test_sliced_weights_are_views_of_the_parameters():
    model = tiny_llama()
    plan = reorder_by_importance(model, importance=random_importance(model))
    params = dict(model.named_parameters())
    slices = level_param_slices(model, plan, 0.5)
    views = level_params(model, slices)
    assert set(views) == set(slices) and len(views) == 3 * 7  # blocks x (q k v o gate up down)
    for name, view in views.items():
        dim, k = slices[name]
        assert view.untyped_storage().data_ptr() == params[name].untyped_storage().data_ptr()
        assert view.data_ptr() == params[name].data_ptr()  # a prefix: same first element
        assert view.shape[dim] == k < params[name].shape[dim]


def test_slice_sizes_keep_whole_kv_groups():
    model = tiny_llama()  # 8 query heads in 2 groups of 4, head_dim 8, 96 neurons
    plan = elastic_plan(model)
    for level, heads, neurons in ((0.25, 4, 24), (0.5, 4, 48), (0.6, 8, 58)):
        slices = level_param_slices(model, plan, level)
        if heads == 8:
            assert "model.layers.0.self_attn.q_proj.weight" not in slices or slices[
                "model.layers.0.self_attn.q_proj.weight"
            ] == (0, 64)
        else:
            assert slices["model.layers.0.self_attn.q_proj.weight"] == (0, heads * 8)
            assert slices["model.layers.0.self_attn.k_proj.weight"] == (0, heads // 4 * 8)
            assert slices["model.layers.0.self_attn.o_proj.weight"] == (1, heads * 8)
        assert slices["model.layers.0.mlp.down_proj.weight"] == (1, neurons)
        assert slices["model.layers.0.mlp.up_proj.weight"] == (0, neurons)
    assert level_param_slices(model, plan, 1.0) == {}


def test_anchor_layers_stay_whole():
    model = tiny_bert()
    imp = random_importance(model)
    plan = reorder_by_importance(model, importance=imp)
    top = int(imp.layers.argmax())
    assert choose_anchors(plan, 1) == {top}
    assert choose_anchors(plan, "auto") == {top}  # ceil(3 / 4) = 1
    slices = level_param_slices(model, plan, 0.5, anchors="auto")
    assert not any(name.startswith(f"encoder.layer.{top}.") for name in slices)
    others = {i for i in range(3) if i != top}
    for i in others:
        assert f"encoder.layer.{i}.attention.self.query.weight" in slices


def test_bad_levels_anchors_and_models_are_rejected():
    model = tiny_bert()
    plan = elastic_plan(model)
    for level in (0.0, 1.5, -0.1, True, "half"):
        with pytest.raises(ValueError, match="level"):
            level_param_slices(model, plan, level)
    with pytest.raises(ValueError, match="layer importance"):
        level_param_slices(model, plan, 0.5, anchors=1)
    with pytest.raises(ValueError, match="block indices"):
        level_param_slices(model, plan, 0.5, anchors=[7])
    with pytest.raises(ValueError, match="'auto'"):
        level_param_slices(model, plan, 0.5, anchors="most")
    with pytest.raises(ValueError, match="expects"):
        level_param_slices(tiny_llama(), elastic_plan(tiny_qwen2()), 0.5)
    gpt2 = tiny_gpt2()  # 6 heads of 8: 3 kept of each of Q, K, V in the fused c_attn
    slices = level_param_slices(gpt2, elastic_plan(gpt2), 0.5)
    assert slices["transformer.h.0.attn.c_attn.weight"] == (1, 24, 3)
    assert slices["transformer.h.0.attn.c_proj.weight"] == (0, 24)
    with pytest.raises(NotImplementedError, match="backend='dynexec'"):
        level_params(gpt2, slices)  # three views cannot feed the module's one weight
