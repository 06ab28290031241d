"""Routers on synthetic candidates whose right answers are known: calibration, cascades, the
random baseline, save/load, RouteLLM's metrics, training, and bad input."""

import math

import pytest
import torch
from safetensors import safe_open

from dynexec_compile.routing import (
    Answers,
    GeneratorCandidate,
    Router,
    RouterClassifier,
    curve,
    random_curve,
    token_accuracy,
    train_router,
)


class Table:
    """A candidate answering integer prompts from fixed tables, recording what it was asked."""

    def __init__(self, answers, confidence):
        self.answers, self.confidence, self.calls = answers, torch.as_tensor(confidence, dtype=torch.float64), []

    def __call__(self, prompts):
        self.calls.append(list(prompts))
        idx = torch.tensor(prompts, dtype=torch.long)
        c = self.confidence[idx] if len(prompts) else torch.zeros(0)
        return Answers([self.answers[i] for i in prompts], {"max_prob": c, "entropy": 1 - c, "logprob": c.log()})


N = 100


def pair():
    """Cheap confidence i/100; cheap is right iff its confidence >= 0.3; strong always right."""
    truth = [i % 2 for i in range(N)]
    conf = [i / N for i in range(N)]
    cheap = Table([t if i >= 30 else 1 - t for i, t in enumerate(truth)], conf)
    strong = Table(truth, [1.0] * N)
    return cheap, strong, list(zip(range(N), truth))


@pytest.mark.parametrize("quality, threshold", [(1.0, 0.30), (0.9, 0.20), (0.7, 0.0)])
def test_calibrate_picks_the_cheapest_threshold_meeting_the_target(quality, threshold):
    cheap, strong, data = pair()
    router = Router([cheap, strong], costs=[1.0, 10.0], router="cascade")
    cal = router.calibrate(data, quality=quality)
    assert router.threshold == pytest.approx(threshold)
    assert cal.strong_share == pytest.approx(threshold)  # exactly the prompts below the threshold escalate
    assert cal.quality >= quality - 1e-12
    assert cal.cost_saved == pytest.approx(1 - (1 + 10 * threshold) / 10)  # a cascade pays both models
    if threshold:
        assert f"max probability < {threshold:.3g}: {threshold:.0%} of calls go to the strong model" in str(cal)


def test_calibrate_entropy_and_logprob_use_their_own_direction():
    cheap, strong, data = pair()
    ent = Router([cheap, strong], router="cascade", confidence="entropy")
    ent.calibrate(data, quality=0.9)
    assert ent.threshold == pytest.approx(0.8) and "entropy > 0.8" in ent.describe()  # entropy 1 - i/100
    lp = Router([cheap, strong], router="cascade", confidence="logprob")
    lp.calibrate(data, quality=0.9)
    assert lp.threshold == pytest.approx(math.log(0.2))


def test_cascade_escalates_exactly_the_low_confidence_items():
    cheap, strong, data = pair()
    router = Router([cheap, strong], costs=[1.0, 4.0], threshold=0.25)
    prompts = [p for p, _ in data]
    out = router(prompts)
    assert out.chosen == [int(i / N < 0.25) for i in prompts]
    assert strong.calls == [[i for i in prompts if i / N < 0.25]]  # the strong model saw only those
    assert out.outputs == [strong.answers[i] if i < 25 else cheap.answers[i] for i in prompts]
    assert out.cost == pytest.approx(N * 1.0 + 25 * 4.0)


def test_cascade_of_three_stops_at_the_first_confident_candidate():
    conf_mid = [0.9 if i % 2 else 0.1 for i in range(N)]
    cheap, strong, _ = pair()
    mid = Table(list(range(N)), conf_mid)
    out = Router([cheap, mid, strong], costs=[1, 2, 3], threshold=0.5)(list(range(N)))
    want = [0 if i >= 50 else (1 if i % 2 else 2) for i in range(N)]
    assert out.chosen == want


def test_random_router_strong_share_matches_its_rate():
    n = 20000
    cheap = Table([0] * n, [0.5] * n)
    strong = Table([1] * n, [0.5] * n)
    router = Router([cheap, strong], router="random", threshold=0.3, seed=1)
    share = router(list(range(n))).strong_share(1)
    assert abs(share - 0.3) < 0.015  # 4.7 standard deviations
    cheap2, strong2, data = pair()
    cal = Router([cheap2, strong2], router="random").calibrate(data, quality=0.85)
    assert cal.threshold == pytest.approx(0.5)  # cheap 0.7, strong 1.0: half the gap is needed
    assert "with probability 0.5" in cal.description
    assert Router([cheap2, strong2], router="random").calibrate(data, quality=0.7).threshold == 0.0  # cheap suffices


