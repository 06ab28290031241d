"""Prompt elastification on SmolLM2-135M-Instruct: label, train the scorer, measure the curve.

Stages (each resumable: results are written after every prompt, a rerun skips what is done):

    label   self-induced labels on ``--prompts`` training prompts (long_prompts(split="train"))
    train   fit the scorer's head on the labels; save it as safetensors
    ceiling on the labelled prompts, the share of the LM's own line-importance lead over random
            that each way of ranking lines keeps at 50% (the scorer's head cross-validated)
    eval    on ``--prompts`` benchmark prompts: the full-prompt answer, then at 25/50/75% of
            the context's tokens kept by the scorer, at random and by dropping the oldest
            words: the answer and its ROUGE-L against the full-prompt answer; and, as a
            reference (not servable: it costs 1 + lines LM passes over the prompt), the lines
            the LM's own answer depends on most (``line_importance``)
    ttft    time to first token of the full and every compressed prompt of the first
            ``--prompts`` benchmark prompts (scoring included for the scorer): warm-up, medians
            of ``--repeats`` interleaved rounds; run it pinned to its own core
    report  the table (Markdown) and the TTFT-vs-quality plot (PNG) from the JSON files

    python benchmarks/bench_prompt_elastic.py label --prompts 60
    python benchmarks/bench_prompt_elastic.py train
    python benchmarks/bench_prompt_elastic.py ceiling
    python benchmarks/bench_prompt_elastic.py eval --prompts 60 [--redo scorer] [--threads 2]
    python benchmarks/bench_prompt_elastic.py ttft --prompts 12 --repeats 3
    python benchmarks/bench_prompt_elastic.py report

Answers are greedy, up to ``--new-tokens`` tokens or EOS, decoded by ``dx.generate`` (compiled,
fp32, 1 thread).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import dynexec_compile as dx
from dynexec_compile.elastic import prompt as P
from dynexec_compile.elastic.prompt_tasks import KINDS, LongPrompt, long_prompts
from dynexec_compile.models import load_lm

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SCORER = ROOT / "models" / "smollm2-135m-instruct" / "prompt-scorer" / "scorer.safetensors"
LABELS = SCORER.parent / "labels.json"
METHODS = ("scorer", "random", "oldest")
# Not a serving method: the LM's own leave-one-line-out importance (1 + lines LM passes over the
# prompt, more than the prefill it would save). Measured as the ceiling of line selection.
REFERENCE = "line_importance"


def _load(path: Path, default):
    return json.loads(path.read_text()) if path.is_file() else default


def _save(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _answer_fn(model, tok, new_tokens: int):
    eos = tok.eos_token_id

    def answer(ids: torch.Tensor) -> torch.Tensor:
        out = dx.generate(model, ids, strategy="greedy", max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=eos)
        new = out.sequences[0, ids.shape[1]:]
        return new[new != eos]

    return answer


def _prompt_dict(p: LongPrompt) -> dict:
    return {"kind": p.kind, "context": p.context, "instruction": p.instruction}


def label(args) -> None:
    model, tok = load_lm("smollm2-135m-instruct")
    answer = _answer_fn(model, tok, args.new_tokens)
    done = _load(LABELS, {"ratios": list(P.DEFAULT_RATIOS), "new_tokens": args.new_tokens, "items": []})
    prompts = long_prompts(args.prompts, "train")
    from dynexec_compile.routing.embed import SentenceEmbedder

    embedder = SentenceEmbedder(max_length=256)
    for i, prompt in enumerate(prompts):
        earlier = _row_labels(done["items"][i]) if i < len(done["items"]) else None
        if i < len(done["items"]) and (earlier is None or all(
                set(P.LABEL_CANDIDATES) <= set(earlier.loglik.get(r, {})) for r in P.DEFAULT_RATIOS)):
            continue  # labelled with every candidate (or the LM gave no answer to preserve)
        start = time.perf_counter()
        (item,) = P.label_prompts(model, tok, [prompt], answer, embedder=embedder, seed=i, progress=False,
                                  known=[earlier]) or [None]
        row = {"prompt": _prompt_dict(prompt), "seconds": time.perf_counter() - start}
        if earlier is not None:  # only the missing candidates were scored now
            row["seconds"] += done["items"][i]["seconds"]
        if item is not None:
            row |= {"answer": item.answer.tolist(), "labels": item.labels.tolist(),
                    "best": {str(k): v for k, v in item.best.items()},
                    "loglik": {str(k): v for k, v in item.loglik.items()},
                    "line_importance": item.line_importance.tolist()}
        done["items"][i : i + 1] = [row]
        _save(LABELS, done)
        print(f"[{i + 1}/{len(prompts)}] {prompt.kind}: best {row.get('best')} ({row['seconds']:.1f} s)", flush=True)


def _row_labels(row: dict) -> P.PromptLabels | None:
    if "labels" not in row:
        return None
    return P.PromptLabels(LongPrompt(**row["prompt"]), torch.tensor(row["answer"]),
                          torch.tensor(row["labels"], dtype=torch.float64),
                          {float(k): v for k, v in row["best"].items()},
                          {float(k): v for k, v in row["loglik"].items()},
                          torch.tensor(row["line_importance"], dtype=torch.float64) if "line_importance" in row else None)


def _labelled(tok) -> list[P.PromptLabels]:
    data = _load(LABELS, None)
    if data is None:
        raise SystemExit(f"no labels at {LABELS}; run the label stage first")
    return [item for item in map(_row_labels, data["items"]) if item is not None]


def train(args) -> None:
    from transformers import AutoTokenizer

    from dynexec_compile.models import lm_folder

    tok = AutoTokenizer.from_pretrained(lm_folder("smollm2-135m-instruct"))
    items = _labelled(tok)
    held = max(1, len(items) // 6)
    fit, val = items[:-held], items[-held:]
    scorer = P.train_prompt_scorer(fit, tok, epochs=args.epochs)
    # how well the head ranks held-out words: mean label of the words it keeps at 50%
    agree, base = [], []
    for item in val:
        words = P.Words.of(item.prompt.context, tok)
        kept = P.keep_by_score(scorer.scores(words, item.prompt.instruction), words.costs, 0.5)
        agree.append(float(item.labels[kept].mean()))
        base.append(float(item.labels.mean()))
    print(f"held-out prompts {len(val)}: mean label of words kept at 50% {statistics.mean(agree):.3f} "
          f"(all words {statistics.mean(base):.3f})")
    best = [b for item in items for b in item.best.values()]
    print("best candidate counts:", {name: best.count(name) for name in sorted(set(best))})
    scorer = P.train_prompt_scorer(items, tok, epochs=args.epochs)  # the saved head sees every label
    SCORER.parent.mkdir(parents=True, exist_ok=True)
    scorer.save(SCORER)
    _save(SCORER.parent / "training.json", {
        "labelled_prompts": len(items), "epochs": args.epochs, "held_out_prompts": len(val),
        "held_out_mean_label_kept_at_0.5": statistics.mean(agree), "held_out_mean_label_all": statistics.mean(base),
        "best_candidate_counts": {name: best.count(name) for name in sorted(set(best))},
        "labelling_s": round(sum(row["seconds"] for row in _load(LABELS, {"items": []})["items"])),
        "command": f"python benchmarks/bench_prompt_elastic.py label --prompts {len(items)} && "
                   f"python benchmarks/bench_prompt_elastic.py train --epochs {args.epochs}",
    })
    print(f"saved {SCORER}")


def _captured(importance: torch.Tensor, words: P.Words, scores: torch.Tensor, keep: float) -> float:
    """The LM line ``importance`` (``[lines]``) a compression at ``keep`` by ``scores``
    (``[W]``) keeps: each line's importance times the share of its tokens kept."""
    kept = P.keep_by_score(scores, words.costs, keep)
    share = words.line_sum((words.costs * kept).double()) / words.line_sum(words.costs.double()).clamp(min=1)
    return float((importance * share).sum())


