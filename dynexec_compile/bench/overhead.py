"""``dynexec bench overhead``: what dynexec costs when no dynamic feature is on.

Side by side in one process, on a BERT and a LLaMA config: plain ``torch.compile`` (Inductor),
dynexec with default options (no feature on: one stage), and dynexec split at every block
(``partition="blocks"``, the form early exit runs on). Compile time (first call, Inductor's
caches disabled so every compile is real) apart from median forward latency; ratios to plain
Inductor. Deterministic metrics for CI: outputs equal, graphs and stage compiles counted.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import transformers as T

from dynexec_compile.bench.common import SuiteResult, interleaved_medians, timed


def _models(quick: bool) -> dict[str, tuple[torch.nn.Module, dict]]:
    torch.manual_seed(0)
    if quick:
        bert = T.BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
        llama = T.LlamaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
        seq = 16
    else:  # MiniLM-L6's shape, and the demo code LM's shape
        bert = T.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
        llama = T.LlamaConfig(vocab_size=4096, hidden_size=256, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4, intermediate_size=688)
        seq = 64
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (1, seq), generator=g)
    bert_model = T.BertForSequenceClassification(bert).eval()
    llama_model = T.LlamaForCausalLM(llama).eval()
    return {
        "bert": (bert_model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}),
        "llama": (llama_model, {"input_ids": ids, "use_cache": False}),
    }


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


def _warm_up(lowering: str) -> None:
    """Pay the process's one-time compiler start-up (imports, codecache, worker pools) on a
    throwaway function, so it is not charged to whichever variant happens to compile first."""
    torch._dynamo.reset()
    fn = torch.compile(lambda x: torch.nn.functional.gelu(x @ x.T).sum(-1), backend="inductor" if lowering == "inductor" else "eager")
    fn(torch.randn(8, 8))
    torch._dynamo.reset()


def run(args: argparse.Namespace) -> SuiteResult:
    from dynexec_compile.backend import capture_reports

    quick = args.quick
    repeats = args.repeats or (5 if quick else 30)
    lowering = "eager" if quick else "inductor"
    result = SuiteResult("overhead")
    result.notes.append(
        f"lowering={lowering}; compile = first call with Inductor caches disabled; run = median of {repeats} forwards, variants timed in interleaved rounds; "
        "ratios are dynexec / plain torch.compile (lower is better)"
    )
    variants = {
        "plain": None,
        "dynexec": {"lowering": lowering},
        "dynexec_staged": {"lowering": lowering, "partition": "blocks"},
    }
    with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True):
        _warm_up(lowering)
        for name, (model, inputs) in _models(quick).items():
            reference = _logits(model(**inputs))
            torch._dynamo.reset()
            compiled: dict[str, Any] = {}
            compile_s: dict[str, float] = {}
            for variant, options in variants.items():
                # Variants compile side by side (Dynamo keeps one cache entry per backend), so
                # their run times can be taken in interleaved rounds below.
                if options is None:
                    compiled[variant] = torch.compile(model, backend="inductor" if lowering == "inductor" else "eager")
                    reports = []
                    out, compile_s[variant] = timed(lambda c=compiled[variant], x=inputs: c(**x))
                else:
                    compiled[variant] = torch.compile(model, backend="dynexec", options=options)
                    with capture_reports() as reports:
                        out, compile_s[variant] = timed(lambda c=compiled[variant], x=inputs: c(**x))
                diff = (_logits(out) - reference).abs().max().item()
                result.metric(f"{name}/{variant}/outputs_equal", float(diff <= 1e-5), "exact")
                if reports:
                    result.metric(f"{name}/{variant}/graphs", len(reports), "exact")
                    result.metric(f"{name}/{variant}/stage_compiles", sum(r.stages_compiled for r in reports), "exact", "lower")
                result.rows.append({
                    "model": name,
                    "variant": variant,
                    "compile s": compile_s[variant],
                    "run ms": None,  # filled after the interleaved timing below
                    "compile ratio": None,
                    "run ratio": None,
                    "max abs diff": diff,
                    "stages": sum(len(r.final_gm.meta.get("dynexec_stages", [])) or 1 for r in reports) if reports else 1,
                })
            run_s = interleaved_medians({v: (lambda c=c, x=inputs: c(**x)) for v, c in compiled.items()}, repeats=repeats)
            for row in result.rows[-len(variants):]:
                variant = row["variant"]
                row["run ms"] = run_s[variant] * 1e3
                row["compile ratio"] = compile_s[variant] / compile_s["plain"]
                row["run ratio"] = run_s[variant] / run_s["plain"]
                if variant != "plain":
                    result.metric(f"{name}/{variant}/run_ratio", row["run ratio"], "timing", "lower")
                    result.metric(f"{name}/{variant}/compile_ratio", row["compile ratio"], "timing", "lower")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:  # no suite-specific options
    del parser
