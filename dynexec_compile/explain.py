"""``explain()``: what dynexec found in a model and what it did, in words a person can read.

Runs the model once through ``torch.compile(backend="dynexec")`` and reports, for every graph
Dynamo handed over: the blocks found (and how), each stage with its node count and parameter
bytes, the live values at each boundary, the passes applied and what each changed, and the
lowering of each stage. ``Explanation.draw(path)`` draws the stage graph (PNG or SVG).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import torch
import torch.fx as fx

from dynexec_compile.backend import CompileReport, capture_reports
from dynexec_compile.config import parse_options
from dynexec_compile.passes.partition_stages import stages_of


@dataclass
class StageInfo:
    name: str
    nodes: int
    param_bytes: int
    lowering: str


@dataclass
class GraphInfo:
    nodes: int
    block_method: str
    blocks: list[tuple[str, str, int]]  # (module path, class, nodes)
    stages: list[StageInfo]
    boundaries: list[tuple[int, list[str]]]  # (after block, live value descriptions)
    passes: list[tuple[str, bool, list[str]]]
    fallback: str | None
    lowering: str
    stages_compiled: int
    stages_shared: int
    compile_seconds: float
    variants: dict[str, GraphInfo] = field(default_factory=dict)  # e.g. each elastic level's compile


def _body_nodes(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op not in ("placeholder", "output"))


def _param_bytes_by_name(report: CompileReport) -> dict[str, int]:
    """Bytes of each parameter/buffer input of the Dynamo graph, by placeholder name."""
    out = {}
    names = [n.name for n in report.gm.graph.nodes if n.op == "placeholder"]
    for name, value in zip(names, report.example_inputs):
        is_state = isinstance(value, torch.nn.Parameter) or "_parameters_" in name or "_buffers_" in name
        if isinstance(value, torch.Tensor) and is_state:
            out[name] = value.numel() * value.element_size()
    return out


def _graph_info(report: CompileReport) -> GraphInfo:
    analysis = report.analysis
    lowering = report.cfg.lowering
    stages: list[StageInfo] = []
    final = report.final_gm
    if final is not None and "dynexec_stages" in final.meta:
        pbytes = _param_bytes_by_name(report)
        for s in stages_of(final):
            inputs = [n.name for n in s.gm.graph.nodes if n.op == "placeholder"]
            stages.append(StageInfo(s.name, _body_nodes(s.gm), sum(pbytes.get(i, 0) for i in inputs), lowering))
    blocks = [(b.module_path, b.module_class, len(b.nodes)) for b in analysis.blocks] if analysis else []
    boundaries = [(b.after_block, [v.describe() for v in b.live_values]) for b in analysis.boundaries] if analysis else []
    return GraphInfo(
        nodes=_body_nodes(report.gm),
        block_method=analysis.method if analysis else "failed",
        blocks=blocks,
        stages=stages,
        boundaries=boundaries,
        passes=[(p.name, p.modified, p.notes) for p in report.passes],
        fallback=report.fallback,
        lowering=lowering,
        stages_compiled=report.stages_compiled,
        stages_shared=report.stages_shared,
        compile_seconds=report.compile_seconds,
        variants={name: _graph_info(sub) for name, sub in report.artifacts.get("variants", {}).items()},
    )


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1024**2 else f"{n / 1024**2:.2f} MiB"


@dataclass
class Explanation:
    graphs: list[GraphInfo]

    def __str__(self) -> str:
        lines = [f"dynexec: {len(self.graphs)} graph(s)"]
        for gi, g in enumerate(self.graphs):
            lines.append(f"\ngraph {gi}: {g.nodes} nodes")
            lines += _describe(g, "  ")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"graphs": [asdict(g) for g in self.graphs]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def stage_graph(self, index: int = 0) -> nx.DiGraph:
        """Stages as vertices; an edge for each boundary, labelled with what crosses it."""
        g = self.graphs[index]
        dg = nx.DiGraph()
        for s in g.stages:
            dg.add_node(s.name, nodes=s.nodes, param_bytes=s.param_bytes)
        names = [s.name for s in g.stages]
        crossing = dict(g.boundaries)
        for a, b in zip(names, names[1:]):
            after = int(a[5:]) if a.startswith("block") else None
            label = "\n".join(v.split(" (")[0] + " " + v.split("(")[1].split(",")[0] for v in crossing.get(after, [])) if after is not None else ""
            dg.add_edge(a, b, label=label)
        return dg

    def draw(self, path: str | Path, index: int = 0) -> Path:
        """Draw the stage graph of graph ``index`` to ``path`` (.png or .svg)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        if path.suffix.lower() not in (".png", ".svg"):
            raise ValueError(f"dynexec: --graph wants a .png or .svg file, got {path.name}")
        dg = self.stage_graph(index)
        if dg.number_of_nodes() == 0:
            raise ValueError("dynexec: this graph has no stages to draw (no transformer blocks were found)")
        order = list(dg.nodes)
        pos = {n: (i, 0) for i, n in enumerate(order)}
        fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(order)), 3.2))
        labels = {n: f"{n}\n{dg.nodes[n]['nodes']} nodes\n{_kib(dg.nodes[n]['param_bytes'])}" for n in order}
        nx.draw_networkx_nodes(dg, pos, ax=ax, node_shape="s", node_size=3800, node_color="#dce9f5", edgecolors="#34699a")
        nx.draw_networkx_labels(dg, pos, labels, ax=ax, font_size=8)
        for a, b, data in dg.edges(data=True):
            (xa, _), (xb, _) = pos[a], pos[b]
            ax.annotate("", xy=(xb - 0.28, 0), xytext=(xa + 0.28, 0), arrowprops=dict(arrowstyle="->", lw=1.2))
            ax.text((xa + xb) / 2, -0.08, data["label"], ha="center", va="top", fontsize=6)
        ax.set_xlim(-0.6, len(order) - 0.4)
        ax.set_ylim(-0.9, 0.5)
        ax.set_title(f"dynexec stages ({self.graphs[index].lowering})")
        ax.axis("off")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path


