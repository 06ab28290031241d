"""``dynexec bench lookahead``: lookahead decoding against greedy and prompt lookup, side by side.

Why this comparison: lookahead decoding only pays if the tokens it gains per forward outweigh
what the wider step costs, and prompt-lookup decoding is the cheap alternative a user would
try first. So in one process, on the trained demo code LM and held-out standard-library
prompts, every generation is timed interleaved (round-robin, medians) for: transformers'
greedy ``generate``; transformers' prompt lookup (``prompt_lookup_num_tokens``, batch 1 only:
transformers refuses it for larger batches); dynexec greedy (the compiled static-cache step);
dynexec lookahead at several ``(W, N, G)``. Every output is checked token-identical to
transformers' greedy decoding. Reported: tokens/s, tokens per forward (forwards counted, not
inferred), ratios, and compile time apart (first call).

Sampling rows: dynexec lookahead with ``do_sample=True`` (default ``(W, N, G)``) against
dynexec ``strategy="sample"`` at the same temperature, in the same interleaved rounds. Sampled
outputs cannot equal greedy ones (their losslessness is tested statistically in
``tests/decoding/test_lookahead_sampling.py``); every call draws from a generator seeded
alike, so repeats draw the same tokens.

``--quick`` runs a tiny random LLaMA eagerly in seconds: only the deterministic metrics
(identical outputs, tokens per forward, forwards) are recorded, for the CI gate.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from dynexec_compile.bench.common import (
    LMSetup,
    SuiteResult,
    compile_settings,
    generated_tokens,
    interleaved_medians,
    left_padded,
    lm_setup,
)
from dynexec_compile.decoding.lookahead import DEFAULTS, LookaheadConfig

TAKES_USER_MODEL = True  # --model / --prompt-file (see bench.common.add_model_arguments)

Config = tuple[int, ...]  # (window, ngram, guesses), or (window, ngram, guesses, copy_ngram)
DEFAULT_CONFIG: Config = (DEFAULTS["window"], DEFAULTS["ngram"], DEFAULTS["guesses"])
FULL_SWEEP: list[Config] = [(1, 3, 1), (1, 2, 3), (2, 2, 2), (1, 2, 1), (1, 4, 1), (1, 5, 1), (1, 6, 2), (0, 3, 1), (0, 5, 1)]
QUICK_SWEEP: list[Config] = [(2, 3, 2), (2, 4, 3)]
Generation = tuple[torch.Tensor, int]  # (sequences, forward passes)


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    group = parser.add_argument_group("lookahead suite") if isinstance(parser, argparse.ArgumentParser) else parser
    group.add_argument("--lookahead-new-tokens", dest="la_new_tokens", type=int, default=None, help="tokens per row (default 128; quick 32)")
    group.add_argument("--lookahead-prompt-tokens", dest="la_prompt_tokens", type=int, default=None, help="prompt length (default 100; quick 24)")
    group.add_argument("--lookahead-prompts", dest="la_prompts", type=int, default=None, help="held-out prompts (default 4)")
    group.add_argument("--lookahead-batches", dest="la_batches", default=None, help="batch sizes, e.g. 1,4 (default 1,4; quick 1,2)")
    group.add_argument("--lookahead-sweep", dest="la_sweep", default=None, help='(W,N,G) configs as "W,N,G;W,N,G" (a 4th number: copy_ngram), run at every batch size (default: a built-in sweep at batch 1, the default config beyond)')
    group.add_argument("--lookahead-pld-tokens", dest="la_pld_tokens", type=int, default=10, help="transformers' prompt_lookup_num_tokens (default 10)")
    group.add_argument("--lookahead-temperature", dest="la_temperature", type=float, default=0.8, help="temperature of the sampling rows (default 0.8)")


def run(args: argparse.Namespace) -> SuiteResult:
    threads = torch.get_num_threads()
    if args.quick and getattr(args, "threads", None) is None:
        torch.set_num_threads(1)  # the quick metrics are exact: keep fp32 reductions in one order
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> SuiteResult:
    quick = args.quick
    setup = _quick_setup(args) if quick else lm_setup(args, args.la_prompts or 4, args.la_prompt_tokens or 100)
    prompts, label = setup.prompts, setup.label
    max_new = args.la_new_tokens or (32 if quick else 128)
    batches = [int(b) for b in (args.la_batches or ("1,2" if quick else "1,4")).split(",")]
    sweep = _parse_sweep(args.la_sweep) if args.la_sweep else (QUICK_SWEEP if quick else FULL_SWEEP)
    configs = [DEFAULT_CONFIG] + [c for c in sweep if c != DEFAULT_CONFIG]
    repeats = args.repeats or (1 if quick else 3)
    result = SuiteResult("lookahead")
    result.notes.append(
        f"{label}; {_describe(prompts)}, up to {max_new} new tokens, fp32, "
        f"{torch.get_num_threads()} thread(s); dynexec {'eager (compile=False)' if quick else _compiled(args)}; "
        f"time = median of {repeats} interleaved rounds over all prompts; 'first call s' includes compilation; "
        "ratios > 1 mean faster than the baseline"
    )
    if args.la_temperature <= 0:
        raise SystemExit(f"--lookahead-temperature must be > 0, got {args.la_temperature}")
    for batch in batches:
        _run_batch(result, setup, batch, max_new, configs, repeats, args, quick)
    if not quick:
        _plot_sweep(result, Path(args.out or "runs/bench-lookahead.json").with_suffix(".png"), label.split(",")[0])
    return result


# ---- set-ups ---------------------------------------------------------------------------


def _compile_settings(quick: bool, mode: str | None) -> dict[str, Any]:
    """dynexec's ``generate`` compile settings: eager for ``--quick``, else compiled (with ``mode``)."""
    return {"compile": not quick, **(compile_settings(mode) if not quick else {})}


