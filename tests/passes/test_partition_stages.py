"""Running the stages in order reproduces the stock model, for every family."""

import pytest
import torch
from transformers import DynamicCache

import hf_models as H
from dynexec_compile.backend import capture_reports
from dynexec_compile.passes.partition_stages import stages_of

STAGED = {"lowering": "eager", "partition": "blocks", "strict": True}


def compile_staged(model):
    return torch.compile(model, backend="dynexec", options=STAGED, fullgraph=True)


@pytest.mark.parametrize("family", H.ENCODERS + ("llama",))
def test_classifier_stages_equal_stock(family):
    model = H.classifier(family)
    inputs = H.encoder_inputs(batch=3, seq=9, pad_last=4)
    with torch.no_grad(), capture_reports() as reports:
        ref = model(**inputs).logits
        out = compile_staged(model)(**inputs).logits
    assert (out - ref).abs().max().item() <= 1e-5
    (report,) = reports
    names = [s.name for s in stages_of(report.final_gm)]
    assert names == ["prefix", "block0", "block1", "block2", "suffix"]
    # identical blocks share one compiled stage: 3 distinct graphs (prefix, block, suffix)
    assert report.stages_compiled == 3 and report.stages_shared == 2


@pytest.mark.parametrize("family", H.DECODERS)
def test_decoder_stages_with_dynamic_cache_prefill_and_decode(family):
    model = H.causal_lm(family)
    compiled = compile_staged(model)
    ids = torch.randint(3, H.VOCAB, (2, 7))
    ref_cache, cache = DynamicCache(config=model.config), DynamicCache(config=model.config)
    with torch.no_grad():
        ref = model(input_ids=ids, past_key_values=ref_cache, use_cache=True)
        out = compiled(input_ids=ids, past_key_values=cache, use_cache=True)
        worst = (ref.logits - out.logits).abs().max().item()
        for _ in range(4):
            nxt = ref.logits[:, -1:].argmax(-1)
            ref = model(input_ids=nxt, past_key_values=ref_cache, use_cache=True)
            out = compiled(input_ids=nxt, past_key_values=cache, use_cache=True)
            worst = max(worst, (ref.logits - out.logits).abs().max().item())
    assert worst <= 1e-5
    assert cache.get_seq_length() == ref_cache.get_seq_length() == 11
    for a, b in zip(ref_cache.layers, cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_partition_does_not_edit_the_input_graph():
    from dynexec_compile.analysis.blocks import analyze_blocks
    from dynexec_compile.config import parse_options
    from dynexec_compile.passes import PassContext
    from dynexec_compile.passes.partition_stages import partition_stages

    graphs = []
    model = H.classifier("bert")
    torch.compile(model, backend=lambda gm, ex: graphs.append(gm) or gm.forward)(**H.encoder_inputs())
    gm = graphs[0]
    before = gm.code
    result = partition_stages(gm, PassContext(parse_options(STAGED), analyze_blocks(gm)))
    assert result.modified and result.gm is not gm
    assert gm.code == before
    # every stage input is either a graph input or an output of an earlier stage
    stages = stages_of(result.gm)
    assert [s.index for s in stages] == sorted(s.index for s in stages)
