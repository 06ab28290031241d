"""``dynexec bench speculative``: draft-and-verify decoding against greedy and HF's assisted
generation, side by side in one process.

Variants, each run over the same held-out prompts: HF greedy (``model.generate``), HF assisted
generation with the same draft model (``num_assistant_tokens`` set on the assistant's
generation config, constant schedule), HF ``assistant_early_exit`` (the target's first layers
+ its LM head as the draft), dynexec greedy, and dynexec ``strategy="speculative"`` with a
chain (``k`` sweep) and a candidate tree. Every variant is warmed up (compiled) first, then
all are timed in interleaved rounds and the median per variant reported, with tokens/s,
ratios to HF greedy and to the best HF assisted run, tokens per target forward and the
acceptance rate. Every output must equal HF greedy's (an exact gate).

``--quick``: tiny random LLaMA target and a one-layer draft cut from it, eager (no compile):
the deterministic figures only (outputs equal, target forwards, acceptance), in seconds.

Other drafters add rows by appending a factory ``factory(ctx) -> list[Variant]`` to
:data:`VARIANT_FACTORIES`; :func:`dynexec_run` wraps any ``dx.generate`` strategy, e.g.
``Variant("dynexec_self_spec_E4", dynexec_run(ctx, "self_speculative", exit_layer=4), "dynexec")``.
"""

from __future__ import annotations

import argparse
import fnmatch
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers as T
from tqdm import tqdm

import dynexec_compile as dx
from dynexec_compile.bench.common import (
    SuiteResult,
    compile_settings,
    generated_tokens,
    interleaved_medians,
    left_padded,
    lm_setup,
    load_causal_lm,
    precision_label,
    prepare_precision,
    sync,
)
from dynexec_compile.decoding.generate import GenerateOutput

Batch = tuple[torch.Tensor, "torch.Tensor | None"]  # (ids [B, L], mask [B, L] or None)
TAKES_USER_MODEL = True  # --model / --draft-model / --draft-heads / --prompt-file (bench.common)


@dataclass
class BenchContext:
    """What the variants run on: target, draft, prompt batches and settings."""

    target: T.PreTrainedModel
    draft: T.PreTrainedModel | None  # None: no draft model given, the draft-model rows are skipped
    prompts: torch.Tensor | list[torch.Tensor]  # [N, L] windows, or chat prompts of their own lengths
    max_new_tokens: int
    compile: bool
    ks: tuple[int, ...]
    trees: tuple[tuple[int, ...], ...]
    early_exit_layer: int
    heads_path: str | None = None  # draft heads to load (compiled runs); None: no draft-heads rows
    adapter_path: str | None = None  # exit adapter for self-speculation at early_exit_layer; None: shared head only
    mode: str | None = None  # torch.compile mode of dynexec's engines (compiled runs)
    eos_token_id: list[int] = field(default_factory=list)  # []: every row generates max_new_tokens
    pad_token_id: int = 0
    eagle_path: str | None = None  # EAGLE draft to load (compiled runs); None: no eagle rows


@dataclass
class RunOutput:
    """One pass of a variant over a prompt batch: sequences and counters (None when unknown)."""

    sequences: torch.Tensor
    target_forwards: int | None = None
    drafted: int | None = None
    accepted: int | None = None


@dataclass
class Variant:
    """A row of the table: ``run((ids, mask)) -> RunOutput`` for ``ids`` ``[B, L]`` (``mask``
    ``None`` without padding, else 0 on the left padding).

    ``batch_sizes``: batch sizes it supports (``None``: all); ``why_not``: shown for others.
    """

    name: str
    run: Callable[[torch.Tensor], RunOutput]
    family: str  # "hf" or "dynexec"
    batch_sizes: tuple[int, ...] | None = None
    why_not: str = ""
    params: dict[str, Any] = field(default_factory=dict)


# ---- variants ---------------------------------------------------------------------------


