"""``dynexec bench lookahead --quick``: runs, every variant's output equals transformers' greedy,
and the deterministic metrics have not regressed against the committed baseline."""

import json
from pathlib import Path

from dynexec_compile.cli import main

BASELINE = Path(__file__).resolve().parents[2] / "benchmarks" / "baselines" / "lookahead-quick.json"


def test_lookahead_quick_is_exact_and_has_not_regressed(tmp_path):
    out = tmp_path / "lookahead.json"
    code = main(["bench", "lookahead", "--quick", "--out", str(out), "--compare", str(BASELINE), "--no-timing"])
    assert code == 0
    metrics = {k: v["value"] for k, v in json.loads(out.read_text())["metrics"].items()}
    assert all(v == 1.0 for k, v in metrics.items() if k.endswith("outputs_equal"))
    assert metrics["b1/dx_greedy/tokens_per_forward"] == 1.0
    lookahead = [v for k, v in metrics.items() if "dx_lookahead" in k and k.endswith("tokens_per_forward")]
    assert lookahead and all(v > 1.0 for v in lookahead), "lookahead never kept more than one token per forward"
