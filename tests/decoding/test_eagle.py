"""strategy="eagle": a feature-level draft layer; greedy token-identical to model.generate.

The drafts are trained for a few seconds on each tiny model's own greedy text, so guesses are
accepted often enough that several tokens per step (different counts per row) are exercised;
a test checks they were.
"""

import pytest
import torch
from conftest import VOCAB, build_model, left_padded_batch, random_choice, random_mix_twice
from test_draft_heads import hf_greedy, own_text

import dynexec_compile as dx
from dynexec_compile.decoding.eagle import EagleDraft, saved_tensor

K = 3


@pytest.fixture(scope="module")
def draft_for():
    cache = {}

    def get(kind):
        if kind not in cache:
            model = build_model(kind)
            torch.manual_seed(0)
            draft = dx.train_eagle_draft(model, own_text(model), vocab=64, epochs=30, lr=3e-3, progress=False)
            cache[kind] = (model, draft)
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_greedy_equals_transformers(kind, draft_for):
    model, draft = draft_for(kind)
    ids, mask = left_padded_batch([5, 11, 8], seed=3)
    out = dx.generate(model, ids, mask, strategy="eagle", draft=draft, max_new_tokens=40, eos_token_id=[], compile=False)
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, 40))
    assert out.stats.forward_passes == out.stats.steps + 1
    accepted = torch.tensor(out.stats.extra["accepted_drafts_per_step"])
    assert accepted.sum() > 0, "the trained draft's guesses were accepted"


def test_trained_draft_guesses_better_than_untrained(draft_for):
    model, draft = draft_for("llama")
    ids = own_text(model, rows=4, length=1)[:, :8]  # the training prompts: the tiny model's text is its own
    fresh = EagleDraft(model.config)
    rates = []
    for d in (fresh, draft):
        out = dx.generate(model, ids, strategy="eagle", draft=d, max_new_tokens=40, eos_token_id=[], compile=False)
        assert torch.equal(out.sequences, hf_greedy(model, ids, torch.ones_like(ids), 40))
        rates.append(out.stats.extra["acceptance_rate"])
    assert rates[1] > rates[0] + 0.15, rates


def test_rows_keep_their_own_counts_and_eos(draft_for):
    model, draft = draft_for("gpt2")
    ids, mask = left_padded_batch([7, 4, 12], seed=8)
    reference = hf_greedy(model, ids, mask, 30, eos=[5])
    out = dx.generate(model, ids, mask, strategy="eagle", draft=draft, max_new_tokens=30, eos_token_id=5, pad_token_id=0,
                      compile=False)
    assert torch.equal(out.sequences, reference[:, : out.sequences.shape[1]])
    per_step = torch.tensor(out.stats.accepted_per_step)  # [steps, B]
    assert bool((per_step.max(dim=1).values != per_step.min(dim=1).values).any()), "rows kept different counts"


@pytest.mark.parametrize("max_new_tokens", [1, 2, 5, 13])
def test_max_new_tokens_boundaries(max_new_tokens, draft_for):
    model, draft = draft_for("llama")
    ids, mask = left_padded_batch([5, 9], seed=2)
    out = dx.generate(model, ids, mask, strategy="eagle", draft=draft, max_new_tokens=max_new_tokens, eos_token_id=[],
                      compile=False)
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, max_new_tokens))


def test_sampling_is_repeatable_and_follows_the_model(draft_for):
    model, draft = draft_for("llama")
    ids, mask = left_padded_batch([6, 6], seed=1)

    def run(seed):
        return dx.generate(model, ids, mask, strategy="eagle", draft=draft, do_sample=True, temperature=0.8,
                           max_new_tokens=24, eos_token_id=[], compile=False,
                           generator=torch.Generator().manual_seed(seed))

    a, b = run(0), run(0)
    assert torch.equal(a.sequences, b.sequences)
    assert a.stats.forward_passes == a.stats.steps + 1


