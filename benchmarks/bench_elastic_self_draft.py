"""Elastic self-drafting on SmolLM2-135M-Instruct: the model's own elastic levels draft for it.

1. Reorder the model's heads and neurons by importance (Taylor, on chat prompts of the train
   split plus the model's greedy answers to them; cached in
   ``models/smollm2-135m-instruct/elastic/importance.safetensors``). The model is edited in
   place; its greedy output is checked unchanged on the benchmark prompts.
2. Step cost: each level decoding on its own (``dx.generate`` greedy with the level as the
   model) against the full model: the per-token decode time of a draft forward, and the
   bytes it adds (0: prefix views).
3. The suite of ``dynexec bench speculative`` on the same chat prompts, batch 1: HF greedy,
   dynexec greedy, other strategies (``--others``: lookahead, the committed draft heads,
   self-speculation), and ``strategy="speculative"`` with ``draft_model=dx.elastic_draft(model,
   level[, lora=...])`` per draft and draft length — warmed up, then timed in interleaved rounds (medians), every output
   checked equal to HF greedy's.

    python benchmarks/bench_elastic_self_draft.py --parts costs
    python benchmarks/bench_elastic_self_draft.py --parts suite --drafts 0.5+lora:2,3 0.5:2 0.75:2 0.25:3

Each part merges its figures into ``benchmarks/results/smollm2-elastic-self-draft.json`` as soon
as it has them.

Run it pinned to its own core (timings): ``taskset -c 1 env OMP_NUM_THREADS=1 ...``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import dynexec_compile as dx
from dynexec_compile.bench.common import SuiteResult, markdown_table
from dynexec_compile.bench.speculative import (
    BenchContext,
    Variant,
    _bench_batch,
    _hf_generate,
    dynexec_run,
)
from dynexec_compile.elastic import Importance
from dynexec_compile.models import chat_prompts, load_lm

ROOT = Path(__file__).resolve().parent.parent
IMPORTANCE = ROOT / "models" / "smollm2-135m-instruct" / "elastic" / "importance.safetensors"
HEADS = ROOT / "models" / "smollm2-135m-instruct" / "draft-heads" / "heads.safetensors"
LORA = ROOT / "models" / "smollm2-135m-instruct" / "elastic" / "lora-{level}.safetensors"  # bench_elastic_lm_lora.py
OUT = ROOT / "benchmarks" / "results" / "smollm2-elastic-self-draft"


def importance(model, tok, n: int, new_tokens: int) -> Importance:
    """Taylor importance on ``n`` train-split chat prompts followed by the model's own answers
    (cached: computing it takes minutes)."""
    if IMPORTANCE.is_file():
        return Importance.load(IMPORTANCE)
    eos = tok.eos_token_id
    batches = []
    for ids in chat_prompts(tok, n, split="train"):
        seq = dx.generate(model, ids[None], max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=eos).sequences
        batches.append({"input_ids": seq, "labels": seq})
    scores = dx.head_importance(model, batches, method="taylor")
    IMPORTANCE.parent.mkdir(parents=True, exist_ok=True)
    scores.save(IMPORTANCE, calibration=f"{n} chat_prompts(split='train') + greedy answers")
    return scores


def step_costs(model, drafts: dict[float | str, torch.nn.Module], prompts, eos: int, new_tokens: int, repeats: int) -> list[dict]:
    """Per-token greedy decode time of each level decoding on its own, and of the full model:
    interleaved rounds over the prompts, medians."""
    models = {"1.0": model, **{str(lv): d for lv, d in drafts.items()}}

    def decode_s(m) -> float:
        steps = seconds = 0.0
        for ids in prompts:
            out = dx.generate(m, ids[None], max_new_tokens=new_tokens, eos_token_id=[], pad_token_id=eos)
            steps, seconds = steps + out.stats.steps, seconds + out.stats.decode_time_s
        return seconds / steps

    for m in models.values():
        decode_s(m)  # warm-up: compiles
    times = {lv: [] for lv in models}
    for _ in range(repeats):
        for lv, m in models.items():
            times[lv].append(decode_s(m))
    full = statistics.median(times["1.0"])
    rows = []
    for lv, m in models.items():
        per_token = statistics.median(times[lv])
        params = {id(p): p for p in m.parameters()}.values()
        rows.append({
            "level": lv,
            "heads / kv heads / neurons": f"{m.config.num_attention_heads} / {m.config.num_key_value_heads} / {m.config.intermediate_size}",
            "parameters (M)": sum(p.numel() for p in params) / 1e6,
            "bytes added": 0 if m is model else dx.draft_extra_bytes(m, model),
            "decode ms/token": 1e3 * per_token,
            "step cost vs full": per_token / full,
        })
    return rows


def _save(part: str, data) -> None:
    """Merge one part's results into the JSON file (a killed run keeps what it measured)."""
    OUT.parent.mkdir(parents=True, exist_ok=True)
    path = OUT.with_suffix(".json")
    saved = json.loads(path.read_text()) if path.is_file() else {}
    saved[part] = data
    path.write_text(json.dumps(saved, indent=1))


