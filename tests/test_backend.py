"""The backend end to end: default path, failure policy, lowerings, debug dumps."""

import json
import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import hf_models as H
from dynexec_compile import passes
from dynexec_compile.backend import capture_reports, dynexec_backend
from dynexec_compile.backends.tensorrt import tensorrt_available
from dynexec_compile.passes import PassError


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def test_default_options_compile_the_graph_whole_and_exact():
    model = H.classifier("bert")
    inputs = H.encoder_inputs(pad_last=3)
    with torch.no_grad(), capture_reports() as reports:
        ref = model(**inputs).logits
        out = torch.compile(model, backend="dynexec", options={"lowering": "eager"}, fullgraph=True)(**inputs).logits
    assert torch.equal(out, ref)
    (report,) = reports
    assert report.analysis.num_blocks == 3 and report.passes == []  # no feature: nothing to cut


def test_model_without_blocks_compiles_unchanged():
    model, x = mlp(), torch.randn(4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no dynamic feature asked for: nothing to warn about
        out = torch.compile(model, backend="dynexec", options={"lowering": "eager"})(x)
    assert torch.equal(out, model(x))


def test_staging_a_model_without_blocks_warns_and_still_runs():
    model, x = mlp(), torch.randn(4, 8)
    with pytest.warns(UserWarning, match="block analysis could not apply.*no transformer blocks"):
        out = torch.compile(model, backend="dynexec", options={"lowering": "eager", "partition": "blocks"})(x)
    assert torch.equal(out, model(x))


def test_strict_raises_when_there_are_no_blocks():
    model, x = mlp(), torch.randn(4, 8)
    with pytest.raises(Exception, match="no recognisable transformer blocks"):
        torch.compile(model, backend="dynexec", options={"lowering": "eager", "partition": "blocks", "strict": True})(x)


def _failing_pass(gm, ctx):
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    raise PassError(f"failing_pass: cannot rewrite {node.format_node()}")


def test_failing_pass_falls_back_with_a_warning_naming_pass_and_node(monkeypatch):
    monkeypatch.setattr(passes, "PASS_ORDER", [("failing_pass", _failing_pass, lambda cfg: True)])
    monkeypatch.setattr("dynexec_compile.backend.PASS_ORDER", passes.PASS_ORDER)
    model = H.classifier("bert")
    inputs = H.encoder_inputs()
    with torch.no_grad(), pytest.warns(UserWarning, match=r"failing_pass: cannot rewrite %\w+ : \["):
        out = torch.compile(model, backend="dynexec", options={"lowering": "eager"})(**inputs).logits
        ref = model(**inputs).logits
    assert torch.equal(out, ref)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="failing_pass"):
        torch.compile(model, backend="dynexec", options={"lowering": "eager", "strict": True})(**inputs)


def test_unknown_option_is_a_value_error_at_compile():
    with pytest.raises(Exception, match="unknown option.*valid keys"):
        torch.compile(mlp(), backend="dynexec", options={"lowring": "eager"})(torch.randn(2, 8))


@pytest.mark.skipif(tensorrt_available()[0], reason="torch-tensorrt and CUDA are present: the GPU test covers this path")
def test_tensorrt_without_it_says_what_to_install():
    with pytest.raises(RuntimeError, match=r"tensorrt.*pip install 'dynexec_compile\[tensorrt\]'"):
        dynexec_backend(torch.fx.symbolic_trace(mlp()), [torch.randn(2, 8)], options={"lowering": "tensorrt"})


def test_one_dynamo_compile_and_no_recompile_on_same_shapes():
    model = H.classifier("llama")
    counter = CompileCounterWithBackend(lambda gm, ex: dynexec_backend(gm, ex, options={"lowering": "eager", "partition": "blocks", "strict": True}))
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        for seed in range(3):
            compiled(**H.encoder_inputs(seed=seed))
    assert counter.frame_count == 1


def test_debug_dir_has_every_graph_before_and_after_every_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNEXEC_DEBUG_DIR", str(tmp_path))
    model = H.classifier("bert")
    with torch.no_grad():
        torch.compile(model, backend="dynexec", options={"lowering": "eager", "partition": "blocks"})(**H.encoder_inputs())
    (run,) = list(tmp_path.iterdir())
    names = sorted(p.name for p in run.iterdir())
    assert names == ["00.input.txt", "01.partition_stages.before.txt", "02.partition_stages.after.txt"]
    after = (run / "02.partition_stages.after.txt").read_text()
    assert "class GraphModule" in after and "submod_1" in after and "torch._C._nn.linear" in after


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_inductor_staged_equals_stock(family):
    model = H.classifier(family)
    inputs = H.encoder_inputs(pad_last=2)
    with torch.no_grad(), capture_reports() as reports:
        ref = model(**inputs).logits
        out = torch.compile(model, backend="dynexec", options={"partition": "blocks", "strict": True})(**inputs).logits
    assert (out - ref).abs().max().item() <= 1e-5
    assert reports[0].stages_compiled == 3 and reports[0].stages_shared == 2


@pytest.mark.slow
def test_inductor_default_equals_stock():
    model = H.causal_lm("llama")
    ids = torch.randint(3, H.VOCAB, (1, 9))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        out = torch.compile(model, backend="dynexec")(input_ids=ids).logits
    assert (out - ref).abs().max().item() <= 1e-5


def test_report_is_json_serialisable():
    from dynexec_compile.explain import explain

    e = explain(H.classifier("distilbert"), H.encoder_inputs(), {"lowering": "eager"})
    assert json.loads(e.to_json())["graphs"][0]["stages"][1]["name"] == "block0"
