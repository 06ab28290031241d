"""Exit rules: when does a sample leave?

* ``entropy`` (DeeBERT): the softmax entropy of the exit head's logits is below the threshold.
* ``max_prob`` (CALM's softmax response): the top probability reaches the threshold.
* ``patience`` (PABEE): the prediction stayed the same for ``patience`` consecutive exits.

A rule is ``rule(logits [A, C], state) -> (leave: bool[A], state)``; ``state`` carries what a
rule remembers between exits (PABEE's previous prediction and counter) and is row-gathered
with the batch by ``rule.select(state, keep)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynexec_compile.config import EarlyExitConfig


def _decide(logits: torch.Tensor, rule: str, threshold: float):
    """exit mask, prediction; the Triton kernel on CUDA, the PyTorch reference elsewhere."""
    from dynexec_compile.backends.kernels.exit_decision import exit_decision

    d = exit_decision(logits, rule, threshold)
    return d.exit_mask, d.pred


@dataclass
class ExitRule:
    cfg: EarlyExitConfig

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
            leave, _ = _decide(logits, self.cfg.rule, self.cfg.threshold)
            return leave.to(torch.bool).cpu(), state
        prev, count = state
        pred = logits.argmax(-1).cpu()
        count = torch.where(pred == prev, count + 1, torch.zeros_like(count))
        return count >= self.cfg.patience, (pred, count)


def make_exit_rule(cfg: EarlyExitConfig) -> ExitRule:
    return ExitRule(cfg)
