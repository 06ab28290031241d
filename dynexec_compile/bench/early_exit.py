"""``dynexec bench early_exit``: accuracy against layers and wall-clock on SST-2.

The full run uses the committed fine-tuned MiniLM-L6 SST-2 classifier
(``models/minilm-sst2``) on the 872 validation sentences, with its trained exit heads and with
the shared head (the model's own pooler + classifier on earlier hidden states):

* a sweep of thresholds (entropy, max_prob) and patience counts, replayed from one recorded
  pass (``dynexec_compile.calibrate``): accuracy, layers per sample, layer reduction; a PNG
  of accuracy against layers per sample (the position paper's Figure 2);
* the operating point ``calibrate_threshold(keep=0.99)`` picks for each rule, checked by
  running the Inductor-compiled early-exit model over the whole validation set (its exits
  must be the replayed ones);
* wall-clock at batch 1 and batch 32 of that point (the rule with the fewest layers) against
  plain ``torch.compile`` (Inductor) of the same model: one process, warm-up, interleaved
  repeats, medians, compile time apart. Batch 32 marks the batch dimension dynamic so exited
  samples leave the batch (compaction); sequence lengths are dynamic on both sides.

``--quick`` is the deterministic part on a tiny random BERT (eager lowering, seconds): layers
per sample, exits per block and accuracy at calibrated points, and that the runtime exits
where the replay says, for CI's regression gate.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from dynexec_compile.bench.common import SuiteResult, sync
from dynexec_compile.calibrate import (
    ExitScores,
    OperatingPoint,
    choose_threshold,
    record_exit_scores,
)
from dynexec_compile.runtime.stats import last_stats

RULES = ("entropy", "max_prob", "patience")
KEEP = 0.99
QUICK_KEEP = 0.9
ENTROPY_GRID = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
MAX_PROB_GRID = (1.0, 0.999, 0.995, 0.99, 0.98, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5)
GOALS = {"layer_reduction": 2.0, "speedup_batch1": 1.7, "speedup_batch32": 1.4, "max_drop_points": 1.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("early_exit suite")
    g.add_argument("--data-dir", default=None, help="folder holding sst2/validation.tsv (default ../shared/data)")
    g.add_argument("--sentences", type=int, default=None, help="use only the first N validation sentences (default all 872)")
    g.add_argument("--timing-sentences", type=int, default=96, help="sentences timed one by one at batch 1")
    g.add_argument("--timing-batches", type=int, default=4, help="batches of 32 sentences timed at batch 32")


# --- shared helpers ------------------------------------------------------------------------


def point_row(section: str, heads: str, p: OperatingPoint, full: float) -> dict[str, Any]:
    return {
        "section": section,
        "heads": heads,
        "rule": p.rule,
        "threshold": p.patience if p.rule == "patience" else p.threshold,
        "accuracy %": 100 * p.accuracy,
        "drop (points)": 100 * (full - p.accuracy),
        "layers/sample": p.mean_layers,
        "layer reduction": p.layer_reduction,
    }


def sweep(scores: ExitScores) -> list[OperatingPoint]:
    num_exits = len(scores.exit_blocks)
    return (
        scores.replay("entropy", ENTROPY_GRID)
        + scores.replay("max_prob", MAX_PROB_GRID)
        + scores.replay("patience", range(num_exits, 0, -1))
    )


def compile_early_exit(model, options: dict, lowering: str):
    opts = {"lowering": lowering, "strict": True, "early_exit": options}
    return torch.compile(model, backend="dynexec", options=opts)


def run_batches(compiled, batches: list[dict], dynamic_batch: bool) -> tuple[list[int], list[int]]:
    """Exit block and prediction of every sample, through the real runtime."""
    exits, preds = [], []
    with torch.no_grad():
        for b in batches:
            inputs = mark(b, dynamic_batch)
            preds += compiled(**inputs).logits.argmax(-1).tolist()
            exits += last_stats()["exit_layer"]
    return exits, preds


def mark(batch: dict, dynamic_batch: bool) -> dict:
    """The model inputs of ``batch``; batch (for compaction) and sequence dims dynamic."""
    inputs = {k: v.clone() for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    for v in inputs.values():
        if dynamic_batch:
            torch._dynamo.mark_dynamic(v, 0)
        torch._dynamo.maybe_mark_dynamic(v, 1)
    return inputs


def check_runtime(result: SuiteResult, name: str, scores: ExitScores, cal, compiled, batches, dynamic_batch) -> None:
    """The compiled runtime exits every sample where the replay says, with its accuracy."""
    exits, preds = run_batches(compiled, batches, dynamic_batch)
    replayed, _ = scores.exit_layer(cal.rule, torch.tensor([float(cal.threshold)]))
    target = (scores.labels if scores.labels is not None else scores.final_pred).tolist()
    accuracy = sum(p == y for p, y in zip(preds, target)) / len(target)
    same = exits == replayed[0].tolist()
    result.metric(f"{name}/runtime_exits_match_replay", float(same), "exact")
    result.metric(f"{name}/runtime_{scores.metric}", accuracy, "tolerance", "higher", tol=0.002)
    if not same:
        moved = sum(a != b for a, b in zip(exits, replayed[0].tolist()))
        result.notes.append(f"{name}: {moved} of {len(exits)} samples exited elsewhere than the replay (scores at a threshold's edge)")


# --- quick: tiny random BERT, deterministic ------------------------------------------------


def quick_model_and_data() -> tuple[torch.nn.Module, list[dict]]:
    """A tiny random BERT whose heads (its own and the off-ramps) are made confident, so exits
    spread over the blocks, and 64 fixed unlabelled samples (accuracy = agreement with the
    full model)."""
    import transformers as T

    from dynexec_compile.exit_heads import ExitHeads, attach_exit_heads

    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=64, num_labels=3)
    model = T.BertForSequenceClassification(cfg).eval()
    heads = ExitHeads([0, 1, 2], 32, 3, kind="mean_tanh").eval()
    with torch.no_grad():
        model.classifier.weight.mul_(8.0)
        for layer in heads.layers:
            heads.head(layer).out.weight.mul_(8.0)
    attach_exit_heads(model, heads)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        ids = torch.randint(3, 128, (16, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[::3, 9:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return model, batches


def run_quick(result: SuiteResult) -> None:
    model, batches = quick_model_and_data()
    for heads in ("trained", "shared"):
        torch._dynamo.reset()
        scores = record_exit_scores(model, batches, heads=heads, progress=False)
        for rule in RULES:
            cal = choose_threshold(scores, QUICK_KEEP, rule)
            result.rows.append(point_row(f"calibrated keep={QUICK_KEEP}", heads, cal.point, 1.0))
            name = f"{heads}/{rule}"
            result.metric(f"{name}/mean_layers", cal.mean_layers, "exact", "lower")
            result.metric(f"{name}/agreement", cal.accuracy, "tolerance", "higher", tol=1e-6)
            for block in range(scores.num_blocks):
                result.metric(f"{name}/exits_after_block{block}", cal.point.exits_per_layer.get(block, 0), "exact")
        if heads == "trained":  # the real runtime at one calibrated point, compacting
            cal = choose_threshold(scores, QUICK_KEEP, "entropy")
            torch._dynamo.reset()
            compiled = compile_early_exit(model, cal.early_exit_options(), "eager")
            check_runtime(result, "trained/entropy", scores, cal, compiled, batches, dynamic_batch=True)
    result.notes.append(f"quick: tiny random BERT (4 blocks, 3 classes, exits after blocks 0..2), 64 fixed unlabelled "
                        f"samples (accuracy = agreement with the full model), eager lowering; calibrated at keep={QUICK_KEEP}")


# --- full: the SST-2 demo model ------------------------------------------------------------


def load_demo(data_dir: str | None, limit: int | None):
    from dynexec_compile.data import load_sst2
    from dynexec_compile.demo_models import load_sst2_classifier, load_sst2_exit_heads
    from dynexec_compile.exit_heads import attach_exit_heads

    model, tokenizer = load_sst2_classifier()
    attach_exit_heads(model, load_sst2_exit_heads())  # our own loaded copy
    return model, tokenizer, load_sst2("validation", data_dir)[:limit]


def tokenize(tokenizer, pairs, batch_size: int) -> list[dict]:
    """Batches in dataset order, padded to their longest sentence, with labels."""
    from dynexec_compile.data import sst2_dataloader

    return list(sst2_dataloader(tokenizer, pairs, batch_size=batch_size, max_length=64))


def time_interleaved(variants: dict[str, Any], batches: list[dict], dynamic_batch: dict[str, bool], repeats: int) -> dict[str, dict]:
    """Compile (first call) apart, one warm-up pass, then ``repeats`` rounds timing a full pass
    of every variant in turn (order alternating per round); medians of the pass times."""
    out: dict[str, dict] = {}
    inputs = {name: [mark(b, dynamic_batch[name]) for b in batches] for name in variants}
    with torch.no_grad():
        for name, fn in variants.items():
            start = time.perf_counter()
            fn(**inputs[name][0])
            sync()
            out[name] = {"compile s": time.perf_counter() - start, "times": [], "layers": []}
            for x in inputs[name]:  # warm-up: also absorbs any recompile for a new length
                fn(**x)
        names = list(variants)
        for r in range(repeats):
            for name in names if r % 2 == 0 else reversed(names):
                fn, layers = variants[name], []
                start = time.perf_counter()
                for x in inputs[name]:
                    fn(**x)
                    if name != "plain":  # dynexec publishes each sample's layers
                        layers += last_stats()["layers_executed"]
                sync()
                out[name]["times"].append(time.perf_counter() - start)
                out[name]["layers"] = layers
    for stats in out.values():
        stats["median s"] = statistics.median(stats["times"])
    return out


def run_full(result: SuiteResult, args: argparse.Namespace, plot_path: Path) -> None:
    model, tokenizer, pairs = load_demo(args.data_dir, args.sentences)
    val = tokenize(tokenizer, pairs, 32)
    scores = {}
    for heads in ("trained", "shared"):
        torch._dynamo.reset()
        scores[heads] = record_exit_scores(model, val, heads=heads, progress=True)
    full = scores["trained"].full_accuracy
    result.metric("full_accuracy", full, "tolerance", "higher", tol=0.002)
    calibrated = {}
    for heads, s in scores.items():
        for p in sweep(s):
            result.rows.append(point_row("sweep", heads, p, full))
        for rule in RULES:
            cal = choose_threshold(s, KEEP, rule)
            calibrated[heads, rule] = cal
            result.rows.append(point_row(f"calibrated keep={KEEP}", heads, cal.point, full))
            result.metric(f"{heads}/{rule}/calibrated_mean_layers", cal.mean_layers, "exact", "lower")
            result.metric(f"{heads}/{rule}/calibrated_accuracy", cal.accuracy, "tolerance", "higher", tol=0.002)
    best = min((c for (h, _), c in calibrated.items() if h == "trained"), key=lambda c: c.mean_layers)
    result.metric("layer_reduction", best.layer_reduction, "exact", "higher")
    result.metric("accuracy_drop_points", 100 * (full - best.accuracy), "tolerance", "lower", tol=0.2)

    # the chosen point, Inductor-compiled: timed against plain Inductor, then run over the
    # whole validation set (batch 32, compaction) to check its exits against the replay;
    # no duck sizing (a batch equal to a sequence length must not share its symbol), room for
    # both variants' graphs, and Inductor's on-disk caches off so compile times are real
    with torch.fx.experimental._config.patch(use_duck_shape=False), torch._dynamo.config.patch(recompile_limit=64), \
            torch._inductor.config.patch(force_disable_caches=True):
        timing = {}
        for batch in (32, 1):
            torch._dynamo.reset()  # each batch size compiles afresh: compile times are real
            dx = compile_early_exit(model, best.early_exit_options(), "inductor")
            timing[batch] = wall_clock(result, model, tokenizer, pairs, best, dx, batch, args)
            if batch == 32:
                check_runtime(result, f"trained/{best.rule}", scores["trained"], best, dx, val, dynamic_batch=True)
    plot(plot_path, scores, calibrated, full, best, timing)
    result.notes.append(
        f"operating point timed: trained heads, {best.rule} {best.threshold} (calibrate keep={KEEP}, the rule with the "
        f"fewest layers): accuracy {100 * best.accuracy:.2f}% vs full {100 * full:.2f}%, "
        f"{best.mean_layers:.3f} layers/sample ({best.layer_reduction:.2f}x fewer)"
    )
    goals(result, best, full)


def wall_clock(result: SuiteResult, model, tokenizer, pairs, best, dx, batch: int, args) -> float:
    """Speed-up of ``dx`` over plain ``torch.compile`` (Inductor) at ``batch``; rows and metric."""
    repeats = args.repeats or 7
    count = args.timing_sentences if batch == 1 else batch * args.timing_batches
    batches = tokenize(tokenizer, pairs[:count], batch)
    plain = torch.compile(model, backend="inductor")
    stats = time_interleaved({"plain": plain, "dynexec": dx}, batches, {"plain": False, "dynexec": batch > 1}, repeats)
    samples = sum(b["input_ids"].shape[0] for b in batches)
    speedup = stats["plain"]["median s"] / stats["dynexec"]["median s"]
    ideal = ideal_speedup(batches, stats["dynexec"]["layers"], best.point.num_blocks)
    for name, s in stats.items():
        layers = s["layers"]
        result.rows.append({
            "section": f"wall-clock batch {batch}",
            "heads": "trained" if name == "dynexec" else "",
            "rule": best.rule if name == "dynexec" else "plain torch.compile",
            "threshold": best.threshold if name == "dynexec" else None,
            "layers/sample": sum(layers) / len(layers) if layers else float(best.point.num_blocks),
            "compile s": s["compile s"],
            "ms/sample": 1e3 * s["median s"] / samples,
            "speed-up": speedup if name == "dynexec" else 1.0,
            "ideal (length-weighted)": ideal if name == "dynexec" else 1.0,
        })
    result.metric(f"speedup_batch{batch}", speedup, "timing", "higher")
    result.notes.append(
        f"wall-clock batch {batch}: {samples} sentences in {len(batches)} calls, Inductor on both sides, "
        f"{torch.get_num_threads()} thread(s), median of {repeats} interleaved passes after a warm-up pass; "
        "compile s = first call; sequence length dynamic on both sides" + (", batch dynamic for dynexec (compaction)" if batch > 1 else "")
    )
    return speedup


def ideal_speedup(batches: list[dict], layers: list[int], num_blocks: int) -> float:
    """Speed-up if blocks were all that cost, each in proportion to its call's sequence length.

    Harder sentences tend to be longer and run more blocks, so ``num_blocks / mean layers``
    overstates what leaving early can save; weighting each sample by the padded length of
    the call it ran in (its own length at batch 1) does not.
    """
    lengths = [b["input_ids"].shape[1] for b in batches for _ in range(b["input_ids"].shape[0])]
    return num_blocks * sum(lengths) / sum(n * w for n, w in zip(layers, lengths))


def goals(result: SuiteResult, best, full: float) -> None:
    drop = 100 * (full - best.accuracy)
    checks = [
        (f"layer reduction {best.layer_reduction:.2f}x >= {GOALS['layer_reduction']}x", best.layer_reduction >= GOALS["layer_reduction"]),
        (f"accuracy drop {drop:.2f} points <= {GOALS['max_drop_points']}", drop <= GOALS["max_drop_points"]),
    ]
    for batch in (1, 32):
        value = result.metrics[f"speedup_batch{batch}"].value
        goal = GOALS[f"speedup_batch{batch}"]
        checks.append((f"wall-clock batch {batch} {value:.2f}x >= {goal}x", value >= goal))
    result.notes += [f"goal {'met' if ok else 'NOT met'}: {text}" for text, ok in checks]


def plot(path: Path, scores: dict[str, ExitScores], calibrated: dict, full: float, best, speedups: dict[int, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    styles = {"trained": "-", "shared": ":"}
    colors = {"entropy": "tab:blue", "max_prob": "tab:orange", "patience": "tab:green"}
    for heads, s in scores.items():
        for rule in RULES:
            points = s.replay(rule, s.candidates(rule))
            marker = "o" if rule == "patience" else None
            ax.plot([p.mean_layers for p in points], [100 * p.accuracy for p in points], styles[heads],
                    marker=marker, color=colors[rule], label=f"{heads} heads, {rule}", linewidth=1.2, markersize=4)
    for (heads, rule), cal in calibrated.items():
        ax.plot(cal.mean_layers, 100 * cal.accuracy, "*", color=colors[rule], markersize=12 if heads == "trained" else 8,
                markeredgecolor="black")
    ax.axhline(100 * full, color="gray", linewidth=0.8)
    ax.axhline(100 * full - 1, color="gray", linewidth=0.8, linestyle="--")
    ax.text(1.02, 100 * full - 0.9, "full model - 1 point", fontsize=8, color="gray")
    n = scores["trained"].num_blocks
    ax.set_xlim(1, n)
    ax.set_ylim(max(45, 100 * full - 20), 100 * full + 2)
    ax.set_xlabel(f"blocks run per sample (of {n})")
    ax.set_ylabel("SST-2 validation accuracy (%)")
    two_classes = scores["trained"].exit_logits.shape[-1] == 2
    ax.set_title(
        f"Early exit, MiniLM-L6 on SST-2 ({scores['trained'].num_samples} validation sentences). Stars: calibrated keep={KEEP}.\n"
        f"Timed ({best.rule}, trained): {best.layer_reduction:.2f}x fewer blocks, "
        f"wall-clock {speedups[1]:.2f}x (batch 1), {speedups[32]:.2f}x (batch 32)"
        + ("\nTwo classes: entropy and max_prob rank samples alike, so their curves coincide." if two_classes else ""),
        fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> SuiteResult:
    result = SuiteResult("early_exit")
    if args.quick:
        with torch.no_grad():
            run_quick(result)
        return result
    plot_path = Path(args.out or "runs/bench-early_exit.json").with_suffix(".png")
    run_full(result, args, plot_path)
    result.notes.append(f"plot written to {plot_path}")
    return result
