"""Prompt elastification: word budgets, the baselines, the scorer, self-induced labels, the
TTFT target and ROUGE-L.

The LM side runs on the committed demo target (a real trained LLaMA with its own tokenizer);
the scorer on the committed pretrained MiniLM-L6.
"""

import copy
import math

import pytest
import torch

import dynexec_compile as dx
from dynexec_compile.elastic import prompt as P
from dynexec_compile.elastic.prompt_tasks import KINDS, LongPrompt, long_prompts


@pytest.fixture(scope="module")
def demo():
    return dx.load_demo_lm("target")


@pytest.fixture(scope="module")
def scorer():
    return P.PromptScorer()


def test_rouge_l():
    assert P.rouge_l("The cat sat.", "the cat sat") == 100.0
    assert P.rouge_l("dogs bark", "the cat sat") == 0.0
    # LCS("a b c d e", "a c e f") = 3: P = 3/5, R = 3/4
    assert P.rouge_l("a b c d e", "a c e f") == pytest.approx(100 * 2 * 0.6 * 0.75 / (0.6 + 0.75))
    assert P.rouge_l("", "") == 100.0 and P.rouge_l("", "x") == 0.0


def test_long_prompts_are_long_deterministic_and_split():
    bench, train = long_prompts(6), long_prompts(6, "train")
    assert [p.kind for p in bench] == list(KINDS) * 2
    assert long_prompts(6) == bench and bench != train
    for p in bench:
        assert p.context.count("\n") >= 6, "several paragraphs"
        assert p.text().endswith(p.instruction)
    assert "review" in bench[1].instruction and "function" in bench[2].instruction
    with pytest.raises(ValueError, match="split"):
        long_prompts(2, "test")


def test_words_cost_the_lm_tokens_and_rejoin(demo):
    _, tok = demo
    p = long_prompts(3)[2]
    words = P.Words.of(p.context, tok)
    assert words.join(torch.ones(len(words), dtype=torch.bool)) == p.context.strip()
    assert int(words.costs.sum()) == len(tok(p.context.strip(), add_special_tokens=False)["input_ids"])
    assert len(words.lines()) == p.context.count("\n") + 1
    assert words.lines()[0] == p.context.split("\n")[0].strip()


def test_keep_by_score_fills_the_budget_best_first():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2])
    costs = torch.tensor([1, 2, 1, 3, 1])
    kept = P.keep_by_score(scores, costs, 0.5)  # budget 4 tokens: 0.9 (2) + 0.7 (3) would be 5
    assert kept.tolist() == [False, True, False, False, False]
    assert P.keep_by_score(scores, costs, 1.0).all()
    assert P.keep_by_score(scores, costs, 0.01).sum() == 1, "at least one word"
    with pytest.raises(ValueError):
        P.keep_by_score(scores, costs, 0.0)


def test_baselines_keep_the_instruction_and_the_budget(demo):
    _, tok = demo
    p = long_prompts(2)[1]
    oldest = P.compress(p, 0.5, tok, "oldest")
    assert p.context.strip().endswith(oldest.context), "dropping the oldest keeps the end"
    assert oldest.text().endswith(p.instruction)
    a, b, c = (P.compress(p, 0.5, tok, "random", seed=s) for s in (1, 1, 2))
    assert a.context == b.context != c.context
    for comp in (oldest, a):
        assert 0.4 < comp.kept_fraction <= 0.5
        kept_tokens = len(tok(comp.context, add_special_tokens=False)["input_ids"])
        assert abs(kept_tokens / int(P.Words.of(p.context, tok).costs.sum()) - comp.kept_fraction) < 0.05
    with pytest.raises(ValueError, match="needs scorer"):
        P.compress(p, 0.5, tok, "scorer")
    with pytest.raises(ValueError, match="method"):
        P.compress(p, 0.5, tok, "newest")


def test_overlap_finds_the_line_the_question_names(demo):
    _, tok = demo
    for p in long_prompts(6)[1:3] + long_prompts(6)[4:6]:
        words = P.Words.of(p.context, tok)
        best_line = words.lines()[int(words.line_of[P.overlap_scores(words, p.instruction).argmax()])]
        if p.kind == "review_question":
            number = p.instruction.split("review ")[1].split()[0]
            assert best_line.startswith(f"Review {number}:")
        else:
            name = p.instruction.split("function ")[1].split(" do?")[0]
            assert best_line.startswith(name + "(")


