"""The early-exit decision, row-wise over logits: entropy, max probability, argmax, exit mask.

The early-exit runtime asks this after every exit point, for every sample still in the
batch, so it sits on the critical path between stages. On CUDA one hand-written Triton
kernel (``_exit_decision_kernel.py``) reads each row once, streaming it in chunks with an
online softmax, and writes the four results; PyTorch would launch about ten kernels and
materialise the ``[N, C]`` probabilities. :func:`exit_decision_reference` is the plain
PyTorch definition the kernel is tested against, and what runs on CPU.

Semantics (both paths, computed in fp32 whatever the input dtype):

* ``entropy`` is the softmax entropy in nats, ``max_prob`` the largest softmax
  probability, ``pred`` the argmax (the first index on ties, like ``torch.argmax``).
* ``rule="entropy"``: ``exit = entropy < threshold`` (DeeBERT), threshold >= 0.
  ``rule="max_prob"``: ``exit = max_prob >= threshold`` (CALM), threshold in (0, 1].
  The patience rule (PABEE) is the runtime's: it compares consecutive ``pred``.
* ``-inf`` logits are masked-out classes: probability 0, contributing ``0 * log 0 = 0``.
* A row whose logits are all ``-inf`` reads as uniform, the limit of equal logits:
  ``entropy = log C``, ``max_prob = 1 / C``, ``pred = 0``. It is NaN-free and exits only
  under a threshold loose enough to let a uniform prediction go.
* A row with a NaN or ``+inf`` logit has no defined distribution: ``entropy`` and
  ``max_prob`` are NaN, ``exit`` is False (the sample runs on), ``pred`` is unspecified.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

RULES = ("entropy", "max_prob")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class ExitDecision(NamedTuple):
    """Per-row results; N is the number of rows of the logits."""

    exit_mask: torch.Tensor  # bool [N]: the row leaves the network here
    pred: torch.Tensor  # int64 [N]: argmax, first index on ties
    entropy: torch.Tensor  # f32 [N]: softmax entropy in nats
    max_prob: torch.Tensor  # f32 [N]: largest softmax probability


def validate_exit_args(logits: object, rule: object, threshold: object) -> None:
    """Raise ``TypeError``/``ValueError`` saying what is wrong with the arguments."""
    if rule not in RULES:
        raise ValueError(
            f"exit_decision: unknown rule {rule!r}; valid rules are {', '.join(RULES)} "
            "(the 'patience' rule is evaluated by the runtime from consecutive predictions)"
        )
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"exit_decision: threshold must be a float, got {type(threshold).__name__}")
    if rule == "entropy" and not (math.isfinite(threshold) and threshold >= 0):
        raise ValueError(
            f"exit_decision: an entropy threshold must be a finite number >= 0 (nats), got {threshold}"
        )
    if rule == "max_prob" and not 0 < threshold <= 1:
        raise ValueError(f"exit_decision: a max_prob threshold must be in (0, 1], got {threshold}")
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"exit_decision: logits must be a torch.Tensor, got {type(logits).__name__}"
        )
    if logits.dim() != 2:
        raise ValueError(
            f"exit_decision: logits must be 2-D [N, C], got shape {tuple(logits.shape)}; "
            "flatten the leading dimensions first (e.g. logits.reshape(-1, C))"
        )
    if logits.dtype not in _DTYPES:
        raise TypeError(
            f"exit_decision: logits dtype {logits.dtype} is not supported; "
            "use float32, float16 or bfloat16"
        )
    if logits.shape[1] == 0:
        raise ValueError("exit_decision: logits have 0 classes (shape [N, 0]); need C >= 1")


def _exit_mask(entropy: torch.Tensor, max_prob: torch.Tensor, rule: str, threshold: float):
    if rule == "entropy":
        return entropy < threshold
    return max_prob >= threshold


def triton_interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's interpreter right now (read as triton
    reads it)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in {"1", "true", "on", "yes"}


def exit_decision_reference(logits: torch.Tensor, rule: str, threshold: float) -> ExitDecision:
    """The PyTorch definition of the exit decision (see the module docstring)."""
    validate_exit_args(logits, rule, threshold)
    return _reference(logits, rule, threshold)


def _reference(logits: torch.Tensor, rule: str, threshold: float) -> ExitDecision:
    x = logits.float()  # x: [N, C]
    all_neg_inf = torch.isneginf(x).all(dim=-1, keepdim=True)  # [N, 1]
    bad = (torch.isnan(x) | torch.isposinf(x)).any(dim=-1)  # [N]
    x = torch.where(all_neg_inf, 0.0, x)  # an all -inf row reads as uniform
    logp = torch.log_softmax(x, dim=-1)  # [N, C], -inf where the logit is -inf
    p = logp.exp()  # [N, C]
    entropy = -torch.where(p > 0, p * logp, 0.0).sum(dim=-1)  # [N], 0 * log 0 = 0
    max_prob = logp.amax(dim=-1).exp()  # [N]
    nan = torch.tensor(float("nan"), device=x.device)
    entropy = torch.where(bad, nan, entropy)
    max_prob = torch.where(bad, nan, max_prob)
    pred = x.argmax(dim=-1)  # [N], first index on ties
    return ExitDecision(_exit_mask(entropy, max_prob, rule, threshold), pred, entropy, max_prob)


def _load_kernel():
    try:
        import triton  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "dynexec: the Triton exit-decision kernel needs triton, which is not installed; "
            "`pip install triton` (it comes with CUDA builds of torch), or run on CPU "
            "without TRITON_INTERPRET=1 to use the PyTorch reference"
        ) from err
    from dynexec_compile.backends.kernels import _exit_decision_kernel

    return _exit_decision_kernel


def exit_decision_triton(
    logits: torch.Tensor, rule: str, threshold: float, block_c: int | None = None
) -> ExitDecision:
    """The exit decision by dynexec's Triton kernel: compiled on CUDA, or through Triton's
    interpreter when ``TRITON_INTERPRET=1`` (then CPU tensors work too).

    ``block_c`` (a power of two) is the number of columns each chunk of the streamed row
    holds; by default the row length rounded up to a power of two, at most 4096.
    """
    validate_exit_args(logits, rule, threshold)
    return _triton(logits, rule, threshold, block_c)


def _triton(logits: torch.Tensor, rule: str, threshold: float, block_c: int | None = None):
    kernel = _load_kernel()
    if block_c is None:
        block_c = kernel.default_block_c(logits.shape[1])
    elif block_c < 1 or block_c & (block_c - 1):
        raise ValueError(f"exit_decision_triton: block_c must be a power of two, got {block_c}")
    if not logits.is_cuda and not triton_interpreting():
        raise ValueError(
            f"exit_decision_triton: logits are on {logits.device}; the compiled kernel needs "
            "CUDA tensors (set TRITON_INTERPRET=1 to run it on CPU through the interpreter)"
        )
    out = kernel.launch(logits, rule == "max_prob", float(threshold), block_c)
    return ExitDecision(*out)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def exit_decision(logits: torch.Tensor, rule: str, threshold: float) -> ExitDecision:
    """The exit decision for ``logits: [N, C]`` under ``rule`` and ``threshold``.

    Runs the Triton kernel on CUDA tensors when triton is installed (the PyTorch reference
    otherwise), the PyTorch reference on CPU, and the Triton kernel on CPU through the
    interpreter when ``TRITON_INTERPRET=1`` is set (a missing triton is then an ImportError).
    """
    validate_exit_args(logits, rule, threshold)
    if triton_interpreting() or (logits.is_cuda and _triton_available()):
        return _triton(logits, rule, threshold)
    return _reference(logits, rule, threshold)