def ceiling(args) -> None:
    """How much of the LM's own line-importance lead over random each way of ranking lines
    recovers, on the labelled prompts (the scorer's head cross-validated)."""
    from dynexec_compile.routing.embed import SentenceEmbedder

    model, tok = load_lm("smollm2-135m-instruct")
    items = [item for item in _labelled(tok) if item.line_importance is not None]
    keep, folds = 0.5, 5
    embedder = SentenceEmbedder(max_length=256)
    scorer = P.PromptScorer()
    contexts = [P.Words.of(item.prompt.context, tok) for item in items]
    scores: list[dict[str, torch.Tensor]] = []
    for item, words in zip(items, contexts):
        q = item.prompt.instruction
        scores.append({  # ties go to the earlier word (keep_by_score)
            "oldest kept": P.position_scores(words, newest_first=False),
            "newest kept": P.position_scores(words),
            "overlap with the question": P.overlap_scores(words, q),
            "similarity to the question": P._similarity_scores(embedder, words, q),
            "LM attention from the question (a full prefill)": words.line_mean(
                P._lm_word_signals(model, tok, item.prompt, words)["attention"])[words.line_of],
        })
    for fold in range(folds):  # the head trained without the prompts it ranks
        train_items = [item for i, item in enumerate(items) if i % folds != fold]
        P.train_prompt_scorer(train_items, tok, scorer=scorer, epochs=args.epochs, progress=False)
        for i in range(fold, len(items), folds):
            scores[i]["scorer head (5-fold)"] = scorer.scores(contexts[i], items[i].prompt.instruction)
    table: dict[str, dict[str, list[float]]] = {}
    for item, words, by_method in zip(items, contexts, scores):
        importance = item.line_importance
        best = _captured(importance, words, importance[words.line_of], keep)
        chance = statistics.mean(_captured(importance, words, P.random_scores(words, s), keep) for s in range(20))
        for method, s in by_method.items():
            share = (_captured(importance, words, s, keep) - chance) / max(best - chance, 1e-9)
            for kind in ("all", item.prompt.kind):
                table.setdefault(method, {}).setdefault(kind, []).append(share)
    out = {method: {kind: statistics.mean(v) for kind, v in row.items()} for method, row in table.items()}
    _save(RESULTS / "prompt-elastic-ceiling.json", {
        "about": f"share of the LM line-importance lead over random (expected over 20 seeds) kept at {keep:.0%}, "
                 f"by line importance; {len(items)} labelled training prompts; the scorer head "
                 f"{folds}-fold cross-validated ({args.epochs} epochs)", "shares": out})
    print(f"| ranking at {keep:.0%} kept | all | " + " | ".join(KINDS) + " |\n|---|---|" + "---|" * len(KINDS))
    for method, row in out.items():
        print(f"| {method} | {row['all']:.2f} | " + " | ".join(f"{row[k]:.2f}" for k in KINDS) + " |")