def test_scorer_learns_labels_and_round_trips(demo, scorer, tmp_path):
    """Labels = the line the question names: after training, the 25% the scorer keeps hold
    those words, on prompts it did not see; it keeps or drops lines whole (but the last one
    the budget reaches); the saved head scores identically."""
    _, tok = demo

    def labelled(prompts):
        out = []
        for p in prompts:
            words = P.Words.of(p.context, tok)
            target = (P.overlap_scores(words, p.instruction) == P.overlap_scores(words, p.instruction).max()).double()
            out.append(P.PromptLabels(p, torch.tensor([1]), target, {}))
        return out

    questions = [p for p in long_prompts(48, "train") if p.kind != "summary"]
    trained = P.train_prompt_scorer(labelled(questions), tok, scorer=scorer, epochs=60, progress=False)
    held_out = labelled([p for p in long_prompts(9) if p.kind != "summary"])
    recall = []
    for item in held_out:
        c = P.compress(item.prompt, 0.25, tok, "scorer", trained)
        recall.append(float(item.labels[c.kept].sum() / item.labels.sum()))
        assert c.scorer_s > 0
        words = P.Words.of(item.prompt.context, tok)
        partial = [j for j in range(int(words.line_of.max()) + 1) if 0 < c.kept[words.line_of == j].sum() < (words.line_of == j).sum()]
        assert len(partial) <= 1, "whole lines"
    assert sum(recall) / len(recall) > 0.8, recall
    untrained = P.compress(held_out[0].prompt, 0.25, tok, "random")
    assert float(held_out[0].labels[untrained.kept].sum() / held_out[0].labels.sum()) < 0.6
    path = tmp_path / "scorer.safetensors"
    trained.save(path)
    loaded = P.PromptScorer.load(path)
    words = P.Words.of(held_out[0].prompt.context, tok)
    torch.testing.assert_close(loaded.scores(words, held_out[0].prompt.instruction),
                               trained.scores(words, held_out[0].prompt.instruction))
    with pytest.raises(ValueError, match="not a dynexec prompt scorer"):
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
        P.PromptScorer.load(tmp_path / "other.safetensors")


def test_answer_loglik_batched_equals_one_by_one(demo):
    model, tok = demo
    texts = ["def add(a, b):\n    return", "class Point:\n    def __init__(self, x, y):\n        self.x"]
    answer = torch.tensor(tok(" a + b\n")["input_ids"])
    batched = P.answer_loglik(model, tok, texts, answer)
    single = [P.answer_loglik(model, tok, [t], answer)[0] for t in texts]
    assert batched == pytest.approx(single, abs=1e-4)
    assert all(x < 0 for x in batched)