def test_compiled_greedy_equals_transformers_without_recompiles(draft_for):
    model, draft = draft_for("llama")
    ids, mask = left_padded_batch([5, 8], seed=6)
    first = dx.generate(model, ids, mask, strategy="eagle", draft=draft, max_new_tokens=24, eos_token_id=[],
                        backend="eager")
    again = dx.generate(model, ids, mask, strategy="eagle", draft=draft, max_new_tokens=24, eos_token_id=[],
                        backend="eager")
    assert torch.equal(first.sequences, hf_greedy(model, ids, mask, 24))
    assert torch.equal(again.sequences, first.sequences)
    assert again.stats.compiles == 0


@pytest.mark.parametrize("packed", [False, True])
def test_regional_compilation_compiles_the_draft_apart(draft_for, packed):
    # packed: the draft's graph runs its linears (and its head) on the few-row kernels too
    model, draft = draft_for("qwen2")
    ids, mask = left_padded_batch([6, 9], seed=5)
    common = dict(strategy="eagle", draft=draft, max_new_tokens=20, eos_token_id=[], backend="eager", regional=True,
                  packed=packed, lookup=2)
    first = dx.generate(model, ids, mask, **common)
    again = dx.generate(model, ids, mask, **common)
    assert torch.equal(first.sequences, hf_greedy(model, ids, mask, 20))
    assert torch.equal(again.sequences, first.sequences)
    assert again.stats.compiles == 0


def test_regional_row_by_row_prefill_feeds_the_draft_every_rows_prompt(draft_for):
    # prompts far apart in length prefill row by row; the draft's prompt pairs come from the
    # rows' outputs padded to one width: same tokens as HF greedy, and as a batch of one
    model, draft = draft_for("llama")
    ids, mask = left_padded_batch([4, 36], seed=7)
    common = dict(strategy="eagle", draft=draft, num_draft=2, lookup=2, max_new_tokens=16, eos_token_id=[],
                  backend="eager", regional=True)
    out = dx.generate(model, ids, mask, **common)
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, 16))
    alone = dx.generate(model, ids[:1, -4:], **common)
    assert out.stats.accepted_per_step[0][0] == alone.stats.accepted_per_step[0][0]


def test_regional_engines_keep_their_draft_graphs_apart(draft_for):
    # each engine's draft compiles a graph per step shape (3 here): five engines would pass
    # Dynamo's recompile limit (8) on one shared code object, a hard error with fullgraph=True
    model, draft = draft_for("llama")
    text = own_text(model, rows=2, length=24)
    ids = torch.cat([text, text[:, :8]], dim=1)  # lookup and copy steps both occur
    reference = hf_greedy(model, ids, torch.ones_like(ids), 16)
    for k, alternatives in ((1, 0), (1, 1), (1, 2), (2, 0), (2, 1)):
        out = dx.generate(model, ids, strategy="eagle", draft=draft, num_draft=k, alternatives=alternatives, lookup=2,
                          copy_lookup=4, max_new_tokens=16, eos_token_id=[], backend="eager", regional=True)
        assert torch.equal(out.sequences, reference), (k, alternatives)


def test_alternatives_verify_the_drafts_next_best_tokens_beside_its_chain(draft_for):
    from dynexec_compile.decoding.eagle import branch_tree

    tree, (chain, others, lookup) = branch_tree(2, 2, 3)
    assert tree.parents == (-1, 0, 0, 0, 0, 1, 1, 1, 4, 8)
    assert (chain, others, lookup) == ([1, 5], [2, 3, 6, 7], [4, 8, 9])
    model, draft = draft_for("qwen2")
    ids, mask = left_padded_batch([6, 9], seed=4)
    common = dict(strategy="eagle", draft=draft, num_draft=1, max_new_tokens=24, eos_token_id=[], compile=False)
    chain_only = dx.generate(model, ids, mask, **common)
    wide = dx.generate(model, ids, mask, alternatives=3, **common)
    reference = hf_greedy(model, ids, mask, 24)
    assert torch.equal(chain_only.sequences, reference) and torch.equal(wide.sequences, reference)
    assert wide.stats.extra["alternatives"] == 3 and wide.stats.extra["tree"] == [-1, 0, 0, 0, 0]
    assert {n for step in wide.stats.extra["drafted_per_step"] for n in step} == {0, 4}, "4 a step; 0 once a row is done"
    assert wide.stats.steps < chain_only.stats.steps, "a step keeps the model's token when it is the draft's 2nd-4th best"
    sampled = [dx.generate(model, ids, mask, alternatives=2, lookup=2, do_sample=True,
                           generator=torch.Generator().manual_seed(3), **common) for _ in range(2)]
    assert torch.equal(sampled[0].sequences, sampled[1].sequences)
    for bad, match in (({"alternatives": -1}, "must be an int"), ({"alternatives": 64}, "vocabulary")):
        with pytest.raises(ValueError, match=match):
            dx.generate(model, ids, mask, **{**common, **bad})


