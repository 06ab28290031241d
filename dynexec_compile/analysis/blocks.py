"""Find the repeated transformer blocks in a Dynamo FX graph.

Everything dynexec does happens *between* blocks: an exit decision after block i, a draft
taken from the first E blocks, a slice of every block's heads. So the first job is to know
which graph nodes belong to which block, where the cuts between blocks are, and which values
cross each cut (the hidden state, the attention mask, rotary cos/sin, the K/V a layer returns).

Two ways to find blocks:

* ``nn_module_stack`` (Dynamo records, for every node, the stack of module calls it was traced
  in). Blocks are the calls of sibling modules of one class held in a container
  (``encoder.layer.0``, ``encoder.layer.1``, ...) or repeated calls of one module (ALBERT's
  shared layer, which Dynamo records as ``key``, ``key@1``, ``key@2``); the group covering the
  most nodes wins.
* A structural fallback for graphs without that metadata: the longest tandem repeat of the
  op sequence, cut where the fewest tensor values cross (the narrowest cut is the boundary a
  person would draw).

The result is a :class:`BlockAnalysis` holding a networkx view of the graph, the blocks, the
stage of every node (prefix 0, block ``i`` is stage ``i + 1``, suffix ``L + 1``) and the
live values at every boundary.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import torch
import torch.fx as fx


class AnalysisError(RuntimeError):
    """The graph does not have the structure a pass needs (names the node where it can)."""


@dataclass
class Block:
    """One transformer block: the nodes traced inside one call of one layer module."""

    index: int
    module_path: str  # e.g. "model.layers.3"; ALBERT's shared layer gives "...groups.0@2"
    module_class: str
    nodes: list[fx.Node]


@dataclass
class LiveValue:
    """A value computed at or before a boundary and used after it."""

    node: fx.Node
    kind: str  # hidden_state | attention_mask | rotary | kv_cache | position | other
    shape: tuple | None
    dtype: torch.dtype | None

    @property
    def name(self) -> str:
        return self.node.name

    def describe(self) -> str:
        shape = "x".join(str(s) for s in self.shape) if self.shape is not None else "?"
        dtype = str(self.dtype).replace("torch.", "") if self.dtype is not None else "?"
        return f"{self.name} ({self.kind}, {dtype}[{shape}])"


@dataclass
class Boundary:
    """The cut after block ``after_block``: what crosses it."""

    after_block: int
    live_values: list[LiveValue]

    def of_kind(self, kind: str) -> list[LiveValue]:
        return [v for v in self.live_values if v.kind == kind]


@dataclass
class BlockAnalysis:
    """Blocks, stages and boundaries of one FX graph."""

    gm: fx.GraphModule
    graph: nx.DiGraph
    blocks: list[Block]
    method: str  # "nn_module_stack" | "structural" | "none"
    stage_of: dict[fx.Node, int] = field(default_factory=dict)
    boundaries: list[Boundary] = field(default_factory=list)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_stages(self) -> int:
        return self.num_blocks + 2

    def stage_name(self, stage: int) -> str:
        if stage == 0:
            return "prefix"
        if stage == self.num_blocks + 1:
            return "suffix"
        return f"block{stage - 1}"

    def hidden_state_after(self, block: int) -> fx.Node:
        """The hidden state leaving ``block`` (the value the next block reads)."""
        hidden = self.boundaries[block].of_kind("hidden_state")
        if len(hidden) != 1:
            raise AnalysisError(
                f"expected exactly one hidden state after block {block}, found "
                f"{[v.name for v in hidden]}"
            )
        return hidden[0].node


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """The data-flow graph of ``gm``: one vertex per node (by name), edges producer -> user."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(node.name, op=node.op, target=_target_str(node))
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


def _target_str(node: fx.Node) -> str:
    t = node.target
    return getattr(t, "__name__", None) or str(t)


def _example_value(node: fx.Node):
    return node.meta.get("example_value", node.meta.get("val"))


def _is_param_placeholder(node: fx.Node) -> bool:
    return node.op == "placeholder" and ("_parameters_" in node.name or "_buffers_" in node.name)


# --- blocks from nn_module_stack ---------------------------------------------------------------

_INDEXED = re.compile(r"^(.*)\.(\d+)$")


def _clean_path(path: str) -> str:
    # Dynamo writes "L['self'].model.layers.0"; users know "model.layers.0".
    path = re.sub(r"^L\['self'\]\.?", "", path)
    return re.sub(r"\._modules\['([^']+)'\]", r".\1", path)


