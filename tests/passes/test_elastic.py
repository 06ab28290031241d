"""torch.compile(backend="dynexec", options={"elastic": ...}): level 1.0 is the stock model, every
other level equals the eager prefix-view reference, every sliced weight is a view of its
parameter, switching level never recompiles, and bad requests are refused with a clear error."""

import copy
import threading

import pytest
import torch
from torch._dynamo.exc import BackendCompilerFailed
from torch.func import functional_call
from transformers.pytorch_utils import Conv1D

from dynexec_compile import elastic_level, last_stats, parse_options, set_elastic_level
from dynexec_compile.backend import capture_reports
from dynexec_compile.elastic import (
    elastic_plan,
    elastic_stats,
    level_param_slices,
    level_params,
    random_importance,
    reorder_by_importance,
)
from dynexec_compile.elastic.fx import narrowed_weights, placeholder_param_names
from hf_models import causal_lm, classifier, encoder_inputs

LEVELS = [1.0, 0.75, 0.5]


def model_and_inputs(family: str, seq: int = 8):
    if family == "bert":
        return classifier("bert"), encoder_inputs(batch=3, seq=seq, pad_last=3)
    return causal_lm("llama"), {**encoder_inputs(batch=3, seq=seq, pad_last=3), "use_cache": False}


def compile_elastic(model, levels=LEVELS, anchors=1, elastic_extra=None, **options):
    elastic = {"levels": levels, "anchor_layers": anchors, **(elastic_extra or {})}
    opts = {"lowering": "eager", "strict": True, "elastic": elastic, **options}
    return torch.compile(model, backend="dynexec", options=opts)


def reference(model, plan, level, anchors, inputs) -> torch.Tensor:
    """The level run eagerly over prefix views (what ElasticModel(backend=None) runs)."""
    views = level_params(model, level_param_slices(model, plan, level, anchors))
    return functional_call(model, views, (), inputs).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("family", ["bert", "llama"])
@torch.no_grad()
def test_levels_equal_the_stock_model_and_the_slice_reference(family):
    model, inputs = model_and_inputs(family)
    stock = copy.deepcopy(model)  # never reordered
    plan = reorder_by_importance(model, importance=random_importance(model))
    compiled = compile_elastic(model, anchors=1)
    with capture_reports() as reports:
        for level in LEVELS + LEVELS[::-1]:
            with elastic_level(level):
                got = compiled(**inputs).logits
            assert last_stats()["elastic_level"] == level
            if level == 1.0:
                assert max_diff(got, stock(**inputs).logits) <= 1e-5
            else:
                assert max_diff(got, reference(model, plan, level, 1, inputs)) <= 1e-5
                full = stock(**inputs).logits
                assert max_diff(got, full) > 1e-3 * full.abs().max().item()  # a smaller model ran
    assert len(reports) == 1  # one Dynamo compile; switching level never recompiles
    assert reports[0].runtime.lowerings == len(LEVELS)  # one lowered graph per level
    assert [p.name for p in reports[0].passes] == ["slice_elastic_levels"]


@torch.no_grad()
def test_every_sliced_weight_is_a_view_of_its_parameter():
    model, inputs = model_and_inputs("llama")
    plan = reorder_by_importance(model, importance=random_importance(model))
    compiled = compile_elastic(model, levels=[1.0, 0.75, 0.5, 0.25], anchors=1)
    with capture_reports() as reports:
        compiled(**inputs)
    report = reports[0]
    graphs = report.artifacts["elastic"]
    params = {id(p) for p in model.parameters()}
    anchor = plan.blocks[graphs.anchors[0]].name + "."
    names = placeholder_param_names(report.gm, report.example_inputs)
    for level, gm in graphs.graphs.items():
        views = narrowed_weights(gm, report.example_inputs)
        assert len(views) == len(graphs.slices[level])
        for placeholder, [(param, view)] in views.items():
            assert id(param) in params, placeholder
            assert view.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()
            assert view.data_ptr() == param.data_ptr()  # a prefix: same first element
            assert not names[placeholder].startswith(anchor)  # anchor blocks stay whole
        if level < 1.0:
            assert {names[p] for p in views} == set(graphs.slices[level])
        for node in gm.graph.nodes:  # no sliced parameter is read whole anywhere else
            if node.op == "placeholder" and node.name in views:
                assert [u.target for u in node.users] == [torch.narrow]
    assert graphs.graphs[1.0] is report.gm  # the full level is Dynamo's graph, unchanged


