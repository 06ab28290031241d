"""The early-exit runtime: run a block, score the batch with an exit head, let confident
samples leave, compact the rest, go on.

Batch compaction needs stage graphs that accept any batch size, i.e. a Dynamo graph whose
batch dimension is symbolic (``torch._dynamo.mark_dynamic(input_ids, 0)`` or
``torch.compile(..., dynamic=True)``): then every live value whose first dimension is the
batch symbol is row-gathered and the stages run on the smaller batch without recompiling.
With a static batch the runtime still gives every sample its own exit (its outputs are taken
at its exit), but the batch runs on whole until every sample has left; it says so once.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable

import torch
import torch.fx as fx

from dynexec_compile.config import EarlyExitConfig
from dynexec_compile.exit_heads import ExitHeads, find_exit_heads, resolve_heads
from dynexec_compile.passes import PassContext
from dynexec_compile.runtime.exit_recording import ExitRecording, RecordedCall, active_recording
from dynexec_compile.runtime.exit_rules import ExitRule, make_exit_rule, requested_exit_config
from dynexec_compile.runtime.staged import StagePlan, make_plan
from dynexec_compile.runtime.stats import record_stats

log = logging.getLogger("dynexec")
_UNRESOLVED = object()  # no heads resolved yet (None means "none attached")


def _example(node: fx.Node):
    return node.meta.get("example_value", node.meta.get("val"))


def _slot_examples(top: fx.GraphModule, plan: StagePlan) -> dict[int, object]:
    """Example value (fake tensor or SymInt) of every env slot."""
    out: dict[int, object] = {}
    placeholders = [n for n in top.graph.nodes if n.op == "placeholder"]
    for slot, node in enumerate(placeholders):
        out[slot] = _example(node)
    for step in plan.steps:
        for slot, node in zip(step.writes, step.stage.gm.graph.output_node().args[0]):
            out[slot] = _example(node)
    return out


def _batch_symbols(top: fx.GraphModule) -> set | None:
    """Symbols of the batch dimension of the data inputs, or None if the batch is static or
    shares its symbol with another dimension (then it cannot change on its own)."""
    symbols, other = set(), set()
    for node in top.graph.nodes:
        if node.op != "placeholder" or "_parameters_" in node.name or "_buffers_" in node.name:
            continue
        val = _example(node)
        if not isinstance(val, torch.Tensor) or val.dim() == 0:
            continue
        first, rest = val.shape[0], val.shape[1:]
        if isinstance(first, torch.SymInt):
            symbols.add(first.node.expr)
        other.update(d.node.expr for d in rest if isinstance(d, torch.SymInt))
    if not symbols or symbols & other:
        return None
    return symbols


class EarlyExitRuntime:
    """Walks the stages of one partitioned graph with exits after some blocks."""

    def __init__(
        self,
        top: fx.GraphModule,
        plan: StagePlan,
        ee_plan,
        cfg: EarlyExitConfig,
        make_head_fns: Callable[[ExitHeads | None], dict[int, Callable]],
        lowering: str = "eager",
        example_inputs: list | None = None,
    ):
        self.plan = plan
        self.requested_heads = cfg.heads  # "auto", "shared" or "trained", as the options said
        self.cfg = cfg  # with heads resolved (by _resolve_heads) for the heads attached now
        self.num_blocks = ee_plan.num_blocks
        self.lowering = lowering
        self.rule: ExitRule = make_exit_rule(cfg, lowering)
        self._rules = {(cfg.rule, cfg.threshold, cfg.patience): self.rule}  # per-call exit_rule()s
        self.exit_hidden = {site.block: plan.value_slot[site.hidden] for site in ee_plan.sites}
        self.suffix = plan.steps[-1]
        hidden_slot = plan.value_slot[ee_plan.suffix_hidden]
        self.suffix_hidden_args = [i for i, r in enumerate(self.suffix.reads) if r == hidden_slot]
        if not self.suffix_hidden_args:
            raise RuntimeError("dynexec: the head stage does not read the last hidden state")
        self.outputs = plan.outputs if isinstance(plan.outputs, (tuple, list)) else (plan.outputs,)
        self.out_position = {slot: self.suffix.writes.index(slot) for slot in self.outputs}  # graph output -> suffix output
        self.logits_output = ee_plan.logits_output
        self._make_head_fns = make_head_fns
        self.head_fns: dict[int, Callable] | None = None  # trained heads by block; None: shared
        # one parameter of the model among the graph inputs: the key attached heads are found by
        self.param_slot = next(
            (i for i, n in enumerate(n for n in top.graph.nodes if n.op == "placeholder") if "_parameters_" in n.name),
            None,
        )
        self._attached: object = _UNRESOLVED
        self._resolve_heads(find_exit_heads(example_inputs or []))
        examples = _slot_examples(top, plan)
        symbols = _batch_symbols(top)
        self.compaction = symbols is not None
        self.batch_tensor_slots: list[int] = []
        self.batch_int_slots: list[int] = []
        if self.compaction:
            for slot, val in examples.items():
                if isinstance(val, torch.Tensor) and val.dim() > 0 and isinstance(val.shape[0], torch.SymInt) and val.shape[0].node.expr in symbols:
                    self.batch_tensor_slots.append(slot)
                elif isinstance(val, torch.SymInt) and val.node.expr in symbols:
                    self.batch_int_slots.append(slot)
        self.data_input_slots = [
            slot for slot, val in examples.items()
            if slot < plan.num_inputs and isinstance(val, torch.Tensor) and val.dim() > 0 and val.dtype in (torch.int64, torch.int32)
        ]
        self._warned = False

    # --- helpers -----------------------------------------------------------------------------

    def _resolve_heads(self, attached: ExitHeads | None) -> None:
        """Point the exits at the heads attached now: Dynamo reuses this compiled graph for a
        later ``torch.compile`` of the same model with the same options, and attaching heads
        does not change the graph, so ``"auto"`` (and which trained heads) is decided per call,
        not once at compile time. A no-op while the attached heads stay the same."""
        if attached is self._attached:
            return
        heads = resolve_heads(self.requested_heads, attached)
        self.head_fns = self._make_head_fns(attached) if heads == "trained" else None
        self.cfg = dataclasses.replace(self.cfg, heads=heads)
        self._attached = attached

    def _follow_attached_heads(self, args) -> None:
        if self.param_slot is not None:
            self._resolve_heads(find_exit_heads((args[self.param_slot],)))

    def _head(self, block: int, env: list) -> tuple:
        """All graph outputs as the head computes them from the hidden state after ``block``."""
        if self.head_fns is not None:
            logits = self.head_fns[block](env[self.exit_hidden[block]], env)
            return tuple(logits if i == self.logits_output else None for i in range(len(self.outputs)))
        args = [env[r] for r in self.suffix.reads]
        for i in self.suffix_hidden_args:
            args[i] = env[self.exit_hidden[block]]
        out = self.suffix.fn(*args)
        return tuple(out[self.out_position[slot]] for slot in self.outputs)

    def _compact(self, env: list, keep: torch.Tensor) -> None:
        count = int(keep.numel())
        for slot in self.batch_tensor_slots:
            if env[slot] is not None:
                env[slot] = env[slot].index_select(0, keep)
        for slot in self.batch_int_slots:
            env[slot] = count

    def _batch_size(self, args) -> int:
        for slot in self.data_input_slots:
            return args[slot].shape[0]
        raise RuntimeError("dynexec: cannot tell the batch size (no integer data input)")

    def _rule_now(self) -> ExitRule:
        """The compiled rule, or this thread's ``exit_rule(...)`` override (each lowered once)."""
        cfg = requested_exit_config(self.cfg)
        key = (cfg.rule, cfg.threshold, cfg.patience)
        if key not in self._rules:
            from dynexec_compile.config import parse_options

            parse_options({"early_exit": dataclasses.asdict(cfg)})  # a threshold out of the rule's range
            self._rules[key] = make_exit_rule(cfg, self.lowering)
        return self._rules[key]

    # --- the loop ----------------------------------------------------------------------------

    def __call__(self, *args):
        self._follow_attached_heads(args)
        recording = active_recording()
        if recording is not None:
            return self._run_recording(args, recording)
        rule = self._rule_now()
        plan = self.plan
        batch = self._batch_size(args)
        env = list(args) + [None] * (plan.num_slots - plan.num_inputs)
        rows = torch.arange(batch)  # original index of each row in the running batch
        live = torch.ones(batch, dtype=torch.bool)  # rows still deciding (static batch mode)
        exit_layer = torch.full((batch,), self.num_blocks - 1, dtype=torch.long)
        results: list[torch.Tensor | None] = [None] * len(self.outputs)
        state = rule.init_state(batch)
        batch_sizes = []
        plan.run(args, 0, 1, env)  # prefix
        for block in range(self.num_blocks):
            batch_sizes.append(int(rows.numel()))
            plan.run(args, block + 1, block + 2, env)
            if block not in self.exit_hidden:
                continue
            head_out = self._head(block, env)
            logits = head_out[self.logits_output]
            scores = logits[:, -1] if logits.dim() == 3 else logits  # [A, C]
            leave, state = rule(scores, state)
            leave = leave & live
            if not bool(leave.any()):
                continue
            self._write(results, head_out, rows[leave], leave, batch)
            exit_layer[rows[leave]] = block
            stay = ~leave & live
            if not bool(stay.any()):
                self._record(exit_layer, batch_sizes, batch, rule.cfg.rule)
                return tuple(results)
            if self.compaction:
                keep = stay.nonzero().squeeze(1)
                self._compact(env, keep)
                rows, live, state = rows[keep], torch.ones(keep.numel(), dtype=torch.bool), rule.select(state, keep)
            else:
                live = stay
                self._warn_static_batch()
        final = plan.run(args, len(plan.steps) - 1, None, env)
        tail = tuple(final[slot] for slot in self.outputs)
        self._write(results, tail, rows[live], live, batch)
        self._record(exit_layer, batch_sizes, batch, rule.cfg.rule)
        return tuple(results)

    def _run_recording(self, args, recording: ExitRecording) -> tuple:
        """Every block and every exit head on the whole batch; the full model's outputs."""
        plan = self.plan
        env = list(args) + [None] * (plan.num_slots - plan.num_inputs)
        plan.run(args, 0, 1, env)  # prefix
        exit_logits = []
        for block in range(self.num_blocks):
            plan.run(args, block + 1, block + 2, env)
            if block in self.exit_hidden:
                logits = self._head(block, env)[self.logits_output]
                exit_logits.append(logits[:, -1] if logits.dim() == 3 else logits)  # [B, C]
        final = plan.run(args, len(plan.steps) - 1, None, env)
        outputs = tuple(final[slot] for slot in self.outputs)
        logits = outputs[self.logits_output]
        recording.calls.append(RecordedCall(
            cfg=self.cfg,
            num_blocks=self.num_blocks,
            exit_blocks=sorted(self.exit_hidden),
            exit_logits=torch.stack(exit_logits, 1).detach().float().cpu(),  # [B, E, C]
            final_logits=(logits[:, -1] if logits.dim() == 3 else logits).detach().float().cpu(),
        ))
        batch = self._batch_size(args)
        self._record(torch.full((batch,), self.num_blocks - 1, dtype=torch.long), [batch] * self.num_blocks, batch)
        return outputs

    @staticmethod
    def _write(results: list, values: tuple, dest_rows: torch.Tensor, src_mask: torch.Tensor, batch: int) -> None:
        """Rows ``src_mask`` of each output go to rows ``dest_rows`` of the full-batch result."""
        for i, value in enumerate(values):
            if value is None:
                continue
            if results[i] is None:
                results[i] = value.new_zeros((batch,) + tuple(value.shape[1:]))
            results[i][dest_rows] = value[src_mask].to(results[i].dtype)

    def _record(self, exit_layer: torch.Tensor, batch_sizes: list[int], batch: int, rule: str | None = None) -> None:
        layers = (exit_layer + 1).tolist()
        record_stats({
            "exit_layer": exit_layer.tolist(),
            "layers_executed": layers,
            "mean_layers": sum(layers) / len(layers),
            "num_blocks": self.num_blocks,
            "batch_per_block": batch_sizes,
            "compaction": self.compaction,
            "rule": rule or self.cfg.rule,
        })

    def _warn_static_batch(self) -> None:
        if self._warned:
            return
        self._warned = True
        msg = (
            "dynexec: early exit is running without batch compaction because the compiled graph has a static "
            "batch size; mark it dynamic (torch._dynamo.mark_dynamic(input_ids, 0), or torch.compile(..., "
            "dynamic=True)) so exited samples leave the batch. Results are per sample either way."
        )
        log.warning(msg)
        warnings.warn(msg, stacklevel=2)


def early_exit_runtime_factory(ctx: PassContext, ee_plan) -> Callable:
    """What the backend calls once the stages are lowered."""

    def factory(top: fx.GraphModule, compiled: dict[str, Callable]):
        from dynexec_compile.runtime.trained_heads import trained_head_fns

        plan = make_plan(top, compiled)

        def make_head_fns(heads: ExitHeads | None) -> dict[int, Callable]:
            return trained_head_fns(ctx, ee_plan, plan, top, heads)

        return EarlyExitRuntime(
            top, plan, ee_plan, ctx.cfg.early_exit, make_head_fns, ctx.cfg.lowering,
            ctx.artifacts.get("example_inputs", []),
        )

    return factory