def test_save_load_roundtrip_and_errors(tmp_path, draft_for):
    model, draft = draft_for("qwen2")
    path = tmp_path / "draft.safetensors"
    dx.save_eagle_draft(draft, path)
    loaded = dx.load_eagle_draft(path)
    assert torch.equal(loaded.vocab, draft.vocab)
    stored = loaded.state_dict()
    for name, tensor in draft.state_dict().items():
        if saved_tensor(name):  # fc, vocab and the decoder layer (not the unused embeddings of its holder)
            assert torch.equal(stored[name], tensor), name
    ids, mask = left_padded_batch([5, 7], seed=9)
    a = dx.generate(model, ids, mask, strategy="eagle", draft=draft, max_new_tokens=16, eos_token_id=[], compile=False)
    b = dx.generate(model, ids, mask, strategy="eagle", draft=loaded, max_new_tokens=16, eos_token_id=[], compile=False)
    assert a.stats.accepted_per_step == b.stats.accepted_per_step
    heads_file = tmp_path / "heads.safetensors"
    dx.save_draft_heads(dx.DraftHeads(64, 2, vocab_size=VOCAB), heads_file)
    with pytest.raises(ValueError, match="not a dynexec EAGLE draft"):
        dx.load_eagle_draft(heads_file)
    other = build_model("llama")
    with pytest.raises(ValueError, match="model_type"):
        dx.generate(other, ids, mask, strategy="eagle", draft=draft, max_new_tokens=4, compile=False)
    with pytest.raises(ValueError, match="needs draft="):
        dx.generate(model, ids, mask, strategy="eagle", max_new_tokens=4, compile=False)
    with pytest.raises(TypeError, match="EagleDraft"):
        dx.generate(model, ids, mask, strategy="eagle", draft=dx.DraftHeads(64, 2), max_new_tokens=4, compile=False)
    with pytest.raises(TypeError, match="unknown options"):
        dx.generate(model, ids, mask, strategy="eagle", draft=draft, tree=[2, 1], max_new_tokens=4, compile=False)


def test_training_leaves_the_model_alone():
    model = build_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    dx.train_eagle_draft(model, own_text(model, rows=4, length=16), vocab=None, epochs=1, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()), "no gradient reaches the model"


