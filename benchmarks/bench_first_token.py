"""Seconds from a new process to dynexec's first generated token: cold (empty compile caches)
and warm (a new process reading the on-disk caches the cold one left).

Why: a serving process that compiles for minutes before its first token is not fast, whatever
its tokens/s. Regional compilation (one compiled decoder layer serves every layer) and the
caches of Inductor and AOTAutograd on disk are what keep this short; this measures both, each
in a fresh Python process (so nothing is cached in memory), with its own empty
``TORCHINDUCTOR_CACHE_DIR`` for the cold run.

Each child process loads the model (timed apart), then times ``dx.generate`` with
``max_new_tokens=1`` (prefill + the step graphs the strategy needs: the first token) and a
second call with ``--new-tokens`` (every width the strategy uses compiled by then).

Usage:
    python benchmarks/bench_first_token.py --model smollm2-135m-instruct --strategies greedy lookahead --out f.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STRATEGIES = {
    "greedy": {},
    "lookahead": {"window": 1, "ngram": 3, "guesses": 1},
}


def child(model_name: str, strategy: str, new_tokens: int, threads: int) -> dict:
    """Runs in the child process: load, first token, then a longer call; seconds of each."""
    import torch

    torch.set_num_threads(threads)
    import dynexec_compile as dx
    from dynexec_compile.models import chat_prompts, load_lm

    t0 = time.perf_counter()
    model, tok = load_lm(model_name)
    load_s = time.perf_counter() - t0
    ids = chat_prompts(tok, 2)[1][None]
    t0 = time.perf_counter()
    dx.generate(model, ids, strategy=strategy, max_new_tokens=1, **STRATEGIES[strategy])
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = dx.generate(model, ids, strategy=strategy, max_new_tokens=new_tokens, **STRATEGIES[strategy])
    rest_s = time.perf_counter() - t0
    return {"load_s": load_s, "first_token_s": first_s, "then_s": rest_s, "compiles": out.stats.compiles}


def run_child(args: argparse.Namespace, strategy: str, cache: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, __file__, "--child", strategy, "--model", args.model, "--new-tokens", str(args.new_tokens),
           "--threads", str(args.threads)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child process failed ({strategy}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.child, args.new_tokens, args.threads)))
        return
    rows = []
    for strategy in args.strategies:
        with tempfile.TemporaryDirectory(prefix="dynexec-inductor-") as cache:
            cold = run_child(args, strategy, cache)
            warm = run_child(args, strategy, cache)
        for kind, r in (("cold", cold), ("warm (on-disk caches)", warm)):
            rows.append({"strategy": strategy, "caches": kind, **{k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}})
            print(rows[-1], flush=True)
    print("| strategy | caches | model load s | first token s | then 1 call of", args.new_tokens, "tokens s | graphs compiled in that call |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['strategy']} | {r['caches']} | {r['load_s']} | {r['first_token_s']} | {r['then_s']} | {r['compiles']} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "threads": args.threads, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