def test_save_load_round_trips(tmp_path):
    cheap, strong, data = pair()
    router = Router([cheap, strong], costs=[1, 3], router="cascade", confidence="entropy")
    router.calibrate(data, quality=0.9)
    router.save(tmp_path / "r.safetensors")
    back = Router.load(tmp_path / "r.safetensors", [cheap, strong])
    assert (back.router, back.confidence, back.costs, back.threshold) == ("cascade", "entropy", [1.0, 3.0], router.threshold)
    prompts = list(range(N))
    assert back(prompts).chosen == router(prompts).chosen

    torch.manual_seed(0)
    clf = RouterClassifier(4, hidden=8).eval()
    feats = torch.randn(N, 4)

    def embed(texts):
        return feats[torch.tensor(texts)]

    r = Router([cheap, strong], router="classifier", classifier=clf, embedder=embed, threshold=0.5)
    path = tmp_path / "clf.safetensors"
    r.save(path)
    with safe_open(str(path), framework="pt") as f:
        assert "dynexec_router" in f.metadata() and "net.0.weight" in f.keys()
    with pytest.raises(ValueError, match="pass that embedder again"):
        Router.load(path, [cheap, strong])
    back = Router.load(path, [cheap, strong], embedder=embed)
    assert torch.equal(back.need_from_prompts(prompts), r.need_from_prompts(prompts))
    assert back(prompts).chosen == r(prompts).chosen


def test_router_file_kind_is_checked(tmp_path):
    from dynexec_compile.weights_io import save_with_config

    save_with_config(torch.nn.Linear(2, 2), tmp_path / "x.safetensors", "dynexec_exit_heads", {"format_version": 1})
    cheap, strong, _ = pair()
    with pytest.raises(ValueError, match="not a dynexec router file"):
        Router.load(tmp_path / "x.safetensors", [cheap, strong])


def test_metrics_on_a_known_case():
    q_cheap = torch.tensor([0.0, 0.0, 1.0, 1.0])
    q_strong = torch.ones(4)
    perfect = curve(torch.tensor([1.0, 0.9, 0.1, 0.0]), q_cheap, q_strong)
    assert perfect.pgr.tolist() == pytest.approx([0, 0.5, 1, 1, 1])
    assert perfect.apgr == pytest.approx(0.75)
    assert perfect.cpt(0.5) == pytest.approx(0.25) and perfect.cpt(0.8) == pytest.approx(0.5)
    worst = curve(torch.tensor([0.0, 0.1, 0.9, 1.0]), q_cheap, q_strong)
    assert worst.apgr == pytest.approx(0.25)
    rnd = random_curve(torch.cat([q_cheap] * 50), torch.cat([q_strong] * 50))
    assert abs(rnd.apgr - 0.5) < 0.05
    assert token_accuracy([1, 2, 3], [1, 0, 3, 4]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no gap"):
        curve(torch.zeros(3), torch.ones(3), torch.ones(3))


def test_train_router_learns_self_induced_labels():
    """Prompts whose feature 0 is positive are the ones the cheap model gets wrong."""
    torch.manual_seed(0)
    n = 400
    feats = torch.randn(n, 8)
    hard = feats[:, 0] > 0
    cheap = Table([0 if h else 1 for h in hard.tolist()], [0.5] * n)
    strong = Table([1] * n, [0.5] * n)

    def embed(texts):
        return feats[torch.tensor(texts)]

    router = train_router(cheap, strong, list(range(n)), lambda o, r: float(o == r), references=[1] * n,
                          embedder=embed, costs=[1, 5], progress=False)
    p = router.need_from_prompts(list(range(n)))
    assert ((p > 0.5) == hard).double().mean() > 0.95
    cal = router.calibrate(list(zip(range(n), [1] * n)), quality=1.0)
    assert cal.quality == 1.0 and cal.strong_share < 0.6
    with pytest.raises(ValueError, match="same label"):
        train_router(strong, strong, list(range(n)), lambda o, r: float(o == r), embedder=embed, progress=False)


def test_generator_candidate_is_hf_greedy():
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, intermediate_size=64)
    model = T.LlamaForCausalLM(cfg).eval()

    class Tok:  # prompts are space-separated token ids
        pad_token_id, eos_token_id = 0, None

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [int(t) for t in text.split()]}

    cand = GeneratorCandidate(model, Tok(), max_new_tokens=5, batch_size=2)
    prompts = ["5 6 7 8", "9 10", "11 12 13"]
    ans = cand(prompts)
    for p, out in zip(prompts, ans.outputs):
        ids = torch.tensor([[int(t) for t in p.split()]])
        want = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
        assert out == want
    assert ans.confidence["max_prob"].shape == (3,) and (ans.confidence["logprob"] <= 0).all()