OTHERS = ("lookahead", "draft_heads", "self_speculative")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=["costs", "suite"], default=["costs", "suite"])
    parser.add_argument("--levels", type=float, nargs="+", default=[0.75, 0.5, 0.25])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--drafts", nargs="+", default=None,
                        help="drafts for the suite, e.g. 0.5+lora:2,3 0.25:3 (level[+lora]:ks); default every level x --ks")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--cost-prompts", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--calibration", type=int, default=24, help="chat prompts (train split) for the importance")
    parser.add_argument("--others", nargs="*", choices=OTHERS, default=["lookahead"],
                        help="other strategies timed in the suite")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tok = load_lm("smollm2-135m-instruct")
    eos = tok.eos_token_id
    prompts = chat_prompts(tok, args.prompts)
    before = [dx.generate(model, p[None], max_new_tokens=args.new_tokens, eos_token_id=eos, pad_token_id=eos).sequences
              for p in prompts]
    start = time.perf_counter()
    scores = importance(model, tok, args.calibration, args.new_tokens)
    dx.reorder_by_importance(model, importance=scores)  # in place: outputs unchanged (checked below)
    after = [dx.generate(model, p[None], max_new_tokens=args.new_tokens, eos_token_id=eos, pad_token_id=eos).sequences
             for p in prompts]
    unchanged = all(torch.equal(a, b) for a, b in zip(after, before))
    print(f"importance + reorder {time.perf_counter() - start:.0f} s; greedy output unchanged by reordering: {unchanged}")
    _save("reorder", {"greedy_output_unchanged": unchanged, "prompts": len(prompts), "new_tokens": args.new_tokens})
    drafts = {str(lv): dx.elastic_draft(model, lv) for lv in args.levels}
    for lv in args.levels:
        path = LORA.with_name(LORA.name.format(level=lv))
        if path.is_file():
            drafts[f"{lv}+lora"] = dx.elastic_draft(model, lv, lora=dx.LevelLoRA.load(path, model))
    print(f"drafts: {list(drafts)}")

    if "costs" in args.parts:
        costs = step_costs(model, drafts, prompts[: args.cost_prompts], eos, args.new_tokens, args.repeats)
        print(markdown_table(costs), flush=True)
        _save("step_costs", {"command": " ".join(sys.argv), "prompts": args.cost_prompts, "rows": costs})
        OUT.with_name(OUT.name + "-costs.md").write_text(markdown_table(costs) + "\n")
    if "suite" not in args.parts:
        return
    ctx = BenchContext(model, None, prompts, args.new_tokens, True, tuple(args.ks), ((3, 2, 1),), 15,
                       eos_token_id=[eos], pad_token_id=eos)
    others = {
        "lookahead": lambda: Variant("dynexec_lookahead_1,3,1", dynexec_run(ctx, "lookahead", window=1, ngram=3, guesses=1), "dynexec"),
        "draft_heads": lambda: Variant("dynexec_draft_heads_k3", dynexec_run(ctx, "draft_heads", heads=dx.load_draft_heads(HEADS)), "dynexec"),
        "self_speculative": lambda: Variant("dynexec_selfspec_E15_k3", dynexec_run(ctx, "self_speculative", exit_layer=15, num_draft=3), "dynexec"),
    }
    variants = [Variant("hf_greedy", lambda batch: _hf_generate(ctx, batch), "hf"),
                Variant("dynexec_greedy", dynexec_run(ctx, "greedy"), "dynexec")]
    variants += [others[name]() for name in args.others]
    chosen = [spec.split(":") for spec in args.drafts] if args.drafts else [(d, None) for d in drafts]
    for name, ks in chosen:
        if name not in drafts:
            raise SystemExit(f"--drafts {name}: not one of {list(drafts)}")
        for k in [int(k) for k in ks.split(",")] if ks else args.ks:
            variants.append(Variant(f"dynexec_elastic_{name}_k{k}", dynexec_run(ctx, "speculative", draft_model=drafts[name], num_draft=k),
                                    "dynexec", params={"draft": name, "k": k}))
    result = SuiteResult("elastic_self_draft")
    _bench_batch(ctx, variants, 1, args.repeats, result)
    greedy = next(r for r in result.rows if r["variant"] == "dynexec_greedy")["tokens/s"]
    for row in result.rows:
        if "tokens/s" in row:
            row["vs dynexec greedy"] = row["tokens/s"] / greedy
    rows = [{k: v for k, v in r.items() if k != "vs best HF assisted"} for r in result.rows]
    table = markdown_table(rows)
    print(table)
    _save("suite", {"command": " ".join(sys.argv), "prompts": [int(p.numel()) for p in prompts],
                    "new_tokens": args.new_tokens, "repeats": args.repeats, "rows": rows})
    OUT.with_name(OUT.name + "-suite.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
