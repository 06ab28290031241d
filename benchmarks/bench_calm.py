"""CALM's quality cost: layers per token against agreement with full greedy output and perplexity.

``strategy="calm"`` (token-level early exit, lossy) at several thresholds on the demo target
LM (``dynexec_compile.models.load_demo_lm("target")``) and held-out prompts
(``heldout_prompts``), next to self-speculative decoding (exact) at the same compute:

- mean decoder layers per generated token (after the first, which the prefill predicts),
  as token x layer evaluations and as sequential layer passes (the latency-bound count at
  batch 1: a self-speculative step runs its k draft passes of E layers, then one pass of L
  layers over all k + 1 tokens); CALM's propagation adds the skipped layers' key/value
  projections (2 of a LLaMA layer's 7 matmuls, at the K/V width), not counted;
- agreement with the full model's greedy continuation: the fraction of positions with the
  same token, and the common prefix as a fraction of the continuation;
- held-out perplexity of CALM's exits, teacher-forced on the files' real continuations
  (``calm_nll``); exact methods have the full model's;
- with ``--train-heads N``, CALM again with a trained exit LM head per layer
  (``train_exit_lm_head``, self-distilled for N steps on training text);
- self-speculative decoding (shared head, chains) at several exit layers and draft lengths:
  its output is the full model's (agreement 1, the full model's perplexity) at a compute of
  (draft + verification layer evaluations) / generated token, counted by the strategy.

Compute is counted in decoder-layer evaluations per token, not timed: CALM runs eagerly here
(a Python loop over the layers per token), so its wall-clock says nothing yet.

    python benchmarks/bench_calm.py --out benchmarks/results/calm.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import torch

import dynexec_compile as dx
from dynexec_compile.bench.common import markdown_table
from dynexec_compile.decoding.calm import calm_nll
from dynexec_compile.exit_heads import ExitHeads
from dynexec_compile.models import heldout_prompts, load_demo_lm

ROOT = Path(__file__).resolve().parents[1]


def trained_heads(model, tokenizer, steps: int, seed: int = 0) -> ExitHeads:
    """One ``train_exit_lm_head`` head per exit layer (blocks 0..L-2), on training (not
    held-out) stdlib text, merged into one ``ExitHeads``."""
    sys.path.insert(0, str(ROOT / "examples"))  # train_draft_heads imports its sibling train_code_lm
    spec = importlib.util.spec_from_file_location("train_draft_heads", ROOT / "examples" / "train_draft_heads.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    batch, seq_len = 8, 256
    stream = module.training_stream(tokenizer, steps * batch * seq_len, seed)
    layers = model.config.num_hidden_layers
    merged = None
    for exit_layer in range(1, layers):
        one = dx.train_exit_lm_head(model, stream, exit_layer, steps=steps, batch_size=batch, seq_len=seq_len)
        if merged is None:
            merged = ExitHeads(range(layers - 1), one.hidden_size, one.num_labels, one.kind, dropout=0.0, eps=one.eps)
        merged.head(exit_layer - 1).load_state_dict(one.head(exit_layer - 1).state_dict())
    return merged.eval()


def agreement(a: list[int], b: list[int]) -> tuple[float, float]:
    same = sum(x == y for x, y in zip(a, b)) / len(b)
    prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(b))
    return same, prefix / len(b)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--thresholds", type=float, nargs="+", default=[1.0, 0.95, 0.9, 0.8, 0.6, 0.4])
    p.add_argument("--self-spec", nargs="+", default=["1:2", "2:2", "2:4", "4:4", "6:2"],
                   help="exit_layer:num_draft pairs for self-speculative decoding")
    p.add_argument("--train-heads", type=int, default=0,
                   help="also run CALM with trained exit heads, each trained for this many steps (0: shared only)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_demo_lm("target")
    num_layers = model.config.num_hidden_layers
    texts = heldout_prompts(args.prompts, args.prompt_tokens + args.new_tokens, tokenizer)  # [P, n + m]
    prompts = texts[:, : args.prompt_tokens]
    common = dict(compile=False, max_new_tokens=args.new_tokens, eos_token_id=[])
    started = time.perf_counter()
    full = [dx.generate(model, prompts[i : i + 1], None, strategy="greedy", **common).sequences[0, args.prompt_tokens:].tolist()
            for i in range(len(prompts))]
    rows = []
    variants = {"calm, shared head (lossy)": None}
    if args.train_heads:
        start = time.perf_counter()
        variants[f"calm, trained heads (lossy; {args.train_heads} steps each)"] = trained_heads(model, tokenizer, args.train_heads)
        print(f"trained {num_layers - 1} exit heads in {time.perf_counter() - start:.0f} s", flush=True)
    for method, heads in variants.items():
        for threshold in args.thresholds:
            layers, same, prefix, nll = [], [], [], []
            for i in range(len(prompts)):
                out = dx.generate(model, prompts[i : i + 1], None, strategy="calm", threshold=threshold, lossy=True,
                                  exit_heads=heads, **common)
                layers += out.stats.extra["layers_per_token"]
                s, f = agreement(out.sequences[0, args.prompt_tokens:].tolist(), full[i])
                same.append(s)
                prefix.append(f)
                nll += calm_nll(model, texts[i : i + 1], args.prompt_tokens, threshold, heads)[0]
            mean = sum(layers) / len(layers)
            rows.append({
                "method": method, "setting": f"threshold {threshold}",
                "layers/token": mean, "sequential layers/token": mean,
                "agreement (tokens)": sum(same) / len(same), "agreement (prefix)": sum(prefix) / len(prefix),
                "held-out ppl": math.exp(sum(nll) / len(nll)),
            })
            print(rows[-1], flush=True)
    with torch.no_grad():  # the full model's held-out perplexity (what every exact method has)
        logits = model(texts).logits[:, args.prompt_tokens - 1 : -1].float()  # [P, m, V]
        full_ppl = math.exp(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), texts[:, args.prompt_tokens:].reshape(-1)).item())
    for pair in args.self_spec:
        exit_layer, k = (int(x) for x in pair.split(":"))
        evals = tokens = sequential = 0
        for i in range(len(prompts)):
            out = dx.generate(model, prompts[i : i + 1], None, strategy="self_speculative", exit_layer=exit_layer,
                              num_draft=k, **common)
            assert out.sequences[0, args.prompt_tokens:].tolist() == full[i], "self-speculation must be exact"
            extra = out.stats.extra
            evals += extra["draft_layer_evals"] + extra["target_layer_evals"]
            sequential += out.stats.steps * (k * exit_layer + num_layers)  # k draft passes, then one of L layers
            tokens += out.stats.new_tokens[0] - 1  # the first token is the prefill's
        rows.append({
            "method": "self_speculative (exact)", "setting": f"exit_layer {exit_layer}, k={k}",
            "layers/token": evals / tokens, "sequential layers/token": sequential / tokens, "agreement (tokens)": 1.0, "agreement (prefix)": 1.0,
            "held-out ppl": full_ppl,
        })
        print(rows[-1], flush=True)
    print(f"\ndemo target LM ({num_layers} layers), {len(prompts)} held-out prompts of {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new tokens, greedy, fp32, {torch.get_num_threads()} thread(s), "
          f"{time.perf_counter() - started:.0f} s\n")
    print(markdown_table(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "num_layers": num_layers, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
