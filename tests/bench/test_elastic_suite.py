"""``dynexec bench elastic --quick`` gates on its deterministic metrics against the committed
baseline: every level exact (with and without a LoRA), one Dynamo compile, levels lowered on
first use, no weight copied, the LoRA tensors the only extra inputs."""

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
        assert metrics[f"{model}/lowerings_after_first_call"] == 1  # lazy
        assert metrics[f"{model}/lowerings"] == 4
        assert metrics[f"{model}/lowerings_with_loras"] == 8
        assert metrics[f"{model}/weight_bytes_outside_parameters"] == 0
        assert metrics[f"{model}/sliced_weights_checked"] > 0
    assert all(v == 1.0 for k, v in metrics.items() if "equals_" in k or "extra_inputs_are_the_lora" in k)
    assert all(v == 0 for k, v in metrics.items() if k.endswith("outside_parameters"))
