"""The linears of decoding graphs: pre-packed oneDNN weights and, for few rows on AVX2 CPUs,
``dynexec::skinny_linear``. The same numbers as ``F.linear`` (fp32 rounding), tokens identical to
HF greedy through either kernel, never a stale weight, the model untouched, packed copies shared
and freed."""

import gc

import pytest
import torch
import torch.nn.functional as F
from conftest import build_model, left_padded_batch
from test_decode_compile import hf_greedy

import dynexec_compile as dx
from dynexec_compile.backends import packed
from dynexec_compile.backends.kernels import skinny
from dynexec_compile.decoding import DecodeEngine

PACKED = True
pytestmark = pytest.mark.skipif(not packed.available(), reason="this PyTorch build has no oneDNN packed linear")


@pytest.fixture(params=["packed", "skinny"])
def kernel(request, monkeypatch):
    """Which kernel serves few-row linears: oneDNN's packed weights (the skinny kernel turned off)
    or ``dynexec::skinny_linear`` (skipped where it is not preferred or cannot be built)."""
    if request.param == "skinny":
        if not skinny.available():
            pytest.skip("dynexec::skinny_linear is not used on this CPU (not AVX2-only, or not buildable)")
    else:
        monkeypatch.setattr(packed, "_skinny", lambda weight: False)
    return request.param


@pytest.fixture
def no_skinny(monkeypatch):
    monkeypatch.setattr(packed, "_skinny", lambda weight: False)