@torch.no_grad()
def test_anchor_layers_kept_whole_at_every_level_share_one_graph():
    model, inputs = model_and_inputs("bert")
    reorder_by_importance(model, importance=random_importance(model))
    want = model(**inputs).logits
    compiled = compile_elastic(model, anchors=3)  # all three blocks are anchors
    with capture_reports() as reports, elastic_level(0.5):
        assert max_diff(compiled(**inputs).logits, want) <= 1e-5
    assert reports[0].runtime.lowerings == 1
    assert last_stats()["elastic_anchor_layers"] == [0, 1, 2]


@torch.no_grad()
def test_auto_anchor_layers_are_the_most_important_blocks():
    model, inputs = model_and_inputs("bert")
    plan = reorder_by_importance(model, importance=random_importance(model))
    compiled = compile_elastic(model, levels=[1.0, 0.5], anchors="auto")
    with elastic_level(0.5):
        got = compiled(**inputs).logits
    top = max(range(3), key=lambda i: plan.layer_importance[i])
    assert last_stats()["elastic_anchor_layers"] == [top]  # ceil(3 / 4) = 1 block
    assert last_stats()["elastic_heads"][top] == 4
    assert max_diff(got, reference(model, plan, 0.5, [top], inputs)) <= 1e-5


@torch.no_grad()
def test_set_level_thread_local_override_and_stats():
    model, inputs = model_and_inputs("bert")
    reorder_by_importance(model, importance=random_importance(model))
    compiled = compile_elastic(model, anchors=0)
    compiled(**inputs)
    assert last_stats()["elastic_level"] == 1.0  # the largest level by default
    set_elastic_level(compiled, 0.5)
    compiled(**inputs)
    assert elastic_stats()["level"] == 0.5 and last_stats()["elastic_heads"] == [2, 2, 2]
    assert last_stats()["elastic_neurons"] == [32, 32, 32]
    seen = {}

    def other_thread():
        with torch.no_grad():
            compiled(**inputs)
        seen["level"] = last_stats()["elastic_level"]

    with elastic_level(0.75):
        compiled(**inputs)
        assert last_stats()["elastic_level"] == 0.75
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert seen["level"] == 0.5  # the context manager is this thread's only
    compiled(**inputs)
    assert last_stats()["elastic_level"] == 0.5


@torch.no_grad()
def test_a_new_sequence_length_compiles_like_stock_and_stays_exact():
    model, inputs = model_and_inputs("llama", seq=8)
    plan = reorder_by_importance(model, importance=random_importance(model))
    compiled = compile_elastic(model, levels=[1.0, 0.5], anchors=1)
    with capture_reports() as reports:
        for seq in (8, 5, 11):  # the second length makes Dynamo mark it dynamic
            _, inputs = model_and_inputs("llama", seq=seq)
            for level in (1.0, 0.5):
                with elastic_level(level):
                    got = compiled(**inputs).logits
                assert max_diff(got, reference(model, plan, level, 1, inputs)) <= 1e-5
    assert len(reports) == 2  # static, then one dynamic graph serving every later length


@torch.no_grad()
def test_original_order_on_request():
    model, inputs = model_and_inputs("bert")
    plan = elastic_plan(model)  # explicit: slice in the original head order
    compiled = compile_elastic(model, levels=[1.0, 0.5], anchors=0)
    with elastic_level(0.5):
        got = compiled(**inputs).logits
    assert max_diff(got, reference(model, plan, 0.5, 0, inputs)) <= 1e-5


