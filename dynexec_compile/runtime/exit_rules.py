"""Exit rules: when does a sample leave?

* ``entropy`` (DeeBERT): the softmax entropy of the exit head's logits is below the threshold.
* ``max_prob`` (CALM's softmax response): the top probability reaches the threshold.
* ``patience`` (PABEE): the prediction stayed the same for ``patience`` consecutive exits.

A rule is ``rule(logits [A, C], state) -> (leave: bool[A], state)``; ``state`` carries what a
rule remembers between exits (PABEE's previous prediction and counter) and is row-gathered
with the batch by ``rule.select(state, keep)``.

The decision runs after every exit on the critical path. On CUDA it is dynexec's Triton
kernel. On CPU the PyTorch definition is about fifteen small ops (~0.5 ms a call on a busy
core, as much as an exit head); with the Inductor lowering it is therefore lowered like a
stage, once per logits dtype and class count, with a symbolic row count: one fused C++ loop
with the same semantics (``exit_decision_reference`` traced as it is).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from dynexec_compile.config import EarlyExitConfig
from dynexec_compile.runtime.overrides import NOT_SET, current, overriding


def _decide(logits: torch.Tensor, rule: str, threshold: float):
    """exit mask, prediction; the Triton kernel on CUDA, the PyTorch reference elsewhere."""
    from dynexec_compile.backends.kernels.exit_decision import exit_decision

    d = exit_decision(logits, rule, threshold)
    return d.exit_mask, d.pred


def lower_exit_decision(rule: str, threshold: float, num_classes: int, dtype: torch.dtype, lowering: str) -> Callable:
    """``fn(logits [A, C]) -> (exit_mask bool[A],)`` for CPU logits, lowered with ``lowering``
    for any row count ``A``."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    from dynexec_compile.backends import lower_graph
    from dynexec_compile.backends.kernels.exit_decision import exit_decision_reference

    mode = FakeTensorMode(shape_env=ShapeEnv())
    rows = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC])
    example = mode.from_tensor(torch.empty(2, num_classes, dtype=dtype), symbolic_context=rows)

    def decide(logits: torch.Tensor) -> tuple[torch.Tensor]:
        return (exit_decision_reference(logits, rule, threshold).exit_mask,)  # ([A],)

    with mode, torch.no_grad():
        gm = make_fx(decide)(example)
    # Inductor's caches fail to key this graph (torch 2.13 cannot format the float globals
    # inf/nan of traced code and warns at length); it is a few fused loops, compiled uncached.
    with torch._functorch.config.patch(enable_autograd_cache=False), torch._inductor.config.patch(fx_graph_cache=False):
        return lower_graph(gm, [example], lowering)


@dataclass
class ExitRule:
    cfg: EarlyExitConfig
    lowering: str = "eager"  # "inductor": the CPU decision is lowered (see the module docstring)
    _lowered: dict = field(default_factory=dict, repr=False)  # (dtype, C) -> lowered decision

    def _leave(self, logits: torch.Tensor) -> torch.Tensor:
        if self.lowering != "inductor" or logits.is_cuda:
            return _decide(logits, self.cfg.rule, self.cfg.threshold)[0]
        key = (logits.dtype, logits.shape[1])
        fn = self._lowered.get(key)
        if fn is None:
            fn = self._lowered[key] = lower_exit_decision(self.cfg.rule, self.cfg.threshold, key[1], key[0], self.lowering)
        return fn(logits)[0]

    def init_state(self, batch: int):
        if self.cfg.rule != "patience":
            return None
        return (torch.full((batch,), -1, dtype=torch.long), torch.zeros(batch, dtype=torch.long))

    def select(self, state, keep: torch.Tensor):
        if state is None:
            return None
        return tuple(s.index_select(0, keep) for s in state)

    def __call__(self, logits: torch.Tensor, state):
        # logits: [A, C]
        if self.cfg.rule in ("entropy", "max_prob"):
            return self._leave(logits).to(torch.bool).cpu(), state
        prev, count = state
        pred = logits.argmax(-1).cpu()
        count = torch.where(pred == prev, count + 1, torch.zeros_like(count))
        return count >= self.cfg.patience, (pred, count)


def make_exit_rule(cfg: EarlyExitConfig, lowering: str = "eager") -> ExitRule:
    return ExitRule(cfg, lowering)



@contextmanager
def exit_rule(rule: str | None = None, threshold: float | None = None, patience: int | None = None) -> Iterator[None]:
    """Early-exit models called in this thread inside the block decide with this rule instead
    of the compiled one (fields left ``None`` keep the compiled value): one compiled model, an
    exit rule per call. Thread-local and nestable; checked like the ``early_exit`` options.

    Raises:
        ValueError: a rule or threshold the ``early_exit`` options would refuse.
    """
    from dynexec_compile.config import parse_options

    given = {k: v for k, v in (("rule", rule), ("threshold", threshold), ("patience", patience)) if v is not None}
    if "threshold" not in given and rule is not None:
        raise ValueError("dynexec: exit_rule(rule=...) needs its threshold too (thresholds differ per rule)")
    parse_options({"early_exit": given})  # the same checks as the compiled options
    with overriding("exit_rule", given):
        yield


def requested_exit_config(cfg: EarlyExitConfig) -> EarlyExitConfig:
    """``cfg`` with this thread's innermost :func:`exit_rule` override applied."""
    given = current("exit_rule")
    return cfg if given is NOT_SET else dataclasses.replace(cfg, **given)
