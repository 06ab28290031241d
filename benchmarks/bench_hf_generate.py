"""What the Hugging Face form costs: ``model.generate(custom_generate=dx.hf_generate)`` beside
``dx.generate`` and stock ``model.generate``, side by side in one process.

Why: the HF-habit form runs transformers' argument handling (generation config merge, mask and
length preparation) before dynexec's decoding; this measures whether that costs anything a user
would notice, and what the form gives against the stock call it replaces. Batch 1, held-out
prompts, greedy; one engine per strategy is compiled before timing (compile time reported
apart) and shared by both dynexec forms; medians of interleaved repeats; tokens checked equal.

Usage:
    python benchmarks/bench_hf_generate.py --threads 1 --out benchmarks/results/hf_generate.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import dynexec_compile as dx
from dynexec_compile.bench.common import environment, interleaved_medians, markdown_table
from dynexec_compile.models import heldout_prompts, load_lm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a local folder or a load_lm name (default: the demo target)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mode", default=None, help="torch.compile mode of dynexec's step")
    parser.add_argument("--no-compile", action="store_true", help="eager step (a smoke test of the script)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = dx.load_demo_lm() if args.model is None else load_lm(args.model)
    prompts = heldout_prompts(args.prompts, args.prompt_tokens, tok)
    n = args.new_tokens
    decoding = {"mode": args.mode, "compile": not args.no_compile}

    def hf(ids, **kw):
        return model.generate(input_ids=ids, max_new_tokens=n, do_sample=False, **kw)

    def hf_form(ids, **kw):
        return model.generate(input_ids=ids, max_new_tokens=n, custom_generate=dx.hf_generate, decoding=decoding, **kw)

    def direct(ids, strategy):
        return dx.generate(model, ids, strategy=strategy, max_new_tokens=n, mode=args.mode,
                           compile=not args.no_compile).sequences

    variants = {
        "HF greedy": lambda ids: hf(ids),
        "HF prompt lookup (k=2)": lambda ids: hf(ids, prompt_lookup_num_tokens=2),
        "hf_generate greedy": lambda ids: hf_form(ids),
        "dx.generate greedy": lambda ids: direct(ids, "greedy"),
        "hf_generate prompt_lookup_num_tokens=2": lambda ids: hf_form(ids, prompt_lookup_num_tokens=2),
        "dx.generate lookahead (ngram=3)": lambda ids: direct(ids, "lookahead"),
    }
    compile_s = {}
    for name in ("dx.generate greedy", "dx.generate lookahead (ngram=3)"):
        start = time.perf_counter()
        variants[name](prompts[:1])
        compile_s[name] = time.perf_counter() - start
    for i in range(prompts.shape[0]):  # every form gives the stock tokens
        ids = prompts[i : i + 1]
        ref = variants["HF greedy"](ids)
        for name, fn in variants.items():
            assert torch.equal(fn(ids), ref), f"{name} differs from HF greedy on prompt {i}"
    fns = {name: (lambda fn=fn: [fn(prompts[i : i + 1]) for i in range(prompts.shape[0])]) for name, fn in variants.items()}
    medians = interleaved_medians(fns, repeats=args.repeats, warmup=1, progress="hf_generate")
    tokens = n * prompts.shape[0]
    rows = []
    for name, seconds in medians.items():
        rows.append({
            "variant": name,
            "tokens/s": round(tokens / seconds, 1),
            "x HF greedy": round(medians["HF greedy"] / seconds, 2),
            "x its dx.generate form": round(
                medians["dx.generate lookahead (ngram=3)" if "lookup" in name and "hf_generate" in name
                        else "dx.generate greedy"] / seconds, 3
            ) if name.startswith("hf_generate") else "",
        })
    print(markdown_table(rows))
    print("first call (compilation included):", {k: round(v, 1) for k, v in compile_s.items()})
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"rows": rows, "medians_s": medians, "first_call_s": compile_s,
                                              "args": vars(args), "environment": environment()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