def test_bad_input_errors():
    cheap, strong, data = pair()
    with pytest.raises(ValueError, match="increase strictly"):
        Router([cheap, strong], costs=[2.0, 1.0])
    with pytest.raises(ValueError, match="one cost per candidate"):
        Router([cheap, strong], costs=[1.0])
    with pytest.raises(ValueError, match="unknown router 'bandit'; valid routers: cascade, classifier, random"):
        Router([cheap, strong], router="bandit")
    with pytest.raises(ValueError, match="unknown confidence"):
        Router([cheap, strong], confidence="margin")
    with pytest.raises(ValueError, match="at least two"):
        Router([cheap])
    with pytest.raises(TypeError, match="ClassifierCandidate"):
        Router([torch.nn.Linear(2, 2), strong])
    with pytest.raises(ValueError, match="train_router"):
        Router([cheap, strong], router="classifier")
    with pytest.raises(NotImplementedError, match="two candidates"):
        Router([cheap, cheap, strong], router="random")
    with pytest.raises(ValueError, match="rate"):
        Router([cheap, strong], router="random", threshold=1.5)
    router = Router([cheap, strong])
    with pytest.raises(ValueError, match="calibrate"):
        router([0, 1])
    for bad in (0.0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            router.calibrate(data, quality=bad)


def test_classifier_candidate_answers_with_the_model_argmax_and_its_confidence():
    import transformers as T

    from dynexec_compile.routing import ClassifierCandidate

    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    model = T.BertForSequenceClassification(cfg).eval()

    class Tok:  # sentences are space-separated token ids
        def __call__(self, texts, padding, truncation, max_length, return_tensors):
            ids = [[int(t) for t in s.split()][:max_length] for s in texts]
            width = max_length if padding == "max_length" else max(len(i) for i in ids)
            pad = [i + [0] * (width - len(i)) for i in ids]
            return {"input_ids": torch.tensor(pad), "attention_mask": torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])}

    sentences = ["1 2 3", "4 5", "6 7 8 9", "10"]
    for pad in (False, True):
        ans = ClassifierCandidate(model, Tok(), batch_size=3, max_length=8, pad_to_max_length=pad)(sentences)
        with torch.no_grad():
            want = torch.cat([model(**Tok()([s], True, True, 8, "pt")).logits for s in sentences]).softmax(-1)
        assert ans.outputs == want.argmax(-1).tolist()
        torch.testing.assert_close(ans.confidence["max_prob"], want.max(-1).values, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_bench_routing_quick_runs_every_router(tmp_path):
    import json

    from dynexec_compile.cli import main

    out = tmp_path / "routing.json"
    assert main(["bench", "routing", "--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    routers = {(r["task"], r["cheap"], r["router"]) for r in result["rows"]}
    # elastic: 3 cascades, 2 classifiers, random; exit-0 / exit-1 (nested): 2 cascades, 2 classifiers, random;
    # exits-0,...,4: one nested cascade; generation: 3 cascades, the learned cascade, 2 classifiers, random
    assert len(routers) == 6 + 5 + 5 + 1 + 7
    assert (tmp_path / "routing.png").is_file()
    for r in result["rows"]:
        assert 0.0 <= r["eval strong share"] <= 1.0


def test_bench_routing_smollm2_cheap_specs_are_checked_before_any_model_runs():
    from dynexec_compile.bench.routing import smollm2_cheap_spec
    from dynexec_compile.cli import main

    assert smollm2_cheap_spec("0.5+lora") == (0.5, True) and smollm2_cheap_spec("0.75") == (0.75, False)
    for bad in ("half", "0.5+adapter", "1.0", "0"):
        with pytest.raises(ValueError, match="LEVEL or LEVEL\\+lora"):
            smollm2_cheap_spec(bad)
    with pytest.raises(ValueError, match="got '0.5\\+adapter'"):
        main(["bench", "routing", "--routing-lms", "smollm2", "--routing-smollm2-cheap", "0.5+adapter"])


def test_sentence_embedder_layers():
    from dynexec_compile.routing import SentenceEmbedder

    full, two = SentenceEmbedder(), SentenceEmbedder(layers=2)
    texts = ["a fine film", "def f(x):\n    return x"]
    a, b = full(texts), two(texts)
    assert a.shape == b.shape == (2, 384) and len(two.model.encoder.layer) == 2
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(2))
    assert not torch.allclose(a, b)
    assert two.config()["layers"] == 2
    with pytest.raises(ValueError, match="layers must be in 1..6"):
        SentenceEmbedder(layers=7)


# ---- nested chains: exits of one model, escalation resumes ------------------------------------


class FakeChain:
    """A nested chain of Table candidates whose cascade replays the tables (what ExitCandidates'
    early-exit run must equal), to test the router's bookkeeping without compiling anything."""

    def __init__(self, tables):
        self.blocks = list(range(len(tables) - 1))
        self.tables, self.calls = tables, []
        for i, t in enumerate(tables):
            t.chain, t.chain_index = self, i

    def cascade(self, prompts, indices, confidence, threshold):
        self.calls.append((list(prompts), list(indices), confidence, threshold))
        stops = []
        for p in prompts:
            k = next((j for j, i in enumerate(indices[:-1]) if self.tables[i].confidence[p] >= threshold), len(indices) - 1)
            stops.append(k)
        outputs = [self.tables[indices[k]].answers[p] for p, k in zip(prompts, stops)]
        return Answers(outputs, {c: torch.zeros(len(prompts)) for c in ("max_prob", "entropy", "logprob")}), stops


def test_a_nested_chain_pays_only_the_deepest_candidate_it_reached():
    cheap, strong, data = pair()
    chain = FakeChain([cheap, strong])
    router = Router([cheap, strong], costs=[1.0, 10.0], router="cascade")
    assert router.chain is chain
    cal = router.calibrate(data, quality=1.0)
    assert router.threshold == pytest.approx(0.30) and cal.strong_share == pytest.approx(0.30)
    # independent: 1 + 10 x 0.3 = 4 per prompt; nested: 0.7 x 1 + 0.3 x 10 = 3.7
    assert cal.cost_saved == pytest.approx(1 - 3.7 / 10)
    prompts = [p for p, _ in data]
    out = router(prompts)
    assert chain.calls == [(prompts, [0, 1], "max_prob", router.threshold)]  # one run of the chain
    assert cheap.calls == [prompts] and strong.calls == [prompts]  # only calibration called them alone
    assert out.chosen == [int(i < 30) for i in prompts]
    assert out.cost == pytest.approx(70 * 1.0 + 30 * 10.0)
    # candidates of a chain taken out of order, or without its full model, are independent
    assert Router([strong, cheap], router="cascade").chain is None
    with pytest.raises(ValueError, match="confidence='max_prob'"):
        Router([cheap, strong], router="cascade", confidence="logprob")
    assert Router([cheap, strong], router="random").chain is None  # only a cascade resumes


def _tiny_chain_model():
    import transformers as T

    from dynexec_compile import ExitHeads, attach_exit_heads

    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
    model = T.BertForSequenceClassification(cfg).eval()
    heads = ExitHeads([0, 1], hidden_size=32, num_labels=2, kind="cls_tanh").eval()
    with torch.no_grad():  # spread the heads' confidences so a mid threshold splits the prompts
        for p in heads.parameters():
            p.mul_(4.0)
    attach_exit_heads(model, heads)
    return model


class SpaceTok:
    """Sentences are space-separated token ids."""

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        ids = [[int(t) for t in s.split()][:max_length] for s in texts]
        width = max_length if padding == "max_length" else max(len(i) for i in ids)
        return {"input_ids": torch.tensor([i + [0] * (width - len(i)) for i in ids]),
                "attention_mask": torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])}