def pruned_gpt2(model, slices):
    """A copy of GPT-2 with the level's heads and neurons physically removed: smaller Conv1D
    layers holding copies of the kept columns/rows, and ``split_size`` / ``num_heads`` set to
    match (what transformers' old ``prune_heads`` did)."""
    pruned = copy.deepcopy(model)
    for name in {n.rsplit(".", 1)[0] for n in slices}:
        old = pruned.get_submodule(name)
        dim, k, *parts = slices[f"{name}.weight"]
        if dim == 1:  # output columns, a prefix of each part
            part = old.weight.shape[1] // (parts[0] if parts else 1)
            keep = torch.cat([torch.arange(j * part, j * part + k) for j in range(parts[0] if parts else 1)])
            new = Conv1D(len(keep), old.weight.shape[0])
            new.weight.data, new.bias.data = old.weight[:, keep].clone(), old.bias[keep].clone()
        else:  # input rows
            new = Conv1D(old.weight.shape[1], k)
            new.weight.data, new.bias.data = old.weight[:k].clone(), old.bias.clone()
        parent, _, child = name.rpartition(".")
        setattr(pruned.get_submodule(parent), child, new)
        if child == "c_attn":
            attn = pruned.get_submodule(parent)
            attn.split_size, attn.num_heads = k, k // attn.head_dim
    return pruned


@torch.no_grad()
def test_gpt2_fused_levels_equal_a_physically_pruned_copy():
    model = causal_lm("gpt2")
    inputs = {**encoder_inputs(batch=3, seq=8, pad_last=3), "use_cache": False}
    stock = copy.deepcopy(model)
    plan = reorder_by_importance(model, importance=random_importance(model))
    compiled = compile_elastic(model, levels=[1.0, 0.5], anchors=1)
    with capture_reports() as reports:
        for level in (1.0, 0.5, 1.0, 0.5):
            with elastic_level(level):
                got = compiled(**inputs).logits
            slices = level_param_slices(model, plan, level, 1)
            want = stock(**inputs).logits if level == 1.0 else pruned_gpt2(model, slices)(**inputs).logits
            assert max_diff(got, want) <= 1e-5
    assert sorted(last_stats()["elastic_heads"]) == [2, 2, 4]  # 4 heads -> 2 outside the anchor
    assert len(reports) == 1 and reports[0].runtime.lowerings == 2
    report = reports[0]
    names = placeholder_param_names(report.gm, report.example_inputs)
    views = narrowed_weights(report.artifacts["elastic"].graphs[0.5], report.example_inputs)
    fused = {p: v for p, v in views.items() if names[p].endswith("c_attn.weight")}
    assert len(fused) == 2  # the two non-anchor blocks
    for parts in fused.values():
        assert len(parts) == 3  # a view of each of Q, K, V, never a copy
        for j, (param, view) in enumerate(parts):
            assert view.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()
            assert view.data_ptr() == param.data_ptr() + j * param.shape[1] // 3 * param.element_size()


def _inner(excinfo) -> BaseException:
    err = excinfo.value
    return err.inner_exception if isinstance(err, BackendCompilerFailed) else err