def _compiled(args: argparse.Namespace) -> str:
    mode = getattr(args, "compile_mode", None)
    return f"compiled (Inductor, mode={mode})" if mode else "compiled (Inductor)"


def _describe(prompts: torch.Tensor | list[torch.Tensor]) -> str:
    if isinstance(prompts, torch.Tensor):
        return f"{prompts.shape[0]} prompts of {prompts.shape[1]} tokens"
    return f"{len(prompts)} prompts of {min(p.numel() for p in prompts)}-{max(p.numel() for p in prompts)} tokens"


def _quick_setup(args: argparse.Namespace) -> LMSetup:
    import transformers as T

    torch.manual_seed(0)
    config = T.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512,
    )
    model = T.LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, 128, (args.la_prompts or 4, args.la_prompt_tokens or 24), generator=gen)
    return LMSetup(model, None, prompts, "tiny random LLaMA (GQA), random prompts", False)


def _options(config: Config) -> dict[str, int]:
    """A sweep entry as ``generate(strategy="lookahead")`` options."""
    return dict(zip(("window", "ngram", "guesses", "copy_ngram"), config, strict=False))


def _step_tokens(config: Config) -> int:
    """The widest step of a sweep entry (a copying step with ``copy_ngram``)."""
    return LookaheadConfig(**_options(config)).step_tokens


def _parse_sweep(text: str) -> list[Config]:
    try:
        configs = [tuple(int(x) for x in part.split(",")) for part in text.split(";") if part.strip()]
    except ValueError as err:
        raise SystemExit(f"--lookahead-sweep {text!r}: expected 'W,N,G;W,N,G' with integers ({err})") from None
    if not configs or any(len(c) not in (3, 4) for c in configs):
        raise SystemExit(f"--lookahead-sweep {text!r}: expected 'W,N,G;W,N,G' (or W,N,G,C with copy_ngram C)")
    return configs  # type: ignore[return-value]