def test_self_induced_labels(demo):
    """Every candidate is tried at every ratio; a word's label is the share of ratios at which
    the candidate with the most likely full-prompt answer kept it."""
    model, tok = demo
    prompt = LongPrompt("doc_question", "\n".join(f"def f{i}(x):\n    return x * {i} + {i * i}" for i in range(6)),
                        "# what does f3 return?")

    def answer_fn(ids):
        out = dx.generate(model, ids, max_new_tokens=8, eos_token_id=[], pad_token_id=0, compile=False)
        return out.sequences[0, ids.shape[1]:]

    def embed(texts):
        gen = torch.Generator().manual_seed(len(texts))
        return torch.nn.functional.normalize(torch.randn(len(texts), 8, generator=gen), dim=-1)

    (item,) = P.label_prompts(model, tok, [prompt], answer_fn, embedder=embed, progress=False)
    assert not any(m._forward_hooks for m in model.modules()), "no hook left behind (a compiled decode must trace)"
    words = P.Words.of(prompt.context, tok)
    assert item.labels.shape == (len(words),) and len(item.answer) == 8
    assert set(item.best) == set(P.DEFAULT_RATIOS) and "full" in item.loglik[1.0]
    for ratio, name in item.best.items():
        scores = item.loglik[ratio]
        assert set(scores) == set(P.LABEL_CANDIDATES) and all(math.isfinite(v) for v in scores.values())
        assert scores[name] == max(scores.values())
    thirds = item.labels * len(P.DEFAULT_RATIOS)
    assert torch.equal(thirds, thirds.round()) and item.labels.max() == 1.0
    # each winner kept about its ratio of the context's tokens: the labels add up to the mean ratio
    total = float(words.costs.sum())
    spent = float((item.labels * words.costs).sum())
    mean_ratio = sum(P.DEFAULT_RATIOS) / len(P.DEFAULT_RATIOS)
    assert mean_ratio * total - float(words.costs.max()) <= spent <= mean_ratio * total + 1e-9
    # the LM's line importance: how much the answer's log-probability falls without each line
    lines = int(words.line_of.max()) + 1
    full = P.answer_loglik(model, tok, [prompt.text()], item.answer)[0]
    want = [full - P.answer_loglik(model, tok, [prompt.text(words.join(words.line_of != j))], item.answer)[0]
            for j in range(lines)]
    assert item.line_importance.tolist() == pytest.approx(want, abs=1e-4)
    # labels from an earlier run: no answer generated again, only the missing candidate scored
    earlier = copy.deepcopy(item)
    for ratio in P.DEFAULT_RATIOS:
        del earlier.loglik[ratio]["line_importance"]
        earlier.loglik[ratio]["random"] = 0.0  # kept as given, not scored again

    def no_answer(ids):
        raise AssertionError("the answer is known")

    (again,) = P.label_prompts(model, tok, [prompt], no_answer, embedder=embed, progress=False, known=[earlier])
    for ratio in P.DEFAULT_RATIOS:
        assert again.loglik[ratio]["random"] == 0.0
        assert again.loglik[ratio]["line_importance"] == pytest.approx(item.loglik[ratio]["line_importance"], abs=1e-4)
    with pytest.raises(ValueError, match="another prompt"):
        P.label_prompts(model, tok, [long_prompts(1)[0]], no_answer, embedder=embed, progress=False, known=[earlier])


def test_attention_signal_is_the_models_attention(demo):
    """The instruction-to-context attention read by hooks equals transformers' own
    ``output_attentions`` (asked on a copy: that installs hooks on the model for good)."""
    model, tok = demo
    prompt = long_prompts(3)[1]
    words = P.Words.of(prompt.context, tok)
    got = P._lm_word_signals(model, tok, prompt, words)["attention"]
    other = copy.deepcopy(model)
    other.set_attn_implementation("eager")
    ids = P.chat_ids(tok, prompt.text())
    with torch.no_grad():
        attn = torch.stack([a[0].mean(0) for a in other(ids, output_attentions=True).attentions]).mean(0)
    n = int(words.costs.sum())
    per_token = attn[n:, :n].mean(0)  # no template: the context starts at token 0
    owner = torch.repeat_interleave(torch.arange(len(words)), words.costs)
    want = torch.zeros(len(words), dtype=torch.float64).index_add_(0, owner, per_token.double()) / words.costs.clamp(min=1)
    torch.testing.assert_close(got, want)


def test_ttft_profile_and_the_keep_it_picks(demo, scorer):
    _, tok = demo
    profile = P.TTFTProfile.fit([100, 200, 400, 800], [0.1 + 1e-3 * n + 1e-7 * n * n for n in (100, 200, 400, 800)],
                                scorer_s_per_word=1e-4)
    assert profile.predict(300) == pytest.approx(0.1 + 0.3 + 0.009, rel=1e-6)
    elastifier = P.PromptElastifier(scorer, tok, profile)
    p = long_prompts(3)[0]
    full = P.chat_ids(tok, p.text()).shape[1]
    assert elastifier.keep_for(p, profile.predict(full) + 1e-3)[0] == 1.0
    target = profile.predict(full) * 0.7
    keep, predicted = elastifier.keep_for(p, target)
    assert 0.1 < keep < 1.0 and predicted <= target
    words = P.Words.of(p.context, tok)
    more = profile.scorer_s_per_word * len(words) + profile.predict(full - float(words.costs.sum()) * (1 - keep - 0.01))
    assert more > target, "the largest keep that meets the target"
    compressed, _ = elastifier(p, target)
    assert compressed.keep == keep and compressed.text().endswith(p.instruction)
    assert elastifier.keep_for(p, 1e-6)[0] == elastifier.min_keep
    with pytest.raises(ValueError):
        P.TTFTProfile.fit([1, 2], [0.1, 0.2])
    calls = []
    measured = P.profile_ttft(lambda ids: calls.append(ids.shape[1]), lengths=(8, 16, 32), repeats=2)
    assert calls.count(8) == 3 and measured.lengths == (8, 16, 32)
