"""Verification core: tree layout, greedy acceptance, and rejection sampling that is lossless.

The statistical tests run the verification rule on a synthetic first-order Markov "target"
and "draft" over a tiny vocabulary, many rows at once: the joint distribution of the first
three emitted tokens must match the target's own (warped) sampling distribution, computed
exactly, under a chi-square test; the draft's own distribution must fail the same test (so
the test can fail).
"""

import math

import pytest
import torch
from conftest import chi_square_pvalue

from dynexec_compile.decoding import SamplingParams, sampling_probs
from dynexec_compile.decoding.masks import step_mask
from dynexec_compile.decoding.verify import (
    StepShape,
    TreeSpec,
    as_tree,
    draw_children,
    point_mass_probs,
    verify,
    verify_sampling,
)

V = 8


def test_tree_spec_structure():
    tree = TreeSpec.from_branching([2, 2, 1])
    assert tree.size == 11 and tree.num_draft == 10 and tree.max_depth == 3 and not tree.is_chain
    assert tree.parents == (-1, 0, 0, 1, 1, 2, 2, 3, 4, 5, 6)
    assert tree.depths == (0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)
    vis = tree.visible()
    for i in range(tree.size):  # visible[i, j] iff j is i or one of its ancestors
        ancestors, node = set(), i
        while node >= 0:
            ancestors.add(node)
            node = tree.parents[node]
        assert {j for j in range(tree.size) if vis[i, j]} == ancestors
    assert tree.path_table()[9].tolist() == [0, 2, 5, 9]
    assert tree.child_table()[0].tolist() == [1, 2] and tree.child_table()[3].tolist() == [7, -1]
    chain = TreeSpec.chain(4)
    assert chain.is_chain and torch.equal(chain.visible(), torch.tril(torch.ones(5, 5, dtype=torch.bool)))
    assert as_tree(None, 3) == TreeSpec.chain(3)
    assert as_tree([2, 1], None) == TreeSpec((-1, 0, 0, 1, 2))
    assert as_tree(tree, 10) is tree


@pytest.mark.parametrize(
    ("parents", "message"),
    [((0, 0), r"tuple \(-1"), ((-1,), "at least one"), ((-1, 1), "0 <= parents"), ((-1, 0, 1, 0), "breadth-first")],
)
def test_bad_trees_are_refused(parents, message):
    with pytest.raises(ValueError, match=message):
        TreeSpec(parents)


def test_bad_tree_arguments_are_refused():
    with pytest.raises(ValueError, match="num_draft"):
        as_tree(None, None)
    with pytest.raises(ValueError, match="num_draft=3 but the tree has 4"):
        as_tree([2, 1], 3)
    with pytest.raises(TypeError, match="tree must be"):
        as_tree("2,1", None)
    with pytest.raises(ValueError, match="branching"):
        TreeSpec.from_branching([2, 0])


def test_tree_step_mask_sees_prefix_and_ancestors_only():
    tree = TreeSpec.from_branching([2, 1])
    lengths = torch.tensor([3, 5])
    positions, slots = StepShape.of_tree(tree).place(lengths)
    assert positions.tolist() == [[3, 4, 4, 5, 5], [5, 6, 6, 7, 7]]
    assert slots.tolist() == [[3, 4, 5, 6, 7], [5, 6, 7, 8, 9]]
    mask = step_mask(lengths, slots, tree.visible(), 12, torch.float32)  # [B, 1, T, S]
    seen = mask[:, 0] == 0
    # node 4 (parent 2, grandparent 0) of row 1: prefix 0..4, root slot 5, node 2 at 7, itself at 9
    assert seen[1, 4].nonzero()[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 7, 9]
    assert seen[0, 3].nonzero()[:, 0].tolist() == [0, 1, 2, 3, 4, 6]
    # queries of a later level that see nodes written by earlier forwards
    level = torch.tensor([[True, True, False, True, False], [True, False, True, False, True]])  # nodes 3, 4
    m = step_mask(lengths, lengths[:, None] + torch.arange(5), level, 12, torch.float32)[:, 0] == 0
    assert m[1, 1].nonzero()[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 7, 9]


def test_greedy_accepts_the_deepest_agreeing_path():
    tree = TreeSpec.from_branching([2, 2])  # 0 -> {1, 2}; 1 -> {3, 4}; 2 -> {5, 6}
    tokens = torch.tensor([[9, 4, 5, 1, 2, 3, 6], [9, 4, 5, 1, 2, 3, 6], [9, 4, 5, 1, 2, 3, 6]])
    # the target's argmax after each node; row 0 agrees along 0-2-6, row 1 along 0-1 only,
    # row 2 with nothing
    argmax = torch.tensor([[5, 7, 6, 0, 0, 0, 0], [4, 3, 0, 0, 0, 0, 0], [7, 3, 0, 0, 0, 0, 0]])
    logits = torch.nn.functional.one_hot(argmax, 10).float()
    verdict = verify(tree, tokens, logits)
    assert verdict.accepted.tolist() == [2, 1, 0]
    assert verdict.path.tolist() == [[0, 2, 6], [0, 1, 1], [0, 0, 0]]
    assert verdict.next_token.tolist() == [0, 3, 7]
    assert verdict.tokens.tolist() == [[5, 6, 0], [4, 3, 3], [7, 7, 7]]
    assert verdict.emitted.tolist() == [3, 2, 1]