class _ForwardCounter:
    """Counts a module's forward calls while HF's (eager) generate runs."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.calls = module, 0

    def __enter__(self) -> _ForwardCounter:
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def _hook(self, *args: Any) -> None:
        self.calls += 1

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()


def _hf_generate(ctx: BenchContext, batch: Batch, count: bool = True, **kwargs: Any) -> RunOutput:
    """``model.generate``; ``count``: count the target's forwards (not when the target also
    drafts, as with early exit, where its draft and verify calls cannot be told apart)."""
    ids, mask = batch
    with torch.no_grad(), _ForwardCounter(ctx.target) as counter:
        out = ctx.target.generate(
            ids, attention_mask=torch.ones_like(ids) if mask is None else mask, do_sample=False,
            max_new_tokens=ctx.max_new_tokens, eos_token_id=ctx.eos_token_id, pad_token_id=ctx.pad_token_id, **kwargs,
        )
    return RunOutput(out, target_forwards=counter.calls if count else None)


def _hf_assisted(ctx: BenchContext, k: int) -> Callable[[torch.Tensor], RunOutput]:
    def run(ids: Batch) -> RunOutput:
        config = ctx.draft.generation_config
        config.num_assistant_tokens, config.num_assistant_tokens_schedule = k, "constant"
        return _hf_generate(ctx, ids, assistant_model=ctx.draft)

    return run


def _hf_early_exit(ctx: BenchContext, k: int) -> Callable[[torch.Tensor], RunOutput]:
    def run(ids: Batch) -> RunOutput:
        config = ctx.target.generation_config  # the assistant is the target itself
        saved = config.num_assistant_tokens, config.num_assistant_tokens_schedule
        config.num_assistant_tokens, config.num_assistant_tokens_schedule = k, "constant"
        try:
            return _hf_generate(ctx, ids, count=False, assistant_early_exit=ctx.early_exit_layer)
        finally:
            config.num_assistant_tokens, config.num_assistant_tokens_schedule = saved

    return run


def dynexec_run(ctx: BenchContext, strategy: str, **options: Any) -> Callable[[torch.Tensor], RunOutput]:
    """A variant's ``run``: ``dx.generate(ctx.target, ids, strategy=strategy, **options)`` with
    the suite's settings; drafted/accepted counts from ``stats.extra`` when it has them."""
    def run(batch: Batch) -> RunOutput:
        out: GenerateOutput = dx.generate(
            ctx.target, *batch, strategy=strategy, max_new_tokens=ctx.max_new_tokens, eos_token_id=ctx.eos_token_id,
            pad_token_id=ctx.pad_token_id,
            compile=ctx.compile, **(compile_settings(ctx.mode) if ctx.compile else {}), **options,
        )
        extra = out.stats.extra
        drafted = sum(map(sum, extra["drafted_per_step"])) if "drafted_per_step" in extra else None
        accepted = sum(map(sum, extra["accepted_drafts_per_step"])) if "accepted_drafts_per_step" in extra else None
        return RunOutput(out.sequences, target_forwards=out.stats.forward_passes, drafted=drafted, accepted=accepted)

    return run


def baseline_variants(ctx: BenchContext) -> list[Variant]:
    """HF greedy, HF assisted (per k), HF early exit, dynexec greedy."""
    one = "HF assisted generation supports batch size 1 only"
    variants = [Variant("hf_greedy", lambda ids: _hf_generate(ctx, ids), "hf")]
    if ctx.draft is not None:
        variants += [
            Variant(f"hf_assisted_k{k}", _hf_assisted(ctx, k), "hf", (1,), one, {"k": k}) for k in ctx.ks
        ]
    k = max(ctx.ks)
    variants.append(
        Variant(
            f"hf_early_exit_E{ctx.early_exit_layer}_k{k}", _hf_early_exit(ctx, k), "hf", (1,), one,
            {"k": k, "exit_layer": ctx.early_exit_layer},
        )
    )
    if not isinstance(ctx.prompts, torch.Tensor):  # chat prompts: answers that copy from them
        variants.append(Variant("hf_prompt_lookup", lambda ids: _hf_generate(ctx, ids, prompt_lookup_num_tokens=10), "hf",
                                (1,), "transformers' prompt lookup supports batch size 1 only", {"tokens": 10}))
        variants.append(Variant("dynexec_prompt_lookup_0_4_1",
                                dynexec_run(ctx, "lookahead", window=0, ngram=4, guesses=1), "dynexec",
                                params={"window": 0, "ngram": 4, "guesses": 1}))
        variants.append(Variant("dynexec_prompt_lookup_0_4_1_copy11",
                                dynexec_run(ctx, "lookahead", window=0, ngram=4, guesses=1, copy_ngram=11), "dynexec",
                                params={"window": 0, "ngram": 4, "guesses": 1, "copy_ngram": 11}))
        if ctx.compile:  # chosen by measured step times: counters vary run to run, so not in --quick
            variants.append(Variant("dynexec_prompt_lookup_0_4_1_copy11_adaptive",
                                    dynexec_run(ctx, "lookahead", window=0, ngram=4, guesses=1, copy_ngram=11,
                                                adaptive=True), "dynexec",
                                    params={"window": 0, "ngram": 4, "guesses": 1, "copy_ngram": 11, "adaptive": True}))
    variants.append(Variant("dynexec_greedy", dynexec_run(ctx, "greedy"), "dynexec"))
    return variants