@pytest.mark.parametrize("confidence", ["max_prob", "entropy"])
def test_exit_candidates_cascade_equals_running_each_candidate_alone(confidence):
    from dynexec_compile.routing import ExitCandidates

    model = _tiny_chain_model()
    g = torch.Generator().manual_seed(1)
    sentences = [" ".join(str(int(t)) for t in torch.randint(1, 64, (int(n),), generator=g)) for n in torch.randint(2, 8, (20,), generator=g)]
    chain = ExitCandidates(model, SpaceTok(), blocks=[0, 1], batch_size=5, max_length=8)
    alone = [c(sentences) for c in chain.candidates]
    with torch.no_grad():
        stock = torch.cat([model(**SpaceTok()([s], "max_length", True, 8, "pt")).logits for s in sentences])
    assert alone[-1].outputs == stock.argmax(-1).tolist()  # the full candidate is the model
    conf = torch.stack([a.confidence[confidence] for a in alone[:-1]], 1)  # [N, 2]
    threshold = float(conf[:, 0].median())  # a threshold exactly at an observed value: ties must stop
    router = Router(chain.candidates, costs=[1.0, 2.0, 3.0], router="cascade", confidence=confidence, threshold=threshold)
    out = router(sentences)
    stop = (conf >= threshold) if confidence == "max_prob" else (conf <= threshold)  # [N, 2] stop here
    want = [next((k for k in range(2) if stop[i, k]), 2) for i in range(len(sentences))]
    assert out.chosen == want and 0 < sum(c == 0 for c in want) < len(want)
    assert out.outputs == [alone[k].outputs[i] for i, k in enumerate(want)]
    assert out.cost == pytest.approx(sum([1.0, 2.0, 3.0][k] for k in want))
    from dynexec_compile import last_stats

    assert last_stats()["compaction"]  # samples that stopped left the batch: escalation resumed on the rest
    # two of the chain's candidates: the cheapest exit and the full model
    pair_router = Router([chain.candidates[0], chain.candidates[2]], costs=[1.0, 3.0], router="cascade",
                         confidence=confidence, threshold=threshold)
    out2 = pair_router(sentences)
    assert out2.chosen == [0 if stop[i, 0] else 1 for i in range(len(sentences))]
    with pytest.raises(ValueError, match="increasing block indices in 0..1"):
        ExitCandidates(model, SpaceTok(), blocks=[2])
    from dynexec_compile.routing.candidates import _EarlyExitCall

    eager = _EarlyExitCall(lambda **kw: model(**kw))  # what Dynamo's fallback past its recompile limit runs
    with pytest.raises(RuntimeError, match="ran without the early-exit runtime"):
        eager(**SpaceTok()(sentences[:2], "max_length", True, 8, "pt"))


