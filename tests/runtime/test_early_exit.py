"""Early exit: per-sample exits, batch compaction, and the invariants users rely on."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import hf_models as H
from dynexec_compile.backend import dynexec_backend
from dynexec_compile.runtime.stats import last_stats

FAMILIES = H.ENCODERS + ("llama",)


def call_kwargs(family, inputs):
    return {**inputs, "use_cache": False} if family == "llama" else inputs


def compiled(model, dynamic_batch=False, **early_exit):
    opts = {"lowering": "eager", "strict": True, "early_exit": early_exit}
    return torch.compile(model, backend="dynexec", options=opts)


def run(c, family, inputs, dynamic_batch=False):
    inputs = {k: v.clone() for k, v in inputs.items()}
    if dynamic_batch:
        for v in inputs.values():
            torch._dynamo.mark_dynamic(v, 0)
    with torch.no_grad():
        return c(**call_kwargs(family, inputs)).logits


def first_exit_entropies(model, family, inputs):
    """Entropy of the shared head at the first exit, per sample (to pick splitting thresholds)."""
    with torch.no_grad():
        c = compiled(model, rule="entropy", threshold=1e9)  # everyone exits at block 0
        logits = run(c, family, inputs)
    assert last_stats()["exit_layer"] == [0] * logits.shape[0]
    p = logits.softmax(-1)
    return -(p * p.log()).sum(-1)


@pytest.mark.parametrize("family", FAMILIES)
def test_threshold_that_never_fires_equals_stock(family):
    model = H.classifier(family)
    inputs = H.encoder_inputs(batch=3, pad_last=2)
    with torch.no_grad():
        ref = model(**call_kwargs(family, inputs)).logits
    out = run(compiled(model, rule="entropy", threshold=0.0), family, inputs)
    assert torch.equal(out, ref)
    assert last_stats()["exit_layer"] == [2, 2, 2] and last_stats()["mean_layers"] == 3


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_threshold_that_always_fires_exits_at_the_first_exit_with_the_shared_head(family):
    model = H.classifier(family)
    inputs = H.encoder_inputs(batch=3, pad_last=2)
    out = run(compiled(model, rule="max_prob", threshold=1e-6, layers=[1]), family, inputs)
    assert last_stats()["exit_layer"] == [1, 1, 1]
    # the shared head is the model's own head on the hidden state after block 1
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[2]
        if family == "bert":
            ref = model.classifier(model.bert.pooler(hidden))
        else:
            ref = model.classifier(torch.relu(model.pre_classifier(hidden[:, 0])))
    assert (out - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family, dynamic_batch", [(f, True) for f in FAMILIES] + [("bert", False)])
def test_each_sample_exits_as_it_would_alone(family, dynamic_batch):
    model = H.classifier(family)
    inputs = H.encoder_inputs(batch=5, seq=8, seed=3)
    entropy = first_exit_entropies(model, family, inputs)
    threshold = entropy.median().item() + 1e-7  # about half the batch leaves at the first exit
    torch._dynamo.reset()
    c = compiled(model, rule="entropy", threshold=threshold)
    out = run(c, family, inputs, dynamic_batch)
    stats = last_stats()
    exits = stats["exit_layer"]
    assert 0 < exits.count(0) < 5, exits
    assert stats["compaction"] is dynamic_batch
    if dynamic_batch:  # exited samples left the batch
        assert stats["batch_per_block"][0] == 5 and stats["batch_per_block"][1] == 5 - exits.count(0)
    for i in range(5):
        alone = run(c, family, {k: v[i : i + 1] for k, v in inputs.items()})
        assert last_stats()["exit_layer"] == [exits[i]]
        assert (alone - out[i : i + 1]).abs().max().item() <= 1e-5


def test_padding_does_not_change_a_samples_exit():
    model = H.classifier("bert")
    inputs = H.encoder_inputs(batch=4, seq=6, seed=5)
    entropy = first_exit_entropies(model, "bert", inputs)
    c = compiled(model, rule="entropy", threshold=entropy.median().item() + 1e-7)
    out = run(c, "bert", inputs)
    exits = last_stats()["exit_layer"]
    # the same sentences padded to length 10 (right padding, masked)
    padded = {
        "input_ids": torch.cat([inputs["input_ids"], torch.zeros(4, 4, dtype=torch.long)], 1),
        "attention_mask": torch.cat([inputs["attention_mask"], torch.zeros(4, 4, dtype=torch.long)], 1),
    }
    out_padded = run(c, "bert", padded)
    assert last_stats()["exit_layer"] == exits
    assert (out_padded - out).abs().max().item() <= 1e-5


def test_patience_rule_needs_agreeing_exits():
    model = H.classifier("bert", num_labels=3)
    inputs = H.encoder_inputs(batch=6, seed=4)
    preds = []
    for block in (0, 1):  # the shared head's prediction at each exit, for every sample
        torch._dynamo.reset()
        preds.append(run(compiled(model, rule="max_prob", threshold=1e-6, layers=[block]), "bert", inputs).argmax(-1))
    torch._dynamo.reset()
    out = run(compiled(model, rule="patience", patience=1), "bert", inputs)
    exits = last_stats()["exit_layer"]
    with torch.no_grad():
        ref = model(**inputs).logits
    # patience 1: leave at block 1 exactly when exits 0 and 1 agree; otherwise run to the end
    agree = (preds[0] == preds[1]).tolist()
    assert exits == [1 if a else 2 for a in agree]
    for i, a in enumerate(agree):
        expected = preds[1][i] if a else ref[i].argmax()
        assert out[i].argmax() == expected
    torch._dynamo.reset()
    out = run(compiled(model, rule="patience", patience=5), "bert", inputs)  # more than there are exits
    assert last_stats()["exit_layer"] == [2] * 6
    assert torch.equal(out, ref)


def test_shrinking_batches_do_not_recompile():
    model = H.classifier("bert")
    counter = CompileCounterWithBackend(lambda gm, ex: dynexec_backend(gm, ex, options={"lowering": "eager", "strict": True, "early_exit": {"rule": "entropy", "threshold": 0.69}}))
    c = torch.compile(model, backend=counter)
    for batch in (8, 5, 3, 6):
        run(c, "bert", H.encoder_inputs(batch=batch, seed=batch), dynamic_batch=True)
    assert counter.frame_count == 1


def test_exit_layers_that_do_not_exist_are_a_value_error():
    model = H.classifier("bert")
    with pytest.raises(Exception, match=r"block\(s\) \[2\].*0\.\.1"):
        run(compiled(model, layers=[0, 2]), "bert", H.encoder_inputs())


def test_causal_lm_with_cache_is_refused_clearly():
    model = H.classifier("llama")
    with pytest.raises(Exception, match="does not come from the head"):
        with torch.no_grad():
            compiled(model)(**H.encoder_inputs())  # use_cache defaults to True: KV among the outputs


@pytest.mark.slow
def test_inductor_early_exit_with_compaction_equals_eager():
    model = H.classifier("bert")
    inputs = H.encoder_inputs(batch=6, seed=2)
    threshold = first_exit_entropies(model, "bert", inputs).median().item() + 1e-7
    torch._dynamo.reset()
    eager = run(compiled(model, rule="entropy", threshold=threshold), "bert", inputs, dynamic_batch=True)
    exits = last_stats()["exit_layer"]
    torch._dynamo.reset()
    c = torch.compile(model, backend="dynexec", options={"strict": True, "early_exit": {"rule": "entropy", "threshold": threshold}})
    out = run(c, "bert", inputs, dynamic_batch=True)
    assert last_stats()["exit_layer"] == exits and last_stats()["compaction"]
    assert (out - eager).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family, kind", [("bert", "cls_tanh"), ("llama", "last_token_rmsnorm")])
def test_trained_heads_are_the_exit_heads(family, kind):
    from dynexec_compile import ExitHeads, attach_exit_heads

    model = H.classifier(family)
    heads = ExitHeads([0, 1], hidden_size=32, num_labels=2, kind=kind).eval()
    inputs = H.encoder_inputs(batch=3, pad_last=2)
    with torch.no_grad():
        stock = model(**call_kwargs(family, inputs), output_hidden_states=True)
    attach_exit_heads(model, heads)  # the one documented in-place edit
    out = run(compiled(model, rule="max_prob", threshold=1e-6, heads="trained"), family, inputs)
    assert last_stats()["exit_layer"] == [0, 0, 0]
    with torch.no_grad():
        ref = heads.exit_logits(0, stock.hidden_states[1], inputs["attention_mask"])
    assert (out - ref).abs().max().item() <= 1e-5
    torch._dynamo.reset()
    out = run(compiled(model, rule="entropy", threshold=0.0, heads="trained"), family, inputs)
    assert torch.equal(out, stock.logits)  # never fires: the model's own output


def test_trained_heads_missing_is_a_clear_error():
    model = H.classifier("bert")
    with pytest.raises(Exception, match="no exit heads are attached.*attach_exit_heads"):
        run(compiled(model, heads="trained"), "bert", H.encoder_inputs())


@pytest.mark.parametrize("family, kind", [("bert", "mean_tanh"), ("llama", "last_token_rmsnorm")])
def test_options_without_heads_use_the_attached_trained_heads(family, kind):
    """The default heads="auto": a user who writes options by hand after attaching trained heads
    gets those heads (and their early exits), not the shared head running every block."""
    from dynexec_compile import ExitHeads, attach_exit_heads, detach_exit_heads

    model = H.classifier(family, num_labels=3)
    heads = ExitHeads([0, 1], hidden_size=32, num_labels=3, kind=kind).eval()
    with torch.no_grad():
        heads.head(0).out.weight.mul_(200.0)  # a confident first exit
    inputs = H.encoder_inputs(batch=3, pad_last=2)
    with torch.no_grad():
        stock = model(**call_kwargs(family, inputs), output_hidden_states=True)
        ref = heads.exit_logits(0, stock.hidden_states[1], inputs["attention_mask"])
    assert ref.softmax(-1).amax(-1).min() > 0.8
    torch._dynamo.reset()
    c = compiled(model, rule="max_prob", threshold=0.8)
    shared = run(c, family, inputs)  # nothing attached
    assert last_stats()["mean_layers"] == 3 and torch.equal(shared, stock.logits)
    attach_exit_heads(model, heads)
    torch._dynamo.reset()
    out = run(compiled(model, rule="max_prob", threshold=0.8), family, inputs)
    assert last_stats()["exit_layer"] == [0, 0, 0] and last_stats()["mean_layers"] == 1 < 3
    assert (out - ref).abs().max().item() <= 1e-5
    # a graph compiled before the heads were attached follows them too (Dynamo reuses it for an
    # identical torch.compile call, and attaching does not change the graph)
    assert torch.equal(run(c, family, inputs), out) and last_stats()["mean_layers"] == 1
    detach_exit_heads(model)
    assert torch.equal(run(c, family, inputs), stock.logits) and last_stats()["mean_layers"] == 3
    attach_exit_heads(model, heads)
    torch._dynamo.reset()
    run(compiled(model, rule="max_prob", threshold=0.8, heads="shared"), family, inputs)
    assert last_stats()["mean_layers"] == 3  # "shared" still means the shared head
