"""strategy="draft_heads": one fused target forward per step, greedy token-identical to model.generate.

The heads are trained for a few seconds on each tiny model's own greedy text, so candidates
are accepted often enough that the acceptance paths (several tokens kept per step, different
counts per row) are exercised; a test checks they were.
"""

import pytest
import torch
from conftest import VOCAB, build_model, left_padded_batch, random_choice, random_mix_twice
from safetensors.torch import save_file
from torch._dynamo.testing import CompileCounterWithBackend

import dynexec_compile as dx
from dynexec_compile.decoding import DraftHeads, DraftHeadsEngine, TokenRuns, verify_step
from dynexec_compile.decoding.verify import _greedy_body

K = 3


def hf_greedy(model, ids, mask, max_new_tokens, eos=None):
    eos = [] if eos is None else eos
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=0
        )


def own_text(model, rows: int = 16, length: int = 48) -> torch.Tensor:
    """The model's greedy continuations of random 8-token prompts: [rows, 8 + length]."""
    prompts = torch.randint(3, VOCAB, (rows, 8), generator=torch.Generator().manual_seed(5))
    return hf_greedy(model, prompts, torch.ones_like(prompts), length)


@pytest.fixture(scope="module")
def heads_for():
    cache = {}

    def get(kind):
        if kind not in cache:
            model = build_model(kind)
            torch.manual_seed(0)
            heads = dx.train_draft_heads(model, own_text(model), offsets=K, steps=60, batch_size=8, lr=1e-2, progress=False)
            cache[kind] = (model, heads)
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_greedy_equals_transformers(kind, heads_for):
    model, heads = heads_for(kind)
    ids, mask = left_padded_batch([5, 11, 8], seed=3)
    out = dx.generate(model, ids, mask, strategy="draft_heads", heads=heads, max_new_tokens=40, eos_token_id=[], compile=False)
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, 40))
    assert out.stats.forward_passes == out.stats.steps + 1
    assert sum(map(sum, out.stats.accepted_per_step)) + 3 == sum(out.stats.new_tokens)


def test_rows_accept_their_own_number_of_drafts(heads_for):
    # the random GPT-2 (init range 0.2) writes text its heads learn to predict
    model, heads = heads_for("gpt2")
    ids, mask = left_padded_batch([5, 11, 8], seed=3)
    out = dx.generate(model, ids, mask, strategy="draft_heads", heads=heads, max_new_tokens=40, eos_token_id=[], compile=False)
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, 40))
    assert out.stats.extra["acceptance_rate"] > 0.2
    assert any(len(set(rows)) > 1 for rows in out.stats.extra["accepted_drafts_per_step"])
    assert out.stats.steps < 40 - 1, "accepted drafts save forwards"


def test_fused_step_accepts_exactly_the_greedy_prefix(heads_for):
    """Candidates equal to greedy's next tokens up to a chosen point are accepted up to there."""
    model, heads = heads_for("llama")
    ids, mask = left_padded_batch([6, 9, 4], seed=7)
    greedy = hf_greedy(model, ids, mask, K + 1)[:, ids.shape[1]:]  # [B, k+1]: pending + k tokens
    engine = DraftHeadsEngine(model, 3, 64, heads, compile=False)
    engine.prefill_propose(ids, mask)
    tokens = greedy.clone()
    tokens[1, 2] = (tokens[1, 2] + 1) % VOCAB  # row 1: second candidate wrong
    tokens[2, 1] = (tokens[2, 1] + 1) % VOCAB  # row 2: first candidate wrong
    lengths = engine.lengths.clone()
    live = torch.tensor([True, True, False])
    runs = TokenRuns(3, 64, K + 1, (), 0, torch.device("cpu"))
    runs.finished.copy_(~live)  # the finished row runs but keeps nothing
    verdict, _, _, (head_logits, chain) = verify_step(engine, engine.shape, tokens, runs)
    target, accepted = verdict.tokens, verdict.accepted
    assert accepted.tolist() == [K, 1, 0]
    assert torch.equal(target[0, :K], greedy[0, 1:]) and torch.equal(target[1, :2], greedy[1, 1:3])
    assert torch.equal(engine.lengths, lengths + torch.tensor([K + 1, 2, 0])), "live rows commit pending + accepted"
    assert head_logits.shape == (3, K, VOCAB)
    assert torch.equal(chain[:, 0], target.gather(1, accepted[:, None])[:, 0])
    assert torch.equal(chain[:, 1:], head_logits.argmax(-1))