def test_rows_also_guess_their_own_prompt_tokens():
    from dynexec_compile.decoding.eagle import DraftRunner
    from dynexec_compile.decoding.layers import DecoderStack

    model = build_model("llama")
    draft = EagleDraft(model.config, vocab=torch.arange(10))
    runner = DraftRunner(draft, DecoderStack(model), 2, 16)
    ids = torch.tensor([[3, 50, 51, 4], [60, 2, 0, 0]])
    runner.set_request_vocab(ids, torch.tensor([4, 2]))
    assert runner.request_ids[0, :2].tolist() == [51, 50] and runner.request_ids[1, 0].item() == 60
    out = model.get_output_embeddings().weight.detach()  # a feature that points at one token's row
    features = torch.stack([out[51] * 50, out[51] * 50])
    guessed = runner.guess(features)
    assert guessed[0].item() == 51, "row 0's prompt holds token 51"
    assert guessed[1].item() != 51 and guessed[1].item() in set(range(10)) | {60}, "row 1's does not"


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_lookup_branch_greedy_equals_transformers_and_adds_accepted_tokens(kind, draft_for):
    model, draft = draft_for(kind)
    text = own_text(model, rows=2, length=40)  # the tiny models repeat themselves: lookup has matches
    ids = torch.cat([text, text[:, :8]], dim=1)  # the prompt ends where its own beginning starts
    common = dict(strategy="eagle", draft=draft, max_new_tokens=32, eos_token_id=[], compile=False)
    plain = dx.generate(model, ids, **common)
    both = dx.generate(model, ids, lookup=4, **common)
    reference = hf_greedy(model, ids, torch.ones_like(ids), 32)
    assert torch.equal(plain.sequences, reference) and torch.equal(both.sequences, reference)
    assert both.stats.steps < plain.stats.steps, "the lookup branch copies what the prompt repeats"
    assert both.stats.forward_passes == both.stats.steps + 1


def test_copy_lookup_lengthens_the_branch_where_the_answer_copies(draft_for):
    model, draft = draft_for("llama")
    text = own_text(model, rows=2, length=40)  # the tiny models repeat themselves: long copies
    ids = torch.cat([text, text[:, :8]], dim=1)
    common = dict(strategy="eagle", draft=draft, num_draft=1, max_new_tokens=32, eos_token_id=[], compile=False, lookup=2)
    short = dx.generate(model, ids, **common)
    long = dx.generate(model, ids, copy_lookup=6, **common)
    reference = hf_greedy(model, ids, torch.ones_like(ids), 32)
    assert torch.equal(short.sequences, reference) and torch.equal(long.sequences, reference)
    assert long.stats.extra["copy_steps"] > 0 and short.stats.extra["copy_steps"] == 0
    assert long.stats.steps < short.stats.steps, "copying steps verify 6 looked-up tokens instead of 2"
    assert max(max(step) for step in long.stats.accepted_per_step) > 2 + 1, "more than either short branch can keep"
    for bad, match in (({"copy_lookup": 2}, "copy_lookup > lookup"), ({"copy_lookup": 4, "lookup": 0}, "lookup >= 1"),
                       ({"copy_lookup": -1}, "must be an int")):
        with pytest.raises(ValueError, match=match):
            dx.generate(model, ids, **{**common, **bad})


def test_lookup_branch_sampling_and_errors(draft_for):
    model, draft = draft_for("llama")
    ids, mask = left_padded_batch([6, 9], seed=2)
    common = dict(strategy="eagle", draft=draft, max_new_tokens=20, eos_token_id=[], compile=False)
    a = dx.generate(model, ids, mask, lookup=3, do_sample=True, generator=torch.Generator().manual_seed(1), **common)
    b = dx.generate(model, ids, mask, lookup=3, do_sample=True, generator=torch.Generator().manual_seed(1), **common)
    assert torch.equal(a.sequences, b.sequences)
    greedy = dx.generate(model, ids, mask, lookup=3, **common)
    assert torch.equal(greedy.sequences, hf_greedy(model, ids, mask, 20))
    for bad in ({"lookup": -1}, {"num_draft": 0}, {"lookup": True}):
        with pytest.raises(ValueError, match="must be an int"):
            dx.generate(model, ids, mask, **{**common, **bad})