def speculative_variants(ctx: BenchContext) -> list[Variant]:
    """dynexec speculative: a chain per k and each tree, with the draft model."""
    if ctx.draft is None:
        return []
    variants = [
        Variant(f"dynexec_spec_k{k}", dynexec_run(ctx, "speculative", draft_model=ctx.draft, num_draft=k), "dynexec",
                params={"k": k})
        for k in ctx.ks
    ]
    for tree in ctx.trees:
        name = "dynexec_spec_tree" + "x".join(map(str, tree))
        variants.append(
            Variant(name, dynexec_run(ctx, "speculative", draft_model=ctx.draft, tree=list(tree)), "dynexec",
                    params={"tree": list(tree)})
        )
    return variants


def self_drafting_variants(ctx: BenchContext) -> list[Variant]:
    """dynexec draft_heads (the committed heads; untrained ones with --quick; a chain and each
    tree at most k deep) and self_speculative (shared exit head at HF early exit's layer, per k
    and each tree)."""
    from dynexec_compile.decoding.draft_heads import DraftHeads

    if ctx.compile and ctx.heads_path is None:
        heads = None
    elif ctx.compile:
        heads = dx.load_draft_heads(ctx.heads_path)
    else:
        heads = DraftHeads(ctx.target.config.hidden_size, 3, vocab_size=ctx.target.config.vocab_size)
    variants = [] if heads is None else _draft_heads_variants(ctx, heads)
    if ctx.compile and ctx.eagle_path is None:
        eagle = None
    elif ctx.compile:
        eagle = dx.load_eagle_draft(ctx.eagle_path)
    else:  # --quick: an untrained draft exercises the path
        eagle = dx.EagleDraft(ctx.target.config.get_text_config(decoder=True))
    if eagle is not None:
        variants += [Variant(f"dynexec_eagle_k{k}", dynexec_run(ctx, "eagle", draft=eagle, num_draft=k), "dynexec",
                             params={"k": k}) for k in ctx.ks]
        variants += [Variant(f"dynexec_eagle_k{k}_lookup3", dynexec_run(ctx, "eagle", draft=eagle, num_draft=k, lookup=3),
                             "dynexec", params={"k": k, "lookup": 3}) for k in ctx.ks]
        variants += [Variant(f"dynexec_eagle_k{k}_lookup3_copy10",
                             dynexec_run(ctx, "eagle", draft=eagle, num_draft=k, lookup=3, copy_lookup=10), "dynexec",
                             params={"k": k, "lookup": 3, "copy_lookup": 10}) for k in ctx.ks]
        variants += [Variant(f"dynexec_eagle_k{k}_alt3_lookup3_copy10",
                             dynexec_run(ctx, "eagle", draft=eagle, num_draft=k, alternatives=3, lookup=3, copy_lookup=10),
                             "dynexec", params={"k": k, "alternatives": 3, "lookup": 3, "copy_lookup": 10}) for k in ctx.ks]
        if ctx.compile:  # each step's shape chosen by measured time: counters vary run to run, so not in --quick
            variants += [Variant(f"dynexec_eagle_k{k}_lookup3_adaptive",
                                 dynexec_run(ctx, "eagle", draft=eagle, num_draft=k, lookup=3, adaptive=True), "dynexec",
                                 params={"k": k, "lookup": 3, "adaptive": True}) for k in ctx.ks]
            variants += [Variant(f"dynexec_eagle_k{k}_alt3_lookup3_copy10_adaptive",
                                 dynexec_run(ctx, "eagle", draft=eagle, num_draft=k, alternatives=3, lookup=3, copy_lookup=10,
                                             adaptive=True), "dynexec",
                                 params={"k": k, "alternatives": 3, "lookup": 3, "copy_lookup": 10, "adaptive": True})
                         for k in ctx.ks]
    exit_layer = ctx.early_exit_layer
    variants += [
        Variant(f"dynexec_selfspec_E{exit_layer}_k{k}",
                dynexec_run(ctx, "self_speculative", exit_layer=exit_layer, num_draft=k), "dynexec",
                params={"k": k, "exit_layer": exit_layer})
        for k in ctx.ks
    ]
    variants += [
        Variant(f"dynexec_selfspec_E{exit_layer}_tree" + "x".join(map(str, tree)),
                dynexec_run(ctx, "self_speculative", exit_layer=exit_layer, tree=list(tree)), "dynexec",
                params={"tree": list(tree), "exit_layer": exit_layer})
        for tree in ctx.trees
    ]
    if ctx.adapter_path is not None:
        adapter = dx.load_draft_heads(ctx.adapter_path)
        trained = {"exit_layer": exit_layer, "exit_head": "trained", "exit_heads": adapter}
        variants += [
            Variant(f"dynexec_selfspec_E{exit_layer}_adapter_k{k}",
                    dynexec_run(ctx, "self_speculative", num_draft=k, **trained), "dynexec",
                    params={"k": k, "exit_layer": exit_layer, "exit_head": "adapter"})
            for k in ctx.ks
        ]
    return variants