def _blocks_from_module_stack(gm: fx.GraphModule) -> list[Block] | None:
    # A group: children of one container with one class (encoder.layer.0, .1, ...), or one
    # module called again (ALBERT's shared layer: Dynamo keys the calls key, key@1, key@2).
    groups: dict[tuple, list[str]] = defaultdict(list)
    nodes_of: dict[str, list[fx.Node]] = defaultdict(list)
    info: dict[str, tuple[str, str, bool]] = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        keys = list(stack.keys())
        for depth, key in enumerate(keys):
            nodes_of[key].append(node)
            if key in info:
                continue
            path, cls = stack[key]
            path = _clean_path(path)
            cls_name = getattr(cls, "__name__", str(cls))
            m = _INDEXED.match(path)
            info[key] = (path, cls_name, bool(m))
            parent = keys[depth - 1].split("@")[0] if depth else None
            groups[(parent, cls_name, m.group(1) if m else path)].append(key)
    best: list[str] | None = None
    best_cover = 0
    for members in groups.values():
        repeated = len(members) >= 2 or info[members[0]][2]
        if not repeated or not all(_looks_like_attention(nodes_of[k]) for k in members):
            continue
        cover = sum(len(nodes_of[k]) for k in members)
        if cover > best_cover:
            best, best_cover = members, cover
    if not best:
        return None
    blocks = []
    for i, key in enumerate(best):
        path, cls_name, _ = info[key]
        suffix = "@" + key.split("@")[1] if "@" in key else ""
        blocks.append(Block(i, path + suffix, cls_name, nodes_of[key]))
    return blocks


_ATTENTION_OPS = {"scaled_dot_product_attention", "softmax", "matmul", "bmm", "baddbmm", "einsum"}


def _looks_like_attention(nodes: list[fx.Node]) -> bool:
    """A transformer block mixes tokens: it has an attention product or a softmax."""
    return any(_target_str(n).split(".")[-1] in _ATTENTION_OPS for n in nodes)


# --- structural fallback -----------------------------------------------------------------------


def _op_signature(node: fx.Node, index_of: dict[fx.Node, int]) -> str:
    """What a node does, without names: its op, target and constant arguments."""

    def arg_sig(a):
        if isinstance(a, fx.Node):
            return "p" if a.op == "placeholder" else "n"
        if isinstance(a, (list, tuple)):
            return "(" + ",".join(arg_sig(x) for x in a) + ")"
        return repr(a)

    args = ",".join(arg_sig(a) for a in node.args)
    kwargs = ",".join(f"{k}={arg_sig(v)}" for k, v in sorted(node.kwargs.items()))
    return f"{node.op}:{_target_str(node)}({args};{kwargs})"