def test_lookup_nodes_count_as_drafted_only_for_rows_that_filled_them(draft_for):
    model, draft = draft_for("llama")
    text = own_text(model, rows=1, length=30)
    repeats = torch.cat([text, text[:, :8]], dim=1)  # row 0 finds lookup candidates, row 1 (random) seldom
    ids = torch.cat([repeats, left_padded_batch([repeats.shape[1]], seed=3)[0]])
    out = dx.generate(model, ids, strategy="eagle", draft=draft, lookup=3, max_new_tokens=20, eos_token_id=[],
                      compile=False)
    assert torch.equal(out.sequences, hf_greedy(model, ids, torch.ones_like(ids), 20))
    drafted, accepted = out.stats.extra["drafted_per_step"], out.stats.extra["accepted_drafts_per_step"]
    k = 3  # DEFAULT_NUM_DRAFT: the chain; + 3 lookup nodes when the row had a candidate
    assert out.stats.extra["num_draft"] == k, "the option's value, whichever shape a step took"
    assert {n for step in drafted for n in step} <= {0, k, k + 3}
    assert [k + 3, k] in drafted, "a step where only row 0 had a lookup candidate counts its 3 nodes for row 0 only"
    assert all(a <= d for step_d, step_a in zip(drafted, accepted, strict=True) for d, a in zip(step_d, step_a, strict=True))


def test_an_int8_weight_only_model_is_served_exactly():
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = build_model("llama")
    quantize_(model, Int8WeightOnlyConfig())  # the LM head too: the draft's head reads its values
    ids, mask = left_padded_batch([5, 9], seed=2)
    torch.manual_seed(0)
    out = dx.generate(model, ids, mask, strategy="eagle", draft=EagleDraft(model.config), num_draft=2, lookup=2,
                      max_new_tokens=16, eos_token_id=[], compile=False)
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, 16))


# ---- adaptive: each step's shape chosen by expected tokens per second ------------------------

PLAIN = "tree(-1,)"  # the one-token step's graph


def _eagle_engine(model):
    from dynexec_compile.decoding.eagle import EagleEngine
    from dynexec_compile.decoding.generate import _ENGINES

    return next(e for e in reversed(_ENGINES.values()) if isinstance(e, EagleEngine) and e.model is model)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_adaptive_steps_are_exact_whichever_shape_each_step_takes(kind, draft_for, monkeypatch):
    from dynexec_compile.decoding.adaptive import WidthChooser

    model, draft = draft_for(kind)
    text = own_text(model, rows=2, length=40)  # repeats: the lookup and copy branches have candidates
    repeats = torch.cat([text, text[:, :8]], dim=1)
    ids = torch.cat([repeats, left_padded_batch([repeats.shape[1]], seed=4)[0]])
    mask = torch.ones_like(ids)
    mask[2, :20] = 0  # a shorter third row (left padding)
    common = dict(strategy="eagle", draft=draft, num_draft=2, alternatives=1, lookup=2, copy_lookup=5, max_new_tokens=30,
                  eos_token_id=[], compile=False)
    monkeypatch.setattr(WidthChooser, "choose", random_choice(0))
    out = dx.generate(model, ids, mask, adaptive=True, **common)
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, 30))
    assert out.stats.forward_passes == out.stats.steps + 1
    engine = _eagle_engine(model)
    used = out.stats.extra["adaptive_steps"]
    assert PLAIN in used and engine.branches[0][0].name in used and len(used) >= 3, used
    assert sum(used.values()) == out.stats.steps
    # the draft saw the model's features of every committed position, whichever shapes the steps
    # took (after plain steps it reads theirs before its next guess): its cache holds what a run
    # without plain steps writes, up to the positions of the last steps that were plain
    drafted = out.stats.extra["drafted_per_step"]
    trailing = len(drafted) - max(i for i, step in enumerate(drafted) if any(step)) - 1  # plain steps at the end
    unread = torch.tensor(out.stats.accepted_per_step[len(drafted) - trailing:] or [[0] * 3]).sum(dim=0)  # [B]
    mixed = [layer.keys.clone() for layer in engine.runner.cache.layers]
    fixed = dx.generate(model, ids, mask, **common)
    assert _eagle_engine(model) is engine and torch.equal(fixed.sequences, out.sequences)
    read = engine.cache.lengths - unread - 1  # the last pair is written by the step after
    for before, layer in zip(mixed, engine.runner.cache.layers, strict=True):
        for row, n in enumerate(read.tolist()):
            torch.testing.assert_close(before[row, :, :n], layer.keys[row, :, :n], atol=1e-4, rtol=1e-4)