def test_training_lowers_the_distillation_loss():
    from dynexec_compile.distill import _distill_loss

    model = build_model("llama")
    text = own_text(model)
    fresh = DraftHeads(64, K, vocab_size=VOCAB)
    torch.manual_seed(0)
    trained = dx.train_draft_heads(model, text, heads=fresh, steps=40, batch_size=8, lr=1e-2, progress=False)
    lm_head = model.get_output_embeddings()
    with torch.no_grad():
        before = _distill_loss(model, fresh, lm_head, text, 1.0)
        after = _distill_loss(model, trained, lm_head, text, 1.0)
    assert after < 0.8 * before, (before, after)
    assert all(torch.count_nonzero(p) == 0 for p in fresh.parameters()), "the given heads are not modified"
    assert all(p.grad is None for p in model.parameters()), "no gradient reaches the model"


def test_exactly_one_target_forward_per_step(heads_for):
    model, heads = heads_for("llama")
    calls = []
    hook = model.model.layers[-1].register_forward_hook(lambda module, args, out: calls.append(args[0].shape[1]))
    try:
        ids, mask = left_padded_batch([7, 4])
        out = dx.generate(model, ids, mask, strategy="draft_heads", heads=heads, max_new_tokens=30, eos_token_id=[], compile=False)
    finally:
        hook.remove()
    steps = out.stats.steps
    assert len(calls) == 1 + steps, "the last layer ran once for the prefill and once per step"
    assert calls[1:] == [K + 1] * steps, "each step is one forward over pending + k candidates"
    assert out.stats.extra["target_forwards"] == steps + 1
    assert sum(out.stats.new_tokens) / 2 > steps + 1, "more tokens than target forwards"


@pytest.mark.parametrize("max_new_tokens", [1, 2, 6, 13])
def test_max_new_tokens_boundaries(max_new_tokens, heads_for):
    model, heads = heads_for("gpt2")
    ids, mask = left_padded_batch([5, 9], seed=2)
    out = dx.generate(
        model, ids, mask, strategy="draft_heads", heads=heads, max_new_tokens=max_new_tokens, eos_token_id=[], compile=False
    )
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, max_new_tokens))


def test_eos_stops_rows_like_transformers(heads_for):
    model, heads = heads_for("qwen2")
    ids, mask = left_padded_batch([5, 9, 7], seed=6)
    free = hf_greedy(model, ids, mask, 30)
    eos = int(free[0, ids.shape[1] + 12])  # a token row 0 emits mid-way
    ref = hf_greedy(model, ids, mask, 30, eos=[eos])
    out = dx.generate(
        model, ids, mask, strategy="draft_heads", heads=heads, max_new_tokens=30, eos_token_id=eos, pad_token_id=0, compile=False
    )
    assert ref.shape[1] <= free.shape[1] and (ref[:, ids.shape[1]:] == eos).any()
    assert torch.equal(out.sequences, ref)


def test_no_recompiles_after_warmup_and_heads_are_graph_outputs(heads_for):
    model, heads = heads_for("llama")
    counter = CompileCounterWithBackend("eager")
    ids, mask = left_padded_batch([7, 12])
    out = dx.generate(model, ids, mask, strategy="draft_heads", heads=heads, max_new_tokens=40, eos_token_id=[], backend=counter)
    assert counter.frame_count == 2, "one graph for the prefill (+ heads), one for the fused step"
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, 40))
    ids2, mask2 = left_padded_batch([9, 15], seed=8)
    out2 = dx.generate(model, ids2, mask2, strategy="draft_heads", heads=heads, max_new_tokens=40, eos_token_id=[], backend=counter)
    assert counter.frame_count == 2 and out2.stats.compiles == 0
    assert torch.equal(out2.sequences, hf_greedy(model, ids2, mask2, 40))

    graph = greedy_step_graph(DraftHeadsEngine(model, 2, 64, heads, compile=False))
    outputs = next(n for n in graph.graph.nodes if n.op == "output").args[0]
    assert len(outputs) == 9, "the shared step's 7 outputs, then the draft heads' logits and the next chain"
    head_params = {n for n in graph.graph.nodes if n.op in ("placeholder", "get_attr") and "heads" in n.name}
    assert head_params, "the draft heads' weights are inputs of the step graph"
    ancestors, frontier = set(), [outputs[7]]
    while frontier:
        node = frontier.pop()
        if node not in ancestors:
            ancestors.add(node)
            frontier.extend(node.all_input_nodes)
    assert head_params <= ancestors, "the heads' logits are computed by the draft heads"