def test_sampling_with_the_target_as_draft_accepts_everything():
    tree = TreeSpec.chain(4)
    logits = torch.randn(64, tree.size, V)
    params = SamplingParams(temperature=0.8)
    p = sampling_probs(logits, params)
    tokens = torch.randint(0, V, (64, tree.size))
    tokens[:, 1:] = torch.multinomial(p[:, :-1].reshape(-1, V), 1).reshape(64, 4)
    verdict = verify_sampling(tree, tokens, logits, torch.cat([p[:, :1], p[:, :-1]], dim=1), params)
    assert verdict.accepted.tolist() == [4] * 64
    with pytest.raises(ValueError, match="needs draft_probs"):
        verify(tree, tokens, logits, sampling=params)


def test_draw_children_draws_without_replacement():
    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.0, 0.0, 1.0, 0.0]])
    tokens, child_probs = draw_children(probs, 3, torch.Generator().manual_seed(0))
    assert len(set(tokens[0].tolist())) == 3
    assert tokens[1, 0] == 2 and child_probs[1, 1:].abs().sum() == 0, "support exhausted: zero rows, never accepted"
    for c in range(3):  # child c was drawn from probs without the earlier children
        expected = probs[0].clone()
        expected[tokens[0, :c]] = 0
        torch.testing.assert_close(child_probs[0, c], expected / expected.sum())


# ---- statistics -----------------------------------------------------------------------------


class Markov:
    """A first-order Markov 'language model': logits of the next token depend on the last one."""

    def __init__(self, seed: int, base: torch.Tensor | None = None, noise: float = 1.0):
        g = torch.Generator().manual_seed(seed)
        table = torch.randn(V, V, generator=g) * 1.5
        self.table = table if base is None else base + noise * table  # [V, V]

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[tokens]  # [..., V]


