"""Acceptance and work per token of the self-drafting strategies on the demo target (deterministic).

For ``draft_heads`` (chain and trees, the committed heads) and ``self_speculative`` (shared
exit head, a sweep of exit layers E, draft lengths k and trees): acceptance rate, accepted drafts
per step, tokens per target forward and token x layer evaluations per generated token
(target + drafter; plain greedy decoding costs L = 8). Eager and greedy, so the figures do
not depend on the machine; every output is checked equal to ``model.generate``. Timings are
in ``dynexec bench speculative``.

    python benchmarks/bench_self_drafting.py [--prompts 4 --prompt-tokens 64 --new-tokens 128]
"""

from __future__ import annotations

import argparse

import torch

import dynexec_compile as dx
from dynexec_compile.bench.common import markdown_table
from dynexec_compile.models import demo_draft_heads_path, heldout_prompts, load_demo_lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--exit-layers", type=int, nargs="+", default=[2, 4, 6])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--trees", nargs="+", default=["3,2,1", "5,3,2"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_demo_lm("target")
    heads = dx.load_draft_heads(demo_draft_heads_path())
    ids = heldout_prompts(args.prompts, args.prompt_tokens, tokenizer)
    n = args.new_tokens
    with torch.no_grad():
        reference = model.generate(ids, do_sample=False, max_new_tokens=n, eos_token_id=[], pad_token_id=0)
    runs = [("draft_heads", "chain", {"heads": heads})]
    runs += [("draft_heads", f"tree {t}", {"heads": heads, "tree": [int(b) for b in t.split(",")]}) for t in args.trees]
    runs += [
        ("self_speculative", f"E={e}, k={k}", {"exit_layer": e, "num_draft": k}) for e in args.exit_layers for k in args.ks
    ]
    runs += [
        ("self_speculative", f"E={e}, tree {t}", {"exit_layer": e, "tree": [int(b) for b in t.split(",")]})
        for e in args.exit_layers
        for t in args.trees
    ]
    rows = []
    for strategy, setting, options in runs:
        out = dx.generate(model, ids, strategy=strategy, max_new_tokens=n, eos_token_id=[], pad_token_id=0, compile=False, **options)
        extra = out.stats.extra
        steps = out.stats.steps
        rows.append({
            "strategy": strategy,
            "setting": setting,
            "outputs equal": torch.equal(out.sequences, reference),
            "acceptance": extra["acceptance_rate"],
            "accepted drafts/step": extra["mean_accepted_per_step"],
            "tokens/target fwd": n / out.stats.forward_passes,
            "layer evals/token": (extra["target_layer_evals"] + extra["draft_layer_evals"]) / (n - 1),
            "steps": steps,
        })
        print(rows[-1], flush=True)
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
