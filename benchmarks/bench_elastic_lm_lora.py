"""Per-level LoRA recovery on a causal LM: SmolLM2-135M-Instruct at level 0.5, with and without
its LoRA, and the LoRA as the elastic self-draft's correction.

1. Reorder SmolLM2 by importance (the cached order of ``bench_elastic_self_draft.py``).
2. Distillation data: ``--train-prompts`` chat prompts of the train split followed by the
   model's own greedy answers (up to ``--new-tokens``): what a draft has to predict.
3. Train a :class:`~dynexec_compile.elastic.LevelLoRA` (rank ``--rank`` on every projection the
   level slices) with ``train_level_lora``: KL from the full model to the level, backbone frozen,
   batches of ``--batch`` sequences, at most ``--max-steps`` steps. Saved (bf16) to
   ``models/smollm2-135m-instruct/elastic/lora-<level>.safetensors``.
4. Perplexity (eager, fp32) of the full model, the level, the level + LoRA and the level of a
   *random* head/neuron order, on (a) held-out chat answers (benchmark-split prompts and the
   full model's greedy answers, answer tokens only) and (b) held-out stdlib code (64-token
   windows of the files held out of the demo LMs' training). Gap recovered =
   ``(ppl_level - ppl_level+LoRA) / (ppl_level - ppl_full)``, and on the log scale (mean NLL)
   ``log(ppl_level / ppl_level+LoRA) / log(ppl_level / ppl_full)``.

    python benchmarks/bench_elastic_lm_lora.py [--level 0.5 --rank 8 --train-prompts 96 --max-steps 100]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

import dynexec_compile as dx
from dynexec_compile.bench.common import markdown_table
from dynexec_compile.elastic import LevelLoRA, elastic_forward, random_importance, train_level_lora
from dynexec_compile.models import chat_prompts, dynexec_cache_dir, heldout_prompts, load_lm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_elastic_self_draft import LORA, importance  # noqa: E402  (one cached order for both)

OUT = Path(__file__).resolve().parent / "results" / "smollm2-elastic-lora"


def answered(model, tok, prompts, new_tokens: int) -> list[tuple[torch.Tensor, int]]:
    """``(prompt + greedy answer [L], prompt length)`` per prompt."""
    eos = tok.eos_token_id
    out = []
    for ids in prompts:
        seq = dx.generate(model, ids[None], max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=eos).sequences[0]
        out.append((seq, ids.numel()))
    return out


def cached_answers(model, tok, split: str, n: int, new_tokens: int) -> list[tuple[torch.Tensor, int]]:
    path = dynexec_cache_dir() / f"smollm2-chat-answers-{split}-{n}-{new_tokens}.json"
    if path.is_file():
        return [(torch.tensor(s), p) for s, p in json.loads(path.read_text())]
    data = answered(model, tok, chat_prompts(tok, n, split=split), new_tokens)
    path.write_text(json.dumps([(s.tolist(), p) for s, p in data]))
    return data


def batches_of(data: list[tuple[torch.Tensor, int]], size: int, pad: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches with an attention mask (the distillation loss averages over it)."""
    out = []
    for i in range(0, len(data) - size + 1, size):
        group = [s for s, _ in data[i : i + size]]
        width = max(len(s) for s in group)
        ids = torch.full((size, width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(group):
            ids[r, : len(s)], mask[r, : len(s)] = s, 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@torch.no_grad()
def perplexity(model, level: float, data: list[tuple[torch.Tensor, int]], lora=None) -> float:
    """exp(mean NLL) over the tokens after each sequence's prefix length."""
    nll, count = 0.0, 0
    for seq, start in data:
        ids = seq[None]
        kwargs = {"input_ids": ids}
        out = model(**kwargs) if level == 1.0 else elastic_forward(model, level, kwargs=kwargs, lora=lora)
        logp = torch.log_softmax(out.logits[0, start - 1 : -1].float(), -1)
        nll -= float(logp.gather(1, seq[start:, None]).sum())
        count += len(seq) - start
    return math.exp(nll / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--level", type=float, default=0.5)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--train-prompts", type=int, default=96)
    parser.add_argument("--eval-prompts", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tok = load_lm("smollm2-135m-instruct")
    eos = tok.eos_token_id
    scores = importance(model, tok, 24, args.new_tokens)
    random_model = copy.deepcopy(model)
    dx.reorder_by_importance(model, importance=scores)
    dx.reorder_by_importance(random_model, importance=random_importance(random_model, seed=0))

    chat_eval = cached_answers(model, tok, "bench", args.eval_prompts, args.new_tokens)
    code = heldout_prompts(16, 128, tok)
    code_eval = [(row, 64) for row in code]  # perplexity of the second half of each window
    path = LORA.with_name(LORA.name.format(level=args.level))
    training = None
    if path.is_file():
        lora = LevelLoRA.load(path, model)
        print(f"loaded {path}")
    else:
        train = cached_answers(model, tok, "train", args.train_prompts, args.new_tokens)
        lora = LevelLoRA.create(model, args.level, rank=args.rank)
        start = time.perf_counter()
        result = train_level_lora(model, lora, batches_of(train, args.batch, eos), epochs=args.epochs, lr=args.lr,
                                  max_steps=args.max_steps)
        training = {"steps": result.steps, "examples": result.examples, "final_loss": result.final_loss,
                    "seconds": time.perf_counter() - start, "cpu_seconds": result.cpu_seconds}
        print(training)
        path.parent.mkdir(parents=True, exist_ok=True)
        lora.save(path, dtype=torch.bfloat16)
        lora = LevelLoRA.load(path, model)  # what the benchmarks load: bf16 values, fp32 compute
    rows = []
    for name, data in (("held-out chat answers", chat_eval), ("held-out stdlib code", code_eval)):
        full = perplexity(model, 1.0, data)
        plain = perplexity(model, args.level, data)
        recovered = perplexity(model, args.level, data, lora)
        rand = perplexity(random_model, args.level, data)
        rows.append({"text": name, "tokens": sum(len(s) - p for s, p in data), "full": full,
                     f"level {args.level}": plain, f"level {args.level} + LoRA": recovered,
                     f"level {args.level}, random order": rand,
                     "gap recovered": (plain - recovered) / (plain - full),
                     "log-ppl gap recovered": math.log(plain / recovered) / math.log(plain / full)})
        print(rows[-1], flush=True)
    print(markdown_table(rows))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.with_suffix(".json").write_text(json.dumps({"args": vars(args), "training": training, "rows": rows,
                                                    "lora": str(path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path),
                                                    "lora_bytes_bf16": path.stat().st_size}, indent=1))
    OUT.with_suffix(".md").write_text(markdown_table(rows) + "\n")


if __name__ == "__main__":
    main()
