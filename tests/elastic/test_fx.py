"""level_graph: a Dynamo graph with narrowed parameter placeholders (and re-derived
reshape sizes) runs the level exactly like functional_call over the level's views."""

import pytest
import torch
from conftest import make_batch, tiny_bert, tiny_llama, tiny_qwen2
from test_reorder import random_importance
from torch.func import functional_call

from dynexec_compile.elastic import fx as elastic_fx
from dynexec_compile.elastic import level_param_slices, level_params, reorder_by_importance
from dynexec_compile.elastic.fx import level_graph, placeholder_param_names


def capture(model, batch):
    """Dynamo's graph of ``model(**batch)`` and its example inputs (parameters lifted)."""
    seen = {}

    def backend(gm, example_inputs):
        seen["gm"], seen["inputs"] = gm, list(example_inputs)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(**batch)
    return seen["gm"], seen["inputs"]


@torch.no_grad()
def test_sliced_bert_graph_equals_the_level():
    model = tiny_bert(layers=2)
    plan = reorder_by_importance(model, importance=random_importance(model))
    batch = make_batch()
    gm, inputs = capture(model, batch)
    names = placeholder_param_names(gm, inputs)
    assert "encoder.layer.0.attention.self.query.weight" in names.values()
    sliced = level_graph(gm, inputs, 0.5)
    views = level_params(model, level_param_slices(model, plan, 0.5))
    want = functional_call(model, views, (), batch).last_hidden_state
    assert (sliced(*inputs)[0] - want).abs().max().item() <= 1e-5
    full = model(**batch).last_hidden_state
    assert (gm(*inputs)[0] - full).abs().max().item() <= 1e-5  # the original graph is untouched
    narrows = [n for n in sliced.graph.nodes if n.target is torch.narrow]
    assert len(narrows) == len(level_param_slices(model, plan, 0.5))


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
@torch.no_grad()
def test_sliced_gqa_graph_with_baked_head_counts_equals_the_level(factory):
    model = factory(layers=2)
    plan = reorder_by_importance(model, importance=random_importance(model))
    batch = make_batch()
    gm, inputs = capture(model, batch)
    for level in (0.5, 0.25):
        sliced = level_graph(gm, inputs, level, anchors=[1])
        views = level_params(model, level_param_slices(model, plan, level, [1]))
        want = functional_call(model, views, (), batch).logits
        (got,) = [
            o for o in sliced(*inputs) if isinstance(o, torch.Tensor) and o.shape == want.shape
        ]
        assert (got - want).abs().max().item() <= 1e-5


def test_a_reshape_that_cannot_be_re_derived_is_refused(monkeypatch):
    model = tiny_llama(layers=1)
    reorder_by_importance(model, importance=random_importance(model))
    gm, inputs = capture(model, make_batch())
    monkeypatch.setattr(elastic_fx, "_resized_shape", lambda *args: None)
    with pytest.raises(NotImplementedError, match="ElasticModel"):
        level_graph(gm, inputs, 0.5)


def test_graph_of_a_model_without_plan_is_refused():
    gm, inputs = capture(tiny_bert(layers=1), make_batch())
    with pytest.raises(ValueError, match="reorder_by_importance"):
        placeholder_param_names(gm, inputs)
