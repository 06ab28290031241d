"""``dynexec bench elastic --quick`` gates on its deterministic metrics against the committed
baseline: every level exact, one Dynamo compile, one lowering per level, no weight copied."""

import json
from pathlib import Path

from dynexec_compile.cli import main

BASELINES = Path(__file__).resolve().parents[2] / "benchmarks" / "baselines"


def test_elastic_quick_has_not_regressed(tmp_path):
    out = tmp_path / "elastic.json"
    code = main(["bench", "elastic", "--quick", "--out", str(out),
                 "--compare", str(BASELINES / "elastic-quick.json"), "--no-timing"])
    assert code == 0
    metrics = {k: v["value"] for k, v in json.loads(out.read_text())["metrics"].items()}
    for model in ("bert", "llama"):
        assert metrics[f"{model}/dynamo_compiles"] == 1  # switching level never recompiles
        assert metrics[f"{model}/lowerings"] == 4
        assert metrics[f"{model}/weight_bytes_outside_parameters"] == 0
        assert metrics[f"{model}/sliced_weights_checked"] > 0
    assert all(v == 1.0 for k, v in metrics.items() if "/equals_" in k)
