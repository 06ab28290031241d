"""Verification of drafted tokens: which of a chain or tree of guesses the target keeps.

Every draft-and-verify strategy (a draft model, fused draft heads, self-speculation) ends a
step the same way: the target has scored a *candidate tree* of drafted tokens in one forward,
and a rule decides, per row, the longest path the target agrees with plus one token of its
own. One implementation of that rule keeps "lossless" meaning the same thing everywhere:

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
accepted path's slots are gathered to ``lengths[b] ..`` by ``DecodeEngine.commit`` (keys and
values moved, never recomputed). A chain of ``k`` drafts is the tree ``parents = (-1, 0, 1,
.., k-1)``, whose accepted slots are already in place.

Typical step (see :mod:`dynexec_compile.decoding.speculative`)::

    positions, slots = tree_positions(tree, engine.lengths)              # [B, T] each
    mask = step_mask(engine.lengths, slots, tree.visible(), engine.max_len, dtype)
    logits = engine.step(tokens, positions, mask, slots)                 # [B, T, V]
    verdict = verify(tree, tokens, logits, draft_probs, sampling, generator)
    commit_verdict(engine, tree, verdict)       # keep root + accepted drafts in the cache
    # emit verdict.tokens[b, : verdict.accepted[b] + 1]; next root = verdict.next_token
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch

from dynexec_compile.decoding.masks import step_mask
from dynexec_compile.decoding.sampling import SamplingParams, draw, sampling_probs

if TYPE_CHECKING:
    from dynexec_compile.decoding.step import DecodeEngine

__all__ = [
    "TreeSpec",
    "Verdict",
    "as_tree",
    "commit_verdict",
    "verdict_commit",
    "verify_step_greedy",
    "draw_children",
    "point_mass_probs",
    "tree_positions",
    "verify",
    "verify_greedy",
    "verify_sampling",
]


@dataclass(frozen=True)
class TreeSpec:
    """A candidate tree: ``parents[i]`` is the parent node of node ``i``.

    Node 0 is the root (``parents[0] == -1``); the others are drafted tokens in breadth-first
    order: ``0 <= parents[i] < i`` and ``depth`` non-decreasing with the index. The order of a
    node's children is the order they are tried in when sampling.

    Build one with :meth:`chain`, :meth:`from_branching` or from explicit parents.
    """

    parents: tuple[int, ...]

    def __post_init__(self) -> None:
        p = self.parents
        if not isinstance(p, tuple) or len(p) < 2 or p[0] != -1:
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

    def level(self, depth: int) -> tuple[int, ...]:
        """Nodes at ``depth``."""
        return tuple(i for i, d in enumerate(self.depths) if d == depth)

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


_DERIVED = ("depths", "children", "_depth_tensor", "_parent_index", "_preference", "_ancestors", "_paths", "_child_table")


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


def tree_positions(tree: TreeSpec, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positions, slots)``, both ``[B, T]``: node ``i`` at position ``lengths + depth[i]``,
    written at slot ``lengths + i``."""
    # lengths: [B]
    base = lengths[:, None]  # [B, 1]
    positions = base + tree.depth_tensor(lengths.device)[None, :]  # [B, T]
    slots = base + torch.arange(tree.size, device=lengths.device)[None, :]  # [B, T]
    return positions, slots


def commit_verdict(engine: DecodeEngine, tree: TreeSpec, verdict: Verdict, keep: torch.Tensor | None = None) -> None:
    """Commit the root and the accepted drafts of each row to ``engine``'s cache.

    The step must have written node ``i`` at slot ``engine.lengths + i`` (:func:`tree_positions`).
    A chain's accepted tokens already sit in place (only the lengths move); a tree's path is
    gathered. ``keep``: ``[B]`` bool, rows that commit at all (finished rows keep nothing).
    """
    engine.commit(*verdict_commit(tree, verdict, keep, engine.lengths))


