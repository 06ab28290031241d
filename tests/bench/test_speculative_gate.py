"""``dynexec bench speculative --quick``: every variant's output equals HF greedy and the
deterministic counters (target forwards, acceptance) match the committed baseline."""

import json
from pathlib import Path

from dynexec_compile.cli import main

BASELINE = Path(__file__).resolve().parents[2] / "benchmarks" / "baselines" / "speculative-quick.json"


def test_speculative_quick_has_not_regressed(tmp_path):
    out = tmp_path / "speculative.json"
    code = main(["bench", "speculative", "--quick", "--ks", "3", "--batch-sizes", "1", "4", "--out", str(out),
                 "--compare", str(BASELINE), "--no-timing"])
    assert code == 0
    result = json.loads(out.read_text())
    metrics = result["metrics"]
    assert all(v["value"] == 1.0 for k, v in metrics.items() if k.endswith("outputs_equal"))
    assert {"b1/hf_assisted_k3/outputs_equal", "b1/dynexec_spec_k3/outputs_equal", "b4/dynexec_spec_tree2x2x1/outputs_equal",
            "b4/dynexec_eagle_k3/outputs_equal"} <= set(metrics)
    assert 0 < metrics["b1/dynexec_spec_k3/acceptance"]["value"] < 1
    # one target forward per step: fewer target forwards than tokens per row
    assert metrics["b1/dynexec_spec_k3/target_forwards"]["value"] < metrics["b1/dynexec_greedy/target_forwards"]["value"]
