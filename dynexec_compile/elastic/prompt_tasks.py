"""Long prompts (several paragraphs) for prompt elastification, built offline.

Three kinds, interleaved, each a *context* (what may be compressed) and an *instruction*
(the task or question, always kept whole):

- ``summary``: a dozen numbered movie reviews (SST-2 sentences), "summarise what they say";
- ``review_question``: the same kind of context, a question about one numbered review;
- ``doc_question``: the documentation of several Python standard-library functions (their
  docstrings, one paragraph each), a question about one of them.

``split="bench"`` draws from SST-2's validation split and the demo LMs' held-out stdlib files,
``"train"`` from SST-2's train split and the other stdlib files, so the prompts a scorer is
trained on never reappear in a benchmark.
"""

from __future__ import annotations

import ast
import random
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

KINDS = ("summary", "review_question", "doc_question")
SPLITS = ("bench", "train")


@dataclass(frozen=True)
class LongPrompt:
    """A prompt whose ``context`` may be compressed and whose ``instruction`` may not.

    Attributes:
        kind: one of :data:`KINDS` (or any label for your own prompts).
        context: the long part (paragraphs separated by blank lines or newlines).
        instruction: the task or question, placed after the context.
    """

    kind: str
    context: str
    instruction: str

    def text(self, context: str | None = None) -> str:
        """The user message: the (given or own) context, a blank line, the instruction."""
        return f"{self.context if context is None else context}\n\n{self.instruction}"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


@lru_cache(maxsize=2)
def _reviews(split: str) -> tuple[str, ...]:
    from dynexec_compile.data import load_sst2

    rows = load_sst2("validation" if split == "bench" else "train")
    shortest = 8 if split == "bench" else 15  # the train split holds sub-phrases; keep sentences
    seen, out = set(), []
    for text, _ in rows:
        if len(text.split()) >= shortest and text not in seen:
            seen.add(text)
            out.append(text)
    return tuple(out)


@lru_cache(maxsize=2)
def _docstrings(split: str) -> tuple[tuple[str, str], ...]:
    """``(signature, first paragraph of the docstring)`` of documented public functions and
    methods (``module.name(args)`` / ``module.Class.name(args)``)."""
    from dynexec_compile.models import heldout_files

    held = heldout_files()
    if split == "bench":
        files = held
    else:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(set(stdlib.glob("*.py")) - set(held))
    out = []
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        scopes = [(path.stem, node) for node in tree.body]
        while scopes:
            scope, node = scopes.pop(0)
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                scopes += [(f"{scope}.{node.name}", child) for child in node.body]
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            paragraph = " ".join((doc or "").split("\n\n")[0].split())
            if 12 <= len(paragraph.split()) <= 90:
                args = ", ".join(a.arg for a in node.args.args if a.arg not in ("self", "cls"))
                out.append((f"{scope}.{node.name}({args})", paragraph))
    return tuple(out)


def _review_context(rng: random.Random, reviews: tuple[str, ...], count: int) -> list[str]:
    return [f"Review {i + 1}: {text}" for i, text in enumerate(rng.sample(reviews, count))]


def long_prompts(n: int, split: str = "bench", reviews_per_prompt: int = 12, functions_per_prompt: int = 7,
                 seed: int = 0) -> list[LongPrompt]:
    """``n`` deterministic long prompts, the kinds of :data:`KINDS` in turn.

    Args:
        n: how many.
        split: ``"bench"`` (SST-2 validation, held-out stdlib files) or ``"train"``.
        reviews_per_prompt: reviews in a review context (about 20 words each on ``bench``).
        functions_per_prompt: documented functions in a documentation context.
        seed: draws which reviews and functions go together.

    Raises:
        ValueError: an unknown split, or ``n < 1``.
    """
    _check_split(split)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(f"{split}-{seed}")
    reviews, docs = _reviews(split), _docstrings(split)
    prompts = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        if kind == "summary":
            context = _review_context(rng, reviews, reviews_per_prompt)
            instruction = "Summarise in two sentences what these reviews say about the films."
        elif kind == "review_question":
            context = _review_context(rng, reviews, reviews_per_prompt)
            asked = rng.randrange(reviews_per_prompt) + 1
            instruction = f"What does review {asked} say about the film, and is it positive or negative?"
        else:
            chosen = rng.sample(docs, functions_per_prompt)
            context = ["Documentation of some Python standard library functions:"]
            context += [f"{signature}: {doc}" for signature, doc in chosen]
            name = rng.choice(chosen)[0].split("(")[0]  # asked by its full dotted name
            instruction = f"In one or two sentences, what does the function {name} do?"
        prompts.append(LongPrompt(kind, "\n".join(context), instruction))
    return prompts


__all__ = ["KINDS", "LongPrompt", "long_prompts"]
