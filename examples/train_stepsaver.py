"""Train StepSaver's digits pipeline, its quality classifier and its step predictor, on CPU.

Why: no pretrained diffusion model can be had offline, so StepSaver (a predicted number of
denoising steps per prompt) is shown on a small but real class-conditional diffusion model
trained here from scikit-learn's 8x8 digits (``dynexec_compile.stepsaver``; diffusers'
UNet2DModel, DDPMScheduler for training, DDIMScheduler for sampling).

Stages (``--stages``, default all, in this order; each reads what the earlier ones wrote):
- ``classifier``: the digit CNN of the quality metric, on a fixed 80% of the real images;
- ``unet``: the diffusion UNet (epsilon loss, 10% of labels dropped to the null class for
  classifier-free guidance, EMA weights saved), its loss curve as ``loss_curve.png``;
- ``labels``: self-induced step labels (``induce_labels``: every training prompt and seed
  sampled at every count of the step grid, the fewest steps that stay within tolerance of the
  100-step image), saved as ``labels.safetensors``;
- ``predictor``: the step predictor fitted to those labels;
- ``card``: the model card ``README.md`` (command, CPU times, figures).

Regenerate everything (about 20 minutes on one CPU core pair; hold the shared lock):

    nohup flock /tmp/heavy.lock python examples/train_stepsaver.py --threads 2 > runs/train_stepsaver.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dynexec_compile.stepsaver.pipeline import DigitsPipeline, build_unet, training_scheduler
from dynexec_compile.stepsaver.quality import (
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
        loss = torch.nn.functional.mse_loss(unet(xt, t, class_labels=labels).sample, noise)
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


def plot_loss(path: Path, smoothed: list[float], window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([window * (i + 1) for i in range(len(smoothed))], smoothed)
    ax.set_xlabel("step")
    ax.set_ylabel(f"epsilon MSE (mean of {window} steps)")
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
        summary_path.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
