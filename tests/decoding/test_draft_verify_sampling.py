"""Sampling with draft heads, self-speculation and EAGLE (with and without its lookup branch)
follows the target's own distribution.

End to end through ``generate``: a tiny LLaMA over an 8-token vocabulary, one prompt in
2,000 rows of one batch, three new tokens per row. The first token comes from the prefill,
the second and third through drafts and the rejection rule. The joint distribution of the
three tokens is computed exactly from the model (64 prefixes), and a chi-square test
compares it with the samples — under temperature, top-k and top-p. The same test must
reject the untempered distribution, so it can fail. Candidate trees (the drafter's top-k
tokens as children, point-mass proposals) are tested the same way.
"""

import functools

import pytest
import torch
from conftest import SAMPLING_WARPS, chi_square_pvalue, tiny_sampling_lm
from conftest import exact_joint as conftest_exact_joint

import dynexec_compile as dx
from dynexec_compile.decoding import DraftHeads, SamplingParams
from dynexec_compile.decoding.adaptive import WidthChooser

V, ROWS, N = 8, 2000, 3
PROMPT = torch.tensor([[1, 5, 2, 7]])
PARAMS = SAMPLING_WARPS


@pytest.fixture(scope="module")
def tiny():
    model = tiny_sampling_lm(V, 64)
    heads = DraftHeads(32, 2, vocab_size=V)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.3)  # proposals unlike the target's, so rejections happen
    return model, heads


@functools.cache
def eagle_draft(model):
    """An EAGLE draft trained briefly on the model's own samples: its guesses are accepted
    often, and still rejected often."""
    torch.manual_seed(3)
    with torch.no_grad():
        text = model.generate(torch.randint(0, V, (32, 4)), do_sample=True, max_new_tokens=24, pad_token_id=0)
    return dx.train_eagle_draft(model, text, epochs=3, lr=3e-3, progress=False)


def exact_joint(model, params):
    """``[V, V, V]``: probability of each 3-token continuation of PROMPT under the warped target."""
    return conftest_exact_joint(model, PROMPT[0].tolist(), params, N)


def sample(model, heads, strategy, params, seed, tree=None):
    adaptive = strategy.endswith("_adaptive")
    if strategy == "draft_heads_adaptive":
        strategy = "draft_heads"
    options = {"heads": heads, "adaptive": adaptive} if strategy == "draft_heads" else {"exit_layer": 1}
    if strategy.startswith("eagle"):  # a random draft layer: its guesses are both accepted and rejected
        options = {"draft": eagle_draft(model), "num_draft": 2, "lookup": 0 if strategy == "eagle" else 2,
                   "adaptive": adaptive}
        strategy = "eagle"
    if tree is not None:
        options["tree"] = tree
    elif strategy == "self_speculative":
        options["num_draft"] = 2
    with pytest.MonkeyPatch.context() as patch:
        if adaptive:  # steps alternate between the plain step (offered last) and the widest offered
            choose = WidthChooser.choose
            patch.setattr(WidthChooser, "choose", lambda self, offered: choose(
                self, [offered[-1] if (sum(self.chosen.values()) + seed) % 2 else offered[0]]))
        out = dx.generate(
            model, PROMPT.expand(ROWS, -1), strategy=strategy, do_sample=True, temperature=params.temperature,
            top_k=params.top_k, top_p=params.top_p, generator=torch.Generator().manual_seed(seed), max_new_tokens=N,
            eos_token_id=[], compile=False, **options,
        )
    return out.sequences[:, PROMPT.shape[1]:], out.stats


@pytest.mark.parametrize("strategy", ["draft_heads", "draft_heads_adaptive", "self_speculative", "eagle", "eagle_lookup",
                                      "eagle_adaptive"])
@pytest.mark.parametrize("warp", sorted(PARAMS))
def test_sampled_tokens_follow_the_target_distribution(strategy, warp, tiny):
    model, heads = tiny
    samples, stats = sample(model, heads, strategy, PARAMS[warp], seed=1)
    assert 0.05 < stats.extra["acceptance_rate"] < 0.95, "drafts must be both accepted and rejected"
    if strategy.endswith("_adaptive"):
        assert "tree(-1,)" in stats.extra["adaptive_steps"] and len(stats.extra["adaptive_steps"]) >= 2
    assert chi_square_pvalue(samples, V, exact_joint(model, PARAMS[warp])) > 1e-3


@pytest.mark.parametrize("strategy", ["draft_heads", "self_speculative", "eagle"])
def test_the_chi_square_test_tells_another_distribution_apart(strategy, tiny):
    model, heads = tiny
    samples, _ = sample(model, heads, strategy, PARAMS["temperature"], seed=2)
    assert chi_square_pvalue(samples, V, exact_joint(model, SamplingParams(temperature=1.0))) < 1e-6


# ---- candidate trees: children are the drafter's top-k tokens (point-mass proposals) ---------


@pytest.mark.parametrize("strategy", ["draft_heads", "self_speculative"])
@pytest.mark.parametrize("warp", sorted(PARAMS))
def test_tree_sampling_follows_the_target_distribution(strategy, warp, tiny):
    model, heads = tiny
    samples, stats = sample(model, heads, strategy, PARAMS[warp], seed=1, tree=[3, 2])
    accepted = sum(map(sum, stats.extra["accepted_drafts_per_step"]))
    assert accepted > 0.05 * ROWS, "drafts must be accepted for the test to mean something"
    assert stats.extra["mean_accepted_per_step"] < 2, "and rejected"
    assert chi_square_pvalue(samples, V, exact_joint(model, PARAMS[warp])) > 1e-3


@pytest.mark.parametrize("strategy", ["draft_heads", "self_speculative"])
def test_tree_sampling_is_reproducible_and_tells_another_distribution_apart(strategy, tiny):
    model, heads = tiny
    a, _ = sample(model, heads, strategy, PARAMS["temperature"], seed=2, tree=[3, 2])
    b, _ = sample(model, heads, strategy, PARAMS["temperature"], seed=2, tree=[3, 2])
    assert torch.equal(a, b), "the same seed gives the same tokens"
    assert chi_square_pvalue(a, V, exact_joint(model, SamplingParams(temperature=1.0))) < 1e-6