def _blocks_from_structure(gm: fx.GraphModule) -> list[Block] | None:
    body = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    n = len(body)
    if n < 4:
        return None
    index_of = {node: i for i, node in enumerate(body)}
    codes: dict[str, int] = {}
    seq = np.array([codes.setdefault(_op_signature(x, index_of), len(codes)) for x in body])
    best = None  # (coverage, -period, start, period, count)
    for period in range(2, n // 2 + 1):
        eq = seq[:-period] == seq[period:]
        # longest run of matches: a run of length R means R + period periodic nodes
        padded = np.concatenate(([0], eq.astype(np.int8), [0]))
        edges = np.flatnonzero(np.diff(padded))
        if len(edges) == 0:
            continue
        starts, ends = edges[::2], edges[1::2]
        lengths = ends - starts
        k = int(np.argmax(lengths))
        run, start = int(lengths[k]), int(starts[k])
        count = (run + period) // period
        if count < 2:
            continue
        cand = (count * period, -period, start, period, count, run)
        if best is None or cand[:2] > best[:2]:
            best = cand
    if best is None:
        return None
    _, _, start, period, count, run = best
    if not _looks_like_attention(body[start : start + period * count]):
        return None
    span = run + period
    # Any rotation of the period is a tandem repeat too: cut where the fewest values cross.
    best_shift, best_width = 0, None
    for shift in range(0, span - count * period + 1):
        cut = start + shift + period
        width = _cut_width(body, cut)
        if best_width is None or width < best_width:
            best_shift, best_width = shift, width
    s0 = start + best_shift
    return [Block(i, f"structural[{i}]", "repeat", body[s0 + i * period : s0 + (i + 1) * period]) for i in range(count)]


def _cut_width(body: list[fx.Node], cut: int) -> int:
    """Number of tensor values defined before ``body[cut]`` and used at or after it."""
    later = set(body[cut:])
    return sum(
        1
        for node in body[:cut]
        if isinstance(_example_value(node), torch.Tensor) and any(u in later for u in node.users)
    )


# --- stages and boundaries ---------------------------------------------------------------------


def _assign_stages(gm: fx.GraphModule, blocks: list[Block]) -> dict[fx.Node, int]:
    """Stage of every non-placeholder node: prefix 0, block i -> i + 1, suffix L + 1.

    Nodes outside any block go with the block before them in graph order (glue such as
    ``layer_outputs[0]`` belongs to the layer that made it); then every node is moved no
    earlier than its inputs, so the stages can run in order. A block node that would have to
    move is an error: the blocks are not sequential.
    """
    block_of = {node: b.index for b in blocks for node in b.nodes}
    num = len(blocks)
    last_node_of_last_block = blocks[-1].nodes[-1] if blocks else None
    stage: dict[fx.Node, int] = {}
    current = 0
    past_last = False
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            break
        if node in block_of:
            current = block_of[node] + 1
            wanted = current
        else:
            wanted = num + 1 if past_last else current
        from_inputs = max((stage[i] for i in node.all_input_nodes if i in stage), default=0)
        if node in block_of and from_inputs > wanted:
            raise AnalysisError(
                f"block {block_of[node]} node {node.format_node()} depends on a later stage "
                f"({from_inputs}); the blocks are not sequential"
            )
        stage[node] = max(wanted, from_inputs)
        if node is last_node_of_last_block:
            past_last = True
    return stage


def _classify(node: fx.Node, stage_of: dict[fx.Node, int], cut: int, hidden_shape) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    paths = " ".join(_clean_path(p).lower() for p, _ in stack.values())
    name = node.name.lower()
    users_after = [u for u in node.users if u.op == "output" or stage_of.get(u, 0) > cut]
    val = _example_value(node)
    shape = tuple(val.shape) if isinstance(val, torch.Tensor) else None
    if "rotary" in paths or "rotary" in name or re.search(r"\b(cos|sin)\b", name):
        return "rotary"
    if "mask" in name or (val is not None and isinstance(val, torch.Tensor) and val.dtype == torch.bool):
        return "attention_mask"
    if "position" in name or "cache_position" in name:
        return "position"
    if users_after and all(u.op == "output" for u in users_after) and stage_of.get(node, 0) >= 1:
        return "kv_cache" if shape is not None and len(shape) == 4 else "other"
    if shape is not None and hidden_shape is not None and shape == hidden_shape:
        return "hidden_state"
    return "other"


def _boundaries(analysis: BlockAnalysis) -> list[Boundary]:
    stage_of = analysis.stage_of
    out = []
    for b in range(analysis.num_blocks):
        cut = b + 1  # values made in stages <= cut and used in a later stage
        # the hidden state leaving block b: a tensor produced in stage b+1 read by stage b+2
        candidates = []
        for node, s in stage_of.items():
            if s != cut:
                continue
            if any(stage_of.get(u, -1) == cut + 1 for u in node.users):
                v = _example_value(node)
                if isinstance(v, torch.Tensor) and v.dim() >= 2:
                    candidates.append(v)
        hidden_shape = tuple(max(candidates, key=lambda v: v.numel()).shape) if candidates else None
        live = []
        for node, s in stage_of.items():
            if s > cut:
                continue
            if not any(u.op == "output" or stage_of.get(u, 0) > cut for u in node.users):
                continue
            val = _example_value(node)
            if not isinstance(val, torch.Tensor):
                continue
            kind = _classify(node, stage_of, cut, hidden_shape)
            if kind == "hidden_state" and s != cut:
                kind = "other"  # an older value of the same shape (e.g. a residual kept aside)
            live.append(LiveValue(node, kind, tuple(val.shape), val.dtype))
        out.append(Boundary(b, live))
    return out


def analyze_blocks(gm: fx.GraphModule, method: str = "auto") -> BlockAnalysis:
    """Find blocks, stages and boundaries of ``gm`` (a Dynamo graph; not modified).

    Args:
        method: ``"auto"`` (module stack, then the structural fallback), ``"nn_module_stack"``
            or ``"structural"``.

    Returns a :class:`BlockAnalysis`; ``method == "none"`` and no blocks when the graph has
    no repeated blocks (an MLP, a small CNN).
    """
    graph = to_networkx(gm)
    blocks = None
    used = "none"
    if method in ("auto", "nn_module_stack"):
        blocks = _blocks_from_module_stack(gm)
        used = "nn_module_stack" if blocks else used
    if not blocks and method in ("auto", "structural"):
        blocks = _blocks_from_structure(gm)
        used = "structural" if blocks else "none"
    analysis = BlockAnalysis(gm, graph, blocks or [], used)
    if analysis.blocks:
        analysis.stage_of = _assign_stages(gm, analysis.blocks)
        analysis.boundaries = _boundaries(analysis)
    return analysis
