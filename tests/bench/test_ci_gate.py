"""Our own CI gates on the deterministic part of the benchmarks against committed baselines."""

import json
from pathlib import Path

from dynexec_compile.cli import main

BASELINES = Path(__file__).resolve().parents[2] / "benchmarks" / "baselines"


def test_overhead_quick_has_not_regressed(tmp_path):
    out = tmp_path / "overhead.json"
    code = main(["bench", "overhead", "--quick", "--repeats", "1", "--out", str(out),
                 "--compare", str(BASELINES / "overhead-quick.json"), "--no-timing"])
    assert code == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["bert/dynexec_staged/stage_compiles"]["value"] == 3  # blocks share one compile
    assert all(v["value"] == 1.0 for k, v in metrics.items() if k.endswith("outputs_equal"))


def test_gate_fails_on_a_worse_baseline(tmp_path):
    baseline = json.loads((BASELINES / "overhead-quick.json").read_text())
    baseline["metrics"]["bert/dynexec_staged/stage_compiles"]["value"] = 2  # pretend we used to compile less
    path = tmp_path / "base.json"
    path.write_text(json.dumps(baseline))
    assert main(["bench", "overhead", "--quick", "--repeats", "1", "--out", str(tmp_path / "o.json"),
                 "--compare", str(path), "--no-timing"]) == 1
