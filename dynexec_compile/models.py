"""The project's trained demo causal LMs and the held-out prompts to run them on.

Why: speed-ups of lookahead and speculative decoding only mean something on trained weights,
and no machine here reaches a model hub. ``examples/train_code_lm.py`` trains a LLaMA target
(grouped-query attention) and a small LLaMA draft sharing one BPE tokenizer on CPython's
standard library and commits them under ``models/code-lm/``. This module finds them, loads
them, and draws prompts from the standard-library files that were held out of training, so
benchmarks never prompt with text the models memorised.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

__all__ = ["demo_draft_heads_path", "demo_lm_path", "heldout_files", "heldout_prompts", "load_demo_lm"]

DEMO_MODELS = ("target", "draft")
REGENERATE_COMMAND = "python examples/train_code_lm.py --out models/code-lm"
DRAFT_HEADS_COMMAND = "python examples/train_draft_heads.py"
_CODE_STARTS = ("def ", "class ", "async def ")


def _demo_root() -> Path:
    """``models/code-lm`` of the repository this package lives in."""
    return Path(__file__).resolve().parent.parent / "models" / "code-lm"


def demo_lm_path(which: str = "target") -> Path:
    """Folder of a committed demo model (``"target"`` or ``"draft"``), loadable with
    ``AutoModelForCausalLM.from_pretrained``.

    Raises:
        ValueError: ``which`` is not ``"target"`` or ``"draft"``.
        FileNotFoundError: the folder is missing (e.g. an installed package without the repo's
            ``models/``); the message gives the command that regenerates it.
    """
    if which not in DEMO_MODELS:
        raise ValueError(f"which must be one of {DEMO_MODELS}, got {which!r}")
    path = _demo_root() / which
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"demo model {which!r} not found at {path}. The demo models live in the dynexec "
            f"repository's models/code-lm/; regenerate them from the repository root with "
            f"`{REGENERATE_COMMAND}` (about an hour on 2 CPU cores)."
        )
    return path


def demo_draft_heads_path() -> Path:
    """The committed draft heads of the demo target (``strategy="draft_heads"``), a safetensors
    file for :func:`dynexec_compile.load_draft_heads`.

    Raises:
        FileNotFoundError: the file is missing; the message gives the command that trains it.
    """
    path = _demo_root() / "draft-heads" / "heads.safetensors"
    if not path.is_file():
        raise FileNotFoundError(
            f"draft heads of the demo target not found at {path}; train them from the repository root with "
            f"`{DRAFT_HEADS_COMMAND}` (a few minutes on one CPU thread)"
        )
    return path


def load_demo_lm(which: str = "target", dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` for a demo model, in eval mode and cast to ``dtype``.

    The weights are stored in bf16; the default fp32 is what exactness tests need.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    path = demo_lm_path(which)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(path)


def heldout_files() -> list[Path]:
    """Absolute paths of this Python's stdlib files that were held out of training (those of
    ``models/code-lm/heldout_files.txt`` that exist here), in the listed order."""
    listing = _demo_root() / "heldout_files.txt"
    if not listing.is_file():
        raise FileNotFoundError(f"{listing} is missing; regenerate it with `{REGENERATE_COMMAND}`")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    paths = [stdlib / rel for rel in listing.read_text().split()]
    return [p for p in paths if p.is_file()]


def _code_start(text: str) -> int | None:
    """Offset of the first top-level ``def``/``class`` line, or None when there is none."""
    offset = 0
    for line in text.splitlines(keepends=True):
        if line.startswith(_CODE_STARTS):
            return offset
        offset += len(line)
    return None


def heldout_prompts(n: int, tokens: int, tokenizer, from_code: bool = True) -> torch.Tensor:
    """``n`` deterministic prompts of exactly ``tokens`` tokens from held-out stdlib files.

    One prompt per file, files in the order of ``heldout_files.txt``, skipping files too short.
    With ``from_code`` a prompt starts at the file's first top-level ``def``/``class`` (so a
    continuation writes code, not licence text; files without one are skipped); otherwise at
    the file's beginning.

    Returns:
        ids: [n, tokens] int64

    Raises:
        ValueError: ``n`` or ``tokens`` is not positive, or fewer than ``n`` held-out files are
            long enough (the message says how many are).
    """
    if n <= 0 or tokens <= 0:
        raise ValueError(f"n and tokens must be positive, got n={n}, tokens={tokens}")
    prompts = []
    for path in heldout_files():
        text = path.read_text(encoding="utf-8")
        if from_code:
            start = _code_start(text)
            if start is None:
                continue
            text = text[start:]
        ids = tokenizer(text[: 16 * tokens], add_special_tokens=False)["input_ids"]
        if len(ids) >= tokens:
            prompts.append(ids[:tokens])
        if len(prompts) == n:
            return torch.tensor(prompts, dtype=torch.long)
    raise ValueError(
        f"only {len(prompts)} held-out files have {tokens} tokens"
        f"{' after their first def/class' if from_code else ''}; ask for fewer or shorter prompts"
    )