def greedy_step_graph(engine):
    """The FX graph Dynamo captures for the greedy step (what the backend compiles): the
    shared step's outputs, then the draft heads' logits and the next candidates. Captured at
    each row's committed length with every row finished (nothing is committed)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    runs = TokenRuns(engine.batch_size, 1, engine.tree.max_depth + 1, (), 0, engine.device)
    runs.finished.fill_(True)  # commits nothing
    tokens = torch.zeros(engine.batch_size, engine.shape.width, dtype=torch.long)
    valid = torch.ones(engine.batch_size, engine.tree.size, dtype=torch.bool)
    fn = torch.compile(_greedy_body(engine.shape).__get__(engine), backend=capture, fullgraph=True, dynamic=False)
    with torch.no_grad():
        fn(tokens, valid, torch.tensor(2**62), runs.produced, runs.finished, runs.limit, runs.eos)
    return graphs[0]


def test_save_load_roundtrip_and_errors(tmp_path, heads_for):
    model, heads = heads_for("llama")
    path = tmp_path / "heads.safetensors"
    dx.save_draft_heads(heads, path)
    loaded = dx.load_draft_heads(path)
    for a, b in zip(heads.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    ids, mask = left_padded_batch([6, 6])
    a = dx.generate(model, ids, mask, strategy="draft_heads", heads=heads, max_new_tokens=12, compile=False)
    b = dx.generate(model, ids, mask, strategy="draft_heads", heads=loaded, max_new_tokens=12, compile=False)
    assert torch.equal(a.sequences, b.sequences)

    with pytest.raises(ValueError, match="needs heads"):
        dx.generate(model, ids, mask, strategy="draft_heads", max_new_tokens=4, compile=False)
    with pytest.raises(TypeError, match="DraftHeads"):
        dx.generate(model, ids, mask, strategy="draft_heads", heads=torch.nn.Linear(2, 2), max_new_tokens=4, compile=False)
    with pytest.raises(ValueError, match="hidden size 32"):
        dx.generate(model, ids, mask, strategy="draft_heads", heads=DraftHeads(32, 2), max_new_tokens=4, compile=False)
    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a dynexec draft-heads file"):
        dx.load_draft_heads(tmp_path / "other.safetensors")


# ---- candidate trees ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("tree", [[3, 2, 1], [2, 2]])
def test_tree_greedy_equals_transformers(kind, tree, heads_for):
    model, heads = heads_for(kind)
    ids, mask = left_padded_batch([5, 11, 8], seed=3)
    out = dx.generate(
        model, ids, mask, strategy="draft_heads", heads=heads, tree=tree, max_new_tokens=40, eos_token_id=[], compile=False
    )
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, 40))
    assert out.stats.forward_passes == out.stats.steps + 1


def test_tree_accepts_at_least_the_chain_from_the_same_state(heads_for):
    """The tree contains the chain (every node's first child is the heads' top token), so from
    the same cache state its accepted path is never shorter — and on some rows longer."""
    model, heads = heads_for("gpt2")
    chain_engine = DraftHeadsEngine(model, 6, 64, heads, compile=False)
    tree_engine = DraftHeadsEngine(model, 6, 64, heads, dx.decoding.TreeSpec.from_branching([3, 2, 1]), compile=False)
    gains = []
    for seed in range(4):
        ids, mask = left_padded_batch([5, 11, 8, 6, 9, 4], seed=seed)
        logits, head_logits = chain_engine.prefill_propose(ids, mask)
        tree_engine.prefill_propose(ids, mask)
        pending = logits.argmax(-1)
        chain = torch.cat([pending[:, None], head_logits.argmax(-1)], dim=1)
        runs = [TokenRuns(6, 64, 8, (), 0, torch.device("cpu")) for _ in range(2)]
        chain_accepted = verify_step(chain_engine, chain_engine.shape, chain, runs[0])[0].accepted
        tree_verdict = verify_step(tree_engine, tree_engine.shape, tree_engine.tree_tokens(pending, head_logits), runs[1])[0]
        emitted, tree_accepted = tree_verdict.tokens, tree_verdict.accepted
        assert (tree_accepted >= chain_accepted).all()
        gains.append(int((tree_accepted - chain_accepted).sum()))
        greedy = hf_greedy(model, ids, mask, 2 + K)[:, ids.shape[1] + 1 :]  # the tokens after pending
        for b in range(6):
            n = int(tree_accepted[b]) + 1
            assert torch.equal(emitted[b, :n], greedy[b, :n]), "the tree's emitted tokens are greedy's"
    assert sum(gains) > 0


def test_tree_options_are_checked(heads_for):
    model, heads = heads_for("llama")
    ids, mask = left_padded_batch([5, 5])
    with pytest.raises(ValueError, match="4 deep but there are 3 draft heads"):
        dx.generate(model, ids, mask, strategy="draft_heads", heads=heads, tree=[2, 1, 1, 1], max_new_tokens=4, compile=False)
    with pytest.raises(TypeError, match="tree must be None"):
        dx.generate(model, ids, mask, strategy="draft_heads", heads=heads, tree="2,1", max_new_tokens=4, compile=False)


def test_tree_sampling_is_one_target_forward_per_step_without_recompiles(heads_for):
    """Sampling trees: batch of 3 rows of different lengths, one target forward per step, rows
    accepting their own numbers of drafts, no compile after the first call."""
    model, heads = heads_for("gpt2")
    counter = CompileCounterWithBackend("eager")
    for seed in (1, 2):
        ids, mask = left_padded_batch([7, 12, 5], seed=seed)
        out = dx.generate(
            model, ids, mask, strategy="draft_heads", heads=heads, tree=[3, 2, 1], do_sample=True, temperature=0.5,
            generator=torch.Generator().manual_seed(seed), max_new_tokens=30, eos_token_id=[], backend=counter,
        )
        assert counter.frame_count == 3, "prefill (+ heads), the tree forward, the keep-path graph (no layers)"
        assert out.stats.forward_passes == out.stats.steps + 1
        assert out.stats.new_tokens == [30, 30, 30]
        assert out.stats.steps < 29, "accepted drafts save forwards"
        assert any(len(set(rows)) > 1 for rows in out.stats.extra["accepted_drafts_per_step"])
    assert out.stats.compiles == 0


def test_tree_step_is_one_graph_without_recompiles(heads_for):
    model, heads = heads_for("gpt2")
    counter = CompileCounterWithBackend("eager")
    for seed in (1, 2):
        ids, mask = left_padded_batch([7, 12], seed=seed)
        out = dx.generate(
            model, ids, mask, strategy="draft_heads", heads=heads, tree=[3, 2, 1], max_new_tokens=30, eos_token_id=[],
            backend=counter,
        )
        assert torch.equal(out.sequences, hf_greedy(model, ids, mask, 30))
        assert counter.frame_count == 2, "the prefill (+ heads) and the tree step (verify, gather, propose)"


def test_a_loss_mask_trains_only_the_marked_positions():
    from dynexec_compile.distill import _distill_loss

    model = build_model("llama")
    text = own_text(model, rows=8)
    heads = DraftHeads(64, K, vocab_size=VOCAB)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.3)
    lm_head = model.get_output_embeddings()
    everything = torch.ones_like(text, dtype=torch.bool)
    answer = everything.clone()
    answer[:, :8] = False  # the prompts' positions
    with torch.no_grad():
        plain = _distill_loss(model, heads, lm_head, text, 1.0)
        assert torch.allclose(_distill_loss(model, heads, lm_head, (text, everything), 1.0), plain)
        masked = _distill_loss(model, heads, lm_head, (text, answer), 1.0)
    assert torch.isfinite(masked) and not torch.allclose(masked, plain)
    torch.manual_seed(0)
    trained = dx.train_draft_heads(model, [(text, answer)] * 30, heads=heads, lr=1e-2, progress=False)
    with torch.no_grad():
        assert _distill_loss(model, trained, lm_head, (text, answer), 1.0) < 0.8 * masked
    with pytest.raises(ValueError, match="mask must be a tensor shaped like"):
        dx.train_draft_heads(model, [(text, answer[:, :4])], heads=heads, progress=False)


# ---- adaptive: each step verifies the heads' candidates or none -------------------------------

PLAIN = "tree(-1,)"  # the one-token step's graph


@pytest.mark.parametrize("kind,tree", [("llama", None), ("gpt2", [2, 2, 1])])
def test_adaptive_steps_are_exact_whichever_shape_each_step_takes(kind, tree, heads_for, monkeypatch):
    from dynexec_compile.decoding.adaptive import WidthChooser

    model, heads = heads_for(kind)
    ids, mask = left_padded_batch([5, 11, 8], seed=3)
    monkeypatch.setattr(WidthChooser, "choose", random_choice(1))
    out = dx.generate(model, ids, mask, strategy="draft_heads", heads=heads, tree=tree, adaptive=True, max_new_tokens=40,
                      eos_token_id=[], compile=False)
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, 40))
    used = out.stats.extra["adaptive_steps"]
    assert PLAIN in used and len(used) == 2 and sum(used.values()) == out.stats.steps, used
    assert out.stats.forward_passes == out.stats.steps + 1
    # plain steps draft nothing; the others draft the whole tree
    drafted = [max(step) for step in out.stats.extra["drafted_per_step"]]
    assert drafted.count(0) == used[PLAIN] and set(drafted) == {0, K if tree is None else 2 + 4 + 4}


def test_adaptive_follows_the_measured_step_costs(heads_for):
    from dynexec_compile.decoding.draft_heads import DraftHeadsEngine
    from dynexec_compile.decoding.generate import _ENGINES

    model, heads = heads_for("llama")
    ids, mask = left_padded_batch([6, 10], seed=5)
    common = dict(strategy="draft_heads", heads=heads, adaptive=True, max_new_tokens=24, eos_token_id=[], compile=False)
    first = dx.generate(model, ids, mask, **common)
    engine = next(e for e in reversed(_ENGINES.values()) if isinstance(e, DraftHeadsEngine) and e.model is model)
    full = engine.shape.name
    calls = []  # the engine's heads, counted as they run (eager)
    forward = engine.heads.forward
    engine.heads.forward = lambda *args: calls.append(1) or forward(*args)
    assert set(first.stats.extra["adaptive_steps"]) <= {PLAIN, full}
    reference = hf_greedy(model, ids, mask, 24)
    assert torch.equal(first.sequences, reference)
    for cheap in (PLAIN, full):
        engine.chooser.costs.update({PLAIN: 1e-4 if cheap == PLAIN else 10.0, full: 1e-4 if cheap == full else 10.0})
        out = dx.generate(model, ids, mask, **common)
        assert torch.equal(out.sequences, reference)
        assert out.stats.extra["adaptive_steps"] == {cheap: out.stats.steps}, "only the cheap shape pays"
        if cheap == PLAIN:  # one token a step, nothing drafted, the heads never run after the prefill
            assert out.stats.steps == 23 and sum(map(sum, out.stats.extra["drafted_per_step"])) == 0
            assert calls == [1] and out.stats.extra["draft_head_evals"] == 0
        calls.clear()
    assert engine.chooser.predicted > 0
    with pytest.raises(ValueError, match="adaptive must be True or False"):
        dx.generate(model, ids, mask, **{**common, "adaptive": 1})


@pytest.mark.parametrize("regional", [False, True])
def test_adaptive_compiled_steps_are_exact_and_compile_once(regional, heads_for, monkeypatch):
    """Compiled: any mix of plain and guessing steps (the heads reading a plain step's hidden
    state in a graph of their own) equals HF greedy; a second run compiles nothing new."""

    model, heads = heads_for("qwen2")
    ids, mask = left_padded_batch([6, 9], seed=5)
    common = dict(strategy="draft_heads", heads=heads, max_new_tokens=24, eos_token_id=[], backend="eager", adaptive=True,
                  regional=regional)
    runs = random_mix_twice(monkeypatch, model, ids, mask, **common)
    assert torch.equal(runs[0].sequences, hf_greedy(model, ids, mask, 24))
    assert torch.equal(runs[1].sequences, runs[0].sequences)
    assert PLAIN in runs[0].stats.extra["adaptive_steps"] and runs[1].stats.compiles == 0
    assert runs[0].stats.extra["draft_head_evals"] < runs[0].stats.steps * K, "plain steps run no heads"
