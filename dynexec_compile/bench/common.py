"""What every benchmark suite shares: timing, metrics, tables, JSON, the regression gate.

Timing follows gpt-fast's rules: warm-up first, compile time reported apart from run time,
medians over repeats, and every dynexec figure next to its baseline from the same process as
a ratio (these machines are shared and noisy; absolute times are not comparable across runs).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

GATES = ("exact", "tolerance", "timing")


@dataclass
class Metric:
    """One number a suite reports.

    gate: ``"exact"`` deterministic counters and equality (layers per sample, tokens per
    forward, compiles, token equality), compared exactly; ``"tolerance"`` deterministic up to
    float noise (accuracy), compared within ``tol``; ``"timing"`` wall-clock ratios, compared
    with the ``--max-regression`` tolerance. better: ``"higher"``, ``"lower"`` or ``"equal"``.
    """

    value: float
    gate: str
    better: str = "equal"
    tol: float = 0.0
    unit: str = ""


@dataclass
class SuiteResult:
    suite: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Metric] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    env: dict[str, Any] = field(default_factory=dict)

    def metric(self, name: str, value: float, gate: str, better: str = "equal", tol: float = 0.0, unit: str = "") -> None:
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}")
        self.metrics[name] = Metric(float(value), gate, better, tol, unit)

    def to_json(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "env": self.env,
            "rows": self.rows,
            "metrics": {k: asdict(v) for k, v in self.metrics.items()},
            "notes": self.notes,
        }


def environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], Any], repeats: int = 20, warmup: int = 3) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(
    fns: dict[str, Callable[[], Any]], repeats: int = 20, warmup: int = 3, progress: str | None = None
) -> dict[str, float]:
    """Median wall-clock seconds of each ``fns[name]()``, timed in round-robin rounds.

    On a shared machine the load drifts over seconds; timing variant A's repeats and then
    B's charges that drift to one of them. Interleaving puts every variant under the same
    load, so their ratio is what a user would see. ``progress``: a tqdm bar over the rounds
    with this description.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in tqdm(range(repeats), desc=progress, leave=False, disable=progress is None):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    cols = list(rows[0].keys())
    for r in rows[1:]:
        cols += [c for c in r if c not in cols]

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_result(result: SuiteResult, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_json(), indent=2))
    return path


def compare(current: dict[str, Any], baseline: dict[str, Any], max_regression: float) -> list[str]:
    """Regressions of ``current`` against ``baseline`` (both suite JSON dicts); empty if none.

    A metric in the baseline but missing now is a regression (a check that silently stopped
    running is how gates rot).
    """
    problems = []
    cur = current.get("metrics", {})
    for name, base in baseline.get("metrics", {}).items():
        if name not in cur:
            problems.append(f"{name}: in the baseline but not measured now")
            continue
        b, c = base["value"], cur[name]["value"]
        gate, better = base["gate"], base.get("better", "equal")
        if gate == "exact":
            bad = c != b if better == "equal" else (c < b if better == "higher" else c > b)
            if bad:
                problems.append(f"{name}: {c:g} vs baseline {b:g} (deterministic; must not get {'worse' if better != 'equal' else 'different'})")
        else:
            tol = base.get("tol", 0.0) if gate == "tolerance" else max_regression
            scale = abs(b) if gate == "timing" else 1.0
            if better == "higher" and c < b - tol * scale:
                problems.append(f"{name}: {c:.4g} vs baseline {b:.4g} (lower by more than {tol:g}{' relative' if gate == 'timing' else ''})")
            elif better == "lower" and c > b + tol * scale:
                problems.append(f"{name}: {c:.4g} vs baseline {b:.4g} (higher by more than {tol:g}{' relative' if gate == 'timing' else ''})")
            elif better == "equal" and abs(c - b) > tol * scale:
                problems.append(f"{name}: {c:.4g} vs baseline {b:.4g} (differs by more than {tol:g})")
    return problems


def parse_percent(text: str) -> float:
    """``"10%"`` or ``"0.1"`` -> 0.1."""
    text = text.strip()
    value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    if not 0 <= value < 10:
        raise ValueError(f"--max-regression {text!r} is not a sensible tolerance")
    return value


# ---- the user's own model ---------------------------------------------------------------