@torch.no_grad()
def test_bad_requests_are_refused():
    model, inputs = model_and_inputs("bert")
    with pytest.raises(BackendCompilerFailed, match="reorder_by_importance") as excinfo:
        compile_elastic(copy.deepcopy(model))(**inputs)  # no plan: never reordered
    assert isinstance(_inner(excinfo), ValueError)

    plain = copy.deepcopy(model)
    elastic_plan(plain)  # an original-order plan has no layer importance for "auto"
    with pytest.raises(BackendCompilerFailed, match="layer importance") as excinfo:
        compile_elastic(plain, anchors="auto")(**inputs)
    assert isinstance(_inner(excinfo), ValueError)

    reorder_by_importance(model, importance=random_importance(model))
    torch._dynamo.reset()
    with pytest.raises(BackendCompilerFailed, match=r"anchor_layers=4 must be in \[0, 3\]"):
        compile_elastic(model, anchors=4)(**inputs)

    torch._dynamo.reset()
    compiled = compile_elastic(model)
    compiled(**inputs)
    with pytest.raises(ValueError, match=r"level 0.25 was requested.*\[1.0, 0.75, 0.5\]"):
        with elastic_level(0.25):
            compiled(**inputs)
    with pytest.raises(ValueError, match="level 0.25 was not compiled"):
        set_elastic_level(compiled, 0.25)


@pytest.mark.slow
@torch.no_grad()
def test_inductor_levels_equal_the_reference():
    model, inputs = model_and_inputs("llama")
    stock = copy.deepcopy(model)
    plan = reorder_by_importance(model, importance=random_importance(model))
    compiled = compile_elastic(model, levels=[1.0, 0.5], anchors=1, lowering="inductor")
    with capture_reports() as reports:
        for level in (1.0, 0.5, 1.0, 0.5):
            with elastic_level(level):
                got = compiled(**inputs).logits
            want = stock(**inputs).logits if level == 1.0 else reference(model, plan, level, 1, inputs)
            assert max_diff(got, want) <= 1e-5
    assert len(reports) == 1 and reports[0].runtime.lowerings == 2


# ----------------------------------------------------------------------------- lazy levels


@torch.no_grad()
def test_levels_compile_lazily_on_first_use(monkeypatch):
    import dynexec_compile.backend as backend

    lowered = []
    real = backend.lower_graph
    monkeypatch.setattr(backend, "lower_graph", lambda gm, *a: lowered.append(gm) or real(gm, *a))
    model, inputs = model_and_inputs("bert")
    reorder_by_importance(model, importance=random_importance(model))
    compiled = compile_elastic(model, levels=[1.0, 0.5, 0.25], anchors=0)
    with capture_reports() as reports:
        compiled(**inputs)  # the largest level only
        assert len(lowered) == 1 and reports[0].runtime.lowerings == 1
        for level, count in ((0.5, 2), (0.5, 2), (1.0, 2), (0.25, 3), (0.5, 3)):
            with elastic_level(level):
                compiled(**inputs)
            assert len(lowered) == count and reports[0].runtime.lowerings == count
    assert len(reports) == 1  # one Dynamo compile throughout
    assert sorted(reports[0].artifacts["variants"]) == ["level 0.25", "level 0.5", "level 1.0"]

    torch._dynamo.reset()
    lowered.clear()
    eager = compile_elastic(model, levels=[1.0, 0.5, 0.25], anchors=0, elastic_extra={"precompile": True})
    eager(**inputs)
    assert len(lowered) == 3  # every level at compile time


@pytest.mark.slow
@torch.no_grad()
def test_inductor_compiles_lazily_on_static_shapes_and_up_front_on_symbolic_ones():
    """Inductor adds shape guards while it lowers a graph with symbolic sizes, and Dynamo
    installs only those added inside the backend call: such a graph lowers every level then."""
    from dynexec_compile.elastic import LevelLoRA, attach_level_loras

    model, inputs = model_and_inputs("llama", seq=8)
    plan = reorder_by_importance(model, importance=random_importance(model))
    compiled = compile_elastic(model, levels=[1.0, 0.5], anchors=1, lowering="inductor")
    with capture_reports() as reports:
        compiled(**inputs)
        assert reports[0].runtime.lazy and reports[0].runtime.lowerings == 1  # static: lazy
        for seq in (5, 11, 7):  # the second length recompiles Dynamo's graph with a symbolic length
            _, inputs = model_and_inputs("llama", seq=seq)
            with elastic_level(0.5):
                got = compiled(**inputs).logits
            assert max_diff(got, reference(model, plan, 0.5, 1, inputs)) <= 1e-5
            compiled(**inputs)
        assert len(reports) == 2 and not reports[1].runtime.lazy and reports[1].runtime.lowerings == 2
        attach_level_loras(model, [LevelLoRA.create(model, 0.5, rank=2, anchors=1)])
        with pytest.raises(ValueError, match="attach the LoRAs before the first call"), elastic_level(0.5):
            compiled(**inputs)


