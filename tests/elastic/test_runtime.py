"""ElasticModel: each level's output equals the sliced model run eagerly, switching levels never
recompiles after a level's first use, levels are thread-local, and all levels share one set of
weight storages."""

import threading

import pytest
import torch
from conftest import make_batch, model_output, tiny_bert, tiny_llama
from torch._dynamo.testing import CompileCounter
from torch.func import functional_call

from dynexec_compile import last_stats
from dynexec_compile.elastic import (
    ElasticModel,
    elastic_level,
    elastic_stats,
    level_param_slices,
    level_params,
    random_importance,
    reorder_by_importance,
    set_elastic_level,
)

LEVELS = (1.0, 0.5, 0.25)


def _reordered_bert(layers: int = 2):
    model = tiny_bert(layers=layers)
    plan = reorder_by_importance(model, importance=random_importance(model))
    return model, plan


@torch.no_grad()
def test_levels_compile_once_and_match_eager_slices():
    model, plan = _reordered_bert(layers=1)  # one block: Dynamo traces fast
    counter = CompileCounter()
    elastic = ElasticModel(model, LEVELS, backend=counter, compile_options={"fullgraph": True})
    batch = make_batch()
    outputs = {}
    for level in LEVELS + LEVELS[::-1] + LEVELS:
        with elastic_level(level):
            outputs[level] = elastic(**batch).last_hidden_state
        assert elastic_stats()["level"] == level
    assert counter.frame_count == len(LEVELS)  # one graph per level, none after first use
    assert (outputs[1.0] - model_output(model, batch)).abs().max().item() <= 1e-5
    for level in LEVELS[1:]:
        views = level_params(model, level_param_slices(model, plan, level))
        want = functional_call(model, views, (), batch).last_hidden_state
        assert (outputs[level] - want).abs().max().item() <= 1e-5
        assert (outputs[level] - outputs[1.0]).abs().max().item() > 1e-3


def test_stats_report_what_ran():
    model, _ = _reordered_bert()
    elastic = ElasticModel(model, LEVELS, backend=None)
    with torch.no_grad(), elastic_level(0.5):
        elastic(**make_batch())
    stats = elastic_stats()
    assert stats == elastic.last_stats
    assert last_stats()["elastic_level"] == 0.5 and last_stats()["elastic_heads"] == [3, 3]
    assert stats["level"] == 0.5 and stats["levels"] == LEVELS
    assert stats["heads"] == [3, 3] and stats["neurons"] == [48, 48]
    assert stats["anchor_layers"] == []


def test_default_level_context_nesting_and_threads():
    model, _ = _reordered_bert()
    elastic = ElasticModel(model, LEVELS, backend=None)
    batch = make_batch()
    with torch.no_grad():
        elastic(**batch)
        assert elastic_stats()["level"] == 1.0
        set_elastic_level(elastic, 0.25)
        elastic(**batch)
        assert elastic_stats()["level"] == 0.25
        with elastic_level(0.5):
            with elastic_level(1.0):
                elastic(**batch)
                assert elastic_stats()["level"] == 1.0
            elastic(**batch)
            assert elastic_stats()["level"] == 0.5
            seen = {}

            def other_thread():
                with torch.no_grad():
                    elastic(**batch)
                seen["level"] = elastic_stats()["level"]

            thread = threading.Thread(target=other_thread)
            thread.start()
            thread.join()
            assert seen["level"] == 0.25  # the override is this thread's only
        elastic(**batch)
        assert elastic_stats()["level"] == 0.25


def test_all_levels_share_the_parameter_storages():
    model = tiny_llama()
    reorder_by_importance(model, importance=random_importance(model))
    elastic = ElasticModel(model, (1.0, 0.75, 0.5, 0.25), anchor_layers=1, backend=None)
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    used = {
        v.untyped_storage().data_ptr() for views in elastic.views.values() for v in views.values()
    }
    assert used <= param_storages
    assert sum(len(views) for views in elastic.views.values()) == 2 * 7 * 3  # 2 sliced blocks


def test_bad_levels_and_targets():
    model, _ = _reordered_bert()
    elastic = ElasticModel(model, LEVELS, backend=None)
    with pytest.raises(ValueError, match="was not compiled"):
        set_elastic_level(elastic, 0.75)
    with pytest.raises(ValueError, match="was not compiled"), elastic_level(0.75):
        elastic(**make_batch())
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        elastic_level(0).__enter__()
    with pytest.raises(ValueError, match="at least one"):
        ElasticModel(model, (), backend=None)
    with pytest.raises(TypeError, match="ElasticModel"):
        set_elastic_level("model", 0.5)
    with pytest.raises(ValueError, match="no elastic plan"):
        set_elastic_level(tiny_bert(layers=1), 0.5)


def test_set_level_on_a_compiled_model_is_recorded_against_its_plan():
    from dynexec_compile.elastic.runtime import requested_level

    model, plan = _reordered_bert()
    compiled = torch.compile(model, backend="eager")
    set_elastic_level(compiled, 0.5)
    assert requested_level(plan, 1.0) == 0.5
    with elastic_level(0.25):
        assert requested_level(plan, 1.0) == 0.25