def evaluate(args) -> None:
    model, tok = load_lm("smollm2-135m-instruct")
    answer = _answer_fn(model, tok, args.new_tokens)
    scorer = P.PromptScorer.load(SCORER)
    out_path = RESULTS / "prompt-elastic-quality.json"
    done = _load(out_path, {"new_tokens": args.new_tokens, "ratios": list(P.DEFAULT_RATIOS), "prompts": []})
    for i, prompt in enumerate(long_prompts(args.prompts, "bench")):
        if i < len(done["prompts"]) and not args.redo:
            continue
        full_ids = P.chat_ids(tok, prompt.text())
        full_answer = None if i < len(done["prompts"]) else answer(full_ids)
        row = done["prompts"][i] if full_answer is None else {
            "kind": prompt.kind, "prompt_tokens": full_ids.shape[1], "answer": tok.decode(full_answer), "runs": []}
        redo = set(args.redo or (*METHODS, REFERENCE))
        row["runs"] = [r for r in row["runs"] if r["method"] not in redo]
        if REFERENCE in redo:
            words = P.Words.of(prompt.context, tok)
            full_answer = answer(full_ids) if full_answer is None else full_answer
            importance = P.line_importance(model, tok, prompt, words, full_answer)[words.line_of]
        for ratio in P.DEFAULT_RATIOS:
            for method in (*METHODS, REFERENCE):
                if method not in redo:
                    continue
                if method == REFERENCE:
                    c = P.Compressed.of(prompt, words, importance, ratio)
                else:
                    c = P.compress(prompt, ratio, tok, method, scorer, seed=i)
                ids = P.chat_ids(tok, c.text())
                text = tok.decode(answer(ids))
                row["runs"].append({"method": method, "keep": ratio, "kept_fraction": c.kept_fraction,
                                    "prompt_tokens": ids.shape[1], "answer": text, "rouge_l": P.rouge_l(text, row["answer"])})
        done["prompts"][i : i + 1] = [row]
        _save(out_path, done)
        at_half = {r["method"]: round(r["rouge_l"], 1) for r in row["runs"] if r["keep"] == 0.5}
        print(f"[{i + 1}] {prompt.kind} {row['prompt_tokens']} tokens; ROUGE-L at 50%: {at_half}", flush=True)


def ttft(args) -> None:
    model, tok = load_lm("smollm2-135m-instruct")
    scorer = P.PromptScorer.load(SCORER)
    eos = tok.eos_token_id

    def first_token(ids):
        return dx.generate(model, ids, strategy="greedy", max_new_tokens=1, eos_token_id=eos, pad_token_id=eos)

    prompts = long_prompts(args.prompts, "bench")
    cases = []  # (prompt index, method, keep)
    for i in range(len(prompts)):
        cases.append((i, "full", 1.0))
        cases += [(i, m, r) for r in P.DEFAULT_RATIOS for m in METHODS]

    def run(case) -> float:
        i, method, keep = case
        start = time.perf_counter()
        text = prompts[i].text() if method == "full" else P.compress(prompts[i], keep, tok, method, scorer, seed=i).text()
        first_token(P.chat_ids(tok, text))
        return time.perf_counter() - start

    for case in cases:  # warm-up: compiles the prefill graph for every length bucket
        run(case)
    times = {case: [] for case in cases}
    for _ in range(args.repeats):
        for case in cases:
            times[case].append(run(case))
    profile = P.profile_ttft(first_token, repeats=args.repeats, vocab=tok.vocab_size, scorer=scorer, tokenizer=tok)
    rows = [{"prompt": i, "method": m, "keep": k, "ttft_s": statistics.median(times[(i, m, k)])} for i, m, k in cases]
    _save(RESULTS / "prompt-elastic-ttft.json", {"repeats": args.repeats, "rows": rows, "profile": {
        "lengths": profile.lengths, "seconds": profile.seconds, "coefficients": profile.coefficients,
        "scorer_s_per_word": profile.scorer_s_per_word}})
    print(json.dumps(rows[:10], indent=1))