# ----------------------------------------------------------------------------- LoRA per level


def with_random_b(lora, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in lora.B:
            b.copy_(torch.randn(b.shape, generator=gen) * 0.2)
    return lora


@pytest.mark.parametrize("family", ["bert", "llama"])
@torch.no_grad()
def test_each_level_runs_with_its_lora(family):
    from dynexec_compile.elastic import LevelLoRA, attach_level_loras, elastic_forward

    model, inputs = model_and_inputs(family)
    stock = copy.deepcopy(model)
    reorder_by_importance(model, importance=random_importance(model))
    loras = {lv: with_random_b(LevelLoRA.create(model, lv, rank=4, anchors=1), seed=i) for i, lv in enumerate((0.75, 0.5))}
    zero = LevelLoRA.create(model, 1.0, rank=4, anchors=1)
    attach_level_loras(model, [zero, *loras.values()])
    compiled = compile_elastic(model, anchors=1)
    with capture_reports() as reports:
        for level in LEVELS + LEVELS[::-1]:
            with elastic_level(level):
                got = compiled(**inputs).logits
            assert last_stats()["elastic_lora_rank"] == 4
            if level == 1.0:
                assert max_diff(got, stock(**inputs).logits) <= 1e-5  # zero LoRA at 1.0 == stock
            else:
                assert max_diff(got, elastic_forward(model, level, kwargs=inputs, lora=loras[level]).logits) <= 1e-5
                plain = elastic_forward(model, level, kwargs=inputs, anchors=1).logits
                assert max_diff(got, plain) > 1e-4  # the LoRA ran
    assert reports[0].runtime.lowerings == 3
    # another LoRA of the same shapes: new values, the same compiled code
    other = with_random_b(LevelLoRA.create(model, 0.5, rank=4, anchors=1), seed=9)
    attach_level_loras(model, [other])
    with elastic_level(0.5):
        got = compiled(**inputs).logits
    assert max_diff(got, elastic_forward(model, 0.5, kwargs=inputs, lora=other).logits) <= 1e-5
    assert reports[0].runtime.lowerings == 3


@torch.no_grad()
def test_a_lora_adds_no_storage_to_the_backbone():
    from dynexec_compile.elastic import LevelLoRA, attach_level_loras

    model, inputs = model_and_inputs("llama")
    reorder_by_importance(model, importance=random_importance(model))
    lora = with_random_b(LevelLoRA.create(model, 0.5, rank=4, anchors=1))
    attach_level_loras(model, [lora])
    compiled = compile_elastic(model, levels=[1.0, 0.5], anchors=1)
    with capture_reports() as reports, elastic_level(0.5):
        compiled(**inputs)
    variant = reports[0].artifacts["variants"]["level 0.5"]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    lora_ptrs = {t.untyped_storage().data_ptr() for t in lora.tensors()}
    views = narrowed_weights(variant.gm, variant.example_inputs)
    assert views and all(v.untyped_storage().data_ptr() in params for vs in views.values() for _, v in vs)
    inputs_seen = {x.untyped_storage().data_ptr() for x in variant.example_inputs if isinstance(x, torch.Tensor)}
    assert inputs_seen - params - {x.untyped_storage().data_ptr() for x in reports[0].example_inputs if isinstance(x, torch.Tensor)} == lora_ptrs
    assert not [n for n in variant.gm.graph.nodes if n.op == "get_attr"]  # no weight baked into the graph


@torch.no_grad()
def test_lora_policy_errors_and_off():
    from dynexec_compile.elastic import LevelLoRA, attach_level_loras, elastic_forward

    model, inputs = model_and_inputs("bert")
    reorder_by_importance(model, importance=random_importance(model))
    attach_level_loras(model, [with_random_b(LevelLoRA.create(model, 0.5, rank=2))])
    required = compile_elastic(model, anchors=0, elastic_extra={"lora": "required"})
    with elastic_level(0.5):
        required(**inputs)
    with pytest.raises(ValueError, match=r"level 0.75 has no LoRA.*'required'.*attach_level_loras"):
        with elastic_level(0.75):
            required(**inputs)
    torch._dynamo.reset()
    off = compile_elastic(model, anchors=0, elastic_extra={"lora": "off"})
    with elastic_level(0.5):
        got = off(**inputs).logits
    assert last_stats()["elastic_lora_rank"] is None
    assert max_diff(got, elastic_forward(model, 0.5, kwargs=inputs).logits) <= 1e-5
    torch._dynamo.reset()
    anchored = compile_elastic(model, anchors=1)  # the LoRA was made without anchors
    with pytest.raises(ValueError, match="anchor blocks"), elastic_level(0.5):
        anchored(**inputs)
    with pytest.raises(ValueError, match="elastic.lora"):
        parse_options({"elastic": {"lora": "sometimes"}})


# ----------------------------------------------------------------------------- with early exit


def exit_reference(model, level, inputs, threshold, lora=None):
    """Per sample: the block after which the entropy rule lets it leave at ``level`` (the
    shared head: pooler + classifier on that block's hidden state) and the logits it leaves
    with, computed eagerly over prefix views (with the level's LoRA when given)."""
    from dynexec_compile.elastic import elastic_forward

    out = elastic_forward(model, level, kwargs={**inputs, "output_hidden_states": True}, lora=lora)
    logits = [model.classifier(model.bert.pooler(h)) for h in out.hidden_states[1:]]  # per block
    exit_layer, result = [], []
    for row in range(inputs["input_ids"].shape[0]):
        for block, lg in enumerate(logits):
            p = lg[row].softmax(-1)
            if -(p * p.log()).sum() < threshold or block == len(logits) - 1:
                exit_layer.append(block)
                result.append(lg[row])
                break
    return exit_layer, torch.stack(result)


@pytest.mark.parametrize("dynamic", [False, True])  # dynamic: batch compaction, and a LoRA at 0.5
@torch.no_grad()
def test_a_level_and_an_exit_rule_per_call(dynamic):
    import dynexec_compile as dx
    from dynexec_compile.elastic import LevelLoRA, attach_level_loras

    torch.manual_seed(0)
    model = classifier("bert")
    with torch.no_grad():  # sharper logits than the random head gives, so thresholds split the batch
        model.classifier.weight.mul_(20)
        model.bert.pooler.dense.weight.mul_(20)
    inputs = encoder_inputs(batch=6, seq=8, pad_last=3, seed=4)
    reorder_by_importance(model, importance=random_importance(model))
    lora = with_random_b(LevelLoRA.create(model, 0.5, rank=4), seed=2) if dynamic else None
    if lora is not None:  # the LoRA's deltas are cut into the level's stages with their blocks
        attach_level_loras(model, [lora])
    if dynamic:
        for key in ("input_ids", "attention_mask"):
            torch._dynamo.mark_dynamic(inputs[key], 0)
    compiled = compile_elastic(
        model, levels=[1.0, 0.5], anchors=0,
        early_exit={"rule": "entropy", "threshold": 0.3, "heads": "shared"},
    )
    seen = set()
    with capture_reports() as reports:
        for level in (1.0, 0.5, 1.0):
            for threshold in (0.185, 0.525, 0.667):
                with elastic_level(level), dx.exit_rule(rule="entropy", threshold=threshold):
                    got = compiled(**inputs).logits
                stats = last_stats()
                want_layers, want = exit_reference(model, level, inputs, threshold, lora if level == 0.5 else None)
                assert stats["elastic_lora_rank"] == (4 if lora is not None and level == 0.5 else None)
                assert stats["exit_layer"] == want_layers and stats["elastic_level"] == level
                assert max_diff(got, want) <= 1e-5
                seen.add(tuple(want_layers))
                if dynamic and min(want_layers) < 2:
                    assert stats["compaction"] and stats["batch_per_block"][-1] < 6
    assert len(seen) >= 3  # the rules and levels split the batch differently
    assert len(reports) == 1 and reports[0].runtime.lowerings == 2
    variant = reports[0].artifacts["variants"]["level 0.5"]
    assert [p.name for p in variant.passes] == ["partition_stages", "insert_early_exit"]
    with pytest.raises(ValueError, match="threshold"), dx.exit_rule(rule="max_prob", threshold=1.5):
        compiled(**inputs)


# ----------------------------------------------------------------------------- latency target


@torch.no_grad()
def test_a_latency_target_picks_the_largest_level_that_meets_it():
    import dynexec_compile as dx

    model, inputs = model_and_inputs("bert")
    reorder_by_importance(model, importance=random_importance(model))
    compiled = compile_elastic(model, anchors=0, elastic_extra={"slo_ms": 1e6, "profile_repeats": 2})
    with capture_reports() as reports:
        compiled(**inputs)
        assert last_stats()["elastic_level"] == 1.0 and last_stats()["elastic_slo_met"]
        runtime = reports[0].runtime
        assert [list(p) for p in runtime.chooser.profiles.values()] == [[1.0]]  # stopped at the first that meets
        assert runtime.lowerings == 1
        with dx.elastic_slo(1e-6):  # nothing meets a nanosecond: the fastest level
            compiled(**inputs)
        assert last_stats()["elastic_level"] == 0.5 and not last_stats()["elastic_slo_met"]
        assert sorted(next(iter(runtime.chooser.profiles.values()))) == [0.5, 0.75, 1.0]
        with elastic_level(0.75), dx.elastic_slo(1e-6):  # an explicit level wins
            compiled(**inputs)
        assert last_stats()["elastic_level"] == 0.75
        set_elastic_level(compiled, 0.75)  # a global default beats the compiled target ...
        compiled(**inputs)
        assert last_stats()["elastic_level"] == 0.75 and "elastic_slo_ms" not in last_stats()
        with dx.elastic_slo(1e-6):  # ... but not this thread's own target
            compiled(**inputs)
        assert last_stats()["elastic_level"] == 0.5
        set_elastic_level(compiled, None)
        compiled(**inputs)
        assert last_stats()["elastic_level"] == 1.0 and last_stats()["elastic_slo_ms"] == 1e6
    for bad in ({"slo_ms": -1}, {"slo_ms": "fast"}, {"slo_quantile": 0}, {"profile_repeats": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            parse_options({"elastic": bad})


def test_explain_shows_every_level_as_its_own_compile():
    import dynexec_compile as dx

    model, inputs = model_and_inputs("bert")
    reorder_by_importance(model, importance=random_importance(model))
    report = dx.explain(model, inputs, {"lowering": "eager", "elastic": {"levels": [1.0, 0.5]}, "early_exit": {"threshold": 0.1}})
    (graph,) = report.graphs
    assert sorted(graph.variants) == ["level 0.5", "level 1.0"]  # both compiled for the report
    for variant in graph.variants.values():
        assert [p[0] for p in variant.passes] == ["partition_stages", "insert_early_exit"]
        assert [s.name for s in variant.stages] == ["prefix", "block0", "block1", "block2", "suffix"]
    text = str(report)
    assert "2 variant(s)" in text and "  level 0.5:" in text
