"""The two compiled forwards of self-speculative decoding, sharing one :class:`SlotCache`.

The draft is the model's own first ``E`` layers plus an exit head. Work sharing is the
point: a drafted token goes through layers ``0..E-1`` once, while drafting, and its
layer-``E`` hidden state and its layers-``< E`` keys/values are kept; verification then
runs only layers ``E..L-1`` on those hidden states. HF's ``assistant_early_exit`` instead
re-runs the whole model on the drafted tokens, recomputing the first ``E`` layers.

One step with ``k`` drafts, committed length ``n`` and the pending token ``x_n`` (sampled by
the previous verification, not yet in the cache):

- ``draft`` x ``k``: token ``t_i`` (``x_n``, then ``d_1 .. d_{k-1}``) at position ``n + i``
  through layers ``[0, E)`` (keys/values to slot ``n + i``) -> ``h_E[i]`` and the exit head's
  logits for ``d_{i+1}``;
- ``verify`` x 1: ``d_k`` through layers ``[0, E)`` (the only token not drafted from), then
  layers ``[E, L)`` + norm + head on all ``k + 1`` hidden states -> target logits at positions
  ``n .. n + k``.

So every layer sees each of the step's ``k + 1`` tokens exactly once. The caller accepts a
prefix and commits ``accepted + 1`` tokens in place (a chain needs no gathering): the kept
tokens' keys/values in all layers are already right, since they were computed over exactly
the kept prefix.

Greedy decoding runs the whole step — ``k`` draft passes, the verification, the acceptance
and the commit — as ONE graph (:meth:`SelfSpeculativeEngine.step_greedy`): on a CPU a call
costs about as much as a small model's arithmetic, so ``k + 1`` calls per step would eat
the gain. Sampling needs the rejection rule's random draws between the passes and uses
``draft`` and ``verify``.

A candidate tree (engine built with ``tree=TreeSpec``; node ``i`` at depth ``d`` written at
slot ``n + i``, position ``n + d``): the draft grows the tree level by level — one pass of
layers ``[0, E)`` + exit head over each depth ``d < D``'s nodes under the tree mask (each
node sees the prefix and its ancestors, whose layers-``< E`` keys/values the earlier levels
wrote), the children of a node being the exit head's top tokens there (as many as the tree
gives it, in rank order); then ONE verification pass runs layers ``[0, E)`` on the deepest
level (the nodes nothing was drafted from) and layers ``[E, L)`` on all ``T`` nodes' hidden
states under the same mask. Every layer again sees each node exactly once. The draft and
the verification are one graph (:meth:`SelfSpeculativeEngine.draft_tree`: no random draws
are needed, the children are deterministic), which for greedy also takes the deepest
agreeing path and gathers its slots in every layer's cache
(:meth:`SelfSpeculativeEngine.step_tree_greedy`); sampling verifies on the host and
commits the path with :meth:`DecodeEngine.commit` (the same gathering, a compiled graph).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from dynexec_compile.decoding.cuda_graphs import CudaGraphRunner
from dynexec_compile.decoding.layers import DecoderStack
from dynexec_compile.decoding.masks import chain_mask, step_mask
from dynexec_compile.decoding.step import DecodeEngine, _private_method
from dynexec_compile.decoding.verify import TreeSpec, tree_positions, verify_greedy


class SelfSpeculativeEngine(DecodeEngine):
    """A :class:`DecodeEngine` with layer-range ``draft`` and ``verify`` entry points.

    Args:
        model: a llama / qwen2 / gpt2 causal LM in eval mode (not modified).
        batch_size, max_len: as for :class:`DecodeEngine`; ``max_len`` must leave room for
            ``k + 1`` scratch slots after the longest row.
        exit_layer: ``E``, layers the draft runs (``1 <= E < L``).
        exit_head: ``[..., D] -> [..., V]`` logits from the layer-``E`` hidden state; ``None``
            shares the model's own final norm + LM head.
        tree: the candidate tree of :meth:`draft_tree` / :meth:`step_tree_greedy` (fixed per
            engine: its shape is baked into their graphs); ``None`` for chains only.
        **engine_options: the rest of :class:`DecodeEngine`'s options.

    Attributes:
        layer_tokens: ``[L]`` tokens each decoder layer has processed in ``draft``/``verify``
            calls (host counters, per row), for the stats.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        batch_size: int,
        max_len: int,
        exit_layer: int,
        exit_head: nn.Module | None = None,
        tree: TreeSpec | None = None,
        **engine_options: Any,
    ):
        super().__init__(model, batch_size, max_len, **engine_options)
        self.stack = DecoderStack(model)
        if isinstance(exit_layer, bool) or not isinstance(exit_layer, int) or not 1 <= exit_layer < self.stack.num_layers:
            raise ValueError(
                f"exit_layer must be an int in [1, {self.stack.num_layers - 1}] for a model with "
                f"{self.stack.num_layers} layers, got {exit_layer!r}"
            )
        self.exit_layer = exit_layer
        self.exit_head = exit_head
        self.layer_tokens = [0] * self.stack.num_layers
        self.tree = tree
        if tree is not None:
            self._tree_tables(tree)
        self._draft_fn = self._compiler(_private_method(self, self._draft_impl))
        self._verify_fn = self._compiler(_private_method(self, self._verify_impl))
        self._step_greedy_fn = self._compiler(_private_method(self, self._step_greedy_impl))
        self._draft_tree_fn = self._compiler(_private_method(self, self._draft_tree_impl))
        self._step_tree_greedy_fn = self._compiler(_private_method(self, self._step_tree_greedy_impl))
        if self.cuda_graphs:
            self._draft_fn = CudaGraphRunner(self._draft_fn)
            self._verify_fn = CudaGraphRunner(self._verify_fn)
            self._step_greedy_fn = CudaGraphRunner(self._step_greedy_fn, state=[self.cache.lengths])
            self._draft_tree_fn = CudaGraphRunner(self._draft_tree_fn)
            self._step_tree_greedy_fn = CudaGraphRunner(self._step_tree_greedy_fn, state=[self.cache.lengths])

    def _tree_tables(self, tree: TreeSpec) -> None:
        """Per depth: the level's node range (contiguous in breadth-first order) and, for the
        next level's nodes, their parent's index within this level and their rank among
        their siblings (which of the exit head's top tokens they take)."""
        depth, vocab = tree.max_depth, int(self.model.config.get_text_config(decoder=True).vocab_size)
        widest = max(len(kids) for kids in tree.children)
        if widest > vocab:
            raise ValueError(f"a tree node has {widest} children but the vocabulary has {vocab} tokens; use fewer children")
        self._levels = [(min(tree.level(d)), max(tree.level(d)) + 1) for d in range(depth + 1)]
        self._child_parent, self._child_rank, self._top = [], [], []
        for d in range(depth):
            start, _ = self._levels[d]
            kids = tree.level(d + 1)
            parents = [tree.parents[c] for c in kids]
            ranks = [tree.children[tree.parents[c]].index(c) for c in kids]
            self._child_parent.append(torch.tensor([p - start for p in parents], device=self.device))
            self._child_rank.append(torch.tensor(ranks, device=self.device))
            self._top.append(max(ranks) + 1)
        # fill the tree's cached tables now: Dynamo cannot trace their first (locked) access
        tree.visible(), tree.depth_tensor(), tree.path_table(), tree.child_table()

    @property
    def tree_leaves(self) -> int:
        """Nodes of the tree's deepest level (their layers ``< E`` run in the verification)."""
        start, stop = self._levels[-1]
        return stop - start

    def draft(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layers ``[0, E)`` + exit head on one token per row; its keys/values go to slot ``positions``.

        Args:
            tokens: ``[B, 1]``; positions: ``[B, 1]`` (slot == position);
            mask: ``[B, 1, 1, S_max]`` additive chain mask.
        Returns:
            ``(h_E [B, 1, D], draft logits [B, V])``.
        """
        self._check_step(tokens, positions, mask, positions)
        out = self._run("draft", self._draft_fn, tokens, positions, mask)
        self._count(range(self.exit_layer), tokens.shape[1])
        return out

    def verify(
        self, hidden: torch.Tensor, last: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Target logits of a drafted chain from the drafts' layer-``E`` hidden states.

        Args:
            hidden: ``[B, k, D]`` layer-``E`` hidden states of the chain's first ``k`` tokens
                (from :meth:`draft`); their layers-``< E`` keys/values are already in the cache.
            last: ``[B, 1]`` the chain's last token (``d_k``), not yet through any layer.
            positions: ``[B, k + 1]`` positions (== slots) of the whole chain.
            mask: ``[B, 1, k + 1, S_max]`` additive chain mask.
        Returns:
            ``[B, k + 1, V]`` the model's logits at the chain's positions.
        """
        self._check_step(positions, positions, mask, positions)
        if hidden.shape != (self.batch_size, positions.shape[1] - 1, self.stack.hidden_size) or last.shape != (self.batch_size, 1):
            raise ValueError(
                f"verify: hidden must be [B, k, D] and last [B, 1] for positions {tuple(positions.shape)}, "
                f"got {tuple(hidden.shape)} and {tuple(last.shape)}"
            )
        logits = self._run("verify", self._verify_fn, hidden, last, positions, mask)
        self.forward_passes += 1
        self._count(range(self.exit_layer), 1)
        self._count(range(self.exit_layer, self.stack.num_layers), positions.shape[1])
        return logits

    def step_greedy(self, pending: torch.Tensor, live: torch.Tensor, num_draft: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One whole greedy step as one graph: draft ``k`` tokens, verify, accept, commit.

        Args:
            pending: ``[B]`` each row's last emitted token (not yet in the cache).
            live: ``[B]`` bool, rows that commit (finished rows run but keep nothing).
            num_draft: ``k``.
        Returns:
            ``(argmax [B, k+1], accepted [B])``: row ``b`` emits ``argmax[b, :accepted[b] + 1]``
            (its accepted drafts, which equal the target's argmax, then the target's own next
            token); ``pending`` and the accepted drafts are committed to the cache.
        """
        if self._length_bound + num_draft + 1 > self.max_len:
            self._refresh_bound(num_draft + 1)
        offsets = torch.arange(num_draft + 1, device=self.device)  # its shape selects the graph
        out = self._run("step_greedy", self._step_greedy_fn, pending.reshape(self.batch_size, 1), live, offsets)
        self.forward_passes += 1
        self._length_bound += num_draft + 1
        self._count(range(self.exit_layer), num_draft + 1)
        self._count(range(self.exit_layer, self.stack.num_layers), num_draft + 1)
        return out

    def draft_tree(self, pending: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Draft the candidate tree with layers ``[0, E)`` and score every node with layers
        ``[E, L)``: one graph, one target forward; nothing is committed.

        Args:
            pending: ``[B]`` each row's last emitted token (the root, not yet in the cache).
        Returns:
            ``(tokens [B, T], logits [B, T, V])``: the tree's tokens (root first, children the
            exit head's top tokens) and the model's logits at every node. Node ``i``'s
            keys/values sit at slot ``lengths + i`` in every layer; keep the accepted path
            with :func:`~dynexec_compile.decoding.verify.commit_verdict`.
        """
        tree = self._check_tree()
        out = self._run("draft_tree", self._draft_tree_fn, pending.reshape(self.batch_size, 1))
        self.forward_passes += 1
        self._count(range(self.stack.num_layers), tree.size)
        return out

    def step_tree_greedy(self, pending: torch.Tensor, live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One whole greedy tree step as one graph: :meth:`draft_tree`, the deepest path the
        model agrees with, and its commit (keys/values gathered in every layer).

        Args:
            pending: ``[B]`` each row's last emitted token (not yet in the cache).
            live: ``[B]`` bool, rows that commit (finished rows run but keep nothing).
        Returns:
            ``(tokens [B, D+1], accepted [B])``: row ``b`` emits ``tokens[b, :accepted[b] + 1]``.
        """
        tree = self._check_tree()
        out = self._run("step_tree_greedy", self._step_tree_greedy_fn, pending.reshape(self.batch_size, 1), live)
        self.forward_passes += 1
        self._length_bound += tree.max_depth + 1
        self._count(range(self.stack.num_layers), tree.size)
        return out

    def _check_tree(self) -> TreeSpec:
        if self.tree is None:
            raise ValueError("tree steps need a SelfSpeculativeEngine built with tree=TreeSpec")
        if self._length_bound + self.tree.size > self.max_len:
            self._refresh_bound(self.tree.size)
        return self.tree

    def _count(self, layers: range, tokens: int) -> None:
        for i in layers:
            self.layer_tokens[i] += tokens

    # ---- traced bodies ------------------------------------------------------------------

    def _exit_logits(self, h: torch.Tensor) -> torch.Tensor:
        # h: [B, T, D] layer-E output -> [B, T, V]
        if self.exit_head is None:
            return self.stack.logits(h)
        return self.exit_head(h)

    def _draft_impl(
        self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.stack.embed(tokens, positions)  # [B, 1, D]
        h = self.stack.run(h, 0, self.exit_layer, mask, positions, self.cache, positions)  # [B, 1, D]
        return h, self._exit_logits(h)[:, -1]

    def _verify_impl(
        self, hidden: torch.Tensor, last: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        # hidden: [B, k, D]; last: [B, 1]; positions: [B, k+1]; mask: [B, 1, k+1, S]
        tail = positions[:, -1:]  # [B, 1]
        h_last = self.stack.embed(last, tail)  # [B, 1, D]
        h_last = self.stack.run(h_last, 0, self.exit_layer, mask[:, :, -1:], tail, self.cache, tail)
        h = torch.cat([hidden, h_last], dim=1)  # [B, k+1, D]
        h = self.stack.run(h, self.exit_layer, self.stack.num_layers, mask, positions, self.cache, positions)
        return self.stack.logits(h)  # [B, k+1, V]

    def _step_greedy_impl(
        self, pending: torch.Tensor, live: torch.Tensor, offsets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # pending: [B, 1]; live: [B]; offsets: [k+1]
        num_draft = offsets.shape[0] - 1
        positions = self.cache.lengths[:, None] + offsets  # [B, k+1], slot == position
        mask = chain_mask(positions, self.cache.max_len, self.cache.dtype)  # [B, 1, k+1, S]
        chain, hidden = [pending], []
        for i in range(num_draft + 1):  # draft passes 0..k-1, then d_k's lower layers
            at = positions[:, i : i + 1]  # [B, 1]
            h = self.stack.embed(chain[-1], at)
            h = self.stack.run(h, 0, self.exit_layer, mask[:, :, i : i + 1], at, self.cache, at)  # [B, 1, D]
            hidden.append(h)
            if i < num_draft:
                chain.append(self._exit_logits(h)[:, -1].argmax(dim=-1, keepdim=True))  # [B, 1]
        h = self.stack.run(torch.cat(hidden, dim=1), self.exit_layer, self.stack.num_layers, mask, positions, self.cache, positions)
        argmax = self.stack.logits(h).argmax(dim=-1)  # [B, k+1]
        tokens = torch.cat(chain, dim=1)  # [B, k+1] = [pending, d_1 .. d_k]
        accepted = (tokens[:, 1:] == argmax[:, :-1]).long().cumprod(dim=1).sum(dim=1)  # [B]
        self.cache.lengths.add_(torch.where(live, accepted + 1, 0))  # pending + accepted drafts, in place
        return argmax, accepted

    def _draft_tree_impl(self, pending: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # pending: [B, 1] the root; node i at slot lengths + i, position lengths + depth[i]
        tree, lengths, exit_layer = self.tree, self.cache.lengths, self.exit_layer
        positions, slots = tree_positions(tree, lengths)  # [B, T] each
        mask = step_mask(lengths, slots, tree.visible(pending.device), self.cache.max_len, self.cache.dtype)  # [B, 1, T, S]
        level_tokens, hidden = [pending], []
        for depth, (start, stop) in enumerate(self._levels):  # the draft over depths < D, then the leaves
            at, where = positions[:, start:stop], slots[:, start:stop]  # [B, n_d]
            h = self.stack.embed(level_tokens[-1], at)
            h = self.stack.run(h, 0, exit_layer, mask[:, :, start:stop], at, self.cache, where)  # [B, n_d, D]
            hidden.append(h)
            if depth < tree.max_depth:  # children: the exit head's top tokens at each node, by rank
                top = self._exit_logits(h).topk(self._top[depth], dim=-1).indices  # [B, n_d, top]
                level_tokens.append(top[:, self._child_parent[depth], self._child_rank[depth]])  # [B, n_{d+1}]
        h = torch.cat(hidden, dim=1)  # [B, T, D] layer-E hidden states of all nodes
        h = self.stack.run(h, exit_layer, self.stack.num_layers, mask, positions, self.cache, slots)
        return torch.cat(level_tokens, dim=1), self.stack.logits(h)  # [B, T], [B, T, V]

    def _step_tree_greedy_impl(self, pending: torch.Tensor, live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # pending: [B, 1]; live: [B]
        lengths = self.cache.lengths
        tokens, logits = self._draft_tree_impl(pending)  # [B, T], [B, T, V]
        verdict = verify_greedy(self.tree, tokens, logits)
        counts = torch.where(live, verdict.accepted + 1, 0)  # [B]: root + accepted path
        self.cache.apply_commit(counts, lengths[:, None] + verdict.path)  # gather the path in every layer
        return verdict.tokens, verdict.accepted


__all__ = ["SelfSpeculativeEngine"]
