"""The fused draft-heads step: ONE target forward verifies the last candidates and proposes the next.

The step's graph runs the model on ``[pending, c_1 .. c_k]`` (the token sampled last step and
the heads' ``k`` candidates) at positions ``n .. n + k`` and has the draft heads inside it,
as extra outputs next to the logits: the heads read the final hidden state of the *last
accepted* position, so their guesses continue the sequence the step keeps.

- Greedy (``verify_greedy``): the whole step is the graph. Acceptance is an argmax
  comparison, so it happens inside, as does the commit (``lengths += accepted + 1``); it
  returns the target's argmax tokens ``[B, k+1]``, the accepted count ``[B]``, the heads'
  logits ``[B, k, V]`` at position ``n + accepted`` — the LM head runs ``k`` extra times
  per row, not ``k (k + 1)`` — and the next step's chain ``[B, k+1]``. One call per step.
- Sampling (``verify_all``): acceptance needs random draws and the rejection rule, so the
  graph returns the logits ``[B, k+1, V]`` and the heads' logits at every position
  ``[B, k+1, k, V]``; the caller picks the row of the last accepted position.

- Greedy with a candidate tree (``verify_tree``, Medusa's trees): node ``i`` at depth ``d``
  holds head ``d``'s ``r``-th most likely token, ``r`` its rank among its parent's children;
  all nodes are verified in the same single forward under the tree mask (positions by
  depth, slots by node), the deepest path the target agrees with is kept (its keys/values
  gathered in the cache, in the graph) and the heads read that path's last node.
- Sampling with a candidate tree: the same tree, split where the random acceptance test
  goes: ``score_tree`` (the one target forward: logits ``[B, T, V]`` and final hidden states
  at every node, nothing committed), the caller's rejection sampling, then ``keep_path``
  (gather the accepted path in the cache, the heads on its last node, the next tree) — a
  small graph without any decoder layer.

The prefill (``prefill_propose``) also ends in the heads, so the first step already has
candidates. The model is run through :class:`DecoderStack` (its own modules, final norm and
LM head), so the logits are the model's.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
from transformers import PreTrainedModel

from dynexec_compile.decoding.cuda_graphs import CudaGraphRunner
from dynexec_compile.decoding.draft_heads import DraftHeads, check_heads_fit
from dynexec_compile.decoding.layers import DecoderStack
from dynexec_compile.decoding.masks import chain_mask, step_mask
from dynexec_compile.decoding.step import (
    DecodeEngine,
    _private_method,
    pack_prompts,
    prefill_bucket,
)
from dynexec_compile.decoding.verify import TreeSpec, Verdict, tree_positions, verify_greedy


class DraftHeadsEngine(DecodeEngine):
    """A :class:`DecodeEngine` whose prefill and verification graphs end in draft heads.

    Args:
        model: a llama / qwen2 / gpt2 causal LM in eval mode (not modified).
        batch_size, max_len: as for :class:`DecodeEngine`.
        heads: trained :class:`DraftHeads` for this model (copied to the model's device and
            dtype; the given module is unchanged).
        **engine_options: the rest of :class:`DecodeEngine`'s options.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        batch_size: int,
        max_len: int,
        heads: DraftHeads,
        tree: TreeSpec | None = None,
        **engine_options: Any,
    ):
        super().__init__(model, batch_size, max_len, **engine_options)
        weight = next(model.parameters())
        self.heads = copy.deepcopy(check_heads_fit(model, heads)).to(device=weight.device, dtype=weight.dtype).eval()
        self.stack = DecoderStack(model)
        self.num_heads = self.heads.num_heads
        self.tree = tree
        if tree is not None:
            if tree.max_depth > self.num_heads:
                raise ValueError(
                    f"the candidate tree is {tree.max_depth} deep but there are {self.num_heads} draft heads "
                    "(depth d takes head d's top tokens); use a tree at most that deep"
                )
            ranks = [0] + [tree.children[parent].index(i) for i, parent in enumerate(tree.parents) if parent >= 0]
            self._node_depth = torch.tensor(tree.depths[1:], device=self.device) - 1  # [T-1] head of each node
            self._node_rank = torch.tensor(ranks[1:], device=self.device)  # [T-1] rank among siblings
            self._top = max(ranks) + 1
            # fill the tree's cached properties now: Dynamo cannot trace their first (locked) access
            tree.visible(), tree.depth_tensor(), tree.path_table(), tree.child_table()
        self._prefill_propose_fn = self._compiler(_private_method(self, self._prefill_propose_impl))
        self._verify_greedy_fn = self._compiler(_private_method(self, self._verify_greedy_impl))
        self._verify_all_fn = self._compiler(_private_method(self, self._verify_all_impl))
        self._verify_tree_fn = self._compiler(_private_method(self, self._verify_tree_impl))
        self._score_tree_fn = self._compiler(_private_method(self, self._score_tree_impl))
        self._keep_path_fn = self._compiler(_private_method(self, self._keep_path_impl))
        if self.cuda_graphs:
            self._verify_tree_fn = CudaGraphRunner(self._verify_tree_fn, state=[self.cache.lengths])
            self._score_tree_fn = CudaGraphRunner(self._score_tree_fn)
            self._keep_path_fn = CudaGraphRunner(self._keep_path_fn, state=[self.cache.lengths])
            self._verify_greedy_fn = CudaGraphRunner(self._verify_greedy_fn, state=[self.cache.lengths])
            self._verify_all_fn = CudaGraphRunner(self._verify_all_fn)

    def prefill_propose(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fill the cache with the prompts: ``(next-token logits [B, V], heads' logits [B, k, V])``."""
        if input_ids.shape[0] != self.batch_size:
            raise ValueError(f"prefill: batch of {input_ids.shape[0]} rows, engine built for {self.batch_size}")
        packed, lengths = pack_prompts(input_ids.to(self.device), attention_mask)
        longest = int(lengths.max())
        bucket = prefill_bucket(longest)
        if bucket > self.max_len:
            raise ValueError(f"prefill: prompts of {longest} tokens need {bucket} slots (bucketed), cache has {self.max_len}")
        ids = torch.zeros(self.batch_size, bucket, dtype=torch.long, device=self.device)  # [B, bucket]
        ids[:, :longest] = packed[:, :longest]
        self.cache.reset()
        out = self._run("prefill_propose", self._prefill_propose_fn, ids, lengths.to(self.device))
        self.forward_passes += 1
        self._length_bound = longest
        return out

    def verify_greedy(
        self, tokens: torch.Tensor, live: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The whole greedy step as one graph: verify ``tokens = [pending, c_1 .. c_k]`` at each
        row's next positions, accept, commit, and propose the next chain.

        Args:
            tokens: ``[B, k + 1]``.
            live: ``[B]`` bool, rows that commit (finished rows run but keep nothing).
        Returns:
            ``(argmax [B, k+1], accepted [B] in 0..k, heads' logits [B, k, V], next [B, k+1])``:
            row ``b`` emits ``argmax[b, :accepted[b] + 1]`` (the accepted candidates, then the
            target's own next token); ``pending`` and the accepted candidates are committed;
            ``next`` is the next step's chain (that token, then the heads' argmax).
        """
        if tokens.ndim != 2 or tokens.shape != (self.batch_size, self.num_heads + 1):
            raise ValueError(
                f"draft-heads step: tokens must be [B={self.batch_size}, k+1={self.num_heads + 1}], got {tuple(tokens.shape)}"
            )
        if self._length_bound + self.num_heads + 1 > self.max_len:
            self._refresh_bound(self.num_heads + 1)
        out = self._run("verify_greedy", self._verify_greedy_fn, tokens, live)
        self.forward_passes += 1
        self._length_bound += self.num_heads + 1
        return out

    def tree_tokens(self, root: torch.Tensor, head_logits: torch.Tensor) -> torch.Tensor:
        """The candidate tree's tokens ``[B, T]``: ``root`` ``[B]``, then each node's token from
        the heads' logits ``[B, k, V]`` (head ``depth``, ``rank``-th most likely)."""
        top = head_logits.topk(self._top, dim=-1).indices  # [B, k, top]
        return torch.cat([root[:, None], top[:, self._node_depth, self._node_rank]], dim=1)

    def verify_tree(
        self, tokens: torch.Tensor, live: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The whole greedy tree step as one graph: verify, accept the deepest agreeing path,
        gather it in the cache, propose the next tree.

        Args:
            tokens: ``[B, T]`` the tree's tokens (:meth:`tree_tokens`), root first.
            live: ``[B]`` bool, rows that commit.
        Returns:
            ``(emitted [B, D+1], accepted [B], heads' logits [B, k, V], next tree [B, T])``: row
            ``b`` emits ``emitted[b, :accepted[b] + 1]``.
        """
        tree = self._check_tree(tokens)
        out = self._run("verify_tree", self._verify_tree_fn, tokens, live)
        self.forward_passes += 1
        self._length_bound += tree.max_depth + 1
        return out

    def score_tree(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The target forward of a sampling tree step; nothing is committed.

        Args:
            tokens: ``[B, T]`` the tree's tokens (:meth:`tree_tokens`), root first; node ``i``'s
                keys/values are written at slot ``lengths + i`` (scratch until :meth:`keep_path`).
        Returns:
            ``(logits [B, T, V], final hidden states [B, T, D])`` at every node.
        """
        self._check_tree(tokens)
        out = self._run("score_tree", self._score_tree_fn, tokens)
        self.forward_passes += 1
        return out

    def keep_path(
        self, hidden: torch.Tensor, verdict: Verdict, live: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """After :meth:`score_tree` and the caller's verification: commit each live row's root
        and accepted path (keys/values gathered, not recomputed), run the heads on the path's
        last node and build the next tree (no decoder layer runs).

        Args:
            hidden: ``[B, T, D]`` from :meth:`score_tree`.
            verdict: the :class:`Verdict` of that step.
            live: ``[B]`` bool, rows that commit.
        Returns:
            ``(heads' logits [B, k, V], next tree [B, T])`` rooted at ``verdict.next_token``.
        """
        out = self._run(
            "keep_path", self._keep_path_fn, hidden, verdict.accepted, verdict.path, verdict.next_token, live
        )
        self._length_bound += self.tree.max_depth + 1
        return out

    def verify_all(
        self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused step for sampling: ``(logits [B, k+1, V], heads' logits [B, k+1, k, V])``."""
        self._check_chain(tokens, positions, mask)
        out = self._run("verify_all", self._verify_all_fn, tokens, positions, mask)
        self.forward_passes += 1
        return out

    def step_graph(self) -> fx.GraphModule:
        """The FX graph Dynamo captures for the greedy fused step (what the backend compiles).

        Its outputs are the target's argmax, the accepted counts, the draft heads' logits and
        the next chain; the heads' parameters are inputs of the same graph. Captured on a
        scratch chain at each row's committed length (nothing is committed).
        """
        graphs: list[fx.GraphModule] = []

        def capture(gm: fx.GraphModule, example_inputs: list) -> Any:
            graphs.append(gm)
            return gm.forward

        tokens = torch.zeros(self.batch_size, self.num_heads + 1, dtype=torch.long, device=self.device)
        live = torch.zeros(self.batch_size, dtype=torch.bool, device=self.device)  # commits nothing
        fn = torch.compile(_private_method(self, self._verify_greedy_impl), backend=capture, fullgraph=True, dynamic=False)
        with torch.no_grad():
            fn(tokens, live)
        return graphs[0]

    def _check_tree(self, tokens: torch.Tensor) -> TreeSpec:
        tree = self.tree
        if tree is None:
            raise ValueError("tree steps need an engine built with tree=TreeSpec")
        if tokens.shape != (self.batch_size, tree.size):
            raise ValueError(f"draft-heads tree step: tokens must be [B={self.batch_size}, T={tree.size}], got {tuple(tokens.shape)}")
        if self._length_bound + tree.size > self.max_len:
            self._refresh_bound(tree.size)
        return tree

    def _check_chain(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> None:
        if tokens.ndim != 2 or tokens.shape[1] != self.num_heads + 1:
            raise ValueError(f"draft-heads step: tokens must be [B, k+1={self.num_heads + 1}], got {tuple(tokens.shape)}")
        self._check_step(tokens, positions, mask, positions)

    # ---- traced bodies ------------------------------------------------------------------

    def _hidden(
        self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, slots: torch.Tensor | None = None
    ) -> torch.Tensor:
        # tokens, positions, slots: [B, T] -> final hidden state after the norm: [B, T, D]
        h = self.stack.embed(tokens, positions)
        slots = positions if slots is None else slots
        h = self.stack.run(h, 0, self.stack.num_layers, mask, positions, self.cache, slots)
        return self.stack.norm(h)

    def _prefill_propose_impl(self, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # ids: [B, L]; lengths: [B]
        batch, width = ids.shape
        positions = torch.arange(width, device=ids.device)[None, :].expand(batch, width)  # [B, L]
        mask = chain_mask(positions, self.cache.max_len, self.cache.dtype)  # [B, 1, L, S]
        h = self._hidden(ids, positions, mask)  # [B, L, D]
        last = h.gather(1, (lengths - 1)[:, None, None].expand(batch, 1, h.shape[-1]))[:, 0]  # [B, D]
        self.cache.lengths.copy_(lengths)
        return self.stack.lm_head(last), self.heads(last, self.stack.lm_head)  # [B, V], [B, k, V]

    def _verify_greedy_impl(
        self, tokens: torch.Tensor, live: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # tokens: [B, k+1] = [pending, c_1 .. c_k]; live: [B]
        positions = self.cache.lengths[:, None] + torch.arange(tokens.shape[1], device=tokens.device)  # [B, k+1]
        mask = chain_mask(positions, self.cache.max_len, self.cache.dtype)  # [B, 1, k+1, S]
        h = self._hidden(tokens, positions, mask)  # [B, k+1, D]
        target = self.stack.lm_head(h).argmax(dim=-1)  # [B, k+1]
        matches = (tokens[:, 1:] == target[:, :-1]).long()  # [B, k]: c_i is the target's choice
        accepted = matches.cumprod(dim=1).sum(dim=1)  # [B]
        self.cache.lengths.add_(torch.where(live, accepted + 1, 0))  # pending + accepted, in place
        last = h.gather(1, accepted[:, None, None].expand(-1, 1, h.shape[-1]))[:, 0]  # [B, D]
        head_logits = self.heads(last, self.stack.lm_head)  # [B, k, V]
        bonus = target.gather(1, accepted[:, None])  # [B, 1]
        return target, accepted, head_logits, torch.cat([bonus, head_logits.argmax(dim=-1)], dim=1)

    def _verify_tree_impl(
        self, tokens: torch.Tensor, live: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # tokens: [B, T] root + tree nodes; live: [B]
        logits, h = self._score_tree_impl(tokens)  # [B, T, V], [B, T, D]
        verdict = verify_greedy(self.tree, tokens, logits)
        head_logits, next_tree = self._keep_path_impl(h, verdict.accepted, verdict.path, verdict.next_token, live)
        return verdict.tokens, verdict.accepted, head_logits, next_tree

    def _score_tree_impl(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # tokens: [B, T] root + tree nodes, at positions lengths + depth, slots lengths + node
        tree, lengths = self.tree, self.cache.lengths
        positions, slots = tree_positions(tree, lengths)  # [B, T] each
        mask = step_mask(lengths, slots, tree.visible(tokens.device), self.cache.max_len, self.cache.dtype)
        h = self._hidden(tokens, positions, mask, slots)  # [B, T, D]
        return self.stack.lm_head(h), h

    def _keep_path_impl(
        self, h: torch.Tensor, accepted: torch.Tensor, path: torch.Tensor, next_token: torch.Tensor, live: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # h: [B, T, D]; accepted, next_token, live: [B]; path: [B, D+1]
        lengths = self.cache.lengths
        counts = torch.where(live, accepted + 1, 0)  # [B]: root + accepted path
        self.cache.apply_commit(counts, lengths[:, None] + path)  # gather the path, advance
        last = path.gather(1, accepted[:, None])  # [B, 1] the path's last node
        head_logits = self.heads(h.gather(1, last[:, :, None].expand(-1, 1, h.shape[-1]))[:, 0], self.stack.lm_head)
        return head_logits, self.tree_tokens(next_token, head_logits)  # [B, k, V], [B, T]

    def _verify_all_impl(
        self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self._hidden(tokens, positions, mask)  # [B, k+1, D]
        return self.stack.lm_head(h), self.heads(h, self.stack.lm_head)  # [B, k+1, V], [B, k+1, k, V]


__all__ = ["DraftHeadsEngine"]