@dataclass
class LMSetup:
    """A causal LM to benchmark and its prompts (the demo target unless ``--model`` names one)."""

    model: Any  # transformers PreTrainedModel, fp32, eval mode
    tokenizer: Any
    prompts: torch.Tensor | list[torch.Tensor]  # [N, L] windows, or chat prompts of their own lengths
    label: str
    is_demo: bool
    eos_token_id: list[int] = field(default_factory=list)  # [] = generate max_new_tokens (code windows)
    pad_token_id: int = 0

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)


def add_model_arguments(parser: Any) -> None:
    """``--model``, ``--draft-model``, ``--draft-heads``, ``--prompt-file``: benchmark your own
    checkpoint (suites that decode: lookahead, speculative)."""
    group = parser.add_argument_group("your own model (lookahead, speculative)")
    group.add_argument(
        "--model", default=None,
        help="local folder of a transformers causal LM, or a name load_lm knows (smollm2-135m-instruct); "
        "default: the demo target",
    )
    group.add_argument(
        "--prompt-set", default=None, choices=["code", "chat"],
        help="chat: instruction prompts (rewrite a review, annotate a function, free-form questions) in the "
        "model's chat template, each at its own length, stopping at EOS; code: windows of held-out stdlib "
        "files, EOS off; default: chat when the model has a chat template and no --prompt-file is given",
    )
    group.add_argument(
        "--draft-model", default=None,
        help="local folder of a draft LM with the same tokenizer (speculative; default: the demo draft with the demo target)",
    )
    group.add_argument(
        "--draft-heads", default=None,
        help="draft heads saved by dynexec_compile.save_draft_heads (speculative; default: the demo heads with the demo target)",
    )
    group.add_argument(
        "--exit-adapter", default=None,
        help="exit adapter saved by save_draft_heads from train_exit_lm_head(head='adapter'), trained for the "
        "bench's self-speculation layer E = layers // 2 (speculative: adds self-speculative rows with it)",
    )
    group.add_argument(
        "--eagle", default=None,
        help="an EAGLE draft saved by dynexec_compile.save_eagle_draft (speculative: adds strategy='eagle' rows, one per --ks)",
    )
    group.add_argument(
        "--prompt-file", default=None,
        help="UTF-8 text file; prompts are consecutive windows of its tokens (default: held-out stdlib files)",
    )
    group.add_argument(
        "--compile-mode", default=None, choices=tuple(COMPILE_MODES),
        help="compile dynexec's steps with this torch.compile mode: max-autotune (on CPU: Inductor's C++ GEMM "
        "template autotuned against MKL; faster steps, minutes of compilation per engine); "
        "max-autotune-whole-step (the same with regional=False: one frozen graph per step, so the GEMM "
        "template applies to every layer; minutes more); default: Inductor's default",
    )


    group.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16"],  # None: float32 (a default would trip the suites that take no model options)
        help="precision of the model (and its draft) for every row, HF baselines included; default float32",
    )
    group.add_argument(
        "--quantize", default=None, choices=["int8-weight-only"],
        help="quantize the model's (and draft's) linear weights with torchao before benchmarking "
        "(Int8WeightOnlyConfig: int8 weights, activations in --dtype); every row runs the quantized model",
    )


# --compile-mode -> dynexec generate's compile settings
COMPILE_MODES = {
    "max-autotune": {"mode": "max-autotune"},
    "max-autotune-whole-step": {"mode": "max-autotune", "regional": False},
}


def compile_settings(compile_mode: str | None) -> dict[str, Any]:
    """The ``dx.generate`` keyword arguments of a ``--compile-mode`` (none for the default)."""
    return dict(COMPILE_MODES[compile_mode]) if compile_mode else {}


MODEL_ARGUMENTS = ("model", "draft_model", "draft_heads", "exit_adapter", "eagle", "prompt_file", "compile_mode", "prompt_set", "dtype", "quantize")


def prepare_precision(model: Any, args: Any) -> Any:
    """``model`` cast to ``--dtype`` and, with ``--quantize``, its linear weights quantized by
    torchao — in place; returns the model. Raises with the install hint when torchao is missing."""
    dtype = getattr(torch, getattr(args, "dtype", None) or "float32")
    model.to(dtype)
    if getattr(args, "quantize", None) == "int8-weight-only":
        try:
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
        except ImportError as err:
            raise ImportError(f'--quantize int8-weight-only needs torchao: pip install -e ".[quantize]" -c constraints.txt ({err})') from None
        quantize_(model, Int8WeightOnlyConfig())
    return model


