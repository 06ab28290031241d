"""``dynexec::skinny_linear``: the same numbers as ``F.linear`` (fp32 rounding; bf16: the fp32 sum
rounded once) for every row count, shape remainder, bias and thread count; a clear error for
what it does not take; built once into the cache and loaded from there."""

import pytest
import torch
import torch.nn.functional as F

from dynexec_compile.backends.kernels import skinny

pytestmark = pytest.mark.skipif(not skinny.load(), reason="dynexec::skinny_linear could not be built here (needs AVX2 and a C++ compiler; see the log)")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 13, 16, 20])
@pytest.mark.parametrize("features, outputs", [(576, 1536), (577, 37), (8, 4), (3, 5)])
def test_equals_linear(rows, features, outputs, threads):
    """Row counts cover every remainder of the 3-row groups, features every remainder of the
    8-wide vectors (and fewer than 8), outputs every remainder of the 4-row weight blocks."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(rows * 1000 + features)
        x, weight, bias = torch.randn(rows, features), torch.randn(outputs, features), torch.randn(outputs)
        op = torch.ops.dynexec.skinny_linear.default
        torch.testing.assert_close(op(x, weight, bias), F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(op(x, weight, None), F.linear(x, weight), rtol=1e-5, atol=1e-4)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 13])
@pytest.mark.parametrize("features, outputs", [(576, 1536), (577, 37), (8, 4), (3, 5)])
def test_bf16_is_the_fp32_sum_rounded_once(rows, features, outputs, bias):
    """bf16 in and out: the fp32 sum of the widened inputs plus the bias, rounded to bf16 once —
    what PyTorch's own bf16 linear computes on the CPU. Only the order of the fp32 sums differs,
    so an output may differ by one bf16 step where the sum sits on a rounding boundary."""
    torch.manual_seed(rows * 1000 + features + bias)
    x, weight = torch.randn(rows, features, dtype=torch.bfloat16), torch.randn(outputs, features, dtype=torch.bfloat16)
    b = torch.randn(outputs, dtype=torch.bfloat16) if bias else None
    got = torch.ops.dynexec.skinny_linear.default(x, weight, b)
    want = F.linear(x.float(), weight.float(), None if b is None else b.float()).bfloat16()
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    step = want.float().abs() * 2.0**-7  # one bf16 step (8 significant bits) at the value's size
    assert ((got.float() - want.float()).abs() <= step).all()
    assert (got == want).float().mean() >= 0.99
    torch.testing.assert_close(got, F.linear(x, weight, b))  # and PyTorch's bf16 linear, at bf16's tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 13, 20])
@pytest.mark.parametrize("features, outputs", [(576, 1536), (577, 37), (8, 4), (3, 5)])
def test_int8_is_the_product_with_the_integer_values(rows, features, outputs, dtype):
    """An int8 weight (torchao's weight-only values) is multiplied as its integers, ``x @
    q.to(x.dtype).T`` in fp32 sums (bf16: rounded once), with a bias of x's dtype; the scales
    are the caller's."""
    torch.manual_seed(rows * 1000 + features)
    x, q = torch.randn(rows, features, dtype=dtype), torch.randint(-128, 128, (outputs, features), dtype=torch.int8)
    bias = torch.randn(outputs, dtype=dtype)
    got = torch.ops.dynexec.skinny_linear.default(x, q, bias)
    want = F.linear(x.float(), q.float(), bias.float())  # fp32 sums
    assert got.dtype == dtype and got.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    else:
        # one bf16 rounding, plus fp32 sums in another order where the terms cancel
        summed = F.linear(x.float().abs(), q.float().abs(), bias.float().abs())
        assert ((got.float() - want.bfloat16().float()).abs() <= want.abs() * 2.0**-7 + summed * 1e-6).all()


def test_leading_dimensions_and_a_strided_input_are_kept():
    x = torch.randn(2, 3, 40)[:, :, ::2]  # [2, 3, 20], not contiguous
    weight = torch.randn(6, 20)
    out = torch.ops.dynexec.skinny_linear.default(x, weight, None)
    assert out.shape == (2, 3, 6)
    torch.testing.assert_close(out, F.linear(x, weight), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "x, weight, bias, message",
    [
        (torch.randn(2, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64), None, "fp32 or bf16"),
        (torch.randn(2, 8), torch.randn(4, 8, dtype=torch.bfloat16), None, "a weight of x's dtype or int8"),
        (torch.randn(2, 8, dtype=torch.float64), torch.randint(-8, 8, (4, 8), dtype=torch.int8), None, "fp32 or bf16 x"),
        (torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(4), "bias"),
        (torch.randn(2, 8), torch.randn(8, 4).t(), None, "contiguous"),
        (torch.randn(2, 7), torch.randn(4, 8), None, "7 features"),
        (torch.randn(2, 8), torch.randn(4, 8), torch.randn(5), "bias"),
    ],
)
def test_what_it_does_not_take_raises(x, weight, bias, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.dynexec.skinny_linear.default(x, weight, bias)


def test_the_fake_kernel_traces_under_compile():
    weight = torch.randn(12, 16)
    fn = torch.compile(lambda x: torch.ops.dynexec.skinny_linear.default(x, weight, None).relu(), backend="eager", fullgraph=True)
    x = torch.randn(1, 3, 16)
    torch.testing.assert_close(fn(x), F.linear(x, weight).relu(), rtol=1e-5, atol=1e-5)


def test_built_once_into_the_cache(tmp_path, monkeypatch):
    """The library lands in ``$DYNEXEC_CACHE/kernels`` under a name that changes with the source,
    compiler flags and PyTorch version, so a later process loads it without compiling."""
    monkeypatch.setenv("DYNEXEC_CACHE", str(tmp_path))
    flags = skinny._flags()
    path = skinny._library_path("g++", flags)
    assert path.parent == tmp_path / "kernels" and path.name.startswith("skinny_linear-")
    assert skinny._library_path("clang++", flags) != path