def _draft_heads_variants(ctx: BenchContext, heads: Any) -> list[Variant]:
    variants = [
        Variant(f"dynexec_draft_heads_k{heads.num_heads}", dynexec_run(ctx, "draft_heads", heads=heads), "dynexec",
                params={"k": heads.num_heads})
    ]
    variants += [
        Variant("dynexec_draft_heads_tree" + "x".join(map(str, tree)),
                dynexec_run(ctx, "draft_heads", heads=heads, tree=list(tree)), "dynexec", params={"tree": list(tree)})
        for tree in ctx.trees
        if len(tree) <= heads.num_heads
    ]
    if ctx.compile:  # each step's shape chosen by measured time: counters vary run to run, so not in --quick
        variants.append(Variant(f"dynexec_draft_heads_k{heads.num_heads}_adaptive",
                                dynexec_run(ctx, "draft_heads", heads=heads, adaptive=True), "dynexec",
                                params={"k": heads.num_heads, "adaptive": True}))
    return variants


VARIANT_FACTORIES: list[Callable[[BenchContext], list[Variant]]] = [
    baseline_variants,
    speculative_variants,
    self_drafting_variants,
]


# ---- running ----------------------------------------------------------------------------


def _context(args: argparse.Namespace) -> BenchContext:
    if args.quick:
        torch.manual_seed(0)
        config = T.LlamaConfig(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1,
        )
        target = T.LlamaForCausalLM(config).eval()
        draft_config = T.LlamaConfig(**{**config.to_dict(), "num_hidden_layers": 1})
        draft = T.LlamaForCausalLM(draft_config).eval()
        draft.load_state_dict(target.state_dict(), strict=False)  # the target's first layer: agrees often
        prompts = torch.randint(3, 512, (4, 16), generator=torch.Generator().manual_seed(1))
        return BenchContext(target, draft, prompts, 24, False, tuple(args.ks or (2, 4)), _trees(args.trees or ["2,2,1"]), 1)
    from dynexec_compile.models import demo_draft_heads_path, load_demo_lm

    setup = lm_setup(args, args.prompts, args.prompt_tokens)
    if args.draft_model:
        draft, _ = load_causal_lm(args.draft_model, "--draft-model")
    else:
        draft = load_demo_lm("draft")[0] if setup.is_demo else None
    if draft is not None:
        prepare_precision(draft, args)
    heads = args.draft_heads or (str(demo_draft_heads_path()) if setup.is_demo else None)
    layers = setup.model.config.get_text_config(decoder=True).num_hidden_layers
    ks, trees = tuple(args.ks or (2, 3, 4, 6)), _trees(args.trees or ["3,2,1"])
    return BenchContext(
        setup.model, draft, setup.prompts, args.new_tokens, True, ks, trees, layers // 2, heads,
        getattr(args, "exit_adapter", None), getattr(args, "compile_mode", None), setup.eos_token_id, setup.pad_token_id,
        getattr(args, "eagle", None),
    )


