"""The Triton kernel behind :func:`exit_decision_triton` (imports triton; load it lazily).

One program per row streams the row in ``BLOCK_C`` chunks and keeps an online softmax:
the running max ``m``, ``s = sum exp(x - m)`` and ``t = sum exp(x - m) * (x - m)``, both
rescaled when ``m`` grows, so any vocabulary size runs in one pass with fixed registers.
At the end ``entropy = log s - t / s`` and ``max_prob = 1 / s``.

Why the kernel can run compiled or interpreted in one process: ``@triton.jit`` decides when
it *decorates* whether a function runs compiled or through the interpreter (it reads
``TRITON_INTERPRET`` then), and so do the ``@jit`` helpers of ``triton.language``
(``tl.max``, ``tl.sum``, ``tl.zeros``, ...), which are decorated when triton is imported:
called from an interpreted kernel while compiled they fail ("Cannot call @triton.jit'd
outside of the scope of a kernel"). So the kernel is decorated on first use, once per mode,
and uses only ``triton.language`` builtins plus ``tl.reduce`` with triton's combine functions
(the interpreter calls their Python function, the compiler inlines them). The mode then
follows ``TRITON_INTERPRET`` at launch time, whenever triton was imported, and a test can
turn the interpreter on with ``monkeypatch.setenv``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dynexec_compile.backends.kernels.exit_decision import triton_interpreting

MAX_BLOCK_C = 4096  # columns per chunk; a row longer than this is streamed in chunks


# Combine functions for tl.reduce: triton's own (what tl.max / tl.min / tl.sum reduce with),
# which the interpreter recognises and runs as one numpy call instead of element by element.
_max = tl.standard._elementwise_max
_min = tl.standard._elementwise_min
_add = tl.standard._sum_combine


def _exit_decision_kernel(
    logits_ptr,  # [N, C] rows, unit stride along C, any float dtype
    exit_ptr,  # [N] bool
    pred_ptr,  # [N] int64
    entropy_ptr,  # [N] fp32
    max_prob_ptr,  # [N] fp32
    n_cols,
    stride_row,
    threshold,
    RULE_MAX_PROB: tl.constexpr,  # False: exit = entropy < threshold; True: max_prob >= threshold
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride_row may pass 2**31
    row_ptr = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_C)
    neg_inf = float("-inf")

    m = tl.full([], neg_inf, tl.float32)  # running max
    s = tl.full([], 0.0, tl.float32)  # sum exp(x - m)
    t = tl.full([], 0.0, tl.float32)  # sum exp(x - m) * (x - m)
    best = tl.full([], 0, tl.int32)  # first index of the running max
    bad = tl.full([], 0, tl.int32)  # 1 once a NaN or +inf logit was seen
    for start in range(0, n_cols, BLOCK_C):
        offs = start + cols  # [BLOCK_C]
        x = tl.load(row_ptr + offs, mask=offs < n_cols, other=neg_inf).to(tl.float32)
        bad = tl.maximum(bad, tl.reduce(((x != x) | (x == float("inf"))).to(tl.int32), 0, _max))
        c_max = tl.reduce(x, 0, _max)
        c_arg = tl.reduce(tl.where(x == c_max, offs, n_cols), 0, _min)  # first index of c_max
        best = tl.where(c_max > m, c_arg, best)  # strict: an equal later max keeps the first
        m_new = tl.maximum(m, c_max)
        # exponents are taken relative to m_ref; 0 while every logit so far is -inf
        m_ref = tl.where(m_new == neg_inf, 0.0, m_new)
        alpha = tl.exp(m - m_ref)  # rescales s and t to the new max; 0 when m is -inf
        shift = tl.where(m == neg_inf, 0.0, m - m_ref)  # (x - m_new) = (x - m) + shift
        d = x - m_ref  # [BLOCK_C], -inf at -inf logits
        e = tl.exp(d)  # [BLOCK_C], exp(-inf) = 0
        ed = e * tl.where(e > 0.0, d, 0.0)  # 0 * log 0 = 0, not 0 * -inf = NaN
        t = alpha * (t + s * shift) + tl.reduce(ed, 0, _add)
        s = alpha * s + tl.reduce(e, 0, _add)
        m = m_new

    all_neg_inf = m == neg_inf
    s = tl.where(all_neg_inf, n_cols, s)  # an all -inf row reads as uniform: s = C, t = 0
    entropy = tl.maximum(tl.log(s) - t / s, 0.0)  # clamp the rounding below 0 of a one-hot row
    max_prob = 1.0 / s
    entropy = tl.where(bad > 0, float("nan"), entropy)
    max_prob = tl.where(bad > 0, float("nan"), max_prob)
    if RULE_MAX_PROB:
        leave = max_prob >= threshold  # NaN compares False: a bad row never exits
    else:
        leave = entropy < threshold
    tl.store(exit_ptr + row, leave)
    tl.store(pred_ptr + row, best.to(tl.int64))
    tl.store(entropy_ptr + row, entropy)
    tl.store(max_prob_ptr + row, max_prob)


_jitted: dict[bool, object] = {}


def jitted_kernel():
    """The kernel decorated with ``triton.jit`` for the current interpreter mode."""
    mode = triton_interpreting()
    if mode not in _jitted:
        _jitted[mode] = triton.jit(_exit_decision_kernel)
    return _jitted[mode]


def default_block_c(n_cols: int) -> int:
    """The smallest power of two >= ``n_cols`` (at least 16), capped at :data:`MAX_BLOCK_C`."""
    return min(MAX_BLOCK_C, max(16, triton.next_power_of_2(n_cols)))


def launch(
    logits: torch.Tensor, rule_max_prob: bool, threshold: float, block_c: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the kernel on ``logits: [N, C]`` (validated by the caller); returns
    ``(exit_mask: bool[N], pred: int64[N], entropy: f32[N], max_prob: f32[N])``."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    n_rows, n_cols = logits.shape
    dev = logits.device
    exit_mask = torch.empty(n_rows, dtype=torch.bool, device=dev)
    pred = torch.empty(n_rows, dtype=torch.int64, device=dev)
    entropy = torch.empty(n_rows, dtype=torch.float32, device=dev)
    max_prob = torch.empty(n_rows, dtype=torch.float32, device=dev)
    if n_rows == 0:
        return exit_mask, pred, entropy, max_prob
    jitted_kernel()[(n_rows,)](
        logits, exit_mask, pred, entropy, max_prob,
        n_cols, logits.stride(0), float(threshold),
        RULE_MAX_PROB=rule_max_prob, BLOCK_C=block_c,
        num_warps=8 if block_c >= 2048 else 4, enable_fp_fusion=True,
    )  # fmt: skip
    return exit_mask, pred, entropy, max_prob
