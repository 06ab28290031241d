"""torchao int8 weight-only models: compiled decoding token-identical to the quantized model's own
HF greedy, Inductor's int8 weight conversion left to ATen (WidenQuantizedWeights), and a
decoding step's few-row products streaming the int8 weights through ``dynexec::skinny_linear``."""

import pytest
import torch
from conftest import build_model, left_padded_batch
from test_decode_compile import hf_greedy

import dynexec_compile as dx
from dynexec_compile.backends.inductor_passes import WidenQuantizedWeights
from dynexec_compile.backends.kernels import skinny

torchao = pytest.importorskip("torchao", reason="torchao (the quantize extra) is not installed")
from torchao.quantization import Int8WeightOnlyConfig, quantize_  # noqa: E402

aten, prims = torch.ops.aten, torch.ops.prims


def test_the_pass_widens_an_int8_weight_before_transposing_it():
    graph = torch.fx.Graph()
    x, w = graph.placeholder("x"), graph.placeholder("w")
    x.meta["val"], w.meta["val"] = torch.empty(2, 8), torch.empty(4, 8, dtype=torch.int8)
    t = graph.call_function(aten.permute.default, (w, [1, 0]))
    t.meta["val"] = w.meta["val"].t()
    f = graph.call_function(prims.convert_element_type.default, (t, torch.float32))
    f.meta["val"] = torch.empty(8, 4)
    graph.output(graph.call_function(aten.mm.default, (x, f)))
    WidenQuantizedWeights()(graph)
    targets = [n.target for n in graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.dynexec.widen_weight.default, aten.permute.default, aten.mm.default]
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    xs, ws = torch.randn(2, 8), torch.randint(-127, 127, (4, 8), dtype=torch.int8)
    assert torch.equal(gm(xs, ws), xs @ ws.t().float())


def _int8_product_graph(rows: int) -> torch.fx.Graph:
    """``x [rows, 8] @ convert(permute(w_int8 [4, 8]), float)``: torchao's weight-only product."""
    graph = torch.fx.Graph()
    x, w = graph.placeholder("x"), graph.placeholder("w")
    x.meta["val"], w.meta["val"] = torch.empty(rows, 8), torch.empty(4, 8, dtype=torch.int8)
    t = graph.call_function(aten.permute.default, (w, [1, 0]))
    t.meta["val"] = w.meta["val"].t()
    f = graph.call_function(prims.convert_element_type.default, (t, torch.float32))
    f.meta["val"] = torch.empty(8, 4)
    mm = graph.call_function(aten.mm.default, (x, f))
    mm.meta["val"] = torch.empty(rows, 4)
    graph.output(mm)
    return graph


@pytest.mark.parametrize("rows, kernel", [(skinny.MAX_ROWS, "skinny"), (skinny.MAX_ROWS + 1, "widened")])
def test_few_row_int8_products_go_to_the_skinny_kernel(rows, kernel):
    """With ``skinny_rows``, a product of a decoding step's few rows streams the int8 weight
    through ``dynexec::skinny_linear`` (no widened copy); wider ones keep the widened weight."""
    if not skinny.available():
        pytest.skip("dynexec::skinny_linear is not used on this CPU (not AVX2-only, or not buildable)")
    graph = _int8_product_graph(rows)
    WidenQuantizedWeights(skinny_rows=skinny.MAX_ROWS)(graph)
    targets = [n.target for n in graph.nodes if n.op == "call_function"]
    if kernel == "skinny":
        assert targets == [torch.ops.dynexec.skinny_linear.default]
    else:
        assert targets == [torch.ops.dynexec.widen_weight.default, aten.permute.default, aten.mm.default]
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    xs, ws = torch.randn(rows, 8), torch.randint(-127, 127, (4, 8), dtype=torch.int8)
    torch.testing.assert_close(gm(xs, ws), xs @ ws.t().float(), rtol=1e-5, atol=1e-4)


def test_a_float_weight_is_left_alone():
    graph = torch.fx.Graph()
    w = graph.placeholder("w")
    w.meta["val"] = torch.empty(4, 8, dtype=torch.bfloat16)
    t = graph.call_function(aten.permute.default, (w, [1, 0]))
    f = graph.call_function(prims.convert_element_type.default, (t, torch.float32))
    f.meta["val"] = torch.empty(8, 4)
    graph.output(f)
    WidenQuantizedWeights()(graph)
    assert prims.convert_element_type.default in [n.target for n in graph.nodes]


@pytest.mark.parametrize("strategy, options", [
    ("greedy", {}),
    pytest.param("lookahead", {"window": 1, "ngram": 3, "guesses": 1}, marks=pytest.mark.slow),
])
def test_int8_weight_only_compiled_is_token_identical_to_the_quantized_models_greedy(strategy, options):
    model = build_model("llama")
    quantize_(model, Int8WeightOnlyConfig())
    ids, mask = left_padded_batch([9, 4])
    out = dx.generate(model, ids, mask, strategy=strategy, max_new_tokens=20, eos_token_id=[], regional=True, **options)
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, 20))


def test_the_eager_int8_lm_head_runs_the_skinny_kernel():
    """Regional compilation runs the LM head eagerly: a torchao int8 head goes through the skinny
    kernel on its int8 values, then torchao's per-row scales — torchao's own numbers, without
    widening the whole vocabulary's weight every step."""
    if not skinny.available():
        pytest.skip("dynexec::skinny_linear is not used on this CPU (not AVX2-only, or not buildable)")
    from dynexec_compile.backends import packed

    model = build_model("llama")
    quantize_(model, Int8WeightOnlyConfig())
    head = model.get_output_embeddings()
    assert packed._weight_only_int8(head.weight)
    h = torch.randn(2, 3, model.config.hidden_size)
    with torch.no_grad():
        want = head(h)
        owner = packed.PackedWeights(model)
        with owner.head_installed():
            assert head._compiled_call_impl is not None
            got = head(h)
    assert head._compiled_call_impl is None
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
