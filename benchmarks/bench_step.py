"""One decoding step, side by side: stock transformers, plain torch.compile, dynexec, the floor.

Why: every decoding strategy is a loop of steps, and at batch 1 a small model's step is
framework overhead, not arithmetic. This measures the median 1-token step (batch 1, after a
prompt) of

- ``hf_eager``: transformers eager with its ``DynamicCache``, called as ``model.generate`` calls it;
- ``compile_dynamic``: ``torch.compile(model)`` (Inductor defaults) on the same calls, as a
  user would write it (shapes grow, so Dynamo goes dynamic after the first steps);
- ``compile_static``: transformers' ``StaticCache`` with ``torch.compile(model.forward,
  fullgraph=True)`` — the set-up transformers documents for compiled decoding;
- ``compile_static_max_autotune``: the same with ``mode="max-autotune"`` (Inductor's GEMM
  autotuning: on CPU its C++ GEMM template against MKL) — the best plain set-up we know;
- ``dynexec`` (+ variants with Inductor options, ``dynexec[mode=max-autotune]`` among them):
  ``DecodeEngine.decode`` on dynexec's ``SlotCache`` with a ``fullgraph``, ``dynamic=False``
  compiled step;

and the floors, measured in the same run: one pass over all the model's matmul weights as
batch-1 GEMVs (the step's arithmetic with nothing else around it; at batch 1 it streams the
weights, so it is bound by memory, not FLOPs), and the step's FLOPs (2 x matmul weights +
attention over the context) over the rate of a cache-resident GEMV of the LM head's shape and
of a large GEMM. Wall and CPU time are both reported. Methods run round-robin (each round restarts every method from the prompt), so load drift
on a shared machine hits all of them alike. Compile time is reported apart.

Then tokens/s of a greedy generation (HF ``generate`` eager and with its static-cache
auto-compile, and ``dynexec_compile.generate``), outputs checked equal.

Usage:
    python benchmarks/bench_step.py --out bench_step.json            # random LLaMA ~5M
    python benchmarks/bench_step.py --model models/code-lm/target --out ...
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CompileConfig,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    StaticCache,
)

import dynexec_compile as dx
from dynexec_compile.decoding import DecodeEngine
from dynexec_compile.decoding.generate import cache_length
from dynexec_compile.models import heldout_prompts

FLOOR = "floor: matmul pass"
DEFAULT_VARIANTS = {
    "dynexec[mode=max-autotune]": {"mode": "max-autotune"},
    "dynexec[attention=model]": {"attention": None},
    "dynexec[freeze=False]": {"freeze": False},
    "dynexec[skip_guards=False]": {"skip_guards": False},
}


def build_model(path: str | None, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The model at ``path`` (local only), or a random LLaMA of the demo LM's size."""
    if path:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    else:
        torch.manual_seed(0)
        config = LlamaConfig(
            hidden_size=256, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
            intermediate_size=688, vocab_size=4096, max_position_embeddings=2048,
        )
        model = LlamaForCausalLM(config).to(dtype)
    return model.to(device).eval()


def build_prompt(path: str | None, vocab: int, length: int) -> tuple[torch.Tensor, str]:
    """``[1, length]``: held-out stdlib code when the model folder has a tokenizer, else
    seeded random ids (the step's cost does not depend on the tokens)."""
    if path and (Path(path) / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return heldout_prompts(1, length, tokenizer), "held-out stdlib code"
    return torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(0)), "random ids"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def cpu_clock() -> Callable[[], float]:
    """CPU time of the work: this thread's with one intra-op thread, else the process's.

    On a shared machine wall time also counts the time other processes hold the cores; CPU
    time does not, so it is the steadier figure there (both are reported).
    """
    return time.thread_time if torch.get_num_threads() == 1 else time.process_time


class Method:
    """A way to run decoding steps: ``start()`` prefills the prompt, ``step(token)`` -> logits."""

    def __init__(self, name: str, start: Callable[[], torch.Tensor], step: Callable[[torch.Tensor], torch.Tensor]):
        self.name, self.start, self.step = name, start, step
        self.step_times: list[float] = []
        self.cpu_times: list[float] = []
        self.first_call_s = 0.0


