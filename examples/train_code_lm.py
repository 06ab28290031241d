"""Train the demo causal LMs (a LLaMA target and a small LLaMA draft) on CPython's stdlib source.

Why: dynexec's decoding strategies (lookahead, speculative, self-speculative, fast steps) only
show real speed-ups and acceptance rates on *trained* weights, and no machine here reaches a
model hub. CPython's standard library is always present, so this script builds a code corpus
from it, trains a byte-level BPE tokenizer and two LLaMA-architecture models sharing it, and
saves them as small bf16 safetensors that load with ``AutoModelForCausalLM.from_pretrained``.

Regenerate everything (about 60 minutes on 2 CPU cores; both models train at once, one
thread each):

    nohup nice -n 10 python examples/train_code_lm.py --out models/code-lm > train.log 2>&1 &

Corpus: every ``.py`` file under ``sysconfig.get_paths()["stdlib"]`` except
- ``site-packages`` / ``dist-packages`` (third-party code, differs per machine),
- ``test`` / ``tests`` / ``idle_test`` trees (17 MB, more than the rest together, full of
  deliberately odd code: bad syntax, encoding torture tests, huge data literals),
- ``encodings`` (machine-generated code-page tables) and ``pydoc_data`` (one 750 KB string).
A fixed 5% of the remaining files (the smallest SHA-256 of their relative paths) is held out
for evaluation and benchmark prompts and listed in ``<out>/heldout_files.txt``.

Outputs in ``--out``: ``target/`` and ``draft/`` (config, bf16 safetensors, generation config,
tokenizer files, ``loss_curve.png``, ``training_summary.json``), ``heldout_files.txt`` and a
model card ``README.md``. Intermediate files (token arrays) go to ``<out>/.work`` (git-ignored).

With ``--target-minutes``/``--draft-minutes`` the cosine learning-rate schedule is sized to a
wall-clock budget (the step count then depends on machine speed and is recorded in the model
card); ``--target-steps``/``--draft-steps`` give a step-based schedule for exact reruns.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

EOS = "<|endoftext|>"
EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings", "pydoc_data"}
)
HELDOUT_FRACTION = 0.05


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of one demo model (LLaMA; grouped-query attention when kv_heads < heads)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    lr: float
    batch: int  # sequences of --seq-len tokens per step


SPECS = {
    # Batch 4 at peak LR 2e-3 for the target: with batch 2 / 1.5e-3 a starved run (0.6 epochs)
    # ended worse than the draft.
    "target": ModelSpec(
        hidden=256, layers=8, heads=8, kv_heads=4, intermediate=688, lr=2e-3, batch=4
    ),
    "draft": ModelSpec(
        hidden=128, layers=3, heads=4, kv_heads=2, intermediate=384, lr=4e-3, batch=4
    ),
}


# ----------------------------------------------------------------------------- corpus


def stdlib_files(root: Path) -> list[str]:
    """Relative paths of the stdlib ``.py`` files used as corpus, sorted."""
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]):
            continue
        files.append(rel.as_posix())
    return sorted(files)


def split_heldout(files: list[str]) -> tuple[list[str], list[str]]:
    """(train, heldout): the heldout files are the 5% with the smallest SHA-256 of their path."""
    ranked = sorted(files, key=lambda f: hashlib.sha256(f.encode()).hexdigest())
    n_held = max(1, round(HELDOUT_FRACTION * len(files)))
    held = set(ranked[:n_held])
    return [f for f in files if f not in held], sorted(held)


def read_texts(root: Path, files: list[str]) -> list[str]:
    """File contents; files that are not valid UTF-8 are skipped (there are none in 3.11)."""
    texts = []
    for rel in files:
        try:
            texts.append((root / rel).read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            print(f"skipping non-UTF-8 file {rel}")
    return texts


# -------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style pre-tokenization keeps whitespace runs, so indentation
    merges into few tokens); ``<|endoftext|>`` is id 0 and separates files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def wrap_tokenizer(tok, max_length: int):
    """A transformers fast tokenizer around ``tok`` with EOS/BOS/PAD = ``<|endoftext|>``."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,
        pad_token=EOS,
        unk_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=max_length,
    )


