"""One pass over every weight matrix of a model with few rows: ``dynexec::skinny_linear`` against
what PyTorch runs otherwise, per weight format.

Why: a decoding step at batch 1 multiplies 1 to ~20 rows by every weight of the model, and once
the weights are far beyond the CPU's caches that pass is the step's floor. This times the pass
alone (no attention, no framework overhead), side by side in one process (interleaved rounds,
medians), for the formats the kernel serves:

- fp32: the kernel vs ``F.linear`` (MKL);
- bf16: the kernel vs ``F.linear`` in bf16;
- int8 weight-only (torchao's per-row format): the kernel on the int8 values vs torchao's
  product ``mm(x, q.t().to(x.dtype)) * scale``.

Usage:
    python benchmarks/bench_skinny_pass.py --model smollm2-135m-instruct --threads 1 [--rows 1,2,3,5,8] [--out f.json]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from dynexec_compile.backends.kernels import skinny
from dynexec_compile.bench.common import interleaved_medians, load_causal_lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="local causal LM folder or a name load_lm knows")
    parser.add_argument("--rows", default="1,2,3,5,8")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="JSON result path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not skinny.load():
        raise SystemExit("dynexec::skinny_linear could not be built here (needs AVX2 and a C++ compiler; see the log)")
    model, _ = load_causal_lm(args.model)
    fp32 = [m.weight.detach().contiguous() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    bf16 = [w.bfloat16() for w in fp32]
    scales = [w.abs().amax(dim=1).clamp(min=1e-8) / 127 for w in fp32]  # per row, symmetric (torchao's int8 weight-only)
    int8 = [(w / s[:, None]).round().clamp(-128, 127).to(torch.int8) for w, s in zip(fp32, scales, strict=True)]
    op = torch.ops.dynexec.skinny_linear.default

    def over(weights: list[torch.Tensor], rows: int, dtype: torch.dtype, fn: Callable) -> Callable[[], object]:
        xs = [torch.randn(rows, w.shape[1], dtype=dtype) for w in weights]
        return lambda: [fn(x, w, i) for i, (x, w) in enumerate(zip(xs, weights, strict=True))]

    fns: dict[str, Callable[[], object]] = {}
    for r in [int(r) for r in args.rows.split(",")]:
        fns[f"fp32 linear r{r}"] = over(fp32, r, torch.float32, lambda x, w, i: F.linear(x, w))
        fns[f"fp32 skinny r{r}"] = over(fp32, r, torch.float32, lambda x, w, i: op(x, w, None))
        fns[f"bf16 linear r{r}"] = over(bf16, r, torch.bfloat16, lambda x, w, i: F.linear(x, w))
        fns[f"bf16 skinny r{r}"] = over(bf16, r, torch.bfloat16, lambda x, w, i: op(x, w, None))
        fns[f"int8 torchao r{r}"] = over(int8, r, torch.float32, lambda x, w, i: torch.mm(x, w.t().float()) * scales[i])
        fns[f"int8 skinny r{r}"] = over(int8, r, torch.float32, lambda x, w, i: op(x, w, None) * scales[i])
    med = interleaved_medians(fns, repeats=args.rounds, warmup=1)
    result = {key: 1e3 * value for key, value in med.items()}
    print(f"{len(fp32)} weight matrices, {sum(w.numel() for w in fp32) / 1e6:.1f}M weights, {args.threads} thread(s); ms per pass:")
    print("| rows | fp32 linear | fp32 skinny | bf16 linear | bf16 skinny | int8 torchao | int8 skinny |")
    print("|---|---|---|---|---|---|---|")
    for r in args.rows.split(","):
        cells = [f"{result[f'{fmt} r{r}']:.1f}" for fmt in
                 ("fp32 linear", "fp32 skinny", "bf16 linear", "bf16 skinny", "int8 torchao", "int8 skinny")]
        print(f"| {r} | " + " | ".join(cells) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"threads": args.threads, "ms": result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
