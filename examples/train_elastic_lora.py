"""Train one LoRA per elastic level of the SST-2 classifier and write the artifact.

One command (re)generates ``models/minilm-sst2-elastic/`` (loaded with
``dynexec_compile.demo_models.load_sst2_elastic``); run from the repository root, one level
per run to fit a ~30-40 minute CPU budget (1 thread):

    nohup taskset -c 0 env OMP_NUM_THREADS=1 python examples/train_elastic_lora.py --levels 0.5 > runs/lora-0.5.log 2>&1 &

Steps:
 1. The fine-tuned MiniLM-L6 SST-2 classifier (``load_sst2_classifier``), reordered by Taylor
    importance on 256 SST-2 training sentences, as ``dynexec bench elastic`` does; the order is
    written to ``plan.json`` the first time and re-applied from it afterwards
    (``apply_plan``), so every level's LoRA is trained on the same order.
 2. Per level: a :class:`~dynexec_compile.elastic.LevelLoRA` (rank ``--rank`` on every
    projection the level slices, ``B = 0`` at the start) trained with the backbone frozen on
    ``--train-size`` SST-2 training sentences disjoint from the calibration ones: KL to the
    full model's predictions plus the labels' cross-entropy (``distillation_loss``).
 3. Saved (safetensors, config as JSON metadata), reloaded with the public loader, and
    evaluated on the 872 validation sentences with and without the LoRA (fp32, eager
    ``elastic_forward``); ``metrics.json`` and the model card ``README.md`` are rewritten from
    every level's measured figures.

``--measure N`` times N training steps and projects the run, to size ``--train-size``.
"""

from __future__ import annotations

import argparse
import functools
import json
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
    ELASTIC_PLAN_FILE,
    SST2_ELASTIC_DIR,
    classifier_accuracy,
    load_sst2_classifier,
)
from dynexec_compile.elastic import (
    LevelLoRA,
    apply_plan,
    distillation_loss,
    elastic_forward,
    plan_to_dict,
    reorder_by_importance,
    train_level_lora,
)

CALIB_SIZE = 256  # as dynexec bench elastic


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 * rank)")
    parser.add_argument("--targets", default="blocks", help="'blocks', 'all-linear' or comma-separated module names")
    parser.add_argument("--train-size", type=int, default=16000, help="SST-2 training sentences per level")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--temperature", type=float, default=2.0, help="distillation temperature")
    parser.add_argument("--label-weight", type=float, default=0.5, help="weight of the labels' cross-entropy")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--data-dir", default=None, help="folder holding sst2/{train,validation}.tsv")
    parser.add_argument("--out", default=str(SST2_ELASTIC_DIR))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--measure", type=int, default=0, help="only time this many training steps")
    return parser.parse_args()


def reordered_model(out: Path, tokenizer, train: list, args: argparse.Namespace) -> torch.nn.Module:
    """The classifier in the artifact's order (``plan.json``), computing it on first use."""
    model, _ = load_sst2_classifier()
    plan_path = out / ELASTIC_PLAN_FILE
    if plan_path.is_file():
        apply_plan(model, json.loads(plan_path.read_text()))
        print(f"order from {plan_path}", flush=True)
        return model
    calib = [
        {**b} for b in sst2_dataloader(tokenizer, train[:CALIB_SIZE], 32, args.max_length)
    ]
    plan = reorder_by_importance(model, calib, method="taylor")
    plan_path.write_text(json.dumps(plan_to_dict(plan)))
    print(f"Taylor importance on {CALIB_SIZE} training sentences -> {plan_path}", flush=True)
    return model


def level_accuracy(model, level: float, loader, lora: LevelLoRA | None) -> float:
    def run(**batch):
        return elastic_forward(model, level, kwargs=batch, lora=lora)

    return classifier_accuracy(run, loader)