# ---- learned cascades, line completion ------------------------------------------------------


class FeatureTable(Table):
    """A Table whose answers carry uncertainty features."""

    def __init__(self, answers, confidence, features):
        super().__init__(answers, confidence)
        self.features = features

    def __call__(self, prompts):
        a = super().__call__(prompts)
        return Answers(a.outputs, a.confidence, self.features[torch.tensor(prompts, dtype=torch.long)])


def test_a_learned_cascade_escalates_where_its_features_say_the_strong_model_wins():
    """The cheap model's max probability says nothing here (constant); feature 1 of its answers
    marks the prompts where it is wrong and the strong model right; feature 0 is noise."""
    torch.manual_seed(0)
    n = 400
    wins = torch.rand(n) < 0.3  # the strong model is right, the cheap one wrong
    feats = torch.stack([torch.randn(n), wins.double() + 0.15 * torch.randn(n)], 1)
    cheap = FeatureTable([0 if w else 1 for w in wins.tolist()], [0.7] * n, feats)
    strong = Table([1] * n, [0.9] * n)
    metric = lambda o, r: float(o == r)  # noqa: E731
    router = train_router(cheap, strong, list(range(n)), metric, references=[1] * n, router="cascade",
                          costs=[1, 5], progress=False)
    assert (router.router, router.confidence, router.embedder) == ("cascade", "learned", None)
    need = router.need_from_answers(cheap(list(range(n))))
    assert ((need > 0.5) == wins).double().mean() > 0.95
    cal = router.calibrate(list(zip(range(n), [1] * n)), quality=1.0, metric=metric)
    assert cal.quality == 1.0 and abs(cal.strong_share - float(wins.double().mean())) < 0.05
    assert "learned deferral rule's P(cheap answer not good enough) >" in cal.description
    out = router(list(range(n)))
    assert out.chosen == [int(v) for v in (need > router.threshold).tolist()]
    with pytest.raises(ValueError, match="needs its trained deferral classifier"):
        Router([cheap, strong], router="cascade", confidence="learned")
    with pytest.raises(ValueError, match="answers have none"):
        Router([cheap, strong], router="cascade", confidence="learned", classifier=router.classifier).need_from_answers(strong(list(range(3))))