def _describe(g: GraphInfo, pad: str) -> list[str]:
    lines = []
    if g.blocks:
        first, last = g.blocks[0][0], g.blocks[-1][0]
        lines.append(f"{pad}blocks ({g.block_method}): {len(g.blocks)} x {g.blocks[0][1]}  [{first} .. {last}]")
    else:
        lines.append(f"{pad}blocks: none found (not a transformer; compiled unchanged)")
    if g.fallback:
        lines.append(f"{pad}FELL BACK to the stock graph: {g.fallback}")
    if g.stages:
        lines.append(
            f"{pad}stages (lowering {g.lowering}: {g.stages_compiled} compiled, {g.stages_shared} shared "
            f"with an identical stage; {g.compile_seconds:.1f} s):"
        )
        for s in g.stages:
            lines.append(f"{pad}  {s.name:<10} {s.nodes:>5} nodes  params {_kib(s.param_bytes):>10}  -> {s.lowering}")
    elif g.variants:
        lines.append(f"{pad}{len(g.variants)} variant(s), each compiled as a graph of its own (below)")
    else:
        lines.append(f"{pad}one stage (no dynamic feature needs a cut), lowering {g.lowering}; {g.compile_seconds:.1f} s")
    if g.boundaries:
        lines.append(f"{pad}live values at each boundary:")
        for after, live in g.boundaries:
            lines.append(f"{pad}  after block{after}: " + ", ".join(live))
    lines.append(f"{pad}passes:" + ("" if g.passes else " none applied"))
    for name, modified, notes in g.passes:
        lines.append(f"{pad}  {name}: {'changed the graph' if modified else 'no change'}")
        lines.extend(f"{pad}    {n}" for n in notes)
    for name, variant in g.variants.items():
        lines.append(f"{pad}{name}: {variant.nodes} nodes")
        lines += _describe(variant, pad + "  ")
    return lines


def explain(model: torch.nn.Module, example_inputs: Any, options: dict | None = None) -> Explanation:
    """Compile ``model`` with dynexec, run it once on ``example_inputs`` and report.

    ``example_inputs`` is a dict of keyword arguments or a tuple of positional ones. Unless
    ``options`` say otherwise the graph is split at every block (``partition="blocks"``), so
    the report shows the stages a dynamic feature would use, and every elastic level is
    compiled (``precompile``) and shown. The model is not modified.
    """
    options = dict(options or {})
    options.setdefault("partition", "blocks")
    if isinstance(options.get("elastic"), dict):
        options["elastic"] = {"precompile": True, **options["elastic"]}
    parse_options(options)  # bad options fail here, before anything is compiled
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="dynexec", options=options)
    with capture_reports() as reports, torch.no_grad():
        if isinstance(example_inputs, dict):
            compiled(**example_inputs)
        elif isinstance(example_inputs, (tuple, list)):
            compiled(*example_inputs)
        else:
            compiled(example_inputs)
    return Explanation([_graph_info(r) for r in reports])