def _describe(ctx: BenchContext) -> str:
    if isinstance(ctx.prompts, torch.Tensor):
        return f"{ctx.prompts.shape[0]} prompts of {ctx.prompts.shape[1]} tokens"
    sizes = [p.numel() for p in ctx.prompts]
    return f"{len(sizes)} prompts of {min(sizes)}-{max(sizes)} tokens"


def _trees(specs: list[str]) -> tuple[tuple[int, ...], ...]:
    """``["3,2,1"]`` -> ``((3, 2, 1),)``."""
    return tuple(tuple(int(b) for b in spec.split(",")) for spec in specs)


def _batches(ctx: BenchContext, batch: int) -> list[Batch]:
    """Groups of ``batch`` prompts: windows as they are, chat prompts left-padded together."""
    prompts = ctx.prompts
    groups = [prompts[i : i + batch] for i in range(0, len(prompts) - batch + 1, batch)]
    if isinstance(prompts, torch.Tensor):
        return [(g, None) for g in groups]
    return [(ids, None if batch == 1 else mask) for ids, mask in (left_padded(g, ctx.pad_token_id) for g in groups)]


def _run_over(variant: Variant, batches: list[torch.Tensor]) -> tuple[list[RunOutput], float]:
    sync()
    start = time.perf_counter()
    outs = [variant.run(ids) for ids in batches]
    sync()
    return outs, time.perf_counter() - start


def _measure(
    variants: list[Variant], batches: list[torch.Tensor], repeats: int
) -> dict[str, tuple[list[RunOutput], float, float]]:
    """Warm every variant up (timed apart: it includes compiling), then time them in
    interleaved rounds; ``(outputs, median seconds, warm-up seconds)`` per variant."""
    warm: dict[str, tuple[list[RunOutput], float]] = {}
    for v in tqdm(variants, desc="warm-up (compiles)", leave=False):
        warm[v.name] = _run_over(v, batches)
    times = interleaved_medians(
        {v.name: (lambda v=v: _run_over(v, batches)) for v in variants}, repeats=repeats, warmup=0, progress="timed rounds"
    )
    return {name: (warm[name][0], times[name], warm[name][1]) for name in times}


