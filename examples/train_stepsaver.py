"""Train StepSaver's digits pipeline, its quality classifier and its step predictor, on CPU.

Why: no pretrained diffusion model can be had offline, so StepSaver (a predicted number of
denoising steps per prompt) is shown on a small but real class-conditional diffusion model
trained here from scikit-learn's 8x8 digits (``dynexec_compile.stepsaver``; diffusers'
UNet2DModel, DDPMScheduler for training, DDIMScheduler for sampling).

Stages (``--stages``, default all, in this order; each reads what the earlier ones wrote):
- ``classifier``: the digit CNN of the quality metric, on a fixed 80% of the real images;
- ``unet``: the diffusion UNet (v-prediction loss, 10% of labels dropped to the null class for
  classifier-free guidance, EMA weights saved), its loss curve as ``loss_curve.png``;
- ``labels``: self-induced step labels (``induce_labels``: every training prompt and seed
  sampled at every count of the step grid, the fewest steps that stay within tolerance of the
  100-step image, the tolerance calibrated against the set-level quality criterion), saved as
  ``labels.safetensors``;
- ``predictor``: the step predictor fitted to those labels, its risk calibrated on them;
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
    STEP_GRID,
    TRAIN_GUIDANCE,
    StepLabels,
    calibrate_feature_tol,
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
    labels = induce_labels(pipeline, quality, prompts, args.label_draws, first_seed=0, grid=STEP_GRID, feature_tol=None)
    _, tol_table = calibrate_feature_tol(labels, quality)
    labels.save(out / "labels.safetensors")
    needed = labels.needed.float()
    per_guidance = {f"{g:g}": round(float(needed[labels.guidance == g].mean()), 3) for g in TRAIN_GUIDANCE}
    summary["labels"] = {
        "prompts": len(prompts), "draws_per_prompt": args.label_draws, "seeds": f"0..{len(labels.seeds) - 1}, one per image", "grid": list(STEP_GRID), "guidance": list(TRAIN_GUIDANCE),
        "prob_tol": labels.prob_tol, "feature_tol": labels.feature_tol, "feature_scale": labels.feature_scale,
        "feature_tol_calibration": tol_table,
        "mean_needed": float(needed.mean()), "mean_needed_per_guidance": per_guidance,
        "set_accuracy": labels.set_accuracy.tolist(), "set_frechet": labels.set_frechet.tolist(),
        "safe_steps": labels.safe_steps(), "cpu_seconds": cpu_seconds() - start,
    }
    print(f"labels: feature tolerance {labels.feature_tol} (calibrated); mean needed {needed.mean():.2f} steps; "
          f"per guidance {per_guidance}; safe static count {labels.safe_steps()}")


def stage_predictor(out: Path, summary: dict) -> None:
    pipeline = DigitsPipeline.from_pretrained(out)
    quality = DigitQuality.from_file(out / "classifier.safetensors")
    labels = StepLabels.load(out / "labels.safetensors")
    start = cpu_seconds()
    predictor, risk_table = train_predictor(pipeline, labels, quality)
    save_predictor(predictor, out / "predictor.safetensors")
    table = {f"{g:g}": predictor.predict([DigitPrompt(d, g) for d in range(10)]) for g in TRAIN_GUIDANCE}
    chosen = next(row for row in risk_table if row["risk"] == predictor.risk)
    summary["predictor"] = {**predictor.config(), "risk_calibration": risk_table, "training_set_at_risk": chosen,
                            "predicted_per_guidance_digits_0_to_9": table, "cpu_seconds": cpu_seconds() - start}
    print(f"predictor: risk {predictor.risk} (calibrated; training set: mean {chosen['mean_steps']:.2f} steps, "
          f"Fréchet {chosen['frechet']:.2f}); {table}")


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
        lines += [
            "",
            "## Self-induced step labels",
            f"- {lab['prompts']} prompts (digits 0-9 x guidance {lab['guidance']}) x {lab['seeds']} seeds, each sampled at",
            f"  {lab['grid']} DDIM steps.",
            f"- An image is good at n steps when the classifier's probability of its digit is at most {lab['prob_tol']} below",
            "  the same seed's 100-step image and its features lie within tol x "
            f"{lab['feature_scale']:.3f} (the median feature distance of two real images",
            "  of the same digit) of that image; its label is the fewest steps from which every larger grid count is good.",
            f"- tol = {lab['feature_tol']}, calibrated on these training images: the largest tolerance whose labels, each image",
            "  taken at its own label, still give a set that matches the 100-step set (accuracy at most 1 point lower,",
            "  Fréchet distance at most 10% higher: the criterion the benchmark judges by). The search:",
            "",
            "| tol | mean label | accuracy | Fréchet | matches 100 steps |",
            "|---|---|---|---|---|",
        ]
        ref = lab["set_frechet"][-1]
        lines += [f"| {r['feature_tol']} | {r['mean_label']:.2f} | {r['accuracy']:.4f} | {r['frechet']:.2f} | {'yes' if r['matches'] else 'no'} |"
                  for r in lab["feature_tol_calibration"]
                  if round(r["feature_tol"] * 40) % 4 == 0 or r["feature_tol"] == lab["feature_tol"] or not r["matches"]]
        lines += [
            "",
            f"- Mean label {lab['mean_needed']:.2f} steps; per guidance: {lab['mean_needed_per_guidance']}.",
            "- Set quality of the training images at each static count (100 steps: Fréchet "
            f"{ref:.2f}): " + ", ".join(f"{n}: {a:.3f} / {f:.2f}" for n, a, f in zip(lab["grid"], lab["set_accuracy"], lab["set_frechet"])) + ".",
            f"- Safe static count (smallest whose set accuracy and Fréchet distance match 100 steps): {lab['safe_steps']}.",
            f"- CPU time {lab['cpu_seconds'] / 60:.1f} min.",
        ]
    if pr:
        at = pr["training_set_at_risk"]
        lines += [
            "",
            "## Step predictor",
            f"- MLP (hidden {pr['hidden']}) over the UNet's class embedding of the digit and the guidance scale, giving a",
            "  distribution over the grid (cross-entropy to the labels of each prompt's seeds); a prompt runs with the fewest",
            f"  steps that are enough with probability >= 1 - risk. Trained over guidance {pr['guidance_range']}; falls back to",
            f"  {pr['safe_steps']} steps outside it.",
            f"- risk = {pr['risk']}, calibrated on the training images: the largest whose predicted counts keep the training",
            f"  set matching 100 steps (there: mean {at['mean_steps']:.2f} steps, accuracy {at['accuracy']:.4f}, Fréchet {at['frechet']:.2f}).",
            "  The search:",
            "",
            "| risk | mean steps | accuracy | Fréchet | matches 100 steps |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {r['risk']} | {r['mean_steps']:.2f} | {r['accuracy']:.4f} | {r['frechet']:.2f} | {'yes' if r['matches'] else 'no'} |"
                  for r in pr["risk_calibration"]]
        lines += [
            "",
            "- Predicted counts, digits 0-9, per guidance scale:",
            "",
            "| guidance | " + " | ".join(str(d) for d in range(10)) + " |",
            "|---|" + "---|" * 10,
        ]
        lines += [f"| {g} | " + " | ".join(str(n) for n in ns) + " |" for g, ns in pr["predicted_per_guidance_digits_0_to_9"].items()]
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
            stage_predictor(out, summary)
        elif stage == "card":
            write_card(out, summary)
        summary_path.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