def speculative_samples(target, draft, tree, params, rows, n, seed, children="sampled"):
    """``[rows, n]`` tokens generated by draft-and-verify rounds from the start token 0.

    ``children``: ``"sampled"`` draws each node's children from the draft without replacement;
    ``"top_k"`` takes the draft's most likely tokens (deterministic, point-mass proposals)."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros(rows, 0, dtype=torch.long)
    root = torch.zeros(rows, dtype=torch.long)
    while out.shape[1] < n:
        tokens = torch.zeros(rows, tree.size, dtype=torch.long)
        q = torch.zeros(rows, tree.size, V)
        tokens[:, 0] = root
        for node, kids in enumerate(tree.children):
            if kids and children == "top_k":
                tokens[:, list(kids)] = draft.logits(tokens[:, node]).topk(len(kids), dim=-1).indices
            elif kids:
                probs = sampling_probs(draft.logits(tokens[:, node]), params)
                tokens[:, list(kids)], q[:, list(kids)] = draw_children(probs, len(kids), gen)
        if children == "top_k":
            q = point_mass_probs(tree, tokens, V)
        verdict = verify_sampling(tree, tokens, target.logits(tokens), q, params, gen)
        # keep a rectangular record: every row takes min(emitted) tokens this round, the rest
        # of its accepted drafts are dropped and re-drafted (still exact: a prefix of samples)
        take = int(verdict.emitted.min())
        out = torch.cat([out, verdict.tokens[:, :take]], dim=1)
        root = verdict.tokens[:, take - 1]
    return out[:, :n]


def exact_joint(model, params, n):
    """``[V] * n`` probabilities of the first ``n`` tokens from the start token 0."""
    p = sampling_probs(model.logits(torch.arange(V)), params)  # [V, V]: next | last
    joint = p[0]
    for _ in range(n - 1):
        joint = joint[..., None] * p[torch.arange(V)].reshape((1,) * (joint.ndim - 1) + (V, V))
    return joint


PARAMS = {
    "temperature": SamplingParams(temperature=1.3),
    "top_k": SamplingParams(temperature=0.9, top_k=4),
    "top_p": SamplingParams(top_p=0.8),
}
TREES = {"chain": TreeSpec.chain(3), "tree": TreeSpec.from_branching([3, 2, 1])}


@pytest.mark.parametrize("shape", sorted(TREES))
@pytest.mark.parametrize("warp", sorted(PARAMS))
def test_sampled_tokens_follow_the_target_distribution(shape, warp):
    target = Markov(1)
    draft = Markov(2, base=target.table, noise=0.8)
    params, tree = PARAMS[warp], TREES[shape]
    samples = speculative_samples(target, draft, tree, params, rows=30_000, n=3, seed=3)
    assert chi_square_pvalue(samples, V, exact_joint(target, params, 3)) > 1e-3


@pytest.mark.parametrize("warp", sorted(PARAMS))
def test_point_mass_proposals_of_top_k_children_are_lossless(warp):
    """Children fixed by the drafter (its top-k tokens) with point-mass draft_probs: the
    emitted tokens still follow the target exactly."""
    target = Markov(1)
    draft = Markov(2, base=target.table, noise=0.8)
    params, tree = PARAMS[warp], TREES["tree"]
    samples = speculative_samples(target, draft, tree, params, rows=30_000, n=3, seed=5, children="top_k")
    assert chi_square_pvalue(samples, V, exact_joint(target, params, 3)) > 1e-3


def test_point_mass_siblings_are_accepted_with_the_target_probability():
    """Children x_1, x_2, x_3 of the root: child c is accepted with probability p(x_c), the
    bonus (none accepted) with the rest; a repeated sibling gets an all-zero row."""
    target = Markov(7)
    params = SamplingParams(temperature=1.0)
    tree = TreeSpec.from_branching([3])
    rows = 50_000
    tokens = torch.tensor([0, 5, 2, 7]).expand(rows, -1)
    verdict = verify_sampling(tree, tokens, target.logits(tokens), point_mass_probs(tree, tokens, V), params,
                              torch.Generator().manual_seed(0))
    p0 = sampling_probs(target.logits(torch.tensor(0)), params)
    for node, token in ((1, 5), (2, 2), (3, 7)):
        rate = ((verdict.accepted == 1) & (verdict.path[:, 1] == node)).float().mean().item()
        want = p0[token].item()
        assert abs(rate - want) < 4 * math.sqrt(want * (1 - want) / rows), (node, rate, want)
    first = torch.bincount(verdict.tokens[:, 0], minlength=V).double() / rows  # the emitted token ~ p
    assert (first - p0.double()).abs().max() < 0.01
    repeated = point_mass_probs(tree, torch.tensor([[5, 5, 2, 5]]), V)
    assert repeated[0, 1, 5] == 1 and repeated[0, 2, 2] == 1
    assert repeated[0, 0].sum() == 0 and repeated[0, 3].sum() == 0, "root unused, repeated sibling never accepted"


def test_the_chi_square_test_tells_the_draft_apart():
    """Power: the same test rejects the draft's own distribution (and a draft that is always
    accepted), so the test above could fail."""
    target = Markov(1)
    draft = Markov(2, base=target.table, noise=0.8)
    params = PARAMS["temperature"]
    draft_only = speculative_samples(draft, draft, TREES["chain"], params, rows=30_000, n=3, seed=4)
    assert chi_square_pvalue(draft_only, V, exact_joint(target, params, 3)) < 1e-6


def test_sampling_acceptance_matches_the_overlap_of_target_and_draft():
    """One drafted token: P(accept) = sum_x min(p(x), q(x)) (Leviathan et al., Lemma 3.3)."""
    target, draft = Markov(5), Markov(6)
    params = SamplingParams(temperature=1.0)
    tree = TreeSpec.chain(1)
    rows = 50_000
    gen = torch.Generator().manual_seed(0)
    q = sampling_probs(draft.logits(torch.zeros(rows, dtype=torch.long)), params)
    tokens = torch.zeros(rows, 2, dtype=torch.long)
    tokens[:, 1] = torch.multinomial(q, 1, generator=gen)[:, 0]
    probs = torch.stack([torch.zeros_like(q), q], dim=1)
    verdict = verify_sampling(tree, tokens, target.logits(tokens), probs, params, gen)
    p0 = sampling_probs(target.logits(torch.tensor(0)), params)
    overlap = torch.minimum(p0, q[0]).sum().item()
    rate = verdict.accepted.float().mean().item()
    assert abs(rate - overlap) < 4 * math.sqrt(overlap * (1 - overlap) / rows)


@pytest.mark.parametrize("tree", [TreeSpec.chain(3), TreeSpec.from_branching([2, 2])], ids=["chain", "tree"])
def test_greedy_verification_traces_into_one_graph(tree):
    """Fused strategies verify inside their compiled step: no graph break, same verdict."""
    tokens = torch.randint(0, 10, (3, tree.size), generator=torch.Generator().manual_seed(0))
    logits = torch.randn(3, tree.size, 10)
    tokens[:, 1] = logits[:, 0].argmax(-1)  # some rows accept something

    def fn(tokens, logits):
        verdict = verify(tree, tokens, logits)
        return verdict.accepted, verdict.path, verdict.tokens

    compiled = torch.compile(fn, backend="eager", fullgraph=True)
    for got, want in zip(compiled(tokens, logits), fn(tokens, logits), strict=True):
        assert torch.equal(got, want)