def encode_corpus(hf_tok, texts: list[str]) -> torch.Tensor:
    """All texts as one token stream, each file followed by EOS. ids: [T] int32"""
    eos_id = hf_tok.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    for enc in hf_tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.int32)


def prepare(args: argparse.Namespace) -> None:
    """Corpus split, tokenizer and token streams into ``<out>/.work`` (+ heldout list)."""
    out, work = Path(args.out), Path(args.out) / ".work"
    work.mkdir(parents=True, exist_ok=True)
    (out / ".gitignore").write_text(".work/\n")
    root = Path(sysconfig.get_paths()["stdlib"])
    train_files, held_files = split_heldout(stdlib_files(root))
    (out / "heldout_files.txt").write_text("\n".join(held_files) + "\n")
    train_texts, held_texts = read_texts(root, train_files), read_texts(root, held_files)
    print(
        f"corpus: {len(train_files)} train files ({sum(map(len, train_texts)) / 1e6:.1f} MB), "
        f"{len(held_files)} held-out files ({sum(map(len, held_texts)) / 1e6:.2f} MB) from {root}"
    )
    hf_tok = wrap_tokenizer(train_tokenizer(train_texts, args.vocab_size), args.max_positions)
    hf_tok.save_pretrained(work / "tokenizer")
    train_ids, held_ids = encode_corpus(hf_tok, train_texts), encode_corpus(hf_tok, held_texts)
    save_file({"train": train_ids, "heldout": held_ids}, work / "tokens.safetensors")
    chars = sum(map(len, train_texts))
    print(
        f"tokens: {len(train_ids):,} train, {len(held_ids):,} held-out "
        f"({chars / len(train_ids):.2f} characters per token)"
    )
    (work / "corpus.json").write_text(
        json.dumps(
            {
                "stdlib": str(root),
                "python": sys.version.split()[0],
                "train_files": len(train_files),
                "heldout_files": len(held_files),
                "train_tokens": len(train_ids),
                "heldout_tokens": len(held_ids),
                "train_chars": chars,
            }
        )
    )


# --------------------------------------------------------------------------- training


def build_model(spec: ModelSpec, vocab_size: int, eos_id: int, max_positions: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        intermediate_size=spec.intermediate,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    return LlamaForCausalLM(config)


def eval_windows(held: torch.Tensor, seq_len: int, n: int) -> torch.Tensor:
    """A fixed held-out sample: ``n`` windows spread evenly over the held-out stream.
    returns: [n, seq_len + 1] int64"""
    starts = torch.linspace(0, len(held) - seq_len - 2, n).long()
    return torch.stack([held[s : s + seq_len + 1] for s in starts]).long()


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor, batch: int) -> float:
    """Mean next-token cross-entropy (nats) over the fixed held-out windows."""
    model.eval()
    total = 0.0
    for i in range(0, len(windows), batch):
        w = windows[i : i + batch]  # w: [b, S + 1]
        logits = model(input_ids=w[:, :-1]).logits  # logits: [b, S, V]
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum"
        )
        total += loss.item()
    model.train()
    return total / windows[:, 1:].numel()