def _batches(prompts: torch.Tensor | list[torch.Tensor], batch: int, pad: int = 0) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Groups of ``batch`` prompts; in a group of windows row ``i`` loses its first ``10 * i``
    tokens (left padding, as for ``model.generate``), so the rows have different lengths;
    prompts of their own lengths (chat) are left-padded together."""
    if isinstance(prompts, list):
        if len(prompts) < batch:
            raise SystemExit(f"batch {batch} needs at least {batch} prompts; pass --lookahead-prompts {batch}")
        return [
            (p[0], None if batch == 1 else p[1])
            for p in (left_padded(prompts[i : i + batch], pad) for i in range(0, len(prompts) - batch + 1, batch))
        ]
    if batch == 1:
        return [(prompts[i : i + 1], None) for i in range(prompts.shape[0])]
    if prompts.shape[0] < batch:
        raise SystemExit(f"batch {batch} needs at least {batch} prompts; pass --lookahead-prompts {batch}")
    groups = []
    for start in range(0, prompts.shape[0] - batch + 1, batch):
        ids = prompts[start : start + batch].clone()
        mask = torch.ones_like(ids)
        for i in range(batch):
            cut = min(10 * i, ids.shape[1] - 1)
            ids[i, :cut], mask[i, :cut] = 0, 0
        groups.append((ids, mask))
    return groups


# ---- the variants ------------------------------------------------------------------------


@contextlib.contextmanager
def _counting_forwards(model: torch.nn.Module) -> Iterator[list[int]]:
    """Count top-level forwards of ``model`` (transformers' own generate loops only: a hook
    must not be traced into dynexec's compiled graphs, so it is removed afterwards)."""
    count = [0]
    handle = model.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    try:
        yield count
    finally:
        handle.remove()


def _variants(
    setup: LMSetup, max_new: int, batch: int, configs: list[Config], pld_tokens: int, quick: bool, mode: str | None
) -> dict[str, tuple[Config | None, bool, Callable[[torch.Tensor, torch.Tensor | None], Generation]]]:
    """name -> (lookahead config, prompt lookup, fn(ids, mask) -> (sequences, forwards))."""
    import dynexec_compile as dx

    model = setup.model
    common = {"max_new_tokens": max_new, "eos_token_id": setup.eos_token_id, "pad_token_id": setup.pad_token_id}
    dx_common = {**common, **_compile_settings(quick, mode)}

    def hf(**extra: Any) -> Callable[[torch.Tensor, torch.Tensor | None], Generation]:
        def fn(ids: torch.Tensor, mask: torch.Tensor | None) -> Generation:
            with torch.no_grad(), _counting_forwards(model) as count:
                out = model.generate(ids, attention_mask=mask, do_sample=False, **common, **extra)
            return out, count[0]

        return fn

    def ours(**extra: Any) -> Callable[[torch.Tensor, torch.Tensor | None], Generation]:
        def fn(ids: torch.Tensor, mask: torch.Tensor | None) -> Generation:
            out = dx.generate(model, ids, mask, **dx_common, **extra)
            return out.sequences, out.stats.forward_passes

        return fn

    variants = {"hf_greedy": (None, False, hf()), "dx_greedy": (None, False, ours(strategy="greedy"))}
    if batch == 1:
        variants["hf_prompt_lookup"] = (None, True, hf(prompt_lookup_num_tokens=pld_tokens))
    for i, config in enumerate(configs):
        options = {"strategy": "lookahead", **_options(config)}
        name = "_".join(["dx_lookahead", *map(str, config)])
        variants[name] = (config, True, ours(**options))
        if i == 0:  # the default: also without prompt lookup (the Jacobi window's own n-grams)
            variants[f"{name}_nopl"] = (config, False, ours(**options, prompt_lookup=False))
    return variants


def _sampling_variants(
    model: torch.nn.Module, max_new: int, config: Config, temperature: float, quick: bool, mode: str | None
) -> dict[str, tuple[Config | None, bool, Callable[[torch.Tensor, torch.Tensor | None], Generation]]]:
    """dynexec ``strategy="sample"`` and sampled lookahead at ``config``, each call drawing from
    a generator with the same seed (so repeats draw the same tokens)."""
    import dynexec_compile as dx

    device = next(model.parameters()).device
    common = {"max_new_tokens": max_new, "eos_token_id": [], "pad_token_id": 0, **_compile_settings(quick, mode)}

    def ours(**extra: Any) -> Callable[[torch.Tensor, torch.Tensor | None], Generation]:
        def fn(ids: torch.Tensor, mask: torch.Tensor | None) -> Generation:
            generator = torch.Generator(device=device).manual_seed(0)
            out = dx.generate(
                model, ids, mask, do_sample=True, temperature=temperature, generator=generator, **common, **extra
            )
            return out.sequences, out.stats.forward_passes

        return fn

    w, n, g = config
    return {
        "dx_sample": (None, False, ours(strategy="sample")),
        f"dx_lookahead_{w}_{n}_{g}_sample": (config, True, ours(strategy="lookahead", window=w, ngram=n, guesses=g)),
    }


def _run_batch(
    result: SuiteResult,
    setup: LMSetup,
    batch: int,
    max_new: int,
    configs: list[Config],
    repeats: int,
    args: argparse.Namespace,
    quick: bool,
) -> None:
    model = setup.model
    groups = _batches(setup.prompts, batch, setup.pad_token_id)
    mode = getattr(args, "compile_mode", None)
    swept = batch == 1 or args.la_sweep is not None  # the built-in sweep is for batch 1; one the user names, every batch
    variants = _variants(setup, max_new, batch, configs if swept else configs[:1], args.la_pld_tokens, quick, mode)
    sampled = _sampling_variants(model, max_new, configs[0], args.la_temperature, quick, mode)
    variants.update(sampled)
    reference = [variants["hf_greedy"][2](ids, mask)[0] for ids, mask in groups]
    first_call: dict[str, float] = {}
    forwards: dict[str, int] = {}
    identical: dict[str, bool] = {}
    for name, (_, _, fn) in variants.items():
        start = time.perf_counter()
        outs = [fn(ids, mask) for ids, mask in groups]  # cold: compiles
        first_call[name] = time.perf_counter() - start
        forwards[name] = sum(f for _, f in outs)
        if name not in sampled:
            identical[name] = all(torch.equal(seq, ref) for (seq, _), ref in zip(outs, reference))

    def all_groups(fn: Callable) -> Callable[[], None]:
        return lambda: [fn(ids, mask) for ids, mask in groups]

    times = interleaved_medians({name: all_groups(v[2]) for name, v in variants.items()}, repeats=repeats, warmup=0)
    sampled_tokens = sum(ids.shape[0] for ids, _ in groups) * max_new  # sampled rows: EOS off
    new_tokens = sum(generated_tokens(ref, ids.shape[1], setup.eos_token_id) for ref, (ids, _) in zip(reference, groups))
    for name, (config, pl, _) in variants.items():
        made = sampled_tokens if name in sampled else new_tokens
        tokens_per_forward = made / batch / forwards[name]  # per row
        row = {
            "batch": batch,
            "variant": name,
            "W,N,G": ",".join(map(str, config)) if config else "",
            "step tokens": _step_tokens(config) if config else "",
            "prompt lookup": "yes" if pl else "no",
            "forwards": forwards[name],
            "tokens/forward": tokens_per_forward,
            "tokens/s": made / times[name],
            "ms/forward": 1e3 * times[name] / forwards[name],
        }
        if name in sampled:  # the greedy baselines' columns stay empty, ``vs dx sample`` is filled
            row["vs dx sample"] = times["dx_sample"] / times[name]
            row["identical"] = f"n/a (sampled, T={args.la_temperature:g})"
            row["first call s"] = first_call[name]
            result.rows.append(row)
            continue
        row["vs hf greedy"] = times["hf_greedy"] / times[name]
        row["vs hf prompt lookup"] = times["hf_prompt_lookup"] / times[name] if "hf_prompt_lookup" in times else None
        row["vs dx greedy"] = times["dx_greedy"] / times[name]
        row["identical"] = "yes" if identical[name] else "NO"
        row["first call s"] = first_call[name]
        result.rows.append(row)
        key = f"b{batch}/{name}"
        result.metric(f"{key}/outputs_equal", float(identical[name]), "exact")
        result.metric(f"{key}/tokens_per_forward", tokens_per_forward, "exact", "higher")
        if not quick and name != "hf_greedy":
            result.metric(f"{key}/speedup_vs_hf_greedy", row["vs hf greedy"], "timing", "higher")
            result.metric(f"{key}/speedup_vs_dx_greedy", row["vs dx greedy"], "timing", "higher")
    if not quick:
        name = next(n for n in sampled if n != "dx_sample")
        result.metric(f"b{batch}/{name}/speedup_vs_dx_sample", times["dx_sample"] / times[name], "timing", "higher")
    if batch > 1:
        result.notes.append(f"batch {batch}: transformers' prompt lookup does not support batches > 1 (not run)")


def _plot_sweep(result: SuiteResult, path: Path, model: str) -> None:
    """Tokens per forward and speed-up over dynexec greedy against the step's token count (batch 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.rows if r["batch"] == 1 and r["W,N,G"] and r["prompt lookup"] == "yes" and "vs dx greedy" in r]
    if not rows:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("tokens/forward", "vs dx greedy")):
        ax.scatter([r["step tokens"] for r in rows], [r[key] for r in rows])
        for r in rows:
            ax.annotate(f"({r['W,N,G']})", (r["step tokens"], r[key]), fontsize=8)
        ax.set_xlabel("tokens per step T = 1 + (N-1)(W+G)")
        ax.set_ylabel(key)
    pld = [r for r in result.rows if r["batch"] == 1 and r["variant"] == "hf_prompt_lookup"]
    if pld:
        axes[1].axhline(pld[0]["vs dx greedy"], linestyle="--", color="gray", label="HF prompt lookup")
        axes[1].legend()
    axes[1].axhline(1.0, color="black", linewidth=0.5)
    fig.suptitle(f"lookahead sweep, batch 1 ({model}; W = 0: prompt lookup alone)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    result.notes.append(f"sweep plot written to {path}")
