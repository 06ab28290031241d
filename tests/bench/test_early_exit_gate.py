"""CI gates on the deterministic part of ``dynexec bench early_exit --quick``: layers per sample,
exits per block and agreement at calibrated points, and the runtime exiting where the replay says."""

import json
from pathlib import Path

from dynexec_compile.bench.common import compare
from dynexec_compile.cli import main

BASELINE = Path(__file__).resolve().parents[2] / "benchmarks" / "baselines" / "early_exit-quick.json"


def test_early_exit_quick_has_not_regressed(tmp_path):
    out = tmp_path / "early_exit.json"
    code = main(["bench", "early_exit", "--quick", "--out", str(out), "--compare", str(BASELINE), "--no-timing"])
    assert code == 0
    current = json.loads(out.read_text())
    metrics = current["metrics"]
    assert metrics["trained/entropy/runtime_exits_match_replay"]["value"] == 1.0
    assert metrics["shared/entropy/mean_layers"]["value"] < 4  # samples do leave early
    for heads in ("trained", "shared"):
        for rule in ("entropy", "max_prob", "patience"):
            exits = sum(metrics[f"{heads}/{rule}/exits_after_block{b}"]["value"] for b in range(4))
            assert exits == 64  # every sample leaves exactly once
    # the gate catches a run that needs more layers than the baseline
    worse = json.loads(json.dumps(current))
    worse["metrics"]["trained/entropy/mean_layers"]["value"] += 0.25
    assert compare(worse, current, 0.1) == [
        f"trained/entropy/mean_layers: {worse['metrics']['trained/entropy/mean_layers']['value']:g} vs baseline "
        f"{current['metrics']['trained/entropy/mean_layers']['value']:g} (deterministic; must not get worse)"
    ]