def _bench_batch(ctx: BenchContext, variants: list[Variant], batch: int, repeats: int, result: SuiteResult) -> None:
    batches = _batches(ctx, batch)
    runnable = []
    for v in variants:
        if v.batch_sizes is None or batch in v.batch_sizes:
            runnable.append(v)
        else:
            result.rows.append({"batch": batch, "variant": v.name, "note": v.why_not})
    failed: dict[str, str] = {}
    for v in list(runnable):  # a baseline that does not run on this transformers is recorded, not fatal
        try:
            v.run(batches[0])
        except Exception as err:  # noqa: BLE001 - any failure of a third-party baseline is reported
            failed[v.name] = f"{type(err).__name__}: {err}"
            runnable.remove(v)
    measured = _measure(runnable, batches, repeats)
    reference = measured["hf_greedy"][0]
    new_tokens = sum(
        generated_tokens(r.sequences, ids.shape[1], ctx.eos_token_id) for r, (ids, _) in zip(reference, batches)
    )
    base_s = measured["hf_greedy"][1]
    assisted = [m[1] for name, m in measured.items() if name.startswith("hf_assisted")]
    best_assisted = min(assisted) if assisted else None
    for v in runnable:
        outs, seconds, warm_up = measured[v.name]
        equal = all(torch.equal(o.sequences, r.sequences) for o, r in zip(outs, reference, strict=True))
        forwards = _total(o.target_forwards for o in outs)
        drafted, accepted = _total(o.drafted for o in outs), _total(o.accepted for o in outs)
        row = {
            "batch": batch,
            "variant": v.name,
            "tokens/s": new_tokens / seconds,
            "vs HF greedy": base_s / seconds,
            "vs best HF assisted": best_assisted / seconds if best_assisted else None,
            "tokens/target fwd": new_tokens / batch / forwards if forwards else None,  # per row
            "acceptance": accepted / drafted if drafted else None,
            "outputs equal": equal,
            "warm-up s": warm_up,
        }
        result.rows.append(row)
        prefix = f"b{batch}/{v.name}"
        result.metric(f"{prefix}/outputs_equal", float(equal), "exact")
        if forwards:
            result.metric(f"{prefix}/target_forwards", forwards, "exact", "lower")
        if drafted:
            result.metric(f"{prefix}/acceptance", accepted / drafted, "exact", "higher")
        if not ctx.compile:  # --quick: deterministic figures only
            continue
        result.metric(f"{prefix}/speedup_vs_hf_greedy", base_s / seconds, "timing", "higher")
    for name, why in failed.items():
        result.rows.append({"batch": batch, "variant": name, "note": f"did not run: {why[:200]}"})
        result.notes.append(f"batch {batch}: {name} did not run on transformers {T.__version__}: {why}")


def _total(values: Any) -> int | None:
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


def run(args: argparse.Namespace) -> SuiteResult:
    threads = args.threads or 1  # dynexec bench --threads; one by default: stable timings on a shared machine
    torch.set_num_threads(threads)
    ctx = _context(args)
    repeats = args.repeats or (1 if args.quick else 3)
    variants = [v for factory in VARIANT_FACTORIES for v in factory(ctx)]
    if args.variants:  # HF greedy (the reference of every comparison) and dynexec greedy always run
        variants = [v for v in variants if v.name in ("hf_greedy", "dynexec_greedy")
                    or any(fnmatch.fnmatch(v.name, pattern) for pattern in args.variants)]
    result = SuiteResult("speculative")
    result.notes.append(
        f"{'quick: tiny random LLaMA, eager' if args.quick else precision_label(args) + ', compiled' + (f' (mode={ctx.mode})' if ctx.mode else '')}; "
        f"{_describe(ctx)}, up to {ctx.max_new_tokens} new tokens each, "
        f"{'stopping at EOS' if ctx.eos_token_id else 'EOS off'}; median of {repeats} interleaved rounds after a warm-up; {threads} thread(s); "
        "'vs' columns are speed-ups (higher is better)"
    )
    if ctx.draft is None:
        result.notes.append("no --draft-model: the draft-model rows (HF assisted, dynexec speculative) are skipped")
    if ctx.compile and ctx.heads_path is None:
        result.notes.append("no --draft-heads: the draft-heads rows are skipped (train heads with dx.train_draft_heads)")
    for batch in args.batch_sizes:
        _bench_batch(ctx, variants, batch, repeats, result)
    if args.md:
        from pathlib import Path

        from dynexec_compile.bench.common import markdown_table

        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(markdown_table(result.rows) + "\n\n" + "\n".join(result.notes) + "\n")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("speculative")
    group.add_argument("--ks", type=int, nargs="+", default=None, help="chain lengths to sweep (default 2 3 4 6; quick 2 4)")
    group.add_argument("--trees", nargs="+", default=None, help="candidate trees as children per depth (default 3,2,1; quick 2,2,1)")
    group.add_argument("--prompts", type=int, default=4, help="held-out prompts")
    group.add_argument("--prompt-tokens", type=int, default=64)
    group.add_argument("--new-tokens", type=int, default=128)
    group.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    group.add_argument("--md", default=None, help="also write the table as markdown here")
    group.add_argument("--variants", nargs="+", default=None,
                       help="only the rows whose names match these patterns (fnmatch, e.g. 'dynexec_eagle_*'); "
                       "hf_greedy and dynexec_greedy always run")