def hf_methods(model, prompt: torch.Tensor, max_len: int) -> list[Method]:
    """Stock eager, ``torch.compile(model)`` and the static-cache compiled forward."""
    state: dict[str, object] = {}
    compiled_model = torch.compile(model)
    compiled_forward = torch.compile(model.forward, fullgraph=True)
    autotuned_forward = torch.compile(model.forward, fullgraph=True, mode="max-autotune")

    def dynamic_start(fn):
        def start():
            cache = DynamicCache(config=model.config)
            mask = torch.ones_like(prompt)
            positions = torch.arange(prompt.shape[1], device=prompt.device)[None]
            out = fn(input_ids=prompt, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
            state[fn] = (cache, mask, positions[:, -1:])
            return out.logits[:, -1]

        return start

    def dynamic_step(fn):
        def step(token):
            cache, mask, pos = state[fn]
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            pos = pos + 1
            state[fn] = (cache, mask, pos)
            out = fn(
                input_ids=token, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                logits_to_keep=1,
            )
            return out.logits[:, -1]

        return step

    def static_method(name: str, forward: Callable) -> Method:
        static = StaticCache(config=model.config, max_cache_len=max_len)

        def start():
            static.reset()
            positions = torch.arange(prompt.shape[1], device=prompt.device)[None]
            out = model(input_ids=prompt, position_ids=positions, past_key_values=static, use_cache=True)
            state[name] = positions[:, -1:]
            return out.logits[:, -1]

        def step(token):
            pos = state[name] + 1
            state[name] = pos
            out = forward(input_ids=token, position_ids=pos, past_key_values=static, use_cache=True)
            return out.logits[:, -1]

        return Method(name, start, step)

    return [
        Method("hf_eager", dynamic_start(model), dynamic_step(model)),
        Method("compile_dynamic", dynamic_start(compiled_model), dynamic_step(compiled_model)),
        static_method("compile_static", compiled_forward),
        static_method("compile_static_max_autotune", autotuned_forward),
    ]


def dynexec_method(name: str, model, prompt: torch.Tensor, max_len: int, settings: dict) -> Method:
    engine = DecodeEngine(model, batch_size=1, max_len=max_len, backend="inductor", **settings)
    return Method(name, lambda: engine.prefill(prompt), engine.decode)


def time_steps(methods: list[Method], rounds: int, steps: int, warmup: int, device: str) -> None:
    """Round-robin: every round, each method prefills and runs ``warmup + steps`` greedy steps."""
    with torch.no_grad():
        for method in methods:  # first calls: compilation
            start = time.perf_counter()
            token = method.start().argmax(-1, keepdim=True)
            for _ in range(warmup + 2):
                token = method.step(token).argmax(-1, keepdim=True)
            sync(device)
            method.first_call_s = time.perf_counter() - start
        clock = cpu_clock()
        for _ in range(rounds):
            for method in methods:
                token = method.start().argmax(-1, keepdim=True)
                for i in range(warmup + steps):
                    sync(device)
                    start, cpu_start = time.perf_counter(), clock()
                    token = method.step(token).argmax(-1, keepdim=True)
                    sync(device)
                    if i >= warmup:
                        method.step_times.append(time.perf_counter() - start)
                        method.cpu_times.append(clock() - cpu_start)


def step_flops(model, context: float) -> float:
    """FLOPs of a 1-token step: 2 x weights of every matmul + QK^T and PV over ``context`` keys."""
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 4 * config.num_hidden_layers * config.num_attention_heads * head_dim * context
    return 2 * weights + attention


def matmul_rate(m: int, k: int, n: int, device: str, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """Measured FLOP/s of ``[m, k] @ [k, n]`` (median over batches of calls)."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    calls = 0
    while time.perf_counter() - start < 0.05:
        a @ b
        calls += 1
    sync(device)
    batch = max(1, calls)
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        start = time.perf_counter()
        for _ in range(batch):
            a @ b
        sync(device)
        times.append((time.perf_counter() - start) / batch)
    return 2 * m * k * n / statistics.median(times)


def matmul_pass_method(model, device: str) -> Method:
    """The floor as a method: one batch-1 GEMV per Linear weight of the model, nothing else, on
    weights pre-transposed to ``[in, out]`` (the layout a frozen graph uses); timed in the
    same rounds as the real steps."""
    weights = [m.weight.detach().t().contiguous() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(1, w.shape[0], device=device, dtype=w.dtype) for w in weights]
    logits = torch.zeros(1, model.config.vocab_size, device=device)

    def step(token: torch.Tensor) -> torch.Tensor:
        for x, w in zip(inputs, weights, strict=True):
            torch.mm(x, w)
        return logits

    return Method(FLOOR, lambda: logits, step)


def generation_throughput(model, prompt: torch.Tensor, new_tokens: int, repeats: int, device: str) -> dict:
    """Tokens/s of greedy generation: HF eager, HF static cache + auto-compile, dynexec (default
    and ``mode="max-autotune"``)."""
    compile_config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
    compile_config._compile_all_devices = True  # transformers auto-compiles on CUDA only otherwise

    runs = {
        "hf_generate_eager": lambda: model.generate(
            prompt, do_sample=False, max_new_tokens=new_tokens, eos_token_id=[], pad_token_id=0
        ),
        "hf_generate_static_compiled": lambda: model.generate(
            prompt, do_sample=False, max_new_tokens=new_tokens, eos_token_id=[], pad_token_id=0,
            cache_implementation="static", compile_config=compile_config,
        ),
        "dynexec_generate": lambda: dx.generate(
            model, prompt, max_new_tokens=new_tokens, eos_token_id=[], pad_token_id=0
        ).sequences,
        "dynexec_generate_max_autotune": lambda: dx.generate(
            model, prompt, max_new_tokens=new_tokens, eos_token_id=[], pad_token_id=0, mode="max-autotune"
        ).sequences,
    }
    results, outputs = {}, {}
    with torch.no_grad():
        for name, run in runs.items():
            start = time.perf_counter()
            outputs[name] = run()  # warm-up (compiles)
            sync(device)
            first = time.perf_counter() - start
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                run()
                sync(device)
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            results[name] = {"seconds": seconds, "tokens_per_s": new_tokens / seconds, "first_call_s": first}
    reference = outputs["hf_generate_eager"]
    for name, out in outputs.items():
        results[name]["equal_to_hf_eager"] = bool(torch.equal(out, reference))
    return results


def markdown(report: dict) -> str:
    steps = report["step"]
    plain = [n for n in ("compile_dynamic", "compile_static", "compile_static_max_autotune") if n in steps]
    floor = report["floor"]
    lines = [
        f"threads={report['threads']} device={report['device']} dtype={report['dtype']} "
        f"params={report['params'] / 1e6:.2f}M prompt={report['prompt_len']} tokens of {report['prompt']} step FLOPs={floor['flops'] / 1e6:.2f}M "
        f"load average={report['load_average']}",
        "",
        "| method | wall median (ms) | wall p10-p90 | CPU median (ms) | speed-up vs hf_eager (wall / CPU) "
        "| time vs best torch.compile (wall / CPU) | CPU vs matmul pass | first calls (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in steps.items():
        ratios = []
        for key in ("median_ms", "cpu_median_ms"):
            base = steps["hf_eager"][key]
            best = min(steps[n][key] for n in plain) if plain else float("nan")
            ratios.append((base / s[key], s[key] / best))
        lines.append(
            f"| {name} | {s['median_ms']:.3f} | {s['p10_ms']:.2f}-{s['p90_ms']:.2f} | {s['cpu_median_ms']:.3f} | "
            f"{ratios[0][0]:.2f}x / {ratios[1][0]:.2f}x | {ratios[0][1]:.2f} / {ratios[1][1]:.2f} | "
            f"{s['cpu_median_ms'] / floor['matmul_pass_ms']:.2f}x | {s['first_call_s']:.1f} |"
        )
    lines += [
        "",
        f"floors: matmul pass (every Linear as a batch-1 GEMV, timed in the same rounds) {floor['matmul_pass_ms']:.3f} ms CPU; "
        f"FLOPs / GEMV rate {floor['gemv_floor_ms']:.3f} ms ({floor['gemv_gflops']:.1f} GFLOP/s, {floor['gemv_shape']}); "
        f"FLOPs / GEMM rate {floor['gemm_floor_ms']:.4f} ms ({floor['gemm_gflops']:.1f} GFLOP/s, {floor['gemm_shape']})",
    ]
    if "generate" in report:
        lines += [
            "",
            f"| generation ({report['generate_new_tokens']} tokens, greedy) | tokens/s | seconds | equal to HF eager "
            "| first call (s) |",
            "|---|---|---|---|---|",
        ]
        for name, g in report["generate"].items():
            lines.append(
                f"| {name} | {g['tokens_per_s']:.1f} | {g['seconds']:.3f} | {g['equal_to_hf_eager']} | {g['first_call_s']:.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="local model directory (default: random LLaMA ~5M params)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    parser.add_argument("--prompt-len", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per round")
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens of the generation benchmark (0 skips it)")
    parser.add_argument("--gen-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as is)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--variants",
        default=json.dumps(DEFAULT_VARIANTS),
        help="JSON {name: DecodeEngine keyword arguments} of dynexec ablations ('{}' for none)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = build_model(args.model, dtype, args.device)
    vocab = model.config.vocab_size
    prompt, prompt_source = build_prompt(args.model, vocab, args.prompt_len)
    prompt = prompt.to(args.device)
    max_len = cache_length(args.prompt_len, args.warmup + args.steps + 8)

    methods = hf_methods(model, prompt, max_len)
    methods.append(dynexec_method("dynexec", model, prompt, max_len, {}))
    for name, settings in json.loads(args.variants).items():
        methods.append(dynexec_method(name, model, prompt, max_len, settings))
    methods.append(matmul_pass_method(model, args.device))
    time_steps(methods, args.rounds, args.steps, args.warmup, args.device)

    context = args.prompt_len + args.warmup + args.steps / 2
    flops = step_flops(model, context)
    hidden = model.config.hidden_size
    gemv = matmul_rate(1, hidden, vocab, args.device, dtype)
    gemm = matmul_rate(512, 1024, 1024, args.device, dtype)
    report = {
        "threads": torch.get_num_threads(),
        "load_average": [round(x, 1) for x in os.getloadavg()],
        "device": args.device,
        "dtype": args.dtype,
        "model": args.model or "random LlamaConfig(hidden 256, 6 layers, 8 heads, 4 kv heads, inter 688, vocab 4096)",
        "params": sum(p.numel() for p in model.parameters()),
        "prompt_len": args.prompt_len,
        "prompt": prompt_source,
        "step": {},
        "floor": {
            "flops": flops,
            "gemv_shape": f"[1,{hidden}]x[{hidden},{vocab}]",
            "gemv_gflops": gemv / 1e9,
            "gemv_floor_ms": flops / gemv * 1e3,
            "gemm_shape": "[512,1024]x[1024,1024]",
            "gemm_gflops": gemm / 1e9,
            "gemm_floor_ms": flops / gemm * 1e3,
        },
    }
    report["floor"]["matmul_pass_ms"] = statistics.median(methods[-1].cpu_times) * 1e3
    for m in methods:
        times = sorted(m.step_times)
        report["step"][m.name] = {
            "median_ms": statistics.median(times) * 1e3,
            "cpu_median_ms": statistics.median(m.cpu_times) * 1e3,
            "p10_ms": times[len(times) // 10] * 1e3,
            "p90_ms": times[(9 * len(times)) // 10] * 1e3,
            "first_call_s": m.first_call_s,
            "samples": len(times),
        }
    if args.new_tokens:
        report["generate"] = generation_throughput(model, prompt, args.new_tokens, args.gen_repeats, args.device)
        report["generate_new_tokens"] = args.new_tokens
    print(markdown(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