def precision_label(args: Any) -> str:
    """``"fp32"``, ``"bf16"``, ``"fp32 + int8 weights"``, ... for tables."""
    name = {"float32": "fp32", "bfloat16": "bf16"}[getattr(args, "dtype", None) or "float32"]
    return f"{name} + int8 weights (torchao)" if getattr(args, "quantize", None) else name


def load_causal_lm(path: str | Path, what: str = "--model") -> tuple[Any, Any]:
    """``(model fp32 in eval mode, tokenizer)`` from a local folder or a name ``load_lm`` knows
    (converted on first use), with errors that say what to do."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dynexec_compile.models import KNOWN_LMS, lm_folder

    folder = lm_folder(path) if str(path) in KNOWN_LMS else Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{what} {path}: no config.json there; pass the folder a transformers model was saved to "
            "(model.save_pretrained(folder); tokenizer.save_pretrained(folder))"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    except ValueError as err:
        raise ValueError(f"{what} {path} is not a causal LM transformers can load: {err}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise ValueError(f"{what} {path}: no tokenizer saved with the model ({err}); save it with tokenizer.save_pretrained") from None
    return model, tokenizer


def file_prompts(path: str | Path, n: int, tokens: int, tokenizer: Any) -> torch.Tensor:
    """``n`` prompts of ``tokens`` tokens: consecutive, non-overlapping windows of a text file."""
    text = Path(path).read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n * tokens:
        raise ValueError(
            f"--prompt-file {path} has {len(ids)} tokens; {n} prompts of {tokens} tokens need {n * tokens}: "
            "give a longer file or ask for fewer or shorter prompts"
        )
    return torch.tensor(ids[: n * tokens], dtype=torch.long).reshape(n, tokens)


def lm_setup(args: Any, n: int, tokens: int) -> LMSetup:
    """The model and prompts a decoding suite runs on: ``--model``/``--prompt-file`` or the demo's."""
    from dynexec_compile.models import chat_prompts, heldout_prompts, load_demo_lm

    if getattr(args, "model", None):
        model, tokenizer = load_causal_lm(args.model)
        label, is_demo = f"model {args.model}", False
    else:
        model, tokenizer = load_demo_lm("target")
        label, is_demo = "demo code LM (models/code-lm/target)", True
    prepare_precision(model, args)
    label = f"{label}, {precision_label(args)}"
    prompt_set = getattr(args, "prompt_set", None)
    if prompt_set is None:
        prompt_set = "chat" if getattr(tokenizer, "chat_template", None) and not getattr(args, "prompt_file", None) else "code"
    if prompt_set == "chat":
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
        source = "chat prompts (rewrite / annotate / free-form; SST-2 validation, held-out stdlib), stop at EOS"
        return LMSetup(model, tokenizer, chat_prompts(tokenizer, n), f"{label}, {source}", is_demo, eos, pad)
    if getattr(args, "prompt_file", None):
        prompts, source = file_prompts(args.prompt_file, n, tokens, tokenizer), f"prompts from {args.prompt_file}"
    else:
        prompts, source = heldout_prompts(n, tokens, tokenizer), "held-out stdlib prompts"
    return LMSetup(model, tokenizer, prompts, f"{label}, {source}", is_demo)


def left_padded(prompts: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, L] ids, [B, L] mask)`` of prompts of their own lengths, padded on the left (as
    ``model.generate`` wants)."""
    width = max(p.numel() for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - p.numel() :], mask[i, width - p.numel() :] = p, 1
    return ids, mask


def generated_tokens(sequences: torch.Tensor, prompt_width: int, eos: list[int]) -> int:
    """New tokens in ``sequences`` ``[B, L + n]``: per row up to and including its first EOS
    (all ``n`` without EOS ids)."""
    new = sequences[:, prompt_width:]  # [B, n]
    if not eos or new.shape[1] == 0:
        return new.numel()
    is_eos = torch.isin(new, torch.tensor(eos))
    first = torch.where(is_eos.any(dim=1), is_eos.long().argmax(dim=1) + 1, new.shape[1])
    return int(first.sum())