def model_card(metrics: dict) -> str:
    rows = "\n".join(
        f"| {lv} | {m['accuracy_without_lora'] * 100:.2f} | **{m['accuracy_with_lora'] * 100:.2f}** | "
        f"{m['lora_parameters']:,} ({m['file_bytes'] / 2**20:.2f} MB) | {m['train_sentences']:,} x {m['epochs']} | "
        f"{m['cpu_minutes']:.1f} | `{m['command']}` |"
        for lv, m in sorted(metrics["levels"].items(), key=lambda kv: -float(kv[0]))
    )
    return f"""# Per-level LoRAs for the elastic MiniLM-L6 SST-2 classifier

Load with `model, tokenizer, loras = dynexec_compile.demo_models.load_sst2_elastic()` and serve
each LoRA with its level: `dx.elastic.attach_level_loras(model, loras.values())`, then
`torch.compile(model, backend="dynexec", options={{"elastic": {{"levels": [1.0, 0.5, 0.25]}}}})`.

- Backbone: the fine-tuned classifier of `models/minilm-sst2/`, reordered by Taylor importance
  on {metrics['calib_sentences']} SST-2 training sentences (`plan.json`, applied with
  `apply_plan`; plan fingerprint `{metrics['plan_id']}`). No anchor blocks. Every level is a
  prefix view of the one set of weights; the LoRA tensors are the only added storage.
- One `LevelLoRA` per level: rank {metrics['rank']}, alpha {metrics['alpha']}, on every projection
  the level slices (Q, K, V, attention output, intermediate, output of all 6 blocks), `B = 0` at
  the start. Trained with the backbone frozen, on SST-2 training sentences disjoint from the
  calibration ones: KL to the full model's predictions (temperature {metrics['temperature']})
  plus {metrics['label_weight']} x the labels' cross-entropy; AdamW lr {metrics['lr']}, batch
  {metrics['batch_size']}, 6% warm-up then linear decay; 1 CPU thread ({metrics['machine']}).
- Saved in fp32 safetensors with the configuration as JSON metadata (`level_<r>.safetensors`).

## SST-2 validation accuracy (872 sentences, %), reloaded files, fp32

Full model (level 1.0): **{metrics['full_accuracy'] * 100:.2f}**.

| level | without LoRA | with LoRA | LoRA parameters (file) | training sentences x epochs | CPU minutes | command |
|---|---:|---:|---|---|---:|---|
{rows}
"""


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train = load_sst2("train", args.data_dir)
    random.Random(0).shuffle(train)  # the first CALIB_SIZE are the calibration sentences
    validation = load_sst2("validation", args.data_dir)
    _, tokenizer = load_sst2_classifier()
    model = reordered_model(out, tokenizer, train, args)
    pool = train[CALIB_SIZE:]
    val_loader = sst2_dataloader(tokenizer, validation, 64, args.max_length)
    targets = args.targets if args.targets in ("blocks", "all-linear") else args.targets.split(",")
    loss_fn = functools.partial(distillation_loss, temperature=args.temperature, label_weight=args.label_weight)
    metrics_path = out / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {"levels": {}}
    metrics["full_accuracy"] = metrics.get("full_accuracy") or classifier_accuracy(model, val_loader)
    for level in args.levels:
        rows = random.Random(args.seed).sample(pool, min(args.train_size, len(pool)))
        loader = sst2_dataloader(
            tokenizer, rows, args.batch_size, args.max_length, shuffle=True, group_by_length=True, seed=args.seed
        )
        lora = LevelLoRA.create(model, level, rank=args.rank, alpha=args.alpha, targets=targets, seed=args.seed)
        if args.measure:
            run = train_level_lora(model, lora, loader, lr=args.lr, max_steps=args.measure, loss_fn=loss_fn)
            per_step = run.cpu_seconds / run.steps
            print(f"level {level}: {per_step:.3f} CPU s/step; {len(loader)} steps/epoch -> "
                  f"{per_step * len(loader) * args.epochs / 60:.1f} CPU min", flush=True)
            continue
        without = level_accuracy(model, level, val_loader, None)
        print(f"level {level}: {without:.4f} without LoRA; training on {len(rows)} sentences", flush=True)
        run = train_level_lora(model, lora, loader, epochs=args.epochs, lr=args.lr, loss_fn=loss_fn)
        path = out / f"level_{level}.safetensors"
        lora.save(path)
        reloaded = LevelLoRA.load(path, model)
        with_lora = level_accuracy(model, level, val_loader, reloaded)
        print(f"level {level}: {with_lora:.4f} with LoRA ({run.cpu_seconds / 60:.1f} CPU min)", flush=True)
        metrics["levels"][str(level)] = {
            "accuracy_without_lora": without,
            "accuracy_with_lora": with_lora,
            "lora_parameters": sum(t.numel() for t in lora.tensors()),
            "file_bytes": path.stat().st_size,
            "train_sentences": len(rows),
            "epochs": args.epochs,
            "steps": run.steps,
            "final_loss": run.final_loss,
            "cpu_minutes": run.cpu_seconds / 60,
            "wall_minutes": run.seconds / 60,
            "command": "python examples/train_elastic_lora.py " + shlex.join(sys.argv[1:]),
        }
        metrics.update(
            plan_id=lora.plan_id, rank=args.rank, alpha=lora.alpha, temperature=args.temperature,
            label_weight=args.label_weight, lr=args.lr, batch_size=args.batch_size,
            calib_sentences=CALIB_SIZE, machine=f"{platform.machine()}, torch {torch.__version__}",
        )
        metrics_path.write_text(json.dumps(metrics, indent=1))
        (out / "README.md").write_text(model_card(metrics))


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"done in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
