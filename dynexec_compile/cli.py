"""The ``dynexec`` command line: ``dynexec inspect`` and ``dynexec bench``."""

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