def test_adaptive_follows_the_measured_step_costs(draft_for):
    model, draft = draft_for("llama")
    ids, mask = left_padded_batch([6, 10], seed=5)
    common = dict(strategy="eagle", draft=draft, lookup=2, adaptive=True, max_new_tokens=24, eos_token_id=[], compile=False)
    first = dx.generate(model, ids, mask, **common)
    engine = _eagle_engine(model)
    shapes = [PLAIN] + [shape.name for shape, _ in engine.branches.values()]
    assert set(first.stats.extra["adaptive_steps"]) <= set(shapes)
    reference = hf_greedy(model, ids, mask, 24)
    for cheap in (PLAIN, engine.branches[0][0].name):
        engine.chooser.costs.update({name: 1e-4 if name == cheap else 10.0 for name in shapes})
        out = dx.generate(model, ids, mask, **common)
        assert torch.equal(out.sequences, reference)
        assert out.stats.extra["adaptive_steps"] == {cheap: out.stats.steps}, "only the cheap shape pays"
        if cheap == PLAIN:  # one token a step, nothing drafted
            assert out.stats.steps == 23 and sum(map(sum, out.stats.extra["drafted_per_step"])) == 0
    assert torch.equal(first.sequences, reference)
    with pytest.raises(ValueError, match="adaptive must be True or False"):
        dx.generate(model, ids, mask, **{**common, "adaptive": "yes"})


@pytest.mark.parametrize("regional", [False, True])
def test_adaptive_compiled_steps_and_catch_ups_are_exact_and_compile_once(regional, draft_for, monkeypatch):
    """Compiled (whole-step graphs, or regional with the draft compiled apart): any mix of plain
    and guessing steps, with the draft's catch-ups after plain runs, equals HF greedy; a second
    run with the same mix compiles nothing new."""

    model, draft = draft_for("qwen2")
    ids, mask = left_padded_batch([6, 9], seed=5)
    common = dict(strategy="eagle", draft=draft, max_new_tokens=24, eos_token_id=[], backend="eager", regional=regional,
                  lookup=2, adaptive=True)
    runs = random_mix_twice(monkeypatch, model, ids, mask, **common)
    assert torch.equal(runs[0].sequences, hf_greedy(model, ids, mask, 24))
    assert torch.equal(runs[1].sequences, runs[0].sequences)
    assert PLAIN in runs[0].stats.extra["adaptive_steps"] and runs[1].stats.compiles == 0


@pytest.mark.parametrize("regional", [False, True])
def test_adaptive_catch_ups_of_any_length_compile_once(regional, draft_for, monkeypatch):
    """Runs of plain steps of any length (the draft catches up in chunks, the last padded) add
    no graph after the first catch-up: a run with runs of 3 plain steps, then one with runs of
    12 and 20 (full chunks cut from a longer run), compiles nothing new and stays exact."""
    from dynexec_compile.decoding.adaptive import WidthChooser

    model, draft = draft_for("qwen2")
    ids, mask = left_padded_batch([9], seed=5)  # one row: a [1, n] view keeps its longer stride
    common = dict(strategy="eagle", draft=draft, max_new_tokens=40, eos_token_id=[], backend="eager", regional=regional,
                  adaptive=True)
    choose = WidthChooser.choose

    def every(period):  # a guessing step, then period - 1 plain steps, over and over
        return lambda self, options: choose(self, [options[0] if self.steps % period == 0 else options[-1]])

    monkeypatch.setattr(WidthChooser, "choose", every(4))
    first = dx.generate(model, ids, mask, **common)
    monkeypatch.setattr(WidthChooser, "choose", every(13))
    second = dx.generate(model, ids, mask, **common)
    monkeypatch.setattr(WidthChooser, "choose", every(21))
    third = dx.generate(model, ids, mask, **common)
    reference = hf_greedy(model, ids, mask, 40)
    for out in (first, second, third):
        assert torch.equal(out.sequences, reference)
    assert second.stats.extra["adaptive_steps"][PLAIN] >= 12 and second.stats.compiles == 0
    assert third.stats.compiles == 0
