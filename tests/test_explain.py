"""explain() and `dynexec inspect`: what a person reads about the compiled model."""

import json

import pytest
import torch

import hf_models as H
from dynexec_compile.cli import main
from dynexec_compile.explain import explain


def test_explain_reports_blocks_stages_boundaries_passes_lowering():
    model = H.causal_lm("llama")
    e = explain(model, {"input_ids": torch.randint(3, H.VOCAB, (1, 8))}, {"lowering": "eager"})
    text = str(e)
    assert "3 x LlamaDecoderLayer" in text and "[model.layers.0 .. model.layers.2]" in text
    for stage in ("prefix", "block0", "block1", "block2", "suffix"):
        assert stage in text
    assert "after block0: " in text and "(rotary," in text and "(hidden_state, float32[1x8x32])" in text
    assert "partition_stages: changed the graph" in text and "-> eager" in text
    (g,) = e.graphs
    # every parameter the graph reads is counted in exactly one stage (tied embeddings once each)
    used = {n for n, p in model.named_parameters()}
    assert sum(s.param_bytes for s in g.stages) >= sum(p.numel() * 4 for n, p in model.named_parameters() if n in used) - 4 * H.VOCAB * 32


def test_explain_on_a_model_without_blocks():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.warns(UserWarning):
        e = explain(model, (torch.randn(2, 4),), {"lowering": "eager"})
    assert "blocks: none found" in str(e)
    with pytest.raises(ValueError, match="no stages to draw"):
        e.draw("x.png")


def test_explain_rejects_bad_options_before_compiling():
    with pytest.raises(ValueError, match="unknown option"):
        explain(H.classifier("bert"), H.encoder_inputs(), {"bogus": 1})


def test_cli_inspect_writes_report_and_graph(tmp_path, capsys):
    config = H.decoder_config("llama")
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(tmp_path)
    png, js = tmp_path / "stages.png", tmp_path / "report.json"
    assert main(["inspect", str(tmp_path / "config.json"), "--lowering", "eager", "--seq", "6", "--graph", str(png), "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "LlamaDecoderLayer" in out and "stage graph written" in out
    assert png.read_bytes()[:4] == b"\x89PNG"
    report = json.loads(js.read_text())
    assert [s["name"] for s in report["graphs"][0]["stages"]] == ["prefix", "block0", "block1", "block2", "suffix"]
    svg = tmp_path / "stages.svg"
    e = explain(H.classifier("bert"), H.encoder_inputs(), {"lowering": "eager"})
    assert "<svg" in e.draw(svg).read_text()[:500]
