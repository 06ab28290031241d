"""The one decoding step: a tree of guesses scored in one forward, verified, committed.

Every strategy guesses something each step (a draft model's chain or tree, draft heads' top
tokens, the first ``E`` layers' drafts, lookahead's n-grams) and ends the step the same way:
the target scores a *candidate tree* in one forward, and one rule decides, per row, the
longest path the target agrees with plus one token of its own. One implementation of that
rule keeps "lossless" meaning the same thing everywhere:

- greedy: the longest root-to-node path whose every token is the target's argmax after its
  parent, then the target's argmax after the path's last node (the *bonus* token) — exactly
  the tokens greedy decoding would produce;
- sampling: speculative sampling (Leviathan et al. 2023; Chen et al. 2023) generalised to
  trees as multi-draft recursive rejection sampling (SpecInfer, Miao et al. 2024): at a node,
  try its children in order; child ``x`` drawn from ``q_x`` is accepted with probability
  ``min(1, p(x) / q_x(x))``; after a rejection ``p <- norm(max(0, p - q_x))``. When no child
  is accepted (or at a leaf) the bonus token is drawn from the current ``p``. Each emitted
  token then follows the target's own sampling distribution exactly, for any proposals
  ``q_x`` as long as child ``x`` really was drawn from ``q_x`` given the earlier siblings
  (:func:`draw_children` draws without replacement and reports those ``q_x``). A drafter
  whose children are fixed by its state (its top-k tokens) proposes point masses
  (:func:`point_mass_probs`): child ``x`` is accepted with probability ``p(x)``, a rejection
  removes ``x`` from ``p``, and the bonus is drawn from what is left.

Tree layout (:class:`TreeSpec`): node 0 is the *root*, the last emitted token, which is not
yet in the KV cache; nodes ``1..N`` are drafted tokens in breadth-first order
(``parents[i] < i``, depths non-decreasing). A step writes node ``i`` of row ``b`` at cache
slot ``lengths[b] + i`` with position ``lengths[b] + depth[i]``; after verification the
accepted path's slots are gathered to ``lengths[b] ..`` (keys and values moved, never
recomputed). A chain of ``k`` drafts is the tree ``parents = (-1, 0, 1, .., k-1)``, whose
accepted slots are already in place. :func:`propose_children` fills a tree level by level
from a drafter's logits, the same way for every drafter.

The step (:func:`verify_step`): a :class:`StepShape` says where the step's tokens sit (the
tree, plus scratch tokens such as lookahead's Jacobi window); the engine's
``step_forward`` says what runs on them inside the graph (the model's forward; draft heads
and self-speculation engines add their drafting) and ``step_after`` what runs after the
verdict. Greedy, the whole step is ONE compiled graph (forward, :func:`greedy_verdict`, the
stop rule, the commit); sampling draws on the host between the forward graph and the
commit::

    out = verify_step(engine, StepShape.of_tree(tree), tokens, runs, sampling, generator)
    # runs (TokenRuns) now holds each row's kept tokens; next root = out.verdict.next_token
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from dynexec_compile.decoding.generate import next_token
from dynexec_compile.decoding.masks import step_mask
from dynexec_compile.decoding.runs import stop_counts
from dynexec_compile.decoding.sampling import SamplingParams, draw, sampling_probs

if TYPE_CHECKING:
    from dynexec_compile.decoding.adaptive import WidthChooser
    from dynexec_compile.decoding.runs import TokenRuns
    from dynexec_compile.decoding.step import DecodeEngine


@dataclass(frozen=True)
class TreeSpec:
    """A candidate tree: ``parents[i]`` is the parent node of node ``i``.

    Node 0 is the root (``parents[0] == -1``); the others are drafted tokens in breadth-first
    order: ``0 <= parents[i] < i`` and ``depth`` non-decreasing with the index, so every
    depth is a contiguous range of nodes (a *level*). The order of a node's children is the
    order they are tried in when sampling, and their rank among the drafter's tokens.

    Build one with :meth:`chain`, :meth:`from_branching` or from explicit parents;
    :meth:`root_only` is the step without guesses (a plain decoding step through the shared
    step, which an adaptive strategy runs where guessing does not pay).
    """

    parents: tuple[int, ...]
    plain: bool = False  # the root alone (root_only): the one tree without a drafted node

    def __post_init__(self) -> None:
        p = self.parents
        if self.plain and p != (-1,):
            raise ValueError(f"a plain tree is the root alone, (-1,), got {p!r}")
        if not isinstance(p, tuple) or len(p) < 2 - self.plain or p[0] != -1:
            raise ValueError(f"tree parents must be a tuple (-1, ...) with at least one drafted node, got {p!r}")
        depths = [0]
        for i, parent in enumerate(p[1:], start=1):
            if isinstance(parent, bool) or not isinstance(parent, int) or not 0 <= parent < i:
                raise ValueError(f"tree node {i} has parent {parent!r}; parents must satisfy 0 <= parents[i] < i")
            depths.append(depths[parent] + 1)
            if depths[i] < depths[i - 1]:
                raise ValueError(
                    f"tree nodes must be in breadth-first order (depth non-decreasing); node {i} has depth "
                    f"{depths[i]} after a node of depth {depths[i - 1]}"
                )
        # fill every derived table now, so that code traced by Dynamo (a compiled step that
        # verifies in-graph) only reads attributes: it cannot trace a first, locked
        # cached_property access
        for name in _DERIVED:
            getattr(self, name)

    @classmethod
    def chain(cls, k: int) -> TreeSpec:
        """``k`` drafted tokens in a row."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"num_draft must be an int >= 1, got {k!r}")
        return cls((-1, *range(k)))

    @classmethod
    def root_only(cls) -> TreeSpec:
        """The root alone: one token per step, the model's own (see :class:`TreeSpec`)."""
        return cls((-1,), plain=True)

    @classmethod
    def from_branching(cls, branching: Sequence[int]) -> TreeSpec:
        """Every node at depth ``d`` has ``branching[d]`` children: ``[2, 2, 1]`` is a root with
        2 children, 4 grandchildren and 4 great-grandchildren (10 drafted tokens)."""
        if not branching or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in branching):
            raise ValueError(f"tree branching must be a non-empty list of ints >= 1, got {branching!r}")
        parents, frontier = [-1], [0]
        for b in branching:
            nxt = []
            for node in frontier:
                for _ in range(b):
                    parents.append(node)
                    nxt.append(len(parents) - 1)
            frontier = nxt
        return cls(tuple(parents))

    @property
    def size(self) -> int:
        """``T``: nodes including the root (the width of the verification step)."""
        return len(self.parents)

    @property
    def num_draft(self) -> int:
        """Drafted tokens ``T - 1``."""
        return len(self.parents) - 1

    @cached_property
    def depths(self) -> tuple[int, ...]:
        """Depth of every node (root 0)."""
        depths = [0]
        for parent in self.parents[1:]:
            depths.append(depths[parent] + 1)
        return tuple(depths)

    @property
    def max_depth(self) -> int:
        """``D``: the most drafted tokens one step can accept."""
        return self.depths[-1]

    @property
    def is_chain(self) -> bool:
        return self.parents == tuple(range(-1, self.size - 1))

    @cached_property
    def children(self) -> tuple[tuple[int, ...], ...]:
        """Children of every node, in try order."""
        kids: list[list[int]] = [[] for _ in self.parents]
        for i, parent in enumerate(self.parents[1:], start=1):
            kids[parent].append(i)
        return tuple(tuple(k) for k in kids)

    @cached_property
    def levels(self) -> tuple[tuple[int, int], ...]:
        """``(start, stop)`` node range of every depth ``0 .. D``."""
        return tuple((self.depths.index(d), len(self.depths) - self.depths[::-1].index(d)) for d in range(self.max_depth + 1))

    def level(self, depth: int) -> tuple[int, ...]:
        """Nodes at ``depth``."""
        return tuple(range(*self.levels[depth]))

    def visible(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``[T, T]`` bool: ``visible[i, j]`` iff ``j`` is ``i`` or an ancestor of ``i`` — the
        ``visible`` argument of :func:`~dynexec_compile.decoding.masks.step_mask`."""
        return self._ancestors.to(device)

    def depth_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``[T]`` int64 depths (position offsets of the nodes)."""
        return self._depth_tensor.to(device)

    def path_table(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``[T, D + 1]`` int64: row ``i`` lists the path root .. ``i`` by depth, then repeats ``i``."""
        return self._paths.to(device)

    def child_table(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``[T, C]`` int64 children of every node in try order, padded with -1 (``C`` = most children)."""
        return self._child_table.to(device)

    def check_vocabulary(self, vocab: int) -> None:
        """Raise ``ValueError`` when a node has more children than the vocabulary has tokens."""
        widest = max(len(kids) for kids in self.children)
        if widest > vocab:
            raise ValueError(f"a tree node has {widest} children but the vocabulary has {vocab} tokens; use fewer children")

    @cached_property
    def _depth_tensor(self) -> torch.Tensor:
        return torch.tensor(self.depths, dtype=torch.long)

    @cached_property
    def _parent_index(self) -> torch.Tensor:
        """``[T]`` parents with the root as its own parent."""
        return torch.tensor((0, *self.parents[1:]), dtype=torch.long)

    @cached_property
    def _preference(self) -> torch.Tensor:
        """``[T]`` deeper nodes first, then lower indices (picks among accepted nodes)."""
        index = torch.arange(self.size)
        return self._depth_tensor * self.size + (self.size - 1 - index)

    @cached_property
    def _ancestors(self) -> torch.Tensor:
        vis = torch.eye(self.size, dtype=torch.bool)
        for i, parent in enumerate(self.parents[1:], start=1):
            vis[i] |= vis[parent]
        return vis

    @cached_property
    def _paths(self) -> torch.Tensor:
        table = torch.empty(self.size, self.max_depth + 1, dtype=torch.long)
        for i in range(self.size):
            path, node = [], i
            while node >= 0:
                path.append(node)
                node = self.parents[node]
            path.reverse()
            table[i] = torch.tensor(path + [i] * (self.max_depth + 1 - len(path)))
        return table

    @cached_property
    def _child_table(self) -> torch.Tensor:
        width = max(len(k) for k in self.children)
        table = torch.full((self.size, width), -1, dtype=torch.long)
        for i, kids in enumerate(self.children):
            table[i, : len(kids)] = torch.tensor(kids, dtype=torch.long)
        return table

    @cached_property
    def _kids(self) -> tuple[tuple[torch.Tensor, torch.Tensor, int], ...]:
        """Per depth ``d < D``, for the nodes of depth ``d + 1``: their parent's index within
        level ``d``, their rank among their siblings, and the most children a node of level
        ``d`` has (what :func:`propose_children` reads)."""
        tables = []
        for d in range(self.max_depth):
            start = self.levels[d][0]
            kids = self.level(d + 1)
            ranks = [self.children[self.parents[c]].index(c) for c in kids]
            parent = torch.tensor([self.parents[c] - start for c in kids], dtype=torch.long)
            tables.append((parent, torch.tensor(ranks, dtype=torch.long), max(ranks) + 1))
        return tuple(tables)


_DERIVED = ("depths", "children", "levels", "_depth_tensor", "_parent_index", "_preference", "_ancestors", "_paths",
            "_child_table", "_kids")


def as_tree(tree: TreeSpec | Sequence[int] | None, num_draft: int | None) -> TreeSpec:
    """The user's ``tree=`` / ``num_draft=`` arguments as a :class:`TreeSpec`.

    ``tree=None`` is a chain of ``num_draft`` tokens; a list of ints is a branching per depth
    (:meth:`TreeSpec.from_branching`); a ``TreeSpec`` is taken as is (then ``num_draft``, if
    given, must equal its drafted-token count).
    """
    if tree is None:
        if num_draft is None:
            raise ValueError("give num_draft=k (a chain of k drafted tokens) or tree=... (a candidate tree)")
        return TreeSpec.chain(num_draft)
    if isinstance(tree, TreeSpec):
        spec = tree
    elif isinstance(tree, Sequence) and not isinstance(tree, str):
        spec = TreeSpec.from_branching(list(tree))
    else:
        raise TypeError(f"tree must be None, a list of children per depth or a TreeSpec, got {type(tree).__name__}")
    if num_draft is not None and num_draft != spec.num_draft:
        raise ValueError(f"num_draft={num_draft} but the tree has {spec.num_draft} drafted nodes; give one of them")
    return spec


# ---- proposing a tree ------------------------------------------------------------------------


def propose_children(
    tree: TreeSpec,
    depth: int,
    logits: torch.Tensor,
    sampling: SamplingParams | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tokens of the nodes at ``depth + 1`` from the drafter's logits at level ``depth``.

    Greedy (``sampling`` None), a node's children are its drafter's top tokens by rank (a
    chain: the argmax): deterministic, so as proposals they are point masses. Sampling, they
    are drawn without replacement from the drafter's warped distribution
    (:func:`draw_children`). Traceable: every drafter fills its tree with it, inside its graph.

    Args:
        logits: ``[B, n_depth, V]`` one distribution per node of the level, or ``[B, V]`` one
            for all of them (draft heads: the head of that depth).
        noise: ``[B, N]`` uniforms in ``(0, 1]``, one per drafted node (node ``i`` uses column
            ``i - 1``), needed when sampling.
    Returns:
        ``(tokens [B, n_{depth+1}], probs [B, n_{depth+1}, V] | None)``: when drawn, the
        distribution each child was drawn from.
    """
    parent, rank, top = tree._kids[depth]
    parent, rank = parent.to(logits.device), rank.to(logits.device)
    if logits.ndim == 2:
        logits, parent = logits[:, None], torch.zeros_like(parent)
    if sampling is None:
        return logits.topk(top, dim=-1).indices[:, parent, rank], None  # [B, n']
    start, stop = tree.levels[depth + 1]
    uniforms = torch.ones(*logits.shape[:2], top, dtype=noise.dtype, device=noise.device)  # [B, n, top]
    uniforms[:, parent, rank] = noise[:, start - 1 : stop - 1]
    tokens, probs = draw_children(sampling_probs(logits, sampling), top, noise=uniforms)  # [B, n, top], [B, n, top, V]
    return tokens[:, parent, rank], probs[:, parent, rank]


def draw_children(
    probs: torch.Tensor, n: int, generator: torch.Generator | None = None, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` distinct children from ``probs`` (without replacement) for sampling trees.

    Inverse-CDF draws from uniforms (``noise``, or drawn from ``generator``), so a compiled
    graph can draw with uniforms drawn on the host (a seeded generator reproduces them).

    Args:
        probs: ``[..., V]`` the drafter's (warped) distribution at a node.
        n: children to draw.
        noise: ``[..., n]`` uniforms in ``(0, 1]``; ``None`` draws them from ``generator``.
    Returns:
        ``(tokens [..., n], child_probs [..., n, V])``: child ``c`` was drawn from
        ``child_probs[..., c, :]`` (``probs`` with the earlier children removed, renormalised)
        — the ``draft_probs`` rows :func:`verify_sampling` needs. When the support runs out
        the remaining children get an all-zero distribution (never accepted).
    """
    if noise is None:
        noise = 1.0 - torch.rand(*probs.shape[:-1], n, generator=generator, device=probs.device)
    remaining = probs.float()
    tokens, child_probs = [], []
    for c in range(n):
        mass = remaining.sum(dim=-1, keepdim=True)  # [..., 1]
        q = remaining if c == 0 else torch.where(mass > 0, remaining / mass.clamp(min=1e-30), 0.0)  # [..., V]
        cdf = q.cumsum(dim=-1)
        token = (cdf < noise[..., c : c + 1] * cdf[..., -1:]).sum(dim=-1).clamp(max=q.shape[-1] - 1)  # [...]
        tokens.append(token)
        child_probs.append(q)
        remaining = remaining.scatter(-1, token[..., None], 0.0)
    return torch.stack(tokens, dim=-1), torch.stack(child_probs, dim=-2)


def point_mass_probs(tree: TreeSpec, tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """``draft_probs`` for a tree whose node tokens are deterministic given the drafter's state
    (its top-k children): a point mass on each node's token.

    With a point mass, :func:`verify_sampling` accepts child ``x`` with probability ``p(x)`` and
    after a rejection tries the next sibling under ``p`` with ``x`` removed — multi-draft
    rejection sampling for deterministic proposals, lossless. A sibling repeating an earlier
    sibling's token gets an all-zero row (never accepted: its token is already out of ``p``).

    Args:
        tokens: ``[B, T]`` node tokens (``tokens[:, 0]`` the root).
    Returns:
        ``[B, T, V]`` float32; row 0 (the root) is all zero.
    """
    # tokens: [B, T]
    device = tokens.device
    parents = tree._parent_index.to(device)  # [T]
    index = torch.arange(tree.size, device=device)
    earlier_sibling = (parents[:, None] == parents[None, :]) & (index[None, :] < index[:, None])  # [T, T]
    earlier_sibling[:, 0] = False  # the root is its own parent in _parent_index, no one's sibling
    repeats = ((tokens[:, :, None] == tokens[:, None, :]) & earlier_sibling[None]).any(dim=-1)  # [B, T]
    repeats[:, 0] = True  # the root is not drafted
    probs = torch.nn.functional.one_hot(tokens, vocab).float()  # [B, T, V]
    return probs * (~repeats)[:, :, None]


# ---- verification ---------------------------------------------------------------------------


@dataclass
class Verdict:
    """What each row keeps from one verification step.

    Attributes:
        accepted: ``[B]`` int64, drafted tokens accepted per row (``0 .. D``).
        path: ``[B, D + 1]`` int64, node indices of the accepted path, root first; entries past
            ``accepted[b]`` repeat the path's last node.
        tokens: ``[B, D + 1]`` int64, the tokens to emit: ``tokens[b, :accepted[b]]`` are the
            accepted drafts, ``tokens[b, accepted[b]]`` the target's own next token; entries
            after it repeat that token.
        next_token: ``[B]`` int64, the target's own token (the next step's root).
    """

    accepted: torch.Tensor
    path: torch.Tensor
    tokens: torch.Tensor
    next_token: torch.Tensor

    @property
    def emitted(self) -> torch.Tensor:
        """``[B]`` tokens each row emits this step: ``accepted + 1``."""
        return self.accepted + 1


def verify(
    tree: TreeSpec,
    tokens: torch.Tensor,
    target_logits: torch.Tensor,
    draft_probs: torch.Tensor | None = None,
    sampling: SamplingParams | None = None,
    generator: torch.Generator | None = None,
) -> Verdict:
    """Which of the tree's drafted tokens the target keeps (see the module docstring).

    Args:
        tree: the candidate tree (``T`` nodes).
        tokens: ``[B, T]`` node tokens (``tokens[:, 0]`` the root).
        target_logits: ``[B, T, V]`` the target's logits at every node.
        draft_probs, sampling, generator: sampling verification (:func:`verify_sampling`);
            ``sampling=None`` is greedy (:func:`greedy_verdict`: among equally deep accepted
            nodes, duplicate siblings, the first wins).
    """
    if sampling is None:
        _check(tree, tokens, target_logits)
        return greedy_verdict(tree, tokens, target_logits.argmax(dim=-1))
    if draft_probs is None:
        raise ValueError("sampling verification needs draft_probs: the distribution each drafted token was drawn from")
    return verify_sampling(tree, tokens, target_logits, draft_probs, sampling, generator)


def greedy_verdict(
    tree: TreeSpec, tokens: torch.Tensor, argmax: torch.Tensor, valid: torch.Tensor | None = None
) -> Verdict:
    """Greedy acceptance, the one copy every strategy uses, from the target's argmax ``[B, T]``
    at every node; ``valid`` ``[B, T]`` marks the nodes that are real guesses (others are never
    accepted). Traceable."""
    device = tokens.device
    if tree.is_chain:  # node i has depth i: the accepted length is the matching prefix
        match = tokens[:, 1:] == argmax[:, :-1]  # [B, T-1]
        best = (match if valid is None else match & valid[:, 1:]).long().cumprod(dim=1).sum(dim=1)  # [B]
    else:
        correct = tokens == argmax[:, tree._parent_index.to(device)]  # [B, T]
        if valid is not None:
            correct &= valid
        correct[:, 0] = True
        # a node is accepted iff it and all its ancestors are correct
        wrong_on_path = tree.visible(device)[None] & ~correct[:, None, :]  # [B, T, T]
        accepted_node = ~wrong_on_path.any(dim=-1)  # [B, T]
        best = torch.where(accepted_node, tree._preference.to(device)[None, :], -1).argmax(dim=-1)  # [B]
    bonus = argmax.gather(1, best[:, None])[:, 0]  # [B]
    return _verdict(tree, tokens, best, bonus)


def verify_sampling(
    tree: TreeSpec,
    tokens: torch.Tensor,
    target_logits: torch.Tensor,
    draft_probs: torch.Tensor,
    sampling: SamplingParams,
    generator: torch.Generator | None = None,
) -> Verdict:
    """Recursive rejection sampling down the tree; emitted tokens follow the target exactly.

    Args:
        tokens: ``[B, T]`` node tokens (``tokens[:, 0]`` the root).
        target_logits: ``[B, T, V]`` the target's raw logits at every node; warped with
            ``sampling`` (the same warps the drafter's ``draft_probs`` must have used).
        draft_probs: ``[B, T, V]``: ``draft_probs[b, i]`` is the distribution node ``i``'s token
            was drawn from (given its earlier siblings); row 0 is unused. An all-zero row marks
            a node that was not drawn (never accepted).
        generator: random generator for the acceptance tests and the bonus draw.
    """
    _check(tree, tokens, target_logits)
    if draft_probs.shape != target_logits.shape:
        raise ValueError(
            f"draft_probs must have the target logits' shape {tuple(target_logits.shape)}, got {tuple(draft_probs.shape)}"
        )
    batch, device = tokens.shape[0], tokens.device
    rows = torch.arange(batch, device=device)
    p_all = sampling_probs(target_logits, sampling)  # [B, T, V]
    q_all = draft_probs.float()  # [B, T, V]
    uniform = torch.rand(batch, tree.size, generator=generator, device=device)  # [B, T], one test per node
    child_table = tree.child_table(device)  # [T, C]
    node = torch.zeros(batch, dtype=torch.long, device=device)  # [B] current node of each row
    walking = torch.ones(batch, dtype=torch.bool, device=device)  # [B] still descending
    residual = p_all[:, 0]  # [B, V] the target distribution at the current node
    for depth in range(tree.max_depth):
        width = max(len(tree.children[i]) for i in tree.level(depth))
        moved = torch.zeros_like(walking)
        for c in range(width):
            child = child_table[node, c]  # [B], -1 where the node has no c-th child
            live = walking & ~moved & (child >= 0)
            child = child.clamp(min=0)
            token = tokens[rows, child]  # [B]
            q = q_all[rows, child]  # [B, V]
            px = residual[rows, token]  # [B]
            qx = q[rows, token]  # [B]
            accept = live & (qx > 0) & (uniform[rows, child] * qx < px)
            reject = live & ~accept
            residual = torch.where(reject[:, None], _residual(residual, q), residual)
            node = torch.where(accept, child, node)
            moved |= accept
        walking &= moved
        residual = torch.where(moved[:, None], p_all[rows, node], residual)
    bonus = draw(residual, generator)  # [B]
    return _verdict(tree, tokens, node, bonus)


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``norm(max(0, p - q))`` per row; a row with (numerically) no mass left keeps ``p``."""
    # p, q: [B, V]
    diff = (p - q).clamp(min=0)
    mass = diff.sum(dim=-1, keepdim=True)  # [B, 1]
    return torch.where(mass > 1e-12, diff / mass.clamp(min=1e-30), p)


def _verdict(tree: TreeSpec, tokens: torch.Tensor, last: torch.Tensor, bonus: torch.Tensor) -> Verdict:
    """Assemble a :class:`Verdict` from each row's last accepted node and bonus token."""
    # tokens: [B, T]; last, bonus: [B]
    device = tokens.device
    accepted = tree.depth_tensor(device)[last]  # [B]
    path = tree.path_table(device)[last]  # [B, D + 1]
    drafted = tokens.gather(1, path[:, 1:])  # [B, D]
    out = torch.cat([drafted, bonus[:, None]], dim=1)  # [B, D + 1]
    after = torch.arange(tree.max_depth + 1, device=device)[None, :] >= accepted[:, None]
    out = torch.where(after, bonus[:, None], out)
    return Verdict(accepted=accepted, path=path, tokens=out, next_token=bonus)


def _check(tree: TreeSpec, tokens: torch.Tensor, target_logits: torch.Tensor) -> None:
    if tokens.ndim != 2 or tokens.shape[1] != tree.size:
        raise ValueError(f"tokens must be [B, T={tree.size}] (root + drafted nodes), got {tuple(tokens.shape)}")
    if target_logits.ndim != 3 or target_logits.shape[:2] != tokens.shape:
        raise ValueError(f"target_logits must be [B, T, V] with [B, T]={tuple(tokens.shape)}, got {tuple(target_logits.shape)}")


# ---- the step ---------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class StepShape:
    """The tokens of one verification step: a candidate tree, and scratch tokens beside it.

    Every strategy's step is this shape: ``T`` step tokens written at slots ``lengths + t``,
    at positions ``lengths + offsets[t]``, query ``t`` seeing step token ``u`` iff
    ``visible[t, u]``; the tree's node ``i`` is step token ``nodes[i]`` (node 0, the root, is
    step token 0). A draft tree is the step itself (:meth:`of_tree`); lookahead adds its
    Jacobi window as scratch tokens that are scored but never accepted.

    Attributes:
        name: the step's graph name (one compiled graph per shape).
        tree: the candidate tree.
        offsets: ``[T]`` int64 position offsets; visible: ``[T, T]`` bool; nodes: ``[N]`` int64.
    """

    name: str
    tree: TreeSpec
    offsets: torch.Tensor
    visible: torch.Tensor
    nodes: torch.Tensor

    def __post_init__(self) -> None:
        self.in_place  # noqa: B018 - filled now: Dynamo cannot trace a first cached_property access

    @functools.cached_property
    def in_place(self) -> bool:
        """Whether every accepted path already sits at ``lengths ..`` (a chain whose nodes are
        the first step tokens): the commit then only moves the lengths."""
        return self.tree.is_chain and torch.equal(self.nodes, torch.arange(self.tree.size))

    @property
    def width(self) -> int:
        """``T``: step tokens (the cache slots past the committed length one step writes)."""
        return self.offsets.numel()

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def of_tree(tree: TreeSpec) -> StepShape:
        """The step of a draft tree: node ``i`` is step token ``i``, at its depth."""
        return StepShape(f"tree{tree.parents}", tree, tree.depth_tensor(), tree.visible(), torch.arange(tree.size))

    def place(self, lengths: torch.Tensor, last_position: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(positions, slots)``, both ``[B, T]``, of the step at committed ``lengths [B]``:
        token ``t`` at position ``lengths + offsets[t]`` (clamped to ``last_position``, a
        model's last learned position: guesses only), written at slot ``lengths + t``."""
        base = lengths[:, None]  # [B, 1]
        positions = base + self.offsets.to(lengths.device)  # [B, T]
        if last_position is not None:
            positions = torch.minimum(positions, last_position)
        return positions, base + torch.arange(self.width, device=lengths.device)


class StepOut(NamedTuple):
    """What :func:`verify_step` returns: the :class:`Verdict`, ``kept [B]`` (tokens each row
    kept, cut by the stop rule), ``argmax [B, T]`` (the model's greedy token after every step
    token) and ``after`` (the engine's ``step_after`` tensors)."""

    verdict: Verdict
    kept: torch.Tensor
    argmax: torch.Tensor
    after: tuple[torch.Tensor, ...]


def verify_step(
    engine: DecodeEngine,
    shape: StepShape,
    tokens: torch.Tensor,
    runs: TokenRuns,
    sampling: SamplingParams | None = None,
    generator: torch.Generator | None = None,
    *,
    draft_probs: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> StepOut:
    """The shared step: the forward over every step token (``engine.step_forward``), the
    verification, the stop rule (EOS, ``max_new_tokens``: :func:`stop_counts`), the commit of
    exactly the tokens the output keeps (a tree's path gathered in the cache) and
    ``engine.step_after``; the kept tokens go to ``runs``.

    Greedy (``sampling`` None) it is ONE compiled graph of ``engine``
    (:meth:`DecodeEngine.run_graph`), no host work between its parts. Sampling, the forward is
    one graph, :func:`verify_sampling` draws on the host, and the commit (with
    ``step_after``) is a second, small graph without decoder layers.

    Args:
        tokens: ``[B, T]`` step tokens (``tokens[:, 0]`` the root; an engine that drafts in
            its forward reads only the root).
        draft_probs: ``[B, N, V]`` what each tree node was drawn from; ``None``: the node
            tokens are deterministic guesses (:func:`point_mass_probs`).
        valid: ``[B, N]`` bool, tree nodes that are real guesses (the rest is never accepted;
            sampling: with ``draft_probs`` None); ``None``: all.
    """
    if sampling is None:
        if valid is None:
            valid = _all_valid(tokens.shape[0], shape.tree.size, tokens.device)
        accepted, path, emitted, next_token, kept, hit, argmax, *after = engine.run_graph(
            f"greedy_{shape.name}", _greedy_body(shape), tokens, valid, _last_position(engine),
            runs.produced, runs.finished, runs.limit, runs.eos, width=shape.width,
        )
        runs.append(emitted, kept, hit)
        return StepOut(Verdict(accepted, path, emitted, next_token), kept, argmax, tuple(after))
    tokens, logits, extras = score_step(engine, shape, tokens)
    nodes = shape.nodes.to(tokens.device)
    node_tokens = tokens[:, nodes]  # [B, N]
    if draft_probs is None:
        draft_probs = point_mass_probs(shape.tree, node_tokens, logits.shape[-1])
        if valid is not None:  # a node that is no guess is never accepted: no mass
            draft_probs = draft_probs * valid[:, :, None]
    verdict = verify_sampling(shape.tree, node_tokens, logits[:, nodes], draft_probs, sampling, generator)
    kept = runs.keep(verdict.tokens, verdict.emitted)
    after = engine.run_graph(
        f"after_{shape.name}", _after_body(shape), kept, verdict.accepted, verdict.path, verdict.tokens,
        verdict.next_token, *extras, width=0, forwards=0,
    )
    return StepOut(verdict, kept, logits.argmax(dim=-1), tuple(after))


def score_step(
    engine: DecodeEngine, shape: StepShape, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """The forward of a step whose verification draws on the host, as one graph; nothing is
    committed. Returns ``engine.step_forward``'s ``(tokens [B, T], logits [B, T, V], extras)``."""
    tokens, logits, *extras = engine.run_graph(
        f"score_{shape.name}", _score_body(shape), tokens, _last_position(engine), width=shape.width
    )
    return tokens, logits, tuple(extras)


def _step_inputs(
    engine: DecodeEngine, shape: StepShape, last_position: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(positions, slots [B, T], mask [B, 1, T, S])`` of a step at the committed lengths. Traceable."""
    lengths = engine.cache.lengths
    positions, slots = shape.place(lengths, last_position)
    mask = step_mask(lengths, slots, shape.visible.to(lengths.device), engine.max_len, engine.cache.dtype)
    return positions, slots, mask


def _commit_path(engine: DecodeEngine, shape: StepShape, kept: torch.Tensor, path: torch.Tensor) -> None:
    """Keep ``kept[b]`` tokens of each row's path (traceable): in place, or gathered."""
    lengths = engine.cache.lengths
    slots = None if shape.in_place else lengths[:, None] + shape.nodes.to(lengths.device)[path]  # [B, D + 1]
    engine.cache.apply_commit(kept, slots)


@functools.lru_cache(maxsize=64)
def _greedy_body(shape: StepShape) -> Any:
    """The graph body of the greedy :func:`verify_step` (one per shape: it is baked in)."""

    def body(engine: DecodeEngine, tokens: torch.Tensor, valid: torch.Tensor, last_position: torch.Tensor,
             produced: torch.Tensor, finished: torch.Tensor, limit: torch.Tensor, eos: torch.Tensor) -> tuple:
        positions, slots, mask = _step_inputs(engine, shape, last_position)
        tokens, logits, extras = engine.step_forward(tokens, positions, slots, mask)
        argmax = logits.argmax(dim=-1)  # [B, T]
        nodes = shape.nodes.to(tokens.device)
        verdict = greedy_verdict(shape.tree, tokens[:, nodes], argmax[:, nodes], valid)
        kept, hit = stop_counts(verdict.tokens, verdict.emitted, produced, finished, limit, eos)  # [B], [B]
        _commit_path(engine, shape, kept, verdict.path)
        after = engine.step_after(verdict, extras)
        return verdict.accepted, verdict.path, verdict.tokens, verdict.next_token, kept, hit, argmax, *after

    return body


@functools.lru_cache(maxsize=64)
def _score_body(shape: StepShape) -> Any:
    def body(engine: DecodeEngine, tokens: torch.Tensor, last_position: torch.Tensor) -> tuple:
        positions, slots, mask = _step_inputs(engine, shape, last_position)
        tokens, logits, extras = engine.step_forward(tokens, positions, slots, mask)
        return tokens, logits, *extras

    return body


@functools.lru_cache(maxsize=64)
def _after_body(shape: StepShape) -> Any:
    def body(engine: DecodeEngine, kept: torch.Tensor, accepted: torch.Tensor, path: torch.Tensor, tokens: torch.Tensor,
             next_token: torch.Tensor, *extras: torch.Tensor) -> tuple:
        _commit_path(engine, shape, kept, path)
        return engine.step_after(Verdict(accepted, path, tokens, next_token), extras)

    return body


@functools.lru_cache(maxsize=16)
def _all_valid(batch: int, size: int, device: torch.device) -> torch.Tensor:
    return torch.ones(batch, size, dtype=torch.bool, device=device)


def _last_position(engine: DecodeEngine) -> torch.Tensor:
    """0-d: the largest position id the model embeds (a huge number when no limit is known)."""
    limit = getattr(engine.model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    return _position_tensor(limit - 1 if isinstance(limit, int) and limit > 0 else 2**62, engine.device)


@functools.lru_cache(maxsize=16)
def _position_tensor(value: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(value, device=device)


class DraftProposer:
    """A draft-and-verify strategy as :func:`~dynexec_compile.decoding.generate.decode_loop`
    runs it: each step, :meth:`guess` a candidate tree rooted at the last token; the shared
    :func:`verify_step` verifies and commits it; :meth:`accept` hands the outcome back to the
    drafter. Subclasses (speculative, draft heads, self-speculation) say only what to guess.

    Attributes:
        root: ``[B]`` each row's last emitted token (the next tree's root).
        drafted, accepted: per step and row, the tokens drafted and the drafts accepted (0 for
            rows that had finished), for ``stats.extra``.
        live: ``[B]`` the rows still generating at this step (set before :meth:`guess`).
        chooser: a :class:`~dynexec_compile.decoding.adaptive.WidthChooser` when :meth:`guess`
            chooses the step's shape (``self.shape``) per step; the step's time goes to it.
        plain: the one-token step shape (the root alone) a chooser may pick.
        typical: a running mean of the draft's expected kept tokens per row
            (:meth:`expected_drafts`), the estimate while its guesses are stale.
    """

    def __init__(self, name: str, engine: DecodeEngine, settings: Any, tree: TreeSpec):
        self.name, self.engine, self.settings, self.tree = name, engine, settings, tree
        self.shape = StepShape.of_tree(tree)
        self.width = tree.max_depth + 1  # the most tokens one step keeps per row
        self.drafted: list[torch.Tensor] = []
        self.accepted: list[torch.Tensor] = []
        self.valid: torch.Tensor | None = None  # [B, T] the tree nodes guess() filled (None: all)
        self.chooser: WidthChooser | None = None  # a proposer choosing each step's shape sets one
        self.plain = StepShape.of_tree(TreeSpec.root_only())  # no guesses: what a chooser runs where they do not pay
        self.typical: float | None = None

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Fill the caches with the prompts; each row's first token ``[B]``."""
        self.root = next_token(self.engine.prefill(input_ids, attention_mask), self.settings)
        return self.root

    def guess(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(tokens [B, T], draft_probs [B, T, V] | None)``: this step's tree, ``tokens[:, 0]``
        the root; ``None`` probabilities: deterministic guesses (point masses)."""
        raise NotImplementedError

    def accept(self, out: StepOut) -> None:
        """What the drafter keeps of a verified step (its cache, its next candidates)."""

    def expected_drafts(self, confidence: torch.Tensor | None, cap: int) -> tuple[torch.Tensor, float]:
        """``adaptive``: the drafted tokens each row is expected to keep ``[B]`` and their mean
        over the live rows, from the draft's ``confidence`` ``[B, k, A]``
        (:meth:`~dynexec_compile.decoding.adaptive.WidthChooser.draft_yield`); ``None`` while its
        guesses are stale (after plain steps that did not run it): :attr:`typical`."""
        live = self.live.float()
        if confidence is None:
            return torch.full_like(live, self.typical), self.typical
        drafted = self.chooser.draft_yield(confidence, cap)
        mean = float((drafted * live).sum() / live.sum().clamp(min=1))
        self.typical = mean if self.typical is None else 0.9 * self.typical + 0.1 * mean
        return drafted, mean

    def step(self, runs: TokenRuns) -> torch.Tensor:
        self.live = live = ~runs.done  # [B] rows still generating
        tokens, probs = self.guess()
        timing = contextlib.nullcontext() if self.chooser is None else self.chooser.timing(self.shape, tokens.device)
        with timing:
            out = verify_step(self.engine, self.shape, tokens, runs, self.settings.sampling, self.settings.generator,
                              draft_probs=probs, valid=self.valid)
        self.accept(out)
        if self.chooser is not None:  # what the step verified per row (before any stop rule cut it)
            self.chooser.kept_on_step(float(((out.verdict.accepted + 1) * live).sum() / live.sum().clamp(min=1)))
        self.root = torch.where(live, out.verdict.next_token, self.root)
        # [B] or all rows alike: this step's tree (a proposer may switch shapes); a node that is no
        # guess (not valid) was not drafted
        guessed = self.shape.tree.num_draft if self.valid is None else self.valid[:, 1:].sum(dim=1)
        self.drafted.append(live.long() * guessed)
        self.accepted.append(torch.where(live, out.verdict.accepted, 0))
        return out.kept

    def extra(self, stats: Any) -> dict[str, Any]:
        drafted = torch.stack(self.drafted).tolist() if self.drafted else []
        accepted = torch.stack(self.accepted).tolist() if self.accepted else []
        total_drafted, total_accepted = sum(map(sum, drafted)), sum(map(sum, accepted))
        live_steps = sum(n > 0 for step in drafted for n in step)
        return {
            "tree": list(self.tree.parents),
            "num_draft": self.tree.num_draft,
            "drafted_per_step": drafted,
            "accepted_drafts_per_step": accepted,
            "acceptance_rate": total_accepted / total_drafted if total_drafted else 0.0,
            "mean_accepted_per_step": total_accepted / live_steps if live_steps else 0.0,
            "target_forwards": stats.forward_passes,
        }


__all__ = [
    "DraftProposer",
    "StepOut",
    "StepShape",
    "TreeSpec",
    "Verdict",
    "as_tree",
    "draw_children",
    "greedy_verdict",
    "point_mass_probs",
    "propose_children",
    "score_step",
    "verify",
    "verify_sampling",
    "verify_step",
]
