"""The ``torch.compile`` entry point: ``torch.compile(model, backend="dynexec", options={...})``.

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so a fresh
interpreter finds it by name without importing this package first. A thin pipeline:
options -> analysis -> passes -> lowering -> runtime; each step is a function of its own.

Failure policy: when analysis or a pass cannot apply, the default warns (naming the pass and
the node) and compiles the stock graph unchanged, so the model still runs and stays correct;
``strict=True`` raises instead.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from dynexec_compile.analysis.blocks import AnalysisError, BlockAnalysis, analyze_blocks
from dynexec_compile.backends import StageLowerer, lower_graph
from dynexec_compile.config import DynexecConfig, parse_options
from dynexec_compile.debug import GraphDumper
from dynexec_compile.passes import PASS_ORDER, PassContext, PassError
from dynexec_compile.passes.partition_stages import stages_of
from dynexec_compile.runtime.staged import assemble, lower_stages

log = logging.getLogger("dynexec")


@dataclass
class PassRecord:
    name: str
    modified: bool
    notes: list[str]


@dataclass
class CompileReport:
    """What one backend call did, for ``explain()`` and ``dynexec inspect``."""

    cfg: DynexecConfig
    gm: fx.GraphModule  # the graph Dynamo handed over
    example_inputs: list
    analysis: BlockAnalysis | None = None
    passes: list[PassRecord] = field(default_factory=list)
    final_gm: fx.GraphModule | None = None  # after all passes (partitioned when staged)
    fallback: str | None = None  # why the stock graph was compiled unchanged
    stages_compiled: int = 0
    stages_shared: int = 0
    compile_seconds: float = 0.0
    artifacts: dict = field(default_factory=dict)  # what the passes left for the runtime
    runtime: Callable | None = None  # what the backend returned to Dynamo


_reports = threading.local()


class capture_reports:
    """Collect the :class:`CompileReport` of every dynexec compile in this thread."""

    def __enter__(self) -> list[CompileReport]:
        self.reports: list[CompileReport] = []
        self._prev = getattr(_reports, "sink", None)
        _reports.sink = self.reports
        return self.reports

    def __exit__(self, *exc) -> None:
        _reports.sink = self._prev


def run_passes(gm: fx.GraphModule, ctx: PassContext, report: CompileReport, dumper: GraphDumper) -> fx.GraphModule:
    """Run every pass whose condition holds, in ``PASS_ORDER``, up to a pass that fans out
    (the rest then run per variant, see :func:`compile_variant`)."""
    for name, pass_fn, applies in PASS_ORDER:
        if not applies(ctx.cfg):
            continue
        dumper.dump(gm, f"{name}.before")
        result = pass_fn(gm, ctx)
        gm = result.gm
        dumper.dump(gm, f"{name}.after")
        report.passes.append(PassRecord(name, result.modified, result.notes))
        if "variant_runtime" in ctx.artifacts:
            break
    return gm


def compile_variant(report: CompileReport) -> Callable[[str, fx.GraphModule, list], Callable]:
    """``compile(name, gm, example_inputs)``: the whole pipeline (analysis, the passes after the
    fan-out, lowering) on one variant's graph, e.g. an elastic level; its report is kept in
    ``report.artifacts["variants"][name]``."""
    cfg = dataclasses.replace(report.cfg, elastic=None)

    def compile_one(name: str, gm: fx.GraphModule, example_inputs: list) -> Callable:
        sub = CompileReport(cfg, gm, list(example_inputs))
        start = time.perf_counter()
        fn = compile_graph(gm, example_inputs, cfg, sub)
        sub.compile_seconds = time.perf_counter() - start
        sub.runtime = fn
        report.artifacts.setdefault("variants", {})[name] = sub
        return fn

    return compile_one


def _fall_back(report: CompileReport, where: str, err: Exception) -> None:
    report.fallback = f"{where}: {err}"
    msg = f"dynexec: {where} could not apply ({err}); compiling the stock graph unchanged (strict=True raises instead)"
    log.warning(msg)
    warnings.warn(msg, stacklevel=3)


def compile_graph(gm: fx.GraphModule, example_inputs: Sequence, cfg: DynexecConfig, report: CompileReport) -> Callable:
    """Analysis, passes and lowering of one Dynamo graph under ``cfg``."""
    dumper = GraphDumper(cfg.debug_dir)
    dumper.dump(gm, "input")
    try:
        report.analysis = analyze_blocks(gm)
    except AnalysisError as err:
        if cfg.strict:
            raise
        _fall_back(report, "block analysis", err)
        return lower_graph(gm, example_inputs, cfg.lowering)
    if not report.analysis.blocks:
        if cfg.needs_stages and cfg.strict:
            raise AnalysisError(
                "dynexec: the model has no recognisable transformer blocks (no repeated layer "
                "modules with attention), so it cannot be split into stages"
            )
        log.info("dynexec: no transformer blocks found; compiling the graph unchanged")
        if cfg.needs_stages:
            _fall_back(report, "block analysis", AnalysisError("no transformer blocks found"))
        report.final_gm = gm
        return lower_graph(gm, example_inputs, cfg.lowering)
    ctx = PassContext(cfg, report.analysis, {"example_inputs": list(example_inputs)})
    report.artifacts = ctx.artifacts
    try:
        final = run_passes(gm, ctx, report, dumper)
    except (PassError, AnalysisError) as err:
        if cfg.strict:
            raise
        _fall_back(report, "a pass", err)
        report.passes.clear()
        report.final_gm = gm
        return lower_graph(gm, example_inputs, cfg.lowering)
    report.final_gm = final
    if "variant_runtime" in ctx.artifacts:
        return ctx.artifacts["variant_runtime"](compile_variant(report))
    if "dynexec_stages" not in final.meta:
        return lower_unstaged(final, example_inputs, ctx)
    return lower_staged(final, ctx, report)


def lower_unstaged(gm: fx.GraphModule, example_inputs: Sequence, ctx: PassContext) -> Callable:
    """Lower a graph that was not split into stages."""
    return lower_graph(gm, example_inputs, ctx.cfg.lowering)


def lower_staged(top: fx.GraphModule, ctx: PassContext, report: CompileReport) -> Callable:
    """Lower each stage on its own and return the runtime that calls them."""
    lowerer = StageLowerer(ctx.cfg)
    compiled = lower_stages(top, lowerer)
    report.stages_compiled, report.stages_shared = lowerer.compiled, lowerer.reused
    runtime_factory = ctx.artifacts.get("runtime")
    if runtime_factory is not None:
        return runtime_factory(top, compiled)
    runner = assemble(top, compiled)
    num_stages = len(stages_of(top))

    def run_staged(*args):
        from dynexec_compile.runtime.stats import record_stats

        record_stats({"stages_run": num_stages})
        return runner(*args)

    return run_staged


def dynexec_backend(gm: fx.GraphModule, example_inputs: Sequence, options: dict | None = None) -> Callable:
    """The Dynamo backend. ``options`` come from ``torch.compile(..., options=...)``."""
    cfg = parse_options(options)
    if cfg.lowering == "tensorrt":
        from dynexec_compile.backends.tensorrt import check_tensorrt

        check_tensorrt()  # a missing optional dependency is an error, never a silent fallback
    report = CompileReport(cfg, gm, list(example_inputs))
    start = time.perf_counter()
    fn = compile_graph(gm, example_inputs, cfg, report)
    report.compile_seconds = time.perf_counter() - start
    report.runtime = fn
    sink = getattr(_reports, "sink", None)
    if sink is not None:
        sink.append(report)
    return fn


def is_registered() -> bool:
    """Whether Dynamo finds ``backend="dynexec"`` by name (through the entry point)."""
    return "dynexec" in torch._dynamo.list_backends(exclude_tags=())
