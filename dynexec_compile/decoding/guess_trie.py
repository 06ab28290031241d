"""Lossless sampling over lookahead's guessed n-grams: merge them into a trie, verify by rejection.

Why this is lossless: lookahead's candidates are *deterministic* guesses (Jacobi n-grams,
prompt lookup), so as speculative-sampling proposals each one is a point mass ``q`` on the
guessed token. Rejection sampling with a point mass accepts guess ``x`` with probability
``p(x)``; after a rejection the target distribution becomes the residual ``p`` without ``x``,
renormalised, and the next *different* guess at the same node is tried (multi-draft
recursive rejection sampling, SpecInfer); when nothing is accepted the token is drawn from
the residual. That is :func:`~dynexec_compile.decoding.verify.verify_sampling` on a
:class:`~dynexec_compile.decoding.verify.TreeSpec` with one-hot draft rows.

Why a trie: two candidates that share a prefix must become one path that branches where
they differ. Kept as separate siblings, the second copy of a token could never be accepted
after the first was rejected (its residual probability is 0), and once the first copy was
accepted the second candidate's continuation would never be tried.

The fused step keeps its layout (``G`` chains of ``N-1`` tokens, see
:func:`~dynexec_compile.decoding.lookahead.step_layout`); each trie node points at the step
token where its prefix first occurs. That token has exactly the node's context (the same
tokens at the same positions, seeing the current token and its own prefix), so its logits
are the node's and its cached keys/values are the ones to keep when the node is accepted.

Rows of a batch have tries of different shapes; rows with the same shape are verified
together (one :func:`verify_sampling` call per distinct shape, in order of first row).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dynexec_compile.decoding.sampling import SamplingParams
from dynexec_compile.decoding.verify import TreeSpec, point_mass_probs, verify_sampling


@dataclass(frozen=True)
class GuessTrie:
    """One row's guesses as a candidate tree in breadth-first order (node 0: the current token).

    Attributes:
        parents: the :class:`TreeSpec` parents.
        tokens: token of every node.
        index: step token (column of the fused step) whose logits and keys/values the node uses.
        guessed: ``False`` for the root and for a filler node (a row without guesses gets one
            child that is never accepted, as a tree needs a drafted node).
    """

    parents: tuple[int, ...]
    tokens: tuple[int, ...]
    index: tuple[int, ...]
    guessed: tuple[bool, ...]


def merge_guesses(root: int, guesses: Sequence[Sequence[int]], index: Sequence[Sequence[int]]) -> GuessTrie:
    """Merge ``guesses`` (token sequences continuing ``root``) into a :class:`GuessTrie`.

    Args:
        root: the current token (node 0, step token 0).
        guesses: candidates in try order; shared prefixes become one path.
        index: ``index[g][k]``: the step token holding ``guesses[g][k]``.
    Returns:
        The trie; a node's children keep the order in which candidates first reach them.
    """
    kids: list[dict[int, int]] = [{}]  # creation-order node -> {token: child}
    tokens, where = [root], [0]
    for guess, columns in zip(guesses, index, strict=True):
        node = 0
        for token, column in zip(guess, columns, strict=True):
            if token not in kids[node]:
                kids[node][token] = len(tokens)
                kids.append({})
                tokens.append(token)
                where.append(column)
            node = kids[node][token]
    if len(tokens) == 1:  # no guesses: one filler child, never accepted
        return GuessTrie(parents=(-1, 0), tokens=(root, root), index=(0, 0), guessed=(False, False))
    order, parents = [0], [-1]  # breadth-first renumbering
    head = 0
    while head < len(order):
        for child in kids[order[head]].values():
            order.append(child)
            parents.append(head)
        head += 1
    return GuessTrie(
        parents=tuple(parents),
        tokens=tuple(tokens[n] for n in order),
        index=tuple(where[n] for n in order),
        guessed=(False,) + (True,) * (len(order) - 1),
    )


def verify_guesses(
    tries: Sequence[GuessTrie],
    logits: torch.Tensor,
    slots: torch.Tensor,
    sampling: SamplingParams,
    generator: torch.Generator | None,
    width: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rejection-sample every row's trie against the step's logits.

    Args:
        tries: one :class:`GuessTrie` per row.
        logits: ``[B, T, V]`` the fused step's logits.
        slots: ``[B, T]`` cache slots of the step tokens.
        sampling: the target's sampling distribution.
        generator: random generator for the acceptance tests and the final draws.
        width: ``K`` columns of the outputs (at least the deepest trie's depth + 1).
    Returns:
        ``run [B, K]``: accepted guesses then the sampled token (repeated after it);
        ``accepted [B]``: guesses accepted; ``run_slots [B, K]``: slots of the current token
        and the accepted guesses (the keys/values to keep), the last one repeated.
    """
    batch, device, vocab = logits.shape[0], logits.device, logits.shape[-1]
    run = torch.zeros(batch, width, dtype=torch.long, device=device)
    accepted = torch.zeros(batch, dtype=torch.long, device=device)
    run_slots = torch.zeros(batch, width, dtype=torch.long, device=device)
    groups: dict[tuple[tuple[int, ...], tuple[bool, ...]], list[int]] = {}
    for b, trie in enumerate(tries):
        groups.setdefault((trie.parents, trie.guessed), []).append(b)
    for (parents, guessed), members in groups.items():
        tree = _tree(parents)
        rows = torch.tensor(members, device=device)  # [b]
        index = torch.tensor([tries[b].index for b in members], device=device)  # [b, n]
        tokens = torch.tensor([tries[b].tokens for b in members], device=device)  # [b, n]
        node_logits = logits[rows[:, None], index]  # [b, n, V]
        # the trie's siblings are distinct; the filler node (guessed False) is never accepted
        draft_probs = point_mass_probs(tree, tokens, vocab) * torch.tensor(guessed, device=device)[None, :, None]
        verdict = verify_sampling(tree, tokens, node_logits, draft_probs, sampling, generator)
        run[rows] = _fit(verdict.tokens, width)
        accepted[rows] = verdict.accepted
        run_slots[rows] = _fit(slots[rows[:, None], index.gather(1, verdict.path)], width)
    return run, accepted, run_slots


@functools.lru_cache(maxsize=256)
def _tree(parents: tuple[int, ...]) -> TreeSpec:
    """Trie shapes recur from step to step: build each :class:`TreeSpec` (and its tables) once."""
    return TreeSpec(parents)


def _fit(columns: torch.Tensor, width: int) -> torch.Tensor:
    """``[b, D+1]`` -> ``[b, width]``: cut, or pad by repeating the last column."""
    if columns.shape[1] >= width:
        return columns[:, :width]
    return torch.cat([columns, columns[:, -1:].expand(-1, width - columns.shape[1])], dim=1)
