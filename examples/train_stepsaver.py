"""Train StepSaver's digits pipeline, its quality classifier and its step predictor, on CPU.

Why: no pretrained diffusion model can be had offline, so StepSaver (a predicted number of
denoising steps per prompt) is shown on a small but real class-conditional diffusion model
trained here from scikit-learn's 8x8 digits (``dynexec_compile.stepsaver``; diffusers'
UNet2DModel, DDPMScheduler for training, DDIMScheduler for sampling).

Stages (``--stages``, default all, in this order; each reads what the earlier ones wrote):
- ``classifier``: the digit CNN of the quality metric, on a fixed 80% of the real images;
- ``unet``: the diffusion UNet (v-prediction loss, 10% of labels dropped to the null class for
  classifier-free guidance, EMA weights saved), its loss curve as ``loss_curve.png``;
- ``labels``: self-induced records (``induce_labels``: every training prompt drawn 20 times, each
  image from its own seed, sampled at every count of the step grid; the classifier's verdict and
  features per image and count), saved as ``labels.safetensors``;
- ``predictor``: the step predictor (``assign_steps``: per prompt, the fewest steps that keep the
  training set matching the 100-step set, with a margin), saved as ``predictor.safetensors``;
- ``card``: the model card ``README.md`` (command, CPU times, figures).

Regenerate everything (about 20 minutes on one CPU core; hold the shared lock):

    nohup flock /tmp/dynexec-core0.lock taskset -c 0 python examples/train_stepsaver.py --threads 1 > runs/train_stepsaver.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dynexec_compile.stepsaver.pipeline import (
    DigitPrompt,
    DigitsPipeline,
    build_unet,
    training_scheduler,
)
from dynexec_compile.stepsaver.predictor import (
    MARGIN,
    STEP_GRID,
    TRAIN_GUIDANCE,
    StepLabels,
    induce_labels,
    save_predictor,
    train_predictor,
)
from dynexec_compile.stepsaver.quality import (
    DigitQuality,
    classifier_split,
    real_digits,
    save_classifier,
    train_classifier,
)

ALL_STAGES = ("classifier", "unet", "labels", "predictor", "card")


def cpu_seconds() -> float:
    return time.process_time()


def stage_classifier(out: Path, summary: dict) -> None:
    images, digits = real_digits()
    train, held = classifier_split(len(images))
    start = cpu_seconds()
    model = train_classifier(images[train], digits[train])
    with torch.no_grad():
        acc = (model(images[held]).argmax(-1) == digits[held]).float().mean().item()
    save_classifier(model, out / "classifier.safetensors", acc)
    summary["classifier"] = {"heldout_accuracy": acc, "train_images": len(train), "heldout_images": len(held), "cpu_seconds": cpu_seconds() - start}
    print(f"classifier: held-out accuracy {acc:.4f} on {len(held)} real images")


def stage_unet(out: Path, summary: dict, args: argparse.Namespace) -> None:
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    torch.manual_seed(args.seed)
    images, digits = real_digits()  # images: [N, 1, 8, 8]
    unet = build_unet().train()
    noise_scheduler = training_scheduler()
    ema = EMAModel(unet.parameters(), decay=args.ema_decay, use_ema_warmup=True)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=1e-4)
    lr_schedule = get_cosine_schedule_with_warmup(opt, 200, args.steps)
    g = torch.Generator().manual_seed(args.seed)
    losses = []
    start_cpu, start_wall = cpu_seconds(), time.perf_counter()
    bar = tqdm(range(args.steps), desc="unet", mininterval=5)
    for step in bar:
        idx = torch.randint(0, len(images), (args.batch_size,), generator=g)
        x0 = images[idx]
        labels = digits[idx].clone()
        labels[torch.rand(len(idx), generator=g) < args.label_dropout] = 10  # the null class: unconditional
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=g)
        xt = noise_scheduler.add_noise(x0, noise, t)
        target = noise_scheduler.get_velocity(x0, noise, t)  # v-prediction: see the pipeline's docstring
        loss = torch.nn.functional.mse_loss(unet(xt, t, class_labels=labels).sample, target)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_schedule.step()
        ema.step(unet.parameters())
        losses.append(loss.item())
        if step % 100 == 0:
            bar.set_postfix(loss=f"{sum(losses[-100:]) / len(losses[-100:]):.4f}")
    ema.copy_to(unet.parameters())
    pipeline = DigitsPipeline(unet.eval())
    pipeline.save_pretrained(out)
    params = sum(p.numel() for p in unet.parameters())
    window = 100
    smoothed = [sum(losses[i : i + window]) / window for i in range(0, len(losses) - window + 1, window)]
    summary["unet"] = {
        "params": params, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "ema_decay": args.ema_decay,
        "label_dropout": args.label_dropout, "final_loss_last_500": sum(losses[-500:]) / len(losses[-500:]),
        "cpu_seconds": cpu_seconds() - start_cpu, "wall_seconds": time.perf_counter() - start_wall,
        "loss_per_100_steps": smoothed,
    }
    plot_loss(out / "loss_curve.png", smoothed, window)
    print(f"unet: {params:,} parameters, final loss {summary['unet']['final_loss_last_500']:.4f}")


def stage_labels(out: Path, summary: dict, args: argparse.Namespace) -> None:
    pipeline = DigitsPipeline.from_pretrained(out)
    quality = DigitQuality.from_file(out / "classifier.safetensors")
    prompts = [DigitPrompt(d, g) for d in range(10) for g in TRAIN_GUIDANCE]
    start = cpu_seconds()
    labels = induce_labels(pipeline, quality, prompts, args.label_draws, first_seed=0, grid=STEP_GRID)
    labels.save(out / "labels.safetensors")
    summary["labels"] = {
        "command": summary["command"], "prompts": len(prompts), "draws_per_prompt": args.label_draws, "seeds": f"0..{len(labels.seeds) - 1}, one per image",
        "grid": list(STEP_GRID), "guidance": list(TRAIN_GUIDANCE),
        "set_accuracy": labels.set_accuracy.tolist(), "set_frechet": labels.set_frechet.tolist(),
        "safe_steps": labels.safe_steps(), "cpu_seconds": cpu_seconds() - start,
    }
    print(f"labels: {len(labels.digits)} images; safe static count {labels.safe_steps()}; set Fréchet per count "
          + ", ".join(f"{n}: {f:.2f}" for n, f in zip(labels.grid, labels.set_frechet.tolist())))


def stage_predictor(out: Path, summary: dict, args: argparse.Namespace) -> None:
    quality = DigitQuality.from_file(out / "classifier.safetensors")
    labels = StepLabels.load(out / "labels.safetensors")
    start = cpu_seconds()
    predictor, report = train_predictor(labels, quality, margin=args.margin)
    save_predictor(predictor, out / "predictor.safetensors")
    table = {f"{g:g}": predictor.predict([DigitPrompt(d, g) for d in range(10)]) for g in TRAIN_GUIDANCE}
    mean = sum(sum(v) for v in table.values()) / (10 * len(table))
    summary["predictor"] = {"margin": args.margin, "safe_steps": predictor.safe_steps, "mean_steps_training_prompts": mean,
                            "training_set": {"accuracy": report.accuracy, "frechet": report.frechet},
                            "reference": {"accuracy": labels.reference().accuracy, "frechet": labels.reference().frechet},
                            "steps_per_guidance_digits_0_to_9": table, "cpu_seconds": cpu_seconds() - start}
    print(f"predictor: margin {args.margin}: mean {mean:.2f} steps over the training prompts; training set accuracy "
          f"{report.accuracy:.4f}, Fréchet {report.frechet:.2f} (100 steps: {labels.reference().frechet:.2f}); {table}")


def write_card(out: Path, summary: dict) -> None:
    c, u = summary["classifier"], summary["unet"]
    lab, pr = summary.get("labels"), summary.get("predictor")
    lines = [
        "# stepsaver-digits: a class-conditional diffusion model of 8x8 digits, its quality classifier and step predictor",
        "",
        "Trained on CPU by `examples/train_stepsaver.py` from scikit-learn's digits set (1,797 images, 8x8,",
        "scaled to [-1, 1]); used by `dynexec_compile.stepsaver` and `dynexec bench stepsaver`.",
        "",
        f"Command: `{summary['command']}` (torch threads: {summary['threads']}).",
        "",
        "## Files",
        "- `unet/` (diffusers `UNet2DModel`, safetensors) and `scheduler/` (`DDIMScheduler`, trailing timesteps):",
        "  load with `DigitsPipeline.from_pretrained(\"models/stepsaver-digits\")`.",
        "- `classifier.safetensors`: the digit CNN of the quality metric.",
        "- `labels.safetensors`: the self-induced step labels; `predictor.safetensors`: the step predictor.",
        "- `training_summary.json`: every figure below, machine-readable.",
        "",
        "## UNet",
        f"- {u['params']:,} parameters; 8x8 -> 4x4 -> 8x8, channels (32, 64), one ResNet block per level, class embedding",
        "  of 10 digits + a null class (classifier-free guidance).",
        f"- {u['steps']} AdamW steps, batch {u['batch_size']}, lr {u['lr']} (cosine, 200 warm-up), EMA {u['ema_decay']},",
        f"  labels dropped to the null class with p={u['label_dropout']}; diffusers `DDPMScheduler` (1000 steps, squaredcos_cap_v2,",
        "  v-prediction: why in `dynexec_compile/stepsaver/pipeline.py`).",
        f"- Final loss (mean of the last 500 steps): {u['final_loss_last_500']:.4f}.",
        f"- CPU time {u['cpu_seconds'] / 60:.1f} min (wall {u['wall_seconds'] / 60:.1f} min on a shared 2-core machine).",
        "",
        "![loss curve](loss_curve.png)",
        "",
        "## Classifier (the quality metric)",
        f"- Trained on {c['train_images']} real images, held-out accuracy {c['heldout_accuracy']:.4f} on {c['heldout_images']};",
        f"  CPU time {c['cpu_seconds']:.0f} s.",
    ]
    if lab:
        ref = lab["set_frechet"][-1]
        lines += [
            "",
            "## Self-induced records",
            f"- {lab['prompts']} prompts (digits 0-9 x guidance {lab['guidance']}) x {lab['draws_per_prompt']} draws, each image from",
            f"  its own noise seed ({lab['seeds']}), each sampled at {lab['grid']} DDIM steps; per image and count,",
            "  the classifier's verdict and features.",
            "- Set quality of the training images at each static count, accuracy / Fréchet (100 steps: Fréchet "
            f"{ref:.2f}): " + ", ".join(f"{n}: {a:.3f} / {f:.2f}" for n, a, f in zip(lab["grid"], lab["set_accuracy"], lab["set_frechet"])) + ".",
            "- Safe static count (smallest whose set accuracy and Fréchet distance match 100 steps: accuracy at most",
            f"  1 point lower, Fréchet at most 10% higher): {lab['safe_steps']}.",
            f"- CPU time {lab['cpu_seconds'] / 60:.1f} min" + (f" (`{lab['command']}`)." if lab.get("command") else "."),
        ]
    if pr:
        lines += [
            "",
            "## Step predictor",
            "- Per prompt, the fewest grid steps that keep the whole training set matching 100 steps, with the Fréchet",
            f"  tolerance narrowed by margin {pr['margin']} (`assign_steps`: every prompt starts at the safe count",
            f"  {pr['safe_steps']}; then, best first, the prompt whose next lower count saves the most image-steps per unit",
            "  of Fréchet distance moves down, while the set keeps matching).",
            f"  Training set at these counts: accuracy {pr['training_set']['accuracy']:.4f}, Fréchet {pr['training_set']['frechet']:.2f}",
            f"  (100 steps: {pr['reference']['accuracy']:.4f} / {pr['reference']['frechet']:.2f}); mean {pr['mean_steps_training_prompts']:.2f} steps.",
            "- A guidance scale between two trained ones takes the larger of their counts; outside the trained range, the",
            f"  safe count {pr['safe_steps']} with a warning.",
            "- Counts, digits 0-9, per guidance scale:",
            "",
            "| guidance | " + " | ".join(str(d) for d in range(10)) + " |",
            "|---|" + "---|" * 10,
        ]
        lines += [f"| {g} | " + " | ".join(str(n) for n in ns) + " |" for g, ns in pr["steps_per_guidance_digits_0_to_9"].items()]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def plot_loss(path: Path, smoothed: list[float], window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([window * (i + 1) for i in range(len(smoothed))], smoothed)
    ax.set_xlabel("step")
    ax.set_ylabel(f"v-prediction MSE (mean of {window} steps)")
    ax.set_yscale("log")
    ax.set_title("digits UNet training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="models/stepsaver-digits")
    p.add_argument("--stages", default=",".join(ALL_STAGES), help=f"comma-separated subset of {','.join(ALL_STAGES)}")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=4000, help="UNet optimizer steps")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--margin", type=float, default=MARGIN, help="share of the Fréchet tolerance the training set keeps in reserve")
    p.add_argument("--label-draws", type=int, default=20, help="images per training prompt for the step labels (each from its own seed)")
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(ALL_STAGES))
    if unknown:
        p.error(f"unknown stage(s) {unknown}; valid: {', '.join(ALL_STAGES)}")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "training_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary["command"] = "python examples/train_stepsaver.py " + " ".join(sys.argv[1:] if argv is None else argv)
    summary["threads"] = args.threads
    for stage in ALL_STAGES:
        if stage not in stages:
            continue
        if stage == "classifier":
            stage_classifier(out, summary)
        elif stage == "unet":
            stage_unet(out, summary, args)
        elif stage == "labels":
            stage_labels(out, summary, args)
        elif stage == "predictor":
            stage_predictor(out, summary, args)
        elif stage == "card":
            write_card(out, summary)
        summary_path.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