def lr_at(progress: float, peak: float, warmup: float = 0.03, floor: float = 0.1) -> float:
    """Linear warm-up then cosine decay to ``floor * peak``; ``progress`` in [0, 1]."""
    if progress < warmup:
        return peak * progress / warmup
    p = min(1.0, (progress - warmup) / (1 - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def train(args: argparse.Namespace, which: str) -> None:
    """Train one model (``target`` or ``draft``) and save it with the tokenizer."""
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed + (0 if which == "target" else 1))
    work, dest = Path(args.out) / ".work", Path(args.out) / which
    if args.samples and not (Path(args.out) / "heldout_files.txt").is_file():  # fail now, not after training
        raise SystemExit(f"{Path(args.out) / 'heldout_files.txt'} is missing: run --stage prepare first (or --samples 0)")
    tok = AutoTokenizer.from_pretrained(work / "tokenizer")
    streams = load_file(work / "tokens.safetensors")
    train_ids, held = streams["train"].long(), streams["heldout"]
    spec = SPECS[which]
    if args.lr > 0:
        spec = replace(spec, lr=args.lr)
    model = build_model(spec, len(tok), tok.eos_token_id, args.max_positions)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[{which}] {n_params / 1e6:.2f}M parameters, {spec}")
    windows = eval_windows(held, args.seq_len, args.eval_windows)
    budget_s = 60 * (args.target_minutes if which == "target" else args.draft_minutes)
    max_steps = args.target_steps if which == "target" else args.draft_steps
    opt = torch.optim.AdamW(
        model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8
    )
    gen = torch.Generator().manual_seed(args.seed)
    log: dict[str, list] = {"train": [], "heldout": []}
    tokens_per_step = spec.batch * args.seq_len
    start = time.monotonic()
    next_eval = 0.0
    step = 0
    bar = tqdm(total=max_steps or int(budget_s), desc=which, unit="step" if max_steps else "s")
    while True:
        elapsed = time.monotonic() - start
        progress = step / max_steps if max_steps else elapsed / budget_s
        if progress >= 1.0:
            break
        if progress >= next_eval:
            loss = heldout_loss(model, windows, 4)
            log["heldout"].append((step * tokens_per_step, loss))
            tqdm.write(f"[{which}] step {step} heldout loss {loss:.3f} ppl {math.exp(loss):.2f}")
            next_eval += args.eval_every
        for group in opt.param_groups:
            group["lr"] = lr_at(progress, spec.lr)
        starts = torch.randint(0, len(train_ids) - args.seq_len - 1, (spec.batch,), generator=gen)
        batch = torch.stack([train_ids[s : s + args.seq_len + 1] for s in starts])  # [B, S+1]
        loss = _lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        log["train"].append((step * tokens_per_step, loss.item()))
        bar.update(1 if max_steps else int(time.monotonic() - start) - bar.n)
        bar.set_postfix(
            loss=f"{loss.item():.3f}",
            tok_s=f"{step * tokens_per_step / (time.monotonic() - start):.0f}",
        )
    bar.close()
    wall = time.monotonic() - start
    final = heldout_loss(model, windows, 4)
    log["heldout"].append((step * tokens_per_step, final))
    print(
        f"[{which}] done: {step} steps, {step * tokens_per_step:,} tokens, {wall / 60:.1f} min, "
        f"held-out loss {final:.3f} ppl {math.exp(final):.2f}"
    )
    summary = {
        "which": which,
        "parameters": n_params,
        "architecture": asdict(spec),
        "steps": step,
        "batch": spec.batch,
        "seq_len": args.seq_len,
        "train_tokens": step * tokens_per_step,
        "wall_clock_s": round(wall, 1),
        "cpu_s": round(time.process_time(), 1),  # < wall-clock when the CPU is shared
        "threads": args.threads,
        "heldout_loss": round(final, 4),
        "heldout_ppl": round(math.exp(final), 3),
        "heldout_eval_tokens": windows[:, 1:].numel(),
        "seed": args.seed,
    }
    save_model(model, tok, dest)  # the weights first: nothing after this can lose the run
    plot_losses(log, which, dest / "loss_curve.png")
    (dest / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    summary["samples"] = greedy_samples(model, tok, args)
    (dest / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for s in summary["samples"]:
        print(f"----- {s['file']}\n{s['prompt']}\033[1m{s['continuation']}\033[0m")


def _lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of ``batch`` ([B, S+1] ids)."""
    logits = model(input_ids=batch[:, :-1]).logits  # logits: [B, S, V]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


@torch.no_grad()
def greedy_samples(model, tok, args: argparse.Namespace) -> list[dict]:
    """Greedy continuations of the first held-out files' beginnings."""
    root = Path(sysconfig.get_paths()["stdlib"])
    held = (Path(args.out) / "heldout_files.txt").read_text().split()
    model.eval()
    samples = []
    for rel in held[: args.samples]:
        text = (root / rel).read_text(encoding="utf-8")[:4000]  # enough for the prompt
        ids = tok(text, return_tensors="pt")["input_ids"]
        prompt = ids[:, : args.sample_prompt_tokens]
        out = model.generate(
            prompt,
            max_new_tokens=args.sample_new_tokens,
            do_sample=False,
            attention_mask=torch.ones_like(prompt),
            pad_token_id=tok.eos_token_id,
        )
        samples.append(
            {
                "file": rel,
                "prompt": tok.decode(prompt[0]),
                "continuation": tok.decode(out[0, prompt.shape[1] :]),
            }
        )
    return samples


def save_model(model, tok, dest: Path) -> None:
    """bf16 safetensors + config + generation config + tokenizer, loadable on their own."""
    dest.mkdir(parents=True, exist_ok=True)
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    gc = model.generation_config
    gc.eos_token_id = gc.pad_token_id = gc.bos_token_id = tok.eos_token_id
    gc.do_sample = False
    model.save_pretrained(dest)
    tok.save_pretrained(dest)


def plot_losses(log: dict[str, list], which: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens, losses = zip(*log["train"], strict=True)
    window = max(1, len(losses) // 100)
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([t / 1e6 for t in tokens], smooth, label=f"train (moving mean of {window} steps)")
    ht, hl = zip(*log["heldout"], strict=True)
    ax.plot([t / 1e6 for t in ht], hl, "o-", label="held-out")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_ylim(top=min(9.0, max(hl) + 0.5))
    ax.set_title(f"demo code LM ({which}) on CPython stdlib")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -------------------------------------------------------------------------- model card


def _minutes(summary: dict) -> str:
    """Wall-clock minutes, with the CPU minutes actually received when they were recorded."""
    wall = f"{summary['wall_clock_s'] / 60:.1f} min"
    if "cpu_s" not in summary:
        return wall
    return f"{wall} ({summary['cpu_s'] / 60:.1f} min CPU)"


def write_card(args: argparse.Namespace) -> None:
    """``<out>/README.md`` from the corpus statistics and both training summaries."""
    out = Path(args.out)
    corpus = json.loads((out / ".work" / "corpus.json").read_text())
    s = {
        w: json.loads((out / w / "training_summary.json").read_text()) for w in ("target", "draft")
    }
    size_mb = sum(f.stat().st_size for w in s for f in (out / w).iterdir()) / 1e6
    rows = "\n".join(
        f"| {w} | {m['parameters'] / 1e6:.2f}M | {a['hidden']} | {a['layers']} | {a['heads']} | "
        f"{a['kv_heads']} | {a['intermediate']} | {m['steps']:,} | {m['train_tokens'] / 1e6:.2f}M | "
        f"{_minutes(m)} | {m['heldout_loss']:.3f} | {m['heldout_ppl']:.2f} |"
        for w, m in s.items()
        for a in [m["architecture"]]
    )
    sample = s["target"]["samples"][0]
    draft_sample = s["draft"]["samples"][0]
    card = f"""# Demo code LMs (target + draft) trained on CPython's standard library

Two LLaMA-architecture causal LMs sharing one byte-level BPE tokenizer (vocabulary
{args.vocab_size}, `<|endoftext|>` = id 0 is EOS/BOS/PAD and separates files), trained from scratch
on CPU by `examples/train_code_lm.py`. They exist so that dynexec's decoding strategies
(lookahead, speculative, self-speculative, fast decode steps) can be measured on trained
weights offline. They are small and undertrained by any standard: use them for speed and
acceptance measurements next to their perplexity, not as code assistants.

Load: `AutoModelForCausalLM.from_pretrained("models/code-lm/target")` (weights are bf16; call
`.float()` for exactness tests) or `dynexec_compile.models.load_demo_lm("target")`.

## Regenerate
From the repository root (needs `tokenizers`), with the committed runs' step counts:
```
nohup python examples/train_code_lm.py --out {args.out} --target-steps {s["target"]["steps"]} --draft-steps {s["draft"]["steps"]} > train.log 2>&1 &
```
This prepares the corpus and tokenizer, then trains both models at once, one thread each.
Fixed seeds ({args.seed}); the step-based cosine schedule reproduces the committed runs on
any machine; the CPU time each took is in the table below. Without `--*-steps` the schedule
is sized to a wall-clock budget (`--target-minutes`, `--draft-minutes`), so the step count
then depends on the machine's speed.

## Data
CPython {corpus["python"]} standard library (`{corpus["stdlib"]}`), `.py` files only, excluding
`site-packages`, `dist-packages`, `test`/`tests`/`idle_test` trees (deliberately odd code and
data, more than the rest together), `encodings` (generated code-page tables) and `pydoc_data`
(one 750 KB string). {corpus["train_files"]} training files ({corpus["train_tokens"]:,} tokens,
{corpus["train_chars"] / corpus["train_tokens"]:.2f} characters per token);
{corpus["heldout_files"]} held-out files ({corpus["heldout_tokens"]:,} tokens), the 5% of files with the
smallest SHA-256 of their relative path, listed in `heldout_files.txt`. Benchmarks take their
prompts from held-out files only (`dynexec_compile.models.heldout_prompts`).

## Models
Training: AdamW (betas 0.9/0.95, weight decay 0.1), peak LR target {SPECS["target"].lr} / draft
{SPECS["draft"].lr}, 3% warm-up then cosine to 10%, batch {SPECS["target"].batch} (target) / {SPECS["draft"].batch} (draft) x {args.seq_len} tokens (random
windows of the token stream), fp32 on CPU; saved as bf16 safetensors. RoPE, RMSNorm, SwiGLU,
tied embeddings, max positions {args.max_positions}. Held-out loss/perplexity on a fixed sample of
{s["target"]["heldout_eval_tokens"]:,} held-out tokens ({args.eval_windows} windows of {args.seq_len}), evaluated in fp32 before the
bf16 cast.

| model | params | hidden | layers | heads | KV heads | MLP | steps | tokens | wall-clock | held-out loss | held-out ppl |
|---|---|---|---|---|---|---|---|---|---|---|---|
{rows}

Total size of the two folders: {size_mb:.1f} MB. Loss curves: `target/loss_curve.png`,
`draft/loss_curve.png`.

## Sample greedy continuations (held-out file `{sample["file"]}`)
Prompt (first {args.sample_prompt_tokens} tokens):
```python
{sample["prompt"]}
```
Target continuation ({args.sample_new_tokens} tokens, greedy):
```python
{sample["continuation"]}
```
Draft continuation:
```python
{draft_sample["continuation"]}
```
More samples in each folder's `training_summary.json`.
"""
    (out / "README.md").write_text(card)
    print(f"wrote {out / 'README.md'}")


# ------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="models/code-lm", help="output folder")
    p.add_argument(
        "--stage",
        choices=["all", "prepare", "train", "card"],
        default="all",
        help="all = prepare, train both models at once (subprocesses), write card",
    )
    p.add_argument("--which", choices=["target", "draft"], help="model for --stage train")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=512, help="training context (tokens)")
    p.add_argument("--max-positions", type=int, default=2048)
    p.add_argument("--target-minutes", type=float, default=54.0)
    p.add_argument("--draft-minutes", type=float, default=33.0)
    p.add_argument("--target-steps", type=int, default=0, help="step-based schedule if > 0")
    p.add_argument("--draft-steps", type=int, default=0, help="step-based schedule if > 0")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    p.add_argument(
        "--lr", type=float, default=0.0, help="peak LR of the model trained (0: the spec's)"
    )
    p.add_argument("--eval-every", type=float, default=0.1, help="held-out eval every fraction")
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--sample-prompt-tokens", type=int, default=48)
    p.add_argument("--sample-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.stage == "train":
        if args.which is None:
            raise SystemExit("--stage train needs --which target|draft")
        train(args, args.which)
        return
    if args.stage in ("all", "prepare"):
        prepare(args)
    if args.stage == "all":
        base = [sys.executable, __file__, *(argv or sys.argv[1:])]
        procs = [
            subprocess.Popen([*base, "--stage", "train", "--which", w], env=os.environ.copy())
            for w in ("target", "draft")
        ]
        if any([proc.wait() != 0 for proc in procs]):
            raise SystemExit("training failed, see the log above")
    if args.stage in ("all", "card"):
        write_card(args)


if __name__ == "__main__":
    main()