def report(args) -> None:
    quality = _load(RESULTS / "prompt-elastic-quality.json", None)
    timing = _load(RESULTS / "prompt-elastic-ttft.json", None)
    if quality is None:
        raise SystemExit("run the eval stage first")
    prompts = quality["prompts"]
    full_ttft = None
    ttft = {}
    if timing is not None:
        full = [r["ttft_s"] for r in timing["rows"] if r["method"] == "full"]
        full_ttft = statistics.mean(full)
        for method in METHODS:
            for keep in P.DEFAULT_RATIOS:
                sel = [r["ttft_s"] for r in timing["rows"] if r["method"] == method and r["keep"] == keep]
                ttft[(method, keep)] = statistics.mean(sel)
    lines = ["| method | keep | tokens kept | TTFT s (vs full) | ROUGE-L all | " + " | ".join(KINDS) + " |",
             "|---|---|---|---|---|" + "---|" * len(KINDS)]
    if full_ttft is not None:
        lines.append(f"| full prompt | 1.00 | 1.00 | {full_ttft:.3f} (1.00x) | 100.0 | " + " | ".join("100.0" for _ in KINDS) + " |")
    curve = {}
    for keep in P.DEFAULT_RATIOS:
        for method in (*METHODS, REFERENCE):
            runs = [(p["kind"], r) for p in prompts for r in p["runs"] if r["method"] == method and r["keep"] == keep]
            if not runs:
                continue
            score = statistics.mean(r["rouge_l"] for _, r in runs)
            kept = statistics.mean(r["kept_fraction"] for _, r in runs)
            by_kind = [statistics.mean([r["rouge_l"] for k, r in runs if k == kind] or [float("nan")]) for kind in KINDS]
            t = ttft.get((method, keep))
            t_text = f"{t:.3f} ({t / full_ttft:.2f}x)" if t is not None else "n/a"
            curve[(method, keep)] = (t, score)
            name = f"{method} (reference, not servable)" if method == REFERENCE else method
            lines.append(f"| {name} | {keep:.2f} | {kept:.2f} | {t_text} | {score:.1f} | " + " | ".join(f"{v:.1f}" for v in by_kind) + " |")
    table = "\n".join(lines)
    counts = ", ".join(f"{k}: {sum(p['kind'] == k for p in prompts)}" for k in KINDS)
    print(f"{len(prompts)} benchmark prompts ({counts})")
    print(table)
    def lead(method: str) -> str:  # over random at 50%, with the paired standard error over prompts
        diffs = [by[(method, 0.5)] - by[("random", 0.5)] for by in (
            {(r["method"], r["keep"]): r["rouge_l"] for r in p["runs"]} for p in prompts) if (method, 0.5) in by]
        return f"{statistics.mean(diffs):+.1f} (paired s.e. {statistics.stdev(diffs) / len(diffs) ** 0.5:.1f})"

    summary = f"at 50% kept: scorer - random = {lead('scorer')} ROUGE-L points (goal >= +10)"
    if (REFERENCE, 0.5) in curve:
        summary += f"; {REFERENCE} (the LM's own, not servable) - random = {lead(REFERENCE)}"
    print("\n" + summary)
    (RESULTS / "prompt-elastic.md").write_text(table + f"\n\n{summary}\n")
    if timing is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for method in METHODS:
            pts = sorted((curve[(method, k)] for k in P.DEFAULT_RATIOS), key=lambda x: x[0])
            ax.plot([t for t, _ in pts] + [full_ttft], [s for _, s in pts] + [100.0], marker="o", label=method)
        ax.set_xlabel("time to first token (s), SmolLM2-135M, 1 CPU thread")
        ax.set_ylabel("ROUGE-L vs full-prompt answer")
        ax.set_title("Prompt elastification: 25 / 50 / 75% of context tokens kept")
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / "prompt-elastic.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["label", "train", "ceiling", "eval", "ttft", "report"])
    parser.add_argument("--prompts", type=int, default=30)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (keep 1 for the ttft stage)")
    parser.add_argument("--redo", nargs="+", choices=(*METHODS, REFERENCE),
                        help="eval: recompute these methods on prompts already done (e.g. after retraining the scorer)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    {"label": label, "train": train, "ceiling": ceiling, "eval": evaluate, "ttft": ttft, "report": report}[args.stage](args)


if __name__ == "__main__":
    main()