@pytest.mark.parametrize("shape", [(1, 32), (5, 32), (2, 7, 32)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_linear(shape, bias, kernel):
    layer = torch.nn.Linear(32, 48, bias=bias)
    owner = packed.PackedWeights(torch.nn.Sequential(layer))
    x = torch.randn(*shape)
    out = packed.packed_linear(x, layer.weight, layer.bias)
    assert out.shape == (*shape[:-1], 48)
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert packed._key(layer.weight) in packed._REGISTRY
    del owner


def test_a_weight_changed_in_place_is_packed_again():
    layer = torch.nn.Linear(16, 16)
    owner = packed.PackedWeights(torch.nn.Sequential(layer))
    x = torch.randn(3, 16)
    before = packed.packed_linear(x, layer.weight, layer.bias)
    with torch.no_grad():
        layer.weight.mul_(-2.0)
    after = packed.packed_linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(after, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)
    del owner


def test_an_unknown_weight_runs_the_plain_linear(no_skinny):
    weight, x = torch.randn(8, 4), torch.randn(2, 4)
    assert torch.equal(packed.packed_linear(x, weight, None), F.linear(x, weight))


def test_engines_of_one_model_share_the_packed_copies_and_free_them(llama):
    keys = {packed._key(m.weight) for m in llama.modules() if isinstance(m, torch.nn.Linear)}
    first = DecodeEngine(llama, 1, 32, backend="eager", regional=True)
    second = DecodeEngine(llama, 2, 32, backend="eager", regional=True)
    assert first.compile_settings["packed"] and first._packed.count == len(keys)
    assert all(packed._REGISTRY[k].refs == 2 for k in keys)
    del first
    gc.collect()
    assert all(packed._REGISTRY[k].refs == 1 for k in keys)
    del second
    gc.collect()
    assert not keys & set(packed._REGISTRY)


def rewritten_targets(llama, rows: int, tol: float = 1e-5) -> list:
    """The call targets of ``llama``'s graph over ``rows`` tokens after the packing pass; its
    logits are checked against the model's own first (to ``tol``)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    fn = torch.compile(lambda i: llama(input_ids=i).logits, backend=packed.packing_backend(capture), fullgraph=True)
    ids = torch.randint(0, llama.config.vocab_size, (1, rows))
    with torch.no_grad():
        torch.testing.assert_close(fn(ids), llama(input_ids=ids).logits, rtol=tol, atol=tol)
    return [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]


def test_the_graph_pass_rewrites_every_linear(llama, kernel):
    owner = packed.PackedWeights(llama)
    targets = rewritten_targets(llama, 6)
    linears = sum(isinstance(m, torch.nn.Linear) for m in llama.modules())
    op = torch.ops.dynexec.skinny_linear.default if kernel == "skinny" else torch.ops.dynexec.packed_linear.default
    assert targets.count(op) == linears
    assert torch._C._nn.linear not in targets
    del owner


def test_skinny_serves_static_few_row_graphs_and_packed_the_rest(llama):
    """Up to ``skinny.MAX_ROWS`` rows (a decoding step) go to the skinny kernel; wider graphs
    (a prefill) keep the packed weights."""
    if not skinny.available():
        pytest.skip("dynexec::skinny_linear is not used on this CPU (not AVX2-only, or not buildable)")
    owner = packed.PackedWeights(llama)
    linears = sum(isinstance(m, torch.nn.Linear) for m in llama.modules())
    for rows, op in ((1, "skinny_linear"), (skinny.MAX_ROWS, "skinny_linear"), (skinny.MAX_ROWS + 1, "packed_linear")):
        assert rewritten_targets(llama, rows).count(getattr(torch.ops.dynexec, op).default) == linears, rows
    del owner


@pytest.mark.parametrize("regional", [True, False])
@pytest.mark.parametrize(
    "strategy, options",
    [("greedy", {}), ("lookahead", {"window": 1, "ngram": 3, "guesses": 1}), ("self_speculative", {"exit_layer": 1, "num_draft": 3})],
)
def test_packed_decoding_is_token_identical_to_hf_greedy(llama, regional, strategy, options, kernel):
    ids, mask = left_padded_batch([9, 4])
    out = dx.generate(
        llama, ids, mask, strategy=strategy, max_new_tokens=30, eos_token_id=[], backend="eager",
        regional=regional, packed=PACKED, **options,
    )
    assert torch.equal(out.sequences, hf_greedy(llama, ids, mask, 30))
    head = llama.get_output_embeddings()
    assert head._compiled_call_impl is None  # the head's packed route is removed after each call


def test_packed_needs_a_compiled_cpu_model(llama):
    with pytest.raises(ValueError, match="packed=True"):
        DecodeEngine(llama, 1, 32, compile=False, packed=True)
    assert not DecodeEngine(llama, 1, 32, backend="eager").compile_settings["packed"]


def test_the_model_is_not_modified(llama):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    ids, mask = left_padded_batch([5, 8])
    dx.generate(llama, ids, mask, max_new_tokens=8, eos_token_id=[], backend="eager", regional=True, packed=True)
    after = llama.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m._compiled_call_impl is None for m in llama.modules())


def test_gpt2_conv1d_layers_are_left_to_the_plain_kernels():
    model = build_model("gpt2")
    ids, mask = left_padded_batch([6, 3])
    out = dx.generate(model, ids, mask, max_new_tokens=12, eos_token_id=[], backend="eager", regional=True, packed=True)
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, 12))


def test_bf16_weights_are_packed_only_where_onednn_has_a_bf16_path():
    """On a CPU without AVX-512 / AVX-NE-CONVERT oneDNN cannot reorder bf16 weights: the engine
    keeps the plain linear for them instead of failing at construction."""
    supported = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert packed.packable(torch.zeros(8, 4, dtype=torch.bfloat16)) == supported
    assert packed.packable(torch.zeros(8, 4))
    model = build_model("llama", dtype=torch.bfloat16)
    engine = DecodeEngine(model, 1, 32, backend="eager", regional=True)
    assert engine._packed.count == (sum(isinstance(m, torch.nn.Linear) for m in model.modules()) if supported else 0)
    out = dx.generate(model, torch.tensor([[5, 9, 13, 2]]), max_new_tokens=6, backend="eager", regional=True)
    assert out.sequences.shape == (1, 10)


@pytest.mark.parametrize(
    "strategy, options", [("greedy", {}), ("lookahead", {"window": 1, "ngram": 3, "guesses": 1})]
)
def test_bf16_decoding_steps_go_to_the_skinny_kernel(strategy, options):
    """bf16 weights: oneDNN packs them only with AVX-512 / AVX-NE-CONVERT, and PyTorch's own bf16
    GEMM re-reads them per row; decoding graphs of at most ``skinny.MAX_ROWS`` rows run the skinny
    kernel in bf16 instead, logits at bf16's tolerance of the model's own, tokens equal to HF's
    bf16 greedy."""
    if not skinny.available():
        pytest.skip("dynexec::skinny_linear is not used on this CPU (not AVX2-only, or not buildable)")
    model = build_model("llama", dtype=torch.bfloat16)
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    op = torch.ops.dynexec.skinny_linear.default
    assert rewritten_targets(model, skinny.MAX_ROWS, tol=3e-2).count(op) == linears
    wide = rewritten_targets(model, skinny.MAX_ROWS + 1, tol=3e-2)  # a prefill: widened, or packed with a bf16 path
    assert wide.count(op) == 0
    assert wide.count(packed.widened_linear) == (0 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else linears)
    ids, mask = left_padded_batch([9, 4])
    out = dx.generate(model, ids, mask, strategy=strategy, max_new_tokens=24, eos_token_id=[], backend="eager",
                      regional=True, packed=True, **options)
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, 24))


@pytest.mark.parametrize("rows", [1, 9, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_widened_linear_is_bf16_linear_summed_in_fp32(rows, bias):
    """bf16 products of many rows (a prefill) on the fp32 GEMM: the fp32 sum rounded to bf16 once,
    which is how PyTorch defines its bf16 linear on the CPU (only the order of the sums differs)."""
    torch.manual_seed(rows)
    x, weight = torch.randn(rows, 96, dtype=torch.bfloat16), torch.randn(40, 96, dtype=torch.bfloat16)
    b = torch.randn(40, dtype=torch.bfloat16) if bias else None
    got = packed.widened_linear(x, weight, b)
    want = F.linear(x.float(), weight.float(), None if b is None else b.float()).bfloat16()
    assert got.dtype == torch.bfloat16
    assert ((got.float() - want.float()).abs() <= want.float().abs() * 2.0**-7).all()
    torch.testing.assert_close(got, F.linear(x, weight, b))


def test_bf16_matmuls_are_widened_where_onednn_has_no_bf16_path():
    """Attention's bf16 products over the prompt (``torch.matmul``) go to the fp32 kernels where
    PyTorch's bf16 matmul is slow (no oneDNN bf16 path): the same values up to bf16 rounding;
    fp32 products are left alone."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    fn = torch.compile(lambda a, b: torch.matmul(a, b.transpose(-1, -2)).relu(), backend=packed.packing_backend(capture),
                       fullgraph=True)
    a, b = torch.randn(1, 3, 17, 8, dtype=torch.bfloat16), torch.randn(1, 3, 24, 8, dtype=torch.bfloat16)
    torch.testing.assert_close(fn(a, b), torch.matmul(a, b.transpose(-1, -2)).relu())
    widened = [n for n in graphs[0].graph.nodes if n.target is packed.widened_matmul]
    assert len(widened) == (0 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else 1)
    torch._dynamo.reset()
    graphs.clear()
    fn(a.float(), b.float())
    assert not [n for n in graphs[0].graph.nodes if n.target is packed.widened_matmul]


@pytest.mark.parametrize("one_row_packed", [True, False])
def test_one_row_linears_stay_plain_where_packing_does_not_pay(llama, monkeypatch, one_row_packed, no_skinny):
    """On an AVX2-only CPU a packed 1-token step measured slower than the plain one (the custom
    op's call overhead, no faster GEMV): one-row graphs keep ``linear``; wider ones are packed."""
    monkeypatch.setattr(packed, "ONE_ROW_PACKED", one_row_packed)
    owner = packed.PackedWeights(llama)
    linears = sum(isinstance(m, torch.nn.Linear) for m in llama.modules())
    for rows, expected in ((1, linears if one_row_packed else 0), (3, linears)):
        assert rewritten_targets(llama, rows).count(torch.ops.dynexec.packed_linear.default) == expected
    del owner
