"""What a verification step of T tokens costs next to a 1-token step, on this machine.

Why: every multi-token strategy (lookahead, speculative, draft heads) wins only if a step
over ``T`` tokens costs much less than ``T`` one-token steps. On a GPU at batch 1 that holds
(the step streams the weights once, whatever ``T``); on a CPU whose small model sits in cache
the step can be bound by arithmetic already at ``T = 1``, and then each extra token costs
almost a full step. This measures, side by side in one process (round-robin, medians):

- ``DecodeEngine.step`` of the model (compiled as the strategies run it) for each ``T`` in
  ``--widths``, as a ratio to the 1-token ``DecodeEngine.decode`` — for each kernel of the
  linear layers in ``--kernels``, side by side: ``plain`` (``linear``: MKL), ``packed``
  (oneDNN-packed weights, the skinny kernel off) and ``skinny`` (the engine's default on an
  AVX2-only CPU: ``dynexec::skinny_linear`` up to ``skinny.MAX_ROWS`` (20) rows, packed weights beyond);
- the model's matmuls alone (one ``torch.mm`` per weight, ``T`` rows), the same ratios — so
  you can tell the GEMM library's scaling from dynexec's overhead;

and prints the break-even: a strategy needs more than ``cost(T) / cost(1)`` tokens per step
at width ``T`` to beat plain decoding.

Usage:
    python benchmarks/bench_verify_width.py --threads 1 [--mode max-autotune] [--model models/code-lm/target] [--kernels plain,packed,skinny] [--dtype bfloat16] [--out f.json]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch

from dynexec_compile.backends import packed
from dynexec_compile.backends.kernels import skinny
from dynexec_compile.bench.common import interleaved_medians, load_causal_lm
from dynexec_compile.decoding import DecodeEngine, chain_mask
from dynexec_compile.models import heldout_prompts, load_demo_lm


def matmul_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every 2-D weight a step multiplies by, as row-major ``[in, out]`` (the frozen layout)."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return [w.detach().t().contiguous() for w in weights]


def _skinny_off(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with ``dynexec::skinny_linear`` turned off while it runs."""

    def run() -> object:
        saved, packed._skinny = packed._skinny, lambda weight: False
        try:
            return fn()
        finally:
            packed._skinny = saved

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="local causal LM folder (default: the demo target)")
    parser.add_argument("--widths", default="1,2,3,4,5,8,16", help="step widths T")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mode", default=None, choices=["max-autotune"], help="torch.compile mode of the engine")
    parser.add_argument("--kernels", default="plain,packed,skinny",
                        help="kernels of the engines' linear layers, side by side: plain, packed, skinny")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the model's dtype")
    parser.add_argument("--out", default=None, help="JSON result path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_causal_lm(args.model) if args.model else load_demo_lm("target")
    model = model.to(getattr(torch, args.dtype))
    widths = [int(w) for w in args.widths.split(",")]
    prompt = heldout_prompts(1, 64, tokenizer)  # [1, 64]
    kernels = args.kernels.split(",")
    unknown = sorted(set(kernels) - {"plain", "packed", "skinny"})
    if unknown:
        raise SystemExit(f"--kernels {args.kernels!r}: unknown {unknown}; choose from plain, packed, skinny")
    if "skinny" in kernels and not skinny.available():
        raise SystemExit("dynexec::skinny_linear is not used on this CPU (not AVX2-only, or not buildable): drop it from --kernels")
    engines = {}
    for kernel in kernels:
        engine = DecodeEngine(model, 1, 64 + max(widths) + 8, mode=args.mode, packed=kernel != "plain")
        engine.prefill(prompt)
        engines[kernel] = engine
        print(f"engine {kernel}: {engine.compile_settings}")

    def step_fn(engine: DecodeEngine, width: int) -> Callable[[], object]:
        length = int(engine.lengths[0])
        positions = (length + torch.arange(width))[None]  # [1, T]
        mask = chain_mask(positions, engine.max_len, engine.cache.dtype)
        ids = prompt[:, :width]
        return lambda: engine.step(ids, positions, mask, positions)

    def decode_fn(engine: DecodeEngine) -> Callable[[], object]:
        def decode() -> None:
            engine.decode(prompt[:, :1])
            engine.cache.lengths.sub_(1)  # stay at the same length: nothing accumulates

        return decode

    weights = matmul_weights(model)

    def mm_fn(width: int) -> Callable[[], object]:
        xs = [torch.randn(width, w.shape[0], dtype=w.dtype) for w in weights]
        return lambda: [torch.mm(x, w) for x, w in zip(xs, weights, strict=True)]

    fns: dict[str, Callable[[], object]] = {}
    for name, engine in engines.items():
        ours = {f"{name} decode": decode_fn(engine)} | {f"{name} step{w}": step_fn(engine, w) for w in widths}
        if name == "packed":  # the graph pass (at compile time) and the eager LM head see it off
            ours = {key: _skinny_off(fn) for key, fn in ours.items()}
        fns |= ours
    fns.update({f"mm{w}": mm_fn(w) for w in widths})
    med = interleaved_medians(fns, repeats=args.rounds, warmup=3)
    rows = []
    for w in widths:
        row = {"T": w}
        for name in engines:
            row[f"{name} step ms"] = 1e3 * med[f"{name} step{w}"]
            row[f"{name} step / decode"] = med[f"{name} step{w}"] / med[f"{name} decode"]
        for name in engines:
            if name != "plain" and "plain" in engines:
                row[f"{name} / plain"] = med[f"{name} step{w}"] / med[f"plain step{w}"]
        row["matmuls ms"] = 1e3 * med[f"mm{w}"]
        row["matmuls / matmuls(T=1)"] = med[f"mm{w}"] / med[f"mm{widths[0]}"]
        rows.append(row)
    decode_ms = {name: 1e3 * med[f"{name} decode"] for name in engines}
    print(f"decode (T=1) ms: {decode_ms}; {args.dtype}; mode={args.mode}; {args.threads} thread(s); "
          f"{sum(w.numel() for w in weights) / 1e6:.2f}M matmul weights")
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in columns) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"dtype": args.dtype, "decode_ms": decode_ms, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
