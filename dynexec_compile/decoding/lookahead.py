"""Lookahead decoding (Fu et al., 2024): Jacobi window, n-gram pool and verification in one forward.

Why: plain decoding runs the whole model for one token; a step that also carries guesses
of later tokens costs little more on hardware that is idle between weight loads, and every
guess the model confirms is a step saved. Lookahead decoding needs no draft model: the
guesses come from the model's own Jacobi iterations and, optionally, from the prompt.

One step is ONE forward of ``T = 1 + (N-1)*W + G*(N-1)`` tokens per row (fixed for a
configuration, so it compiles once) under a custom mask, laid out as

- the *current* token (the last one generated, not yet in the cache), position ``p``;
- the *lookahead window*: ``N-1`` levels of ``W`` tokens, the last ``N-1`` Jacobi iterates.
  Level ``l``, column ``j`` sits at position ``p+1+l+j`` and sees the current token, level 0
  at columns ``<= j`` and its own column at levels ``1..l`` — its Jacobi ancestors, a causal
  chain of consecutive positions (the layout of the paper and of llama.cpp's lookahead example);
- the *verification branch*: up to ``G`` candidate ``(N-1)``-grams; candidate token ``k``
  sits at position ``p+1+k`` and sees the current token and its own earlier tokens only.
  With ``prompt_lookup`` the first candidates continue earlier occurrences of the last two
  tokens in the prompt + generated text; the rest come from the n-gram pool under the
  current token (the window's n-grams and, with ``prompt_lookup``, the text's). Unused
  candidate slots are padding.

After the forward: the current token's prediction and the candidates' predictions give the
greedy tokens; the longest candidate prefix that matches them is accepted (plus the one
token the model predicts after it), which is exactly what greedy decoding would have
produced. Only the accepted tokens' keys/values are kept: ``DecodeEngine.commit`` gathers
them from their scratch slots into place (nothing recomputed). The window then advances by
one Jacobi iteration (drop the oldest level, append the predictions of the newest), and the
``W`` n-grams along its columns (level 0 .. N-2, then the prediction) enter the pool.

The window starts as tokens drawn from the prompt; its first ``N-2`` steps fill the levels
(level ``l+1`` = predictions of level ``l``) before n-grams are collected.

``W = 0`` drops the window: every guess comes from the text (prompt-lookup decoding, as
transformers' ``prompt_lookup_num_tokens``, but verified in a fixed-width step with the
cache surgery above), so the whole step goes to ``G`` continuations of ``N-1`` tokens. With
``copy_ngram = C`` a step whose last :data:`COPY_MATCH` tokens occurred earlier in the text (an
answer copying a passage) guesses ``C-1`` tokens from that passage instead, in a second, wider
step layout: a long guess only where a long run is likely, a short step elsewhere.

Defaults ``(W, N, G) = (1, 3, 1)``, a 5-token step: on this project's CPU the step is bound
by arithmetic already at one token (the demo LM's weights sit in L3), so every extra token
costs: with ``mode="max-autotune"`` a 5-token step costs 1.0-1.4 one-token steps and a
16-token step ~3, and (1, 3, 1) was the fastest setting of the sweep (``dynexec bench
lookahead``, ``benchmarks/RESULTS.md``); with Inductor's default GEMMs it ties (1, 6, 2). On hardware
with idle compute per weight load (GPUs, large models) wider windows and more guesses pay
off: sweep them there.

Batches work row by row inside the same tensors: rows accept different counts, each row's
cache length moves on its own (the :class:`SlotCache` keeps per-row lengths).

Sampling (``do_sample=True``) is lossless: the candidates are deterministic guesses, so they
are merged into a trie and verified by multi-draft rejection sampling with point-mass
proposals (:mod:`dynexec_compile.decoding.guess_trie`): every emitted token follows the
target's own temperature / top-k / top-p distribution, and the draws come from the
``generator`` (same generator state, same tokens). The step's layout, its one forward and
the cache surgery are those of greedy decoding; the window keeps guessing with the argmax of
its predictions (it only proposes, correctness never depends on it).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from dynexec_compile.decoding.generate import (
    DecodeSettings,
    GenerateOutput,
    GenerateStats,
    decode_loop,
    next_token,
    register_strategy,
    strategy_engine,
)
from dynexec_compile.decoding.guess_trie import merge_guesses, verify_guesses
from dynexec_compile.decoding.runs import TokenRuns
from dynexec_compile.decoding.step import DecodeEngine, pack_prompts
from dynexec_compile.decoding.verify import StepShape, TreeSpec, score_step, verify_step

DEFAULTS = {"window": 1, "ngram": 3, "guesses": 1, "prompt_lookup": True, "copy_ngram": 0, "adaptive": False}
# With copy_ngram: a step copies when the text's last COPY_MATCH tokens occurred earlier in it.
COPY_MATCH = 4
_WINDOW_SEED = 0  # the initial window is drawn from the prompt with this seed (reproducible)


@dataclass(frozen=True)
class LookaheadConfig:
    """Lookahead decoding settings.

    Args:
        window: ``W``, columns of the Jacobi window (>= 0; 0 = no window: every guess comes
            from the text, i.e. prompt-lookup decoding, which needs ``prompt_lookup`` and
            ``guesses >= 1``).
        ngram: ``N``, n-gram length (>= 2): the window has ``N-1`` levels and candidates are
            ``N-1`` tokens, so one step accepts at most ``N`` tokens.
        guesses: ``G``, the most candidate n-grams verified per step (>= 0).
        prompt_lookup: also fill the n-gram pool from the prompt and the generated text
            (prompt-lookup decoding), besides the Jacobi window.
        copy_ngram: with ``window=0``, the n-gram length of the steps that copy: when the
            text's last :data:`COPY_MATCH` tokens occurred earlier in it (the answer is
            copying a passage of the prompt or of itself), the step guesses ``copy_ngram - 1``
            tokens from that passage instead of ``ngram - 1``, in a wider step compiled once
            too. 0 (default): every step guesses ``ngram - 1``.
        adaptive: with ``window=0``, choose each step between this step and a plain one-token
            step by expected tokens per second: the step times measured on this engine and each
            layout's observed acceptance on rows that had a guess
            (:mod:`~dynexec_compile.decoding.adaptive`). Exact either way; only the speed changes,
            but the steps depend on timings: sampled tokens are not repeatable for a seed (their
            distribution is the model's) and counters vary from run to run. Off by default.
    """

    window: int = DEFAULTS["window"]
    ngram: int = DEFAULTS["ngram"]
    guesses: int = DEFAULTS["guesses"]
    prompt_lookup: bool = DEFAULTS["prompt_lookup"]
    copy_ngram: int = DEFAULTS["copy_ngram"]
    adaptive: bool = DEFAULTS["adaptive"]

    def __post_init__(self) -> None:
        for name, low in (("window", 0), ("ngram", 2), ("guesses", 0), ("copy_ngram", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"lookahead: {name} must be an int >= {low}, got {value!r}")
        for name in ("prompt_lookup", "adaptive"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"lookahead: {name} must be True or False, got {getattr(self, name)!r}")
        if self.window == 0 and not (self.prompt_lookup and self.guesses):
            raise ValueError(
                "lookahead: window=0 guesses only from the text (prompt lookup): it needs prompt_lookup=True "
                f"and guesses >= 1, got prompt_lookup={self.prompt_lookup}, guesses={self.guesses}"
            )
        if self.adaptive and self.window:
            raise ValueError(
                "lookahead: adaptive chooses between prompt-lookup steps and plain one-token steps: it needs window=0 "
                f"(a Jacobi window feeds the n-gram pool only if it advances every step), got window={self.window}"
            )
        if self.copy_ngram and not (self.window == 0 and self.copy_ngram > self.ngram):
            raise ValueError(
                "lookahead: copy_ngram widens the steps of prompt lookup alone: it needs window=0 and "
                f"copy_ngram > ngram, got window={self.window}, ngram={self.ngram}, copy_ngram={self.copy_ngram}"
            )

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> LookaheadConfig:
        """Build from ``generate(**options)``; unknown keys are a ``ValueError`` naming the valid ones."""
        unknown = sorted(set(options) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"lookahead: unknown option(s) {unknown}; valid options are {sorted(DEFAULTS)}")
        return cls(**options)

    @property
    def step_tokens(self) -> int:
        """``T``: tokens per row in one step (the widest, with ``copy_ngram``)."""
        return 1 + (max(self.ngram, self.copy_ngram) - 1) * self.guesses + (self.ngram - 1) * self.window


# ---- the fused step's layout -------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class StepLayout(StepShape):
    """Where each token of the fused step sits, and what it sees: a :class:`StepShape` whose
    tree is the root and the ``G`` candidates (chains of ``N-1``, breadth-first), and whose
    scratch tokens are the Jacobi window.

    Token order: ``[current, window level 0 (W), ..., level N-2 (W), candidate 0 (N-1), ...]``.

    Attributes:
        offsets: ``[T]`` position of each token relative to the current token's.
        visible: ``[T, T]`` bool, ``visible[q, k]``: token ``q`` attends to token ``k``.
        window: ``[N-1, W]`` token index of window level ``l``, column ``j``.
        candidates: ``[G, N-1]`` token index of candidate ``g``'s ``k``-th token.
    """

    window: torch.Tensor
    candidates: torch.Tensor


@functools.lru_cache(maxsize=16)
def step_layout(window: int, ngram: int, guesses: int) -> StepLayout:
    """The (CPU) layout of a lookahead step for ``(W, N, G)``; see the module docstring."""
    levels, span = ngram - 1, ngram - 1
    lev = torch.arange(levels)[:, None].expand(levels, window).reshape(-1)  # [(N-1)W] level of each window token
    col = torch.arange(window)[None, :].expand(levels, window).reshape(-1)  # [(N-1)W] column
    cand = torch.arange(guesses)[:, None].expand(guesses, span).reshape(-1)  # [G(N-1)] candidate
    depth = torch.arange(span)[None, :].expand(guesses, span).reshape(-1)  # [G(N-1)] token within it
    first_window, first_candidate = 1, 1 + levels * window
    width = first_candidate + guesses * span

    sees_first_level = (lev[None, :] == 0) & (col[None, :] <= col[:, None])  # [(N-1)W, (N-1)W]
    sees_own_column = (col[None, :] == col[:, None]) & (lev[None, :] >= 1) & (lev[None, :] <= lev[:, None])
    own_prefix = (cand[None, :] == cand[:, None]) & (depth[None, :] <= depth[:, None])  # [G(N-1), G(N-1)]
    visible = torch.zeros(width, width, dtype=torch.bool)
    visible[:, 0] = True  # everything sees the current token
    visible[first_window:first_candidate, first_window:first_candidate] = sees_first_level | sees_own_column
    visible[first_candidate:, first_candidate:] = own_prefix

    candidates = torch.arange(first_candidate, width).view(guesses, span)
    # the tree, breadth-first: node 1 + k*G + g is candidate g's k-th token, its parent the
    # (k-1)-th; without candidates one filler node (the current token, never valid)
    if guesses:
        parents = (-1, *[0 if k == 0 else 1 + (k - 1) * guesses + g for k in range(span) for g in range(guesses)])
        nodes = torch.cat([torch.zeros(1, dtype=torch.long), candidates.t().reshape(-1)])
    else:
        parents, nodes = (-1, 0), torch.zeros(2, dtype=torch.long)
    return StepLayout(
        name=f"lookahead{(window, ngram, guesses)}",
        tree=TreeSpec(parents),
        offsets=torch.cat([torch.zeros(1, dtype=torch.long), 1 + lev + col, 1 + depth]),  # [T]
        visible=visible,
        nodes=nodes,
        window=torch.arange(first_window, first_candidate).view(levels, window),
        candidates=candidates,
    )


# ---- the n-gram pool -----------------------------------------------------------------


class NgramPool:
    """One row's n-grams, keyed by their first token: up to ``capacity`` continuations of
    ``N-1`` tokens per key, most recently seen first (a seen-again n-gram moves to the front).

    Args:
        ngram: ``N``.
        capacity: continuations kept per key (``G``).
    """

    def __init__(self, ngram: int, capacity: int):
        self.ngram = ngram
        self.capacity = capacity
        self._pool: dict[int, list[tuple[int, ...]]] = {}

    def add(self, key: int, continuation: tuple[int, ...]) -> None:
        if self.capacity == 0:
            return
        known = self._pool.setdefault(key, [])
        if continuation in known:
            known.remove(continuation)
        known.insert(0, continuation)
        del known[self.capacity :]

    def add_text(self, tokens: list[int], start: int = 0) -> None:
        """Add every n-gram of ``tokens`` that begins at index ``start`` or later, in order."""
        n = self.ngram
        for i in range(start, len(tokens) - n + 1):
            self.add(tokens[i], tuple(tokens[i + 1 : i + n]))

    def candidates(self, key: int) -> list[tuple[int, ...]]:
        """Continuations of ``key``, most recent first."""
        return self._pool.get(key, [])

    def __len__(self) -> int:
        return sum(len(v) for v in self._pool.values())


class ContextLookup:
    """Prompt-lookup candidates of one row: what followed earlier occurrences of the row's last
    two tokens in its text (prompt + generated so far), most recent occurrence first.

    Why two tokens: a single token (``(``, ``.``, a space) has many continuations in code and
    prose; the bigram picks the copy that is being continued (as transformers' prompt lookup
    does with ``max_matching_ngram_size=2``). Single-token matches come from the
    :class:`NgramPool` seeded with the same text.

    Args:
        span: candidate length ``N-1``.
        tokens: the prompt.
    """

    def __init__(self, span: int, tokens: list[int]):
        self.span = span
        self.text: list[int] = []
        self._after: dict[tuple[int, int], list[int]] = {}  # bigram -> indices of what followed it
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        text = self.text
        for token in tokens:
            text.append(token)
            if len(text) >= 2:
                self._after.setdefault((text[-2], token), []).append(len(text))

    def _earlier(self) -> list[int]:
        """Where what followed the earlier occurrences of the last bigram starts, most recent first."""
        text = self.text
        if len(text) < 2:
            return []
        return [start for start in reversed(self._after.get((text[-2], text[-1]), [])) if start < len(text)]

    def copying(self, length: int) -> bool:
        """The text's last ``length`` tokens occurred earlier in it."""
        return any(self._matches(start, length) for start in self._earlier())

    def _matches(self, start: int, length: int) -> bool:
        """The ``length`` tokens before ``start`` are the text's last ``length``."""
        text = self.text
        return length <= start < len(text) and text[start - length : start] == text[-length:]

    def candidates(self, limit: int, span: int | None = None, match: int = 2) -> list[tuple[int, ...]]:
        """Up to ``limit`` distinct continuations of ``span`` tokens (default: the lookup's) of the
        text's last bigram, those whose occurrence matches the text's last ``match`` tokens first;
        one that runs into the end of the text is padded with its last token (verification
        rejects what is wrong)."""
        text, found, span = self.text, [], span or self.span
        if limit == 0:
            return found
        starts = self._earlier()
        if match > 2:
            starts.sort(key=lambda start: not self._matches(start, match))  # stable: recency kept
        for start in starts:
            continuation = text[start : start + span]
            continuation += continuation[-1:] * (span - len(continuation))
            candidate = tuple(continuation)
            if candidate not in found:
                found.append(candidate)
                if len(found) == limit:
                    break
        return found


# ---- the strategy --------------------------------------------------------------------


def _lookahead(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    settings: DecodeSettings,
    **options: Any,
) -> GenerateOutput:
    config = LookaheadConfig.from_options(options)
    settings = _wide_step_settings(model, settings)
    engine = strategy_engine(model, input_ids, attention_mask, settings, "lookahead", reserve=config.step_tokens)
    return lookahead_decode(engine, input_ids, attention_mask, settings, config)


def _wide_step_settings(model: PreTrainedModel, settings: DecodeSettings) -> DecodeSettings:
    """Inductor on CPU without the user's own compile settings: MKL-prepacked weights.

    The engine's CPU default (plain GEMV on pre-transposed weights) is tuned for one-token
    steps; a lookahead step multiplies ``T`` rows at once, a small GEMM that runs faster on
    prepacked weights (T=16 on the demo LM: 14.0 -> 11.3 ms per step, same logits).
    """
    on_cpu = next(model.parameters()).device.type == "cpu"
    if on_cpu and settings.compile and settings.backend == "inductor" and settings.mode is None and not settings.options:
        return dataclasses.replace(settings, options={"cpp.weight_prepack": True})
    return settings


def lookahead_decode(
    engine: DecodeEngine,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    settings: DecodeSettings,
    config: LookaheadConfig,
) -> GenerateOutput:
    """Lookahead decoding on ``engine`` (its cache must hold prompt + new tokens + ``T``):
    greedy, or lossless sampling when ``settings.sampling`` is set.

    Returns what :func:`dynexec_compile.generate` returns; ``stats.extra`` holds the
    configuration, ``step_tokens`` (``T``) and ``guesses_per_step`` (candidates verified per
    step and row).
    """
    device = engine.device
    packed, lengths = pack_prompts(input_ids.to(device), attention_mask)
    if int(lengths.max()) + settings.max_new_tokens + config.step_tokens > engine.max_len:
        raise ValueError(
            f"lookahead: the engine's cache ({engine.max_len} slots) cannot hold prompt + max_new_tokens + "
            f"{config.step_tokens} step tokens; build it with cache_length(..., reserve={config.step_tokens})"
        )
    return decode_loop(_LookaheadState(engine, config, settings, packed, lengths), input_ids, attention_mask, settings)


class _LookaheadState:
    """Lookahead's proposer: current tokens, Jacobi window and n-gram pools between steps."""

    name = "lookahead"

    def __init__(
        self,
        engine: DecodeEngine,
        config: LookaheadConfig,
        settings: DecodeSettings,
        packed: torch.Tensor,
        lengths: torch.Tensor,
    ):
        device = engine.device
        self.engine, self.config = engine, config
        self.settings = settings
        self.layout = layout = step_layout(config.window, config.ngram, config.guesses)
        self.copy_layout = step_layout(0, config.copy_ngram, config.guesses) if config.copy_ngram else None
        self.window_index = layout.window.to(device)  # [N-1, W]
        self.width = max(config.ngram, config.copy_ngram)  # the most tokens one step keeps per row
        self.window = _initial_window(packed, lengths, config)  # [B, N-1, W]
        self.filled = 1  # window levels that hold Jacobi iterates (the rest: prompt tokens)
        prompts = [row[:n] for row, n in zip(packed.tolist(), lengths.tolist(), strict=True)]
        self.pools = [NgramPool(config.ngram, config.guesses) for _ in prompts]
        self.contexts = [ContextLookup(config.ngram - 1, p) for p in prompts] if config.prompt_lookup else []
        for pool, context in zip(self.pools, self.contexts):  # no contexts: prompt lookup off
            pool.add_text(context.text)
        self.token = torch.zeros(packed.shape[0], dtype=torch.long, device=device)  # [B] current token
        self.guesses_per_step: list[list[int]] = []
        self.copy_steps = 0  # steps that took the copy_ngram layout
        self.chooser = engine.chooser if config.adaptive else None
        if self.chooser is not None:
            self.chooser.begin()
        self.plain = StepShape.of_tree(TreeSpec.root_only())

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Prefill the prompts; each row's first token."""
        self.token = next_token(self.engine.prefill(input_ids, attention_mask), self.settings)  # [B]
        self._extend_texts(self.token[:, None], torch.ones_like(self.token))
        return self.token

    def extra(self, stats: GenerateStats) -> dict[str, Any]:
        config = self.config
        return {
            "window": config.window,
            "ngram": config.ngram,
            "guesses": config.guesses,
            "prompt_lookup": config.prompt_lookup,
            "step_tokens": config.step_tokens,
            "copy_ngram": config.copy_ngram,
            "copy_steps": self.copy_steps,
            "guesses_per_step": self.guesses_per_step,
            "adaptive_steps": dict(self.chooser.chosen) if self.chooser is not None else None,
        }

    def step(self, runs: TokenRuns) -> torch.Tensor:
        """One fused forward: verify, keep, commit, advance the window. Returns the tokens kept per row."""
        copying = self.copy_layout is not None and any(context.copying(COPY_MATCH) for context in self.contexts)
        layout = self.copy_layout if copying else self.layout
        span = layout.candidates.shape[1]
        guesses = self._guesses(span, COPY_MATCH if copying else 2)
        if self.chooser is not None:
            return self._chosen_step(layout, span, guesses, runs)
        return self._layout_step(layout, span, guesses, runs)

    def _chosen_step(self, layout: StepLayout, span: int, guesses: list[list[tuple[int, ...]]], runs: TokenRuns) -> torch.Tensor:
        """``adaptive``: the layout's step or a plain one, whichever is expected to keep more
        tokens per second; the step's time and, for rows with a guess, its yield go to the chooser."""
        live, chooser = (~runs.done).float(), self.chooser
        has = torch.tensor([bool(found) for found in guesses], device=live.device) * live  # [B]
        expected = 1 + float((has * chooser.lookup_expectation(layout, span)).sum() / live.sum().clamp(min=1))
        shape = chooser.choose([(layout, expected), (self.plain, 1.0)])
        if shape is not self.plain:
            with chooser.timing(shape, self.token.device):
                kept = self._layout_step(layout, span, guesses, runs)
            chooser.observe(layout, float(((kept - 1).clamp(min=0) * has).sum()), int(has.sum()))
            chooser.kept_on_step(float((kept * live).sum() / live.sum().clamp(min=1)))
            return kept
        with chooser.timing(shape, self.token.device):
            out = verify_step(self.engine, shape, self.token[:, None], runs, self.settings.sampling, self.settings.generator)
        chooser.kept_on_step(1.0)
        self.token = torch.where(out.kept > 0, out.verdict.next_token, self.token)
        self._extend_texts(out.verdict.tokens, out.kept)
        self.guesses_per_step.append([0] * len(guesses))
        return out.kept

    def _layout_step(self, layout: StepLayout, span: int, guesses: list[list[tuple[int, ...]]], runs: TokenRuns) -> torch.Tensor:
        """The step of ``layout`` (window and guesses) for every row; the tokens each row kept."""
        self.copy_steps += layout is self.copy_layout
        candidates, valid = self._candidate_tensors(guesses, span)  # [B, G, span], [B, G]
        tokens = torch.cat([self.token[:, None], self.window.flatten(1), candidates.flatten(1)], dim=1)  # [B, T]
        if self.settings.sampling is None:  # the shared step: one graph, commit and stop rule included
            root = torch.ones(valid.shape[0], 1, dtype=torch.bool, device=valid.device)  # [B, 1]
            guessed = valid.repeat(1, span) if self.config.guesses else ~root  # [B, N_tree - 1]
            node_valid = torch.cat([root, guessed], dim=1)  # the tree's nodes, breadth-first
            verdict, kept, predicted, _ = verify_step(self.engine, layout, tokens, runs, valid=node_valid)
            run = verdict.tokens  # [B, N]
        else:
            predicted, run, kept = self._sampled_step(layout, tokens, guesses, runs)
        last = run.gather(1, (kept - 1).clamp(min=0)[:, None])[:, 0]  # [B]
        self.token = torch.where(kept > 0, last, self.token)

        self._advance_window(predicted)
        self._extend_texts(run, kept)
        self.guesses_per_step.append(valid.sum(dim=1).tolist())
        return kept

    def _sampled_step(
        self, layout: StepLayout, tokens: torch.Tensor, guesses: list[list[tuple[int, ...]]], runs: TokenRuns
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step with lossless sampling: the forward; each row's guesses merged into a trie
        and verified by rejection sampling on the host (:mod:`~dynexec_compile.decoding.guess_trie`);
        the commit of the current token and the accepted guesses, in order. Returns
        ``(predicted [B, T], run [B, A], kept [B])``, the run ending in the sampled token."""
        engine = self.engine
        _, logits, _ = score_step(engine, layout, tokens)  # [B, T, V]
        slots = engine.lengths[:, None] + torch.arange(layout.width, device=engine.device)  # [B, T]
        columns = layout.candidates.tolist()
        tries = [merge_guesses(root, found, columns[: len(found)]) for root, found in zip(self.token.tolist(), guesses, strict=True)]
        width = 1 + layout.candidates.shape[1] if self.config.guesses else 1  # the greedy run's width: one commit graph
        run, accepted, run_slots = verify_guesses(tries, logits, slots, self.settings.sampling, self.settings.generator, width)
        kept = runs.keep(run, accepted + 1)  # [B], 0 for finished rows
        engine.commit(kept, run_slots)
        return logits.argmax(dim=-1), run, kept

    def _guesses(self, span: int, match: int) -> list[list[tuple[int, ...]]]:
        """Up to ``G`` distinct candidates of ``span`` tokens per row: prompt-lookup continuations
        of the last bigram first (with ``prompt_lookup``; those matching the last ``match``
        tokens before the others), then the pool's continuations of the current token (a
        shorter one padded with its last token)."""
        guesses = self.config.guesses
        rows = []
        for b, key in enumerate(self.token.tolist()):
            found = self.contexts[b].candidates(guesses, span, match) if self.contexts else []
            pooled = [c + c[-1:] * (span - len(c)) for c in self.pools[b].candidates(key)]
            found += [c for c in pooled if c not in found][: guesses - len(found)]
            rows.append(found)
        return rows

    def _candidate_tensors(self, guesses: list[list[tuple[int, ...]]], span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, G, span] tokens, [B, G] valid)``: the guesses, padded to ``G`` per row."""
        cfg = self.config
        filler = (0,) * span
        rows = [found + [filler] * (cfg.guesses - len(found)) for found in guesses]
        valid = [[True] * len(found) + [False] * (cfg.guesses - len(found)) for found in guesses]
        device = self.token.device
        candidates = torch.tensor(rows, dtype=torch.long, device=device).view(len(rows), cfg.guesses, span)
        return candidates, torch.tensor(valid, dtype=torch.bool, device=device).view(len(rows), cfg.guesses)

    def _advance_window(self, predicted: torch.Tensor) -> None:
        """One Jacobi iteration: while filling, the next level is the predictions of the last
        filled one; then the oldest level goes, the newest predictions come in, and the
        columns' n-grams (levels 0..N-2 + prediction) enter the pools."""
        levels = self.config.ngram - 1
        if self.filled < levels:
            self.window[:, self.filled] = predicted[:, self.window_index[self.filled - 1]]
            self.filled += 1
            return
        newest = predicted[:, self.window_index[-1]]  # [B, W]
        ngrams = torch.cat([self.window, newest[:, None]], dim=1).transpose(1, 2)  # [B, W, N]
        for pool, row in zip(self.pools, ngrams.tolist(), strict=True):
            for gram in row:
                pool.add(gram[0], tuple(gram[1:]))
        self.window = torch.cat([self.window[:, 1:], newest[:, None]], dim=1)

    def _extend_texts(self, run: torch.Tensor, kept: torch.Tensor) -> None:
        """With prompt lookup: append the kept tokens to each row's text and pool its new n-grams."""
        if not self.contexts:
            return
        for b, (row, n) in enumerate(zip(run.tolist(), kept.tolist(), strict=True)):
            if n == 0:
                continue
            text = self.contexts[b].text
            self.contexts[b].extend(row[:n])
            self.pools[b].add_text(text, start=max(0, len(text) - n - self.config.ngram + 1))


def _initial_window(packed: torch.Tensor, lengths: torch.Tensor, config: LookaheadConfig) -> torch.Tensor:
    """``[B, N-1, W]`` tokens drawn from each row's own prompt (as the reference implementations
    seed it), with a fixed seed so runs are reproducible."""
    batch = packed.shape[0]
    gen = torch.Generator().manual_seed(_WINDOW_SEED)
    draws = torch.rand(batch, (config.ngram - 1) * config.window, generator=gen)  # [B, (N-1)W]
    index = (draws * lengths.cpu()[:, None]).long().to(packed.device)
    return packed.gather(1, index).view(batch, config.ngram - 1, config.window)


register_strategy("lookahead", _lookahead)
