"""dynexec's Triton exit-decision kernel against its PyTorch reference, and the reference
against the textbook formulas.

The kernel runs on CPU through Triton's interpreter: the ``interpret`` fixture sets
``TRITON_INTERPRET=1`` with monkeypatch. ``@triton.jit`` reads that variable when it
*decorates* (not when it launches), so the kernel module decorates on first use, once per
mode (see ``_exit_decision_kernel.py``); monkeypatch removes the variable after each test and
the next compiled-mode use gets its own JITFunction, so other tests are not affected
(``test_interpreter_mode_follows_env`` checks both directions).

Tolerances: both paths upcast the input to fp32 (exactly) and compute in fp32, so the same
tolerance holds for fp32, fp16 and bf16 inputs: entropy and max_prob within
``atol=2e-5, rtol=2e-5`` (different summation orders and formulas: ``log s - t / s`` against
``sum -p log p``); ``pred`` and the exit mask are compared exactly, with thresholds placed in
the widest gap between the rows' values so rounding cannot flip a decision.
"""

from __future__ import annotations

import math

import pytest
import torch

from dynexec_compile.backends.kernels import exit_decision as ed
from dynexec_compile.backends.kernels.exit_decision import (
    ExitDecision,
    exit_decision,
    exit_decision_reference,
    exit_decision_triton,
)

triton = pytest.importorskip("triton", reason="the Triton kernel tests need triton installed")

NEG_INF = float("-inf")
ATOL = RTOL = 2e-5
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def random_logits(n: int, c: int, dtype: torch.dtype, scale: float = 3.0) -> torch.Tensor:
    return (torch.randn(n, c) * scale).to(dtype)  # [N, C]


def splitting_threshold(values: torch.Tensor) -> float:
    """The midpoint of the widest gap between sorted finite values: some rows fall on each
    side and none lies near the threshold."""
    v = values[torch.isfinite(values)].double().sort().values
    if v.numel() < 2:
        return float(v[0]) + 1e-3 if v.numel() else 0.5
    gaps = v[1:] - v[:-1]
    i = int(gaps.argmax())
    return float(v[i] + v[i + 1]) / 2


def assert_same(got: ExitDecision, want: ExitDecision) -> None:
    assert got.exit_mask.dtype == torch.bool and got.pred.dtype == torch.int64
    assert got.entropy.dtype == torch.float32 and got.max_prob.dtype == torch.float32
    torch.testing.assert_close(got.entropy, want.entropy, atol=ATOL, rtol=RTOL, equal_nan=True)
    torch.testing.assert_close(got.max_prob, want.max_prob, atol=ATOL, rtol=RTOL, equal_nan=True)
    defined = ~torch.isnan(want.entropy)  # pred is unspecified for NaN / +inf rows
    assert torch.equal(got.pred[defined], want.pred[defined])
    assert torch.equal(got.exit_mask, want.exit_mask)


# --- the kernel (through the interpreter) against the reference ---------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", [2, 5, 127, 1000, 4099])
@pytest.mark.parametrize("n", [1, 3, 17])
def test_kernel_matches_reference(interpret, n, c, dtype):
    x = random_logits(n, c, dtype)
    want = exit_decision_reference(x, "entropy", 1.0)
    thr = splitting_threshold(want.entropy)
    want = exit_decision_reference(x, "entropy", thr)
    # block_c=256: rows longer than a block are streamed in several chunks, the last partial
    assert_same(exit_decision_triton(x, "entropy", thr, block_c=256), want)


@pytest.mark.parametrize("c", [5, 1000])
def test_kernel_default_block_matches_reference(interpret, c):
    x = random_logits(4, c, torch.float32)
    assert_same(exit_decision(x, "max_prob", 0.5), exit_decision_reference(x, "max_prob", 0.5))