def verdict_commit(
    tree: TreeSpec, verdict: Verdict, keep: torch.Tensor | None, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(counts [B], accepted_slots [B, D+1] | None)`` for ``commit``/``apply_commit``: the root
    and the accepted drafts of rows with ``keep``; slots only for a tree (a chain sits in place).
    Tensor work only (traceable)."""
    counts = verdict.accepted + 1  # [B]: root + accepted drafts
    if keep is not None:
        counts = torch.where(keep, counts, 0)
    return counts, None if tree.is_chain else lengths[:, None] + verdict.path


def verify_step_greedy(engine: DecodeEngine, tree: TreeSpec, tokens: torch.Tensor, keep: torch.Tensor) -> Verdict:
    """The target's whole greedy verification step as ONE compiled graph of ``engine``
    (:meth:`DecodeEngine.run_graph`): positions, slots and the tree mask from the committed
    lengths, the forward over the root and every candidate, :func:`verify_greedy`, and the
    commit of the root and the accepted drafts (:func:`commit_verdict`) — no host work
    between them.

    Args:
        tokens: ``[B, T]`` node tokens (``tokens[:, 0]`` the root).
        keep: ``[B]`` bool, rows that commit (finished rows keep nothing).
    """
    accepted, path, emitted, next_token = engine.run_graph(
        f"verify_greedy{tree.parents}", _verify_greedy_body(tree), tokens, keep, width=tree.size
    )
    return Verdict(accepted=accepted, path=path, tokens=emitted, next_token=next_token)


@functools.lru_cache(maxsize=32)
def _verify_greedy_body(tree: TreeSpec) -> Any:
    """The graph body of :func:`verify_step_greedy` for ``tree`` (one function per tree: the
    tree's structure is baked into the graph, so each tree gets a graph of its own)."""

    def body(engine: DecodeEngine, tokens: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, ...]:
        lengths = engine.cache.lengths
        positions, slots = tree_positions(tree, lengths)  # [B, T] each
        mask = step_mask(lengths, slots, tree.visible(tokens.device), engine.max_len, engine.cache.dtype)
        verdict = verify_greedy(tree, tokens, engine.forward_logits(tokens, positions, slots, mask))
        engine.cache.apply_commit(*verdict_commit(tree, verdict, keep, lengths))
        return verdict.accepted, verdict.path, verdict.tokens, verdict.next_token

    return body


def verify(
    tree: TreeSpec,
    tokens: torch.Tensor,
    target_logits: torch.Tensor,
    draft_probs: torch.Tensor | None = None,
    sampling: SamplingParams | None = None,
    generator: torch.Generator | None = None,
) -> Verdict:
    """:func:`verify_greedy` when ``sampling`` is ``None``, else :func:`verify_sampling`."""
    if sampling is None:
        return verify_greedy(tree, tokens, target_logits)
    if draft_probs is None:
        raise ValueError("sampling verification needs draft_probs: the distribution each drafted token was drawn from")
    return verify_sampling(tree, tokens, target_logits, draft_probs, sampling, generator)


def verify_greedy(tree: TreeSpec, tokens: torch.Tensor, target_logits: torch.Tensor) -> Verdict:
    """The deepest path whose every drafted token is the target's argmax after its parent.

    Args:
        tree: the candidate tree (``T`` nodes).
        tokens: ``[B, T]`` node tokens (``tokens[:, 0]`` the root).
        target_logits: ``[B, T, V]`` the target's logits at every node.
    Returns:
        :class:`Verdict`; among equally deep accepted nodes (duplicate siblings) the first wins.
    """
    _check(tree, tokens, target_logits)
    device = tokens.device
    argmax = target_logits.argmax(dim=-1)  # [B, T]
    if tree.is_chain:  # node i has depth i: the accepted length is the matching prefix
        best = (tokens[:, 1:] == argmax[:, :-1]).cumprod(dim=1).sum(dim=1)  # [B]
    else:
        correct = tokens == argmax[:, tree._parent_index.to(device)]  # [B, T]
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
        tree: the candidate tree (``T`` nodes).
        tokens: ``[B, T]`` node tokens (``tokens[:, 0]`` the root).
        target_logits: ``[B, T, V]`` the target's raw logits at every node; warped with
            ``sampling`` (the same warps the drafter's ``draft_probs`` must have used).
        draft_probs: ``[B, T, V]``: ``draft_probs[b, i]`` is the distribution node ``i``'s token
            was drawn from (given its earlier siblings); row 0 is unused. An all-zero row marks
            a node that was not drawn (never accepted).
        sampling: temperature / top-k / top-p of the target distribution.
        generator: random generator for the acceptance tests and the bonus draw.
    Returns:
        :class:`Verdict`.
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


def draw_children(
    probs: torch.Tensor, n: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` distinct children from ``probs`` (without replacement) for sampling trees.

    Args:
        probs: ``[B, V]`` the drafter's (warped) distribution at a node.
        n: children to draw.
    Returns:
        ``(tokens [B, n], child_probs [B, n, V])``: child ``c`` was drawn from
        ``child_probs[:, c]`` (``probs`` with the earlier children removed, renormalised) —
        the ``draft_probs`` rows :func:`verify_sampling` needs. When the support runs out the
        remaining children repeat a token with an all-zero distribution (never accepted).
    """
    # probs: [B, V]
    rows = torch.arange(probs.shape[0], device=probs.device)
    remaining = probs.float()
    tokens, child_probs = [], []
    for _ in range(n):
        mass = remaining.sum(dim=-1, keepdim=True)  # [B, 1]
        empty = mass[:, 0] <= 0
        q = torch.where(empty[:, None], 0.0, remaining / mass.clamp(min=1e-30))  # [B, V]
        safe = torch.where(empty[:, None], probs.float(), q)  # something to draw from; discarded if empty
        token = draw(safe, generator)  # [B]
        tokens.append(token)
        child_probs.append(q)
        remaining = remaining.index_put((rows, token), torch.zeros((), device=probs.device))
    return torch.stack(tokens, dim=1), torch.stack(child_probs, dim=1)


def point_mass_probs(tree: TreeSpec, tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """``draft_probs`` for a tree whose node tokens are deterministic given the drafter's state
    (its top-k children): a point mass on each node's token.

    With a point mass, :func:`verify_sampling` accepts child ``x`` with probability ``p(x)`` and
    after a rejection tries the next sibling under ``p`` with ``x`` removed — multi-draft
    rejection sampling for deterministic proposals, lossless. A sibling repeating an earlier
    sibling's token gets an all-zero row (never accepted: its token is already out of ``p``).

    Args:
        tree: the candidate tree (``T`` nodes).
        tokens: ``[B, T]`` node tokens (``tokens[:, 0]`` the root).
        vocab: ``V``.
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


def acceptance_stats(drafted: list[torch.Tensor], accepted: list[torch.Tensor]) -> dict[str, Any]:
    """The ``stats.extra`` entries every draft-and-verify strategy reports, from per-step,
    per-row counts ``[B]`` of drafted and accepted tokens (0 for rows that had finished)."""
    drafted_rows = torch.stack(drafted).tolist() if drafted else []
    accepted_rows = torch.stack(accepted).tolist() if accepted else []
    total_drafted = sum(map(sum, drafted_rows))
    total_accepted = sum(map(sum, accepted_rows))
    live_steps = sum(n > 0 for step in drafted_rows for n in step)
    return {
        "drafted_per_step": drafted_rows,
        "accepted_drafts_per_step": accepted_rows,
        "acceptance_rate": total_accepted / total_drafted if total_drafted else 0.0,
        "mean_accepted_per_step": total_accepted / live_steps if live_steps else 0.0,
    }


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


def node_mask(
    prefix_lengths: torch.Tensor,
    base: torch.Tensor,
    visible: torch.Tensor,
    max_len: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Mask of queries that see a cache prefix plus chosen tree nodes written in earlier steps.

    A drafter that grows a tree depth by depth feeds only one level per forward, while the
    ancestors it must see were written (uncommitted) by earlier forwards at ``base + node``.
    Query ``t`` of row ``b`` sees slot ``s`` iff ``s < prefix_lengths[b]`` or ``s == base[b] + j``
    for a node ``j`` with ``visible[t, j]``.

    Args:
        prefix_lengths: ``[B]`` slots every query sees.
        base: ``[B]`` slot of node 0.
        visible: ``[Tq, T]`` bool, query ``t`` sees node ``j`` (include the query's own node).
        max_len: ``S_max``.
    Returns:
        ``[B, 1, Tq, S_max]`` additive mask.
    """
    from dynexec_compile.decoding.masks import additive

    batch, (queries, nodes) = base.shape[0], visible.shape
    keys = torch.arange(max_len, device=base.device)  # [S]
    prefix = keys[None, None, :] < prefix_lengths[:, None, None]  # [B, 1, S]
    node_slots = base[:, None] + torch.arange(nodes, device=base.device)[None, :]  # [B, T]
    own = torch.zeros(batch, queries, max_len, dtype=torch.bool, device=base.device)  # [B, Tq, S]
    vis = visible.to(device=base.device, dtype=torch.bool)[None].expand(batch, queries, nodes)
    own.scatter_(2, node_slots[:, None, :].expand(batch, queries, nodes), vis)
    return additive((prefix | own)[:, None], dtype)