def test_learned_cascade_save_load_round_trips(tmp_path):
    torch.manual_seed(0)
    n = 50
    cheap = FeatureTable([0] * n, [0.5] * n, torch.randn(n, 8))
    strong = Table([1] * n, [0.9] * n)
    router = Router([cheap, strong], [1, 3], "cascade", confidence="learned", classifier=RouterClassifier(8, 4).eval(), threshold=0.5)
    router.save(tmp_path / "r.safetensors")
    back = Router.load(tmp_path / "r.safetensors", [cheap, strong])  # no embedder to rebuild
    prompts = list(range(n))
    assert back.confidence == "learned" and torch.equal(back.need_from_answers(cheap(prompts)), router.need_from_answers(cheap(prompts)))
    assert back(prompts).chosen == router(prompts).chosen


def test_uncertainty_features_read_the_answered_tokens_only():
    from dynexec_compile.routing import uncertainty_features

    logits = torch.zeros(2, 3, 4)
    logits[:, 0, 0] = 10.0  # token 0: sure; tokens 1, 2: uniform over 4
    f = uncertainty_features(logits, torch.tensor([[True, False, False], [True, True, True]]))
    sure, unsure = float(torch.log_softmax(logits[0, 0], -1).max()), -math.log(4)
    assert f.shape == (2, 8)
    torch.testing.assert_close(f[0, :5], torch.full((5,), sure))  # quantiles of one token
    assert f[1, 0].item() == pytest.approx(unsure) and f[1, 4].item() == pytest.approx(sure)
    assert f[0, 7].item() == pytest.approx(math.log(2)) and f[1, 7].item() == pytest.approx(math.log(4))
    assert f[1, 6].item() > f[0, 6].item()  # more entropy where the answer held uniform tokens


def test_line_metrics():
    from dynexec_compile.routing import edit_similarity, exact_match

    assert edit_similarity(" return x", "return x ") == 1.0 and exact_match(" return x", "return x ") == 1.0
    assert edit_similarity("abc", "abd") == pytest.approx(2 / 3) and exact_match("abc", "abd") == 0.0
    assert edit_similarity("", "") == 1.0 and edit_similarity("abc", "") == 0.0
    assert edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)


def test_generator_candidate_cuts_at_the_stop_string():
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, intermediate_size=64)
    model = T.LlamaForCausalLM(cfg).eval()

    class Tok:  # token t decodes to the letter 'a' + t, token `newline` to a newline
        pad_token_id, eos_token_id, newline = 0, None, -1

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [int(t) for t in text.split()]}

        def decode(self, ids):
            return "".join("\n" if i == self.newline else chr(ord("a") + i) for i in ids)

    prompts = ["5 6 7 8", "9 10", "11 12 13", "1 2"]
    tok = Tok()
    plain = GeneratorCandidate(model, tok, max_new_tokens=6, batch_size=2)(prompts)
    tok.newline = plain.outputs[0][2]  # a token the model does generate, mid-answer, stands for "\n"
    cut = GeneratorCandidate(model, tok, max_new_tokens=6, batch_size=2, stop="\n")(prompts)
    for ids, text, lp, lp_all in zip(plain.outputs, cut.outputs, cut.confidence["logprob"], plain.confidence["logprob"]):
        k = ids.index(tok.newline) + 1 if tok.newline in ids else len(ids)
        assert text == tok.decode(ids[:k]).split("\n")[0]
        if k == len(ids):
            assert lp.item() == pytest.approx(lp_all.item())  # no stop: every token counts
    assert len(cut.outputs[0]) == 2  # cut before its third token
    assert cut.features.shape == (4, 8) and plain.features.shape == (4, 8)
    with pytest.raises(ValueError, match="stop must be a non-empty string"):
        GeneratorCandidate(model, Tok(), stop="")