@pytest.mark.parametrize("rule", ["entropy", "max_prob"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_both_rules_split_the_batch(interpret, rule, dtype):
    x = random_logits(17, 50, dtype, scale=torch.linspace(0.2, 6.0, 17)[:, None])  # easy to hard
    stats = exit_decision_reference(x, rule, 0.5)
    thr = splitting_threshold(stats.entropy if rule == "entropy" else stats.max_prob)
    want = exit_decision_reference(x, rule, thr)
    assert 0 < int(want.exit_mask.sum()) < 17  # the threshold splits the batch
    got = exit_decision_triton(x, rule, thr, block_c=16)
    assert_same(got, want)
    direction = got.entropy < thr if rule == "entropy" else got.max_prob >= thr
    assert torch.equal(got.exit_mask, direction)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_neg_inf_logits(interpret, dtype):
    x = random_logits(6, 300, dtype)
    x[0, torch.rand(300) < 0.3] = NEG_INF  # some masked classes
    x[1, :] = NEG_INF
    x[1, 257] = 1.5  # all -inf but one, in the last (partial) chunk
    x[2, :] = NEG_INF  # all -inf: uniform
    x[3, :200] = NEG_INF  # the first chunks entirely -inf, then finite
    x[4, 100:] = NEG_INF  # finite, then entirely -inf chunks
    want = exit_decision_reference(x, "entropy", 0.5)
    got = exit_decision_triton(x, "entropy", 0.5, block_c=64)
    assert_same(got, want)
    assert not torch.isnan(got.entropy).any() and not torch.isnan(got.max_prob).any()
    assert got.pred[1] == 257 and got.entropy[1] == 0 and got.max_prob[1] == 1
    assert bool(got.exit_mask[1])
    assert got.pred[2] == 0
    torch.testing.assert_close(got.entropy[2], torch.tensor(math.log(300)))
    torch.testing.assert_close(got.max_prob[2], torch.tensor(1 / 300))
    assert not bool(got.exit_mask[2])


def test_ties_take_the_first_index(interpret):
    x = torch.zeros(5, 40)  # block_c=16: chunks [0, 16), [16, 32), [32, 40)
    x[0, [3, 9]] = 2.0  # tie inside one chunk
    x[1, [5, 20, 35]] = 2.0  # ties across chunks
    x[2, [18, 21]] = 2.0  # tie in a later chunk only
    x[3, [16, 32]] = 2.0  # ties on chunk starts
    x[4, [15, 16]] = 2.0  # tie across a chunk boundary
    got = exit_decision_triton(x, "max_prob", 0.9, block_c=16)
    assert got.pred.tolist() == [3, 5, 18, 16, 15]
    assert torch.equal(got.pred, x.argmax(dim=-1))
    assert_same(got, exit_decision_reference(x, "max_prob", 0.9))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_ties(interpret, dtype):
    x = torch.randint(-3, 4, (8, 700)).to(dtype)  # many equal maxima per row
    want = exit_decision_reference(x, "entropy", 5.0)
    assert_same(exit_decision_triton(x, "entropy", 5.0, block_c=128), want)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on NaN
def test_nan_and_pos_inf_rows_never_exit(interpret):
    x = torch.zeros(3, 40)
    x[0, 7] = float("nan")
    x[1, 30] = float("inf")
    for rule, thr in (("entropy", 100.0), ("max_prob", 1e-6)):  # thresholds any row passes
        want = exit_decision_reference(x, rule, thr)
        got = exit_decision_triton(x, rule, thr, block_c=16)
        assert_same(got, want)
        assert got.exit_mask.tolist() == [False, False, True]
        assert torch.isnan(got.entropy[:2]).all() and torch.isnan(got.max_prob[:2]).all()


def test_strided_rows_and_empty_batch(interpret):
    h = torch.randn(3, 4, 50)  # [B, S, V]: the last position's logits are strided rows
    x = h[:, -1, :]
    assert not x.is_contiguous()
    assert_same(exit_decision_triton(x, "entropy", 3.5), exit_decision_reference(x, "entropy", 3.5))
    empty = exit_decision_triton(torch.randn(0, 10), "entropy", 1.0)
    assert [t.shape for t in empty] == [torch.Size([0])] * 4
    one_class = exit_decision_triton(torch.randn(2, 1), "max_prob", 1.0)
    assert one_class.exit_mask.all() and (one_class.entropy == 0).all()


# --- dispatch and interpreter mode -------------------------------------------------------


def test_interpreter_mode_follows_env(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    from dynexec_compile.backends.kernels import _exit_decision_kernel as kmod

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not isinstance(kmod.jitted_kernel(), InterpretedFunction)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert isinstance(kmod.jitted_kernel(), InterpretedFunction)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not isinstance(kmod.jitted_kernel(), InterpretedFunction)


def test_dispatch_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(ed, "_triton", lambda *a, **k: calls.append("triton"))
    monkeypatch.setattr(ed, "_reference", lambda *a, **k: calls.append("reference"))
    x = torch.randn(2, 5)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    exit_decision(x, "entropy", 1.0)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    exit_decision(x, "entropy", 1.0)
    assert calls == ["reference", "triton"]


def test_compiled_kernel_refuses_cpu_tensors(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        exit_decision_triton(torch.randn(2, 5), "entropy", 1.0)


def test_missing_triton_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "triton", None)  # `import triton` fails
    with pytest.raises(ImportError, match="pip install triton"):
        exit_decision_triton(torch.randn(2, 5), "entropy", 1.0)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ImportError, match="needs triton"):
        exit_decision(torch.randn(2, 5), "entropy", 1.0)


@pytest.mark.parametrize("dtype", ["*fp32", "*bf16"])
def test_kernel_compiles_for_hopper_without_a_gpu(dtype, monkeypatch):
    """The real compiler (not the interpreter) accepts the kernel: Triton compiles it down to
    a cubin for sm_90 with the ptxas it ships, no GPU needed."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dynexec_compile.backends.kernels import _exit_decision_kernel as kmod

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton build has no NVIDIA backend to compile with")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    signature = {
        "logits_ptr": dtype, "exit_ptr": "*i1", "pred_ptr": "*i64", "entropy_ptr": "*fp32",
        "max_prob_ptr": "*fp32", "n_cols": "i32", "stride_row": "i64", "threshold": "fp32",
        "RULE_MAX_PROB": "constexpr", "BLOCK_C": "constexpr",
    }  # fmt: skip
    src = ASTSource(
        kmod.jitted_kernel(), signature, constexprs={"RULE_MAX_PROB": True, "BLOCK_C": 4096}
    )
    compiled = triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "enable_fp_fusion": True}
    )
    assert len(compiled.asm["cubin"]) > 0


# --- the reference against textbook formulas --------------------------------------------


def naive(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy and max probability straight from the definitions, in float64."""
    p = x.double().exp() / x.double().exp().sum(-1, keepdim=True)
    return -(p * p.log()).sum(-1), p.max(-1).values


def test_reference_matches_the_definition():
    x = torch.randn(6, 9) * 2
    got = exit_decision_reference(x, "entropy", 1.0)
    h, pmax = naive(x)
    torch.testing.assert_close(got.entropy.double(), h, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.max_prob.double(), pmax, atol=1e-6, rtol=1e-6)
    assert torch.equal(got.pred, x.argmax(-1))
    assert torch.equal(got.exit_mask, got.entropy < 1.0)


def test_reference_closed_forms():
    c = 10
    uniform = exit_decision_reference(torch.full((1, c), 3.0), "max_prob", 0.05)
    torch.testing.assert_close(uniform.entropy, torch.tensor([math.log(c)]))
    torch.testing.assert_close(uniform.max_prob, torch.tensor([1 / c]))
    assert uniform.exit_mask.tolist() == [True]  # 0.1 >= 0.05
    two = exit_decision_reference(torch.tensor([[0.0, math.log(3.0), NEG_INF]]), "entropy", 0.6)
    p = torch.tensor([0.25, 0.75])
    torch.testing.assert_close(two.entropy, -(p * p.log()).sum().reshape(1))
    torch.testing.assert_close(two.max_prob, torch.tensor([0.75]))
    assert two.pred.tolist() == [1] and two.exit_mask.tolist() == [True]  # H = 0.562 < 0.6
    big = exit_decision_reference(torch.tensor([[1000.0, 1000.0, -1000.0]]), "entropy", 0.1)
    torch.testing.assert_close(big.entropy, torch.tensor([math.log(2)]))  # no overflow


def test_reference_accepts_low_precision():
    x = torch.randn(4, 33)
    want = exit_decision_reference(x.bfloat16().float(), "entropy", 2.0)
    assert_same(exit_decision_reference(x.bfloat16(), "entropy", 2.0), want)


# --- argument errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "logits, rule, threshold, error, match",
    [
        (torch.randn(2, 3), "patience", 1.0, ValueError, "unknown rule 'patience'"),
        (torch.randn(2, 3), "entropy", -0.1, ValueError, "entropy threshold must be"),
        (torch.randn(2, 3), "entropy", float("nan"), ValueError, "entropy threshold must be"),
        (torch.randn(2, 3), "entropy", float("inf"), ValueError, "entropy threshold must be"),
        (torch.randn(2, 3), "max_prob", 0.0, ValueError, r"max_prob threshold must be in \(0, 1\]"),
        (torch.randn(2, 3), "max_prob", 1.5, ValueError, r"max_prob threshold must be in \(0, 1\]"),
        (torch.randn(2, 3), "max_prob", float("nan"), ValueError, "max_prob threshold"),
        (torch.randn(2, 3), "max_prob", True, TypeError, "threshold must be a float"),
        (torch.randn(2, 3), "max_prob", "0.5", TypeError, "threshold must be a float"),
        (torch.randn(3), "entropy", 1.0, ValueError, r"must be 2-D \[N, C\], got shape \(3,\)"),
        (torch.randn(2, 3, 4), "entropy", 1.0, ValueError, "must be 2-D"),
        (torch.randn(2, 0), "entropy", 1.0, ValueError, "0 classes"),
        (torch.randint(0, 5, (2, 3)), "entropy", 1.0, TypeError, "int64 is not supported"),
        (torch.randn(2, 3).double(), "entropy", 1.0, TypeError, "float32, float16 or bfloat16"),
        ([[0.1, 0.2]], "entropy", 1.0, TypeError, "must be a torch.Tensor"),
    ],
)
@pytest.mark.parametrize("fn", [exit_decision, exit_decision_reference, exit_decision_triton])
def test_argument_errors(fn, logits, rule, threshold, error, match):
    with pytest.raises(error, match=match):
        fn(logits, rule, threshold)


def test_block_c_must_be_a_power_of_two(interpret):
    with pytest.raises(ValueError, match="power of two"):
        exit_decision_triton(torch.randn(2, 5), "entropy", 1.0, block_c=24)


# --- on CUDA: the compiled kernel --------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled Triton kernel needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, c", [(1, 2), (33, 5), (64, 1000), (8, 32000), (4, 128256)])
def test_compiled_kernel_on_cuda(monkeypatch, n, c, dtype):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = (torch.randn(n, c, device="cuda") * 3).to(dtype)
    x[0, : c // 2] = NEG_INF
    if n > 2:
        x[1] = NEG_INF
        x[2, 1:] = x[2, 0]  # an all-tied row
    for rule in ("entropy", "max_prob"):
        want = exit_decision_reference(x, rule, 0.5)
        thr = splitting_threshold((want.entropy if rule == "entropy" else want.max_prob).cpu())
        want = exit_decision_reference(x, rule, thr)
        got = exit_decision(x, rule, thr)  # dispatches to the compiled kernel on CUDA
        assert got.entropy.device.type == "cuda"
        assert_same(got, want)
        assert_same(exit_decision_triton(x, rule, thr, block_c=256), want)
