"""``dynexec bench SUITE``: dynexec and its baselines side by side, JSON + table + plots, and
``--compare BASELINE.json --max-regression 10%`` to gate a CI job on it."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch

from dynexec_compile.bench.common import (
    MODEL_ARGUMENTS,
    add_model_arguments,
    compare,
    environment,
    markdown_table,
    parse_percent,
    write_result,
)

# suite name -> module with ``run(args) -> SuiteResult`` and ``add_arguments(parser)``
SUITES = {
    "overhead": "dynexec_compile.bench.overhead",
    "early_exit": "dynexec_compile.bench.early_exit",
    "elastic": "dynexec_compile.bench.elastic",
    "speculative": "dynexec_compile.bench.speculative",
    "routing": "dynexec_compile.bench.routing",
    "lookahead": "dynexec_compile.bench.lookahead",
    "stepsaver": "dynexec_compile.bench.stepsaver",
}
PLANNED: dict[str, str] = {}


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", choices=sorted(set(SUITES) | set(PLANNED)))
    parser.add_argument("--quick", action="store_true", help="small configs and few repeats: the deterministic part, for CI")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (median reported)")
    parser.add_argument("--out", default=None, help="JSON result path (default runs/bench-SUITE.json)")
    parser.add_argument("--compare", metavar="BASELINE.json", help="fail (exit 1) when a metric regresses against this result")
    parser.add_argument("--max-regression", default="10%", help="tolerance for wall-clock ratios in --compare (default 10%%)")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch intra-op threads (default: torch's); 1 keeps timings stable on a shared machine",
    )
    parser.add_argument("--no-timing", action="store_true", help="with --compare: gate only the deterministic metrics")
    add_model_arguments(parser)
    for module in SUITES.values():  # suite-specific options, each in its own group
        importlib.import_module(module).add_arguments(parser)


def run_suite(args: argparse.Namespace) -> int:
    if args.suite not in SUITES:
        raise NotImplementedError(f"dynexec bench {args.suite}: this suite lands with {PLANNED[args.suite]}, which is not done yet")
    module = importlib.import_module(SUITES[args.suite])
    given = [f"--{name.replace('_', '-')}" for name in MODEL_ARGUMENTS if getattr(args, name, None)]
    if given and not getattr(module, "TAKES_USER_MODEL", False):
        takers = sorted(s for s, m in SUITES.items() if getattr(importlib.import_module(m), "TAKES_USER_MODEL", False))
        raise ValueError(f"dynexec bench {args.suite} does not take {', '.join(given)}; the suites that do: {', '.join(takers)}")
    if given and args.quick:
        raise ValueError(f"{', '.join(given)} and --quick exclude each other: --quick runs tiny random models")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    result = module.run(args)
    result.env = environment()
    print(markdown_table(result.rows))
    for note in result.notes:
        print(note)
    out = write_result(result, args.out or f"runs/bench-{args.suite}.json")
    print(f"\nresult written to {out}")
    if args.compare:
        baseline = json.loads(Path(args.compare).read_text())
        current = result.to_json()
        if args.no_timing:
            baseline = {**baseline, "metrics": {k: v for k, v in baseline["metrics"].items() if v["gate"] != "timing"}}
        problems = compare(current, baseline, parse_percent(args.max_regression))
        if problems:
            print(f"\nREGRESSION against {args.compare}:", file=sys.stderr)
            for p in problems:
                print(f"  {p}", file=sys.stderr)
            return 1
        print(f"no regression against {args.compare} ({len(baseline['metrics'])} metrics checked)")
    return 0
