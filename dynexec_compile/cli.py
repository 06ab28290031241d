"""The ``dynexec`` command line: ``dynexec inspect``, ``dynexec bench`` and ``dynexec generate``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

TASKS = ("auto", "causal-lm", "sequence-classification", "base")


def load_model(spec: str, task: str = "auto", random_weights: bool = False) -> torch.nn.Module:
    """A model from a local folder (``from_pretrained``) or a ``config.json`` (random weights).

    Hub ids are not fetched by dynexec itself: pass a local path (any folder that
    ``from_pretrained`` reads, e.g. a snapshot you downloaded).
    """
    import transformers as T

    path = Path(spec)
    if not path.exists():
        raise SystemExit(f"dynexec: {spec!r} is not a local model folder or config.json; download the model first and pass its path")
    config = T.AutoConfig.from_pretrained(path if path.is_dir() else str(path))
    archs = config.architectures or []
    if task == "auto":
        task = "causal-lm" if any("CausalLM" in a or "LMHead" in a for a in archs) else (
            "sequence-classification" if any("SequenceClassification" in a for a in archs) else "base"
        )
    auto = {"causal-lm": T.AutoModelForCausalLM, "sequence-classification": T.AutoModelForSequenceClassification, "base": T.AutoModel}[task]
    if path.is_file() or random_weights:
        return auto.from_config(config).eval()
    return auto.from_pretrained(path, dtype=torch.float32).eval()


def _cmd_inspect(args: argparse.Namespace) -> int:
    from dynexec_compile.explain import explain

    model = load_model(args.model, args.task, args.random_weights)
    vocab = getattr(model.config, "vocab_size", 100)
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(0, vocab, (args.batch, args.seq), generator=g)}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    options = json.loads(args.options) if args.options else {}
    if args.lowering:
        options["lowering"] = args.lowering
    report = explain(model, inputs, options)
    print(report)
    if args.graph:
        print(f"\nstage graph written to {report.draw(args.graph)}")
    if args.json:
        Path(args.json).write_text(report.to_json())
        print(f"report written to {args.json}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from dynexec_compile.bench import run_suite

    return run_suite(args)


# --flag -> (strategy option, how to read it); passed only when given, to strategies that take it
GENERATE_OPTIONS = {
    "window": ("window", int),
    "ngram": ("ngram", int),
    "guesses": ("guesses", int),
    "copy_ngram": ("copy_ngram", int),
    "no_prompt_lookup": ("prompt_lookup", None),
    "num_draft": ("num_draft", int),  # speculative, self_speculative, eagle
    "tree": ("tree", lambda text: [int(x) for x in text.split(",")]),
    "exit_layer": ("exit_layer", int),
    "alternatives": ("alternatives", int),
    "lookup": ("lookup", int),
    "copy_lookup": ("copy_lookup", int),
}


def _cmd_generate(args: argparse.Namespace) -> int:
    """Stream one answer with a dynexec strategy, then print its speed and tokens per forward."""
    from transformers import TextStreamer

    from dynexec_compile.decoding.generate import generate
    from dynexec_compile.hf import strategy_options
    from dynexec_compile.models import load_lm

    options = {}
    for flag, (name, _) in GENERATE_OPTIONS.items():
        value = getattr(args, flag)
        if value is None or value is False:
            continue
        if name not in strategy_options(args.strategy):
            raise ValueError(f"--{flag.replace('_', '-')} is not an option of strategy {args.strategy!r}; "
                             f"its options are {strategy_options(args.strategy)}")
        options[name] = False if flag == "no_prompt_lookup" else value
    model, tokenizer = load_lm(args.model)
    if args.draft is not None:
        if args.strategy != "speculative":
            raise ValueError("--draft is the draft model of --strategy speculative")
        options["draft_model"], _ = load_lm(args.draft)
    if args.heads is not None:
        if args.strategy != "draft_heads":
            raise ValueError("--heads is for --strategy draft_heads")
        from dynexec_compile.decoding.draft_heads import load_draft_heads

        options["heads"] = load_draft_heads(args.heads, dtype=next(model.parameters()).dtype)
    if args.eagle_draft is not None:
        if args.strategy != "eagle":
            raise ValueError("--eagle-draft is for --strategy eagle")
        from dynexec_compile.decoding.eagle import load_eagle_draft

        options["draft"] = load_eagle_draft(args.eagle_draft, dtype=next(model.parameters()).dtype)
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"--chat: the tokenizer of {args.model!r} has no chat template; drop --chat to send the raw prompt")
        input_ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    else:
        input_ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    sampling = {"do_sample": True, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    generator = torch.Generator().manual_seed(args.seed) if args.do_sample else None
    out = generate(
        model,
        input_ids,
        strategy=args.strategy,
        max_new_tokens=args.max_new_tokens,
        streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
        compile=not args.no_compile,
        mode=args.mode,
        generator=generator,
        **(sampling if args.do_sample else {}),
        **options,
    )
    stats = out.stats
    decoded = max(stats.new_tokens[0] - 1, 0)  # the prefill emits the first token
    decode_rate = decoded / stats.decode_time_s if stats.decode_time_s > 0 else 0.0
    print(
        f"\n[{stats.strategy}] {stats.new_tokens[0]} tokens, {stats.forward_passes} forwards: "
        f"{stats.tokens_per_forward:.2f} tokens per forward; {stats.tokens_per_second:.1f} tokens/s overall "
        f"(prefill {stats.prefill_time_s:.2f} s, compilation included on a first call), {decode_rate:.1f} tokens/s decoding"
    )
    return 0


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    from dynexec_compile.hf import strategy_names

    p.add_argument("model", help="a local model folder or a name dynexec_compile.models.load_lm knows (e.g. smollm2-135m-instruct)")
    p.add_argument("--prompt", required=True, help="the text to continue (or, with --chat, the user's message)")
    p.add_argument("--strategy", choices=strategy_names(), default="greedy")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    g = p.add_argument_group("strategy options (passed to strategies that take them)")
    g.add_argument("--window", type=int, help="lookahead: Jacobi window columns W")
    g.add_argument("--ngram", type=int, help="lookahead: n-gram length N")
    g.add_argument("--guesses", type=int, help="lookahead: candidate n-grams verified per step G")
    g.add_argument("--copy-ngram", type=int, help="lookahead with --window 0: n-gram length of the steps that copy from the text")
    g.add_argument("--no-prompt-lookup", action="store_true", help="lookahead: no candidates from the prompt")
    g.add_argument("--draft", help="speculative: the draft model (folder or load_lm name; same vocabulary)")
    g.add_argument("--num-draft", type=int, help="speculative / self_speculative / eagle: drafted tokens per step")
    g.add_argument("--tree", type=GENERATE_OPTIONS["tree"][1], help="draft tree: children per depth, e.g. 2,2,1")
    g.add_argument("--exit-layer", type=int, help="self_speculative: the layers the draft runs")
    g.add_argument("--heads", help="draft_heads: a heads.safetensors file (dynexec_compile.save_draft_heads)")
    g.add_argument("--eagle-draft", help="eagle: a draft file (dynexec_compile.save_eagle_draft)")
    g.add_argument("--alternatives", type=int, help="eagle: the draft's next-best tokens verified beside each guess")
    g.add_argument("--lookup", type=int, help="eagle: prompt-lookup tokens verified on a second branch")
    g.add_argument("--copy-lookup", type=int, help="eagle with --lookup: the branch's length in steps that copy from the text")
    s = p.add_argument_group("sampling")
    s.add_argument("--do-sample", action="store_true")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float)
    s.add_argument("--seed", type=int, default=0)
    c = p.add_argument_group("compilation")
    c.add_argument("--no-compile", action="store_true", help="run the decoding step eagerly (no Inductor)")
    c.add_argument("--mode", help="torch.compile mode of the step, e.g. max-autotune")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynexec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="show the blocks, stages, boundaries, passes and lowering dynexec finds in a model")
    p.add_argument("model", help="a local model folder (from_pretrained) or a config.json (random weights)")
    p.add_argument("--task", choices=TASKS, default="auto")
    p.add_argument("--random-weights", action="store_true", help="initialise from the config instead of loading weights")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--options", help='dynexec options as JSON, e.g. \'{"early_exit": {"rule": "entropy"}}\'')
    p.add_argument("--lowering", choices=("inductor", "eager", "tensorrt"), help="shortcut for options.lowering")
    p.add_argument("--graph", metavar="FILE.png|svg", help="draw the stage graph")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")
    p.set_defaults(func=_cmd_inspect)

    from dynexec_compile.bench import add_bench_arguments

    b = sub.add_parser("bench", help="side-by-side benchmarks against the baselines, with a regression gate")
    add_bench_arguments(b)
    b.set_defaults(func=_cmd_bench)

    gen = sub.add_parser("generate", help="stream an answer with a dynexec decoding strategy; print tokens/s and tokens per forward")
    add_generate_arguments(gen)
    gen.set_defaults(func=_cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; a bad argument raises (``ValueError``, ``FileNotFoundError``, ...)."""
    args = build_parser().parse_args(argv)
    return args.func(args)


USER_ERRORS = (ValueError, FileNotFoundError, NotImplementedError)


def console_main(argv: list[str] | None = None) -> int:
    """The ``dynexec`` command: :func:`main`, with a user error (a bad option, a missing file,
    a suite that has not landed) printed as one ``dynexec: error: ...`` line and exit status 2
    instead of a traceback."""
    try:
        return main(argv)
    except USER_ERRORS as err:
        print(f"dynexec: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(console_main())
