"""strategy="self_speculative": the model's first E layers draft, layers E..L verify, no layer < E recomputed.

Layer evaluations are counted with forward hooks on the model's own decoder layers (eager
runs), so the counts are what ran, not what the strategy claims.
"""

import pytest
import torch
from conftest import VOCAB, build_model, left_padded_batch
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import FalconConfig, FalconForCausalLM, LlamaConfig, LlamaForCausalLM

import dynexec_compile as dx
from dynexec_compile.decoding.layers import DecoderStack


def hf_greedy(model, ids, mask, max_new_tokens, eos=None):
    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=[] if eos is None else eos,
            pad_token_id=0,
        )


@pytest.fixture(scope="module")
def llama4():
    """A 4-layer LLaMA, so the exit layer can sit in the middle (E = 2)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=1024,
    )
    return LlamaForCausalLM(config).eval()


def generate(model, ids, mask, max_new_tokens=40, **options):
    options.setdefault("exit_layer", 1)
    options.setdefault("compile", False)
    options.setdefault("eos_token_id", [])
    return dx.generate(model, ids, mask, strategy="self_speculative", max_new_tokens=max_new_tokens, **options)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_greedy_equals_transformers_shared_head(kind):
    model = build_model(kind)
    ids, mask = left_padded_batch([5, 11, 8], seed=3)
    out = generate(model, ids, mask, num_draft=3)
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, 40))
    assert out.stats.extra["acceptance_rate"] > 0, "some drafts must be accepted for the test to mean something"
    assert out.stats.forward_passes == out.stats.steps + 1


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_greedy_equals_transformers_trained_head(kind):
    model = build_model(kind)
    text = torch.randint(3, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
    heads = dx.train_exit_lm_head(model, text, exit_layer=1, steps=10, batch_size=4, seq_len=32, progress=False)
    assert heads.layers == (0,) and heads.num_labels == VOCAB
    ids, mask = left_padded_batch([5, 9], seed=4)
    out = generate(model, ids, mask, exit_head="trained", exit_heads=heads, num_draft=2)
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, 40))


def test_training_the_exit_head_brings_it_closer_to_the_model(llama4):
    text = hf_greedy(llama4, *left_padded_batch([8] * 8, seed=9), 40)  # [8, 48]
    stack = DecoderStack(llama4)
    with torch.no_grad():
        out = llama4(text, output_hidden_states=True)
        teacher = out.logits.log_softmax(-1)  # [8, 48, V]

        def kl(logits):
            return torch.nn.functional.kl_div(logits.log_softmax(-1), teacher, log_target=True, reduction="batchmean")

        shared = kl(stack.logits(out.hidden_states[2]))  # the shared head at layer 2
    heads = dx.train_exit_lm_head(llama4, text, exit_layer=2, steps=40, batch_size=8, seq_len=48, lr=3e-3, progress=False)
    with torch.no_grad():
        trained = kl(heads.head(1).classify(out.hidden_states[2]))
    assert trained < 0.7 * shared, (float(shared), float(trained))
    ids, mask = left_padded_batch([6, 10], seed=5)
    generated = generate(llama4, ids, mask, exit_layer=2, num_draft=3, exit_head="trained", exit_heads=heads)
    assert torch.equal(generated.sequences, hf_greedy(llama4, ids, mask, 40))


def test_an_exit_adapter_is_small_trains_closer_and_keeps_greedy_exact(llama4):
    """head="adapter": residual blocks under the model's own frozen norm + LM head. It must
    bring the draft closer to the model than the shared head, touch none of the model's
    weights (no .grad either), and keep greedy output identical."""
    text = hf_greedy(llama4, *left_padded_batch([8] * 8, seed=9), 40)  # [8, 48]
    stack = DecoderStack(llama4)
    before = {k: v.clone() for k, v in llama4.state_dict().items()}
    with torch.no_grad():
        out = llama4(text, output_hidden_states=True)
        teacher = out.logits.log_softmax(-1)

        def kl(logits):
            return torch.nn.functional.kl_div(logits.log_softmax(-1), teacher, log_target=True, reduction="batchmean")

        shared = kl(stack.logits(out.hidden_states[2]))
    adapter = dx.train_exit_lm_head(llama4, text, exit_layer=2, head="adapter", steps=40, batch_size=8, seq_len=48,
                                    lr=3e-3, progress=False)
    assert isinstance(adapter, dx.DraftHeads) and adapter.num_heads == 1
    assert sum(p.numel() for p in adapter.parameters()) == 64 * 64 + 64  # D x D + bias, no D x V
    assert all(torch.equal(v, before[k]) for k, v in llama4.state_dict().items())
    assert all(p.grad is None and p.requires_grad for p in llama4.parameters())
    from dynexec_compile.decoding.self_speculative import AdapterExitHead

    with torch.no_grad():
        trained = kl(AdapterExitHead(llama4, adapter.blocks[0])(out.hidden_states[2]))
    assert trained < 0.8 * shared, (float(shared), float(trained))
    ids, mask = left_padded_batch([6, 10], seed=5)
    generated = generate(llama4, ids, mask, exit_layer=2, num_draft=3, exit_head="trained", exit_heads=adapter)
    assert torch.equal(generated.sequences, hf_greedy(llama4, ids, mask, 40))
    with pytest.raises(ValueError, match="one-head DraftHeads"):
        generate(llama4, ids, mask, exit_layer=2, exit_head="trained", exit_heads=dx.DraftHeads(64, 2, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="head must be 'vocab' or 'adapter'"):
        dx.train_exit_lm_head(llama4, text, exit_layer=2, head="lora", progress=False)


def test_the_exit_head_loss_covers_only_the_marked_positions(llama4):
    """An (ids, mask) batch trains the exit head where it will draft (answers), not on prompts:
    the loss is the KL over the marked positions of the model's own distribution."""
    from dynexec_compile.distill import _exit_lm_loss

    text = hf_greedy(llama4, *left_padded_batch([8] * 4, seed=3), 24)  # [4, 32]
    heads = dx.train_exit_lm_head(llama4, text, exit_layer=2, steps=1, batch_size=4, seq_len=32, progress=False)
    head = heads.head(1)
    with torch.no_grad():  # far from the model's head, so that positions differ in loss
        head.out.weight.add_(0.3 * torch.randn(head.out.weight.shape, generator=torch.Generator().manual_seed(1)))
    answer = torch.ones_like(text, dtype=torch.bool)
    answer[:, :10] = False
    answer[1, 10:14] = False  # rows may start at different positions
    with torch.no_grad():
        out = llama4(text, output_hidden_states=True)
        teacher = out.logits.log_softmax(-1)
        student = head.classify(out.hidden_states[2]).log_softmax(-1)
        kl = torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)  # [4, 32]
        plain = _exit_lm_loss(llama4, head.classify, 2, text, 1.0)
        assert torch.allclose(plain, kl.mean())
        assert torch.allclose(_exit_lm_loss(llama4, head.classify, 2, (text, torch.ones_like(answer)), 1.0), plain)
        masked = _exit_lm_loss(llama4, head.classify, 2, (text, answer), 1.0)
    assert torch.allclose(masked, kl[answer].mean()) and not torch.allclose(masked, plain, rtol=1e-2)
    assert dx.train_exit_lm_head(llama4, [(text, answer)] * 2, exit_layer=2, progress=False).layers == (1,)


@pytest.mark.parametrize("do_sample", [False, True])
def test_layers_below_the_exit_run_once_per_token(llama4, do_sample):
    """Per step, every layer processes the step's k + 1 tokens exactly once: the k tokens the
    draft read are not re-run through layers < E for verification (HF's assistant_early_exit
    would run them through all layers again: 2k + 1 per step in layers < E)."""
    exit_layer, k = 2, 3
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(4)}

    def recorder(index):
        def hook(module, args, kwargs):
            seen[index].append(kwargs["position_ids"].clone())

        return hook

    hooks = [
        layer.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(llama4.model.layers)
    ]
    try:
        ids, mask = left_padded_batch([6, 10], seed=5)
        sampling = {"do_sample": True, "generator": torch.Generator().manual_seed(0)} if do_sample else {}
        out = generate(llama4, ids, mask, exit_layer=exit_layer, num_draft=k, max_new_tokens=30, **sampling)
    finally:
        for hook in hooks:
            hook.remove()
    if not do_sample:
        assert torch.equal(out.sequences, hf_greedy(llama4, ids, mask, 30))
    steps = out.stats.steps
    for layer, calls in seen.items():
        tokens = sum(p.shape[1] for p in calls[1:])  # after the prefill
        assert tokens == steps * (k + 1), f"layer {layer} processed {tokens} tokens in {steps} steps"
    assert out.stats.extra["layer_tokens"] == [steps * (k + 1)] * 4
    # layers < E: one call per token (k draft calls + the last draft in the verification)
    assert len(seen[0]) - 1 == steps * (k + 1) and len(seen[exit_layer]) - 1 == steps
    # within a step no position goes through layer 0 twice
    lower = torch.cat(seen[0][1:], dim=1).view(2, steps, k + 1)  # [B, steps, k+1] positions
    assert all(len(set(lower[b, s].tolist())) == k + 1 for b in range(2) for s in range(steps))
    assert out.stats.extra["draft_layer_evals"] == steps * exit_layer * k
    assert out.stats.extra["target_layer_evals"] == steps * (exit_layer + (4 - exit_layer) * (k + 1))


@pytest.mark.parametrize("max_new_tokens", [1, 2, 5, 11])
def test_max_new_tokens_boundaries(max_new_tokens, llama4):
    ids, mask = left_padded_batch([5, 9], seed=2)
    out = generate(llama4, ids, mask, exit_layer=2, num_draft=4, max_new_tokens=max_new_tokens)
    assert torch.equal(out.sequences, hf_greedy(llama4, ids, mask, max_new_tokens))


def test_eos_stops_rows_like_transformers():
    model = build_model("gpt2")
    ids, mask = left_padded_batch([5, 9, 7], seed=6)
    free = hf_greedy(model, ids, mask, 30)
    eos = int(free[0, ids.shape[1] + 10])
    ref = hf_greedy(model, ids, mask, 30, eos=[eos])
    out = generate(model, ids, mask, max_new_tokens=30, eos_token_id=eos, pad_token_id=0, num_draft=3)
    assert (ref[:, ids.shape[1]:] == eos).any()
    assert torch.equal(out.sequences, ref)


def test_no_recompiles_after_warmup(llama4):
    counter = CompileCounterWithBackend("eager")
    ids, mask = left_padded_batch([7, 12])
    out = generate(llama4, ids, mask, exit_layer=2, num_draft=3, compile=True, backend=counter)
    assert counter.frame_count == 2, "prefill, and the whole greedy step (drafts, verification, commit)"
    assert torch.equal(out.sequences, hf_greedy(llama4, ids, mask, 40))
    ids2, mask2 = left_padded_batch([9, 15], seed=8)
    out2 = generate(llama4, ids2, mask2, exit_layer=2, num_draft=3, compile=True, backend=counter)
    assert counter.frame_count == 2 and out2.stats.compiles == 0
    assert torch.equal(out2.sequences, hf_greedy(llama4, ids2, mask2, 40))


def test_bad_arguments_raise_clear_errors(llama4):
    ids, mask = left_padded_batch([5, 5])
    with pytest.raises(ValueError, match="needs exit_layer"):
        dx.generate(llama4, ids, mask, strategy="self_speculative", max_new_tokens=4, compile=False)
    with pytest.raises(ValueError, match=r"exit_layer must be an int in \[1, 3\]"):
        generate(llama4, ids, mask, exit_layer=4)
    with pytest.raises(ValueError, match="exit_head='nope'"):
        generate(llama4, ids, mask, exit_head="nope")
    with pytest.raises(ValueError, match="needs exit_heads=ExitHeads"):
        generate(llama4, ids, mask, exit_head="trained")
    heads = dx.train_exit_lm_head(llama4, torch.randint(3, VOCAB, (4, 16)), exit_layer=1, steps=1, seq_len=16, progress=False)
    with pytest.raises(ValueError, match="reads block 1"):
        generate(llama4, ids, mask, exit_layer=2, exit_head="trained", exit_heads=heads)
    with pytest.raises(TypeError, match="unknown options"):
        generate(llama4, ids, mask, window=3)
    torch.manual_seed(0)
    falcon = FalconForCausalLM(
        FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True, vocab_size=VOCAB)
    ).eval()
    with pytest.raises(NotImplementedError, match="ALiBi"):
        generate(falcon, ids, mask)


def test_the_users_model_and_heads_are_not_modified(llama4):
    state = {k: v.clone() for k, v in llama4.state_dict().items()}
    attn = llama4.config._attn_implementation
    heads = dx.DraftHeads(64, 2, vocab_size=VOCAB)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.1)
    head_state = {k: v.clone() for k, v in heads.state_dict().items()}
    ids, mask = left_padded_batch([5, 7])
    generate(llama4, ids, mask, exit_layer=2, max_new_tokens=8)
    generate(llama4, ids, mask, exit_layer=2, tree=[2, 1], max_new_tokens=8)
    generate(llama4, ids, mask, exit_layer=2, tree=[2, 1], max_new_tokens=8, do_sample=True)
    dx.generate(llama4, ids, mask, strategy="draft_heads", heads=heads, tree=[2, 1], max_new_tokens=8, compile=False)
    assert llama4.config._attn_implementation == attn
    assert all(torch.equal(v, state[k]) for k, v in llama4.state_dict().items())
    assert all(torch.equal(v, head_state[k]) for k, v in heads.state_dict().items())
    assert all(p.grad is None for p in llama4.parameters())


# ---- candidate trees --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("tree", [[3, 2, 1], [2, 2]])
def test_tree_greedy_equals_transformers(kind, tree):
    model = build_model(kind)
    ids, mask = left_padded_batch([5, 11, 8], seed=3)
    out = generate(model, ids, mask, tree=tree)
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, 40))
    assert out.stats.forward_passes == out.stats.steps + 1, "one graph per step: the tree's draft and verification"
    assert out.stats.extra["acceptance_rate"] > 0
    assert any(len(set(rows)) > 1 for rows in out.stats.extra["accepted_drafts_per_step"]), "rows accept their own"


def test_tree_accepts_more_than_its_first_branch():
    """The tree's first branch is the chain of the exit head's top tokens: from the same state
    the tree accepts at least as much, and over a run it takes fewer steps."""
    model = build_model("gpt2")
    ids, mask = left_padded_batch([5, 11, 8], seed=3)
    chain = generate(model, ids, mask, num_draft=3)
    tree = generate(model, ids, mask, tree=[3, 2, 1])
    first_branch = generate(model, ids, mask, tree=dx.decoding.TreeSpec.chain(3))
    assert torch.equal(tree.sequences, chain.sequences) and torch.equal(first_branch.sequences, chain.sequences)
    assert first_branch.stats.steps == chain.stats.steps
    assert tree.stats.steps < chain.stats.steps


def test_tree_with_a_trained_head_and_uneven_branching_equals_transformers(llama4):
    """A TreeSpec whose nodes have different numbers of children (some none above the last
    level), a trained exit head, E = 2 of 4 layers."""
    text = torch.randint(3, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
    heads = dx.train_exit_lm_head(llama4, text, exit_layer=2, steps=10, batch_size=4, seq_len=32, progress=False)
    spec = dx.decoding.TreeSpec((-1, 0, 0, 0, 1, 1, 2, 4, 4, 6))  # node 3 and 5 have no children
    ids, mask = left_padded_batch([6, 10, 3], seed=5)
    out = generate(llama4, ids, mask, exit_layer=2, exit_head="trained", exit_heads=heads, tree=spec)
    assert torch.equal(out.sequences, hf_greedy(llama4, ids, mask, 40))
    assert out.stats.extra["tree"] == list(spec.parents)


@pytest.mark.parametrize("do_sample", [False, True])
def test_tree_layers_below_the_exit_run_once_per_node(llama4, do_sample):
    """Per step every layer processes each of the T nodes exactly once: layers < E level by
    level while drafting (the deepest level in the verification), layers >= E in one pass."""
    exit_layer, tree = 2, dx.decoding.TreeSpec.from_branching([2, 2, 1])  # levels of 1, 2, 4, 4 nodes
    seen: dict[int, list[int]] = {i: [] for i in range(4)}
    hooks = [
        layer.register_forward_pre_hook(lambda module, args, kwargs, i=i: seen[i].append(args[0].shape[1]), with_kwargs=True)
        for i, layer in enumerate(llama4.model.layers)
    ]
    try:
        ids, mask = left_padded_batch([6, 10], seed=5)
        sampling = {"do_sample": True, "generator": torch.Generator().manual_seed(0)} if do_sample else {}
        out = generate(llama4, ids, mask, exit_layer=exit_layer, tree=tree, max_new_tokens=30, **sampling)
    finally:
        for hook in hooks:
            hook.remove()
    if not do_sample:
        assert torch.equal(out.sequences, hf_greedy(llama4, ids, mask, 30))
    steps, size = out.stats.steps, tree.size
    assert out.stats.extra["acceptance_rate"] > 0
    for layer in range(exit_layer):  # the draft: one call per level, the leaves in the verification
        assert seen[layer][1:] == [1, 2, 4, 4] * steps, layer
    for layer in range(exit_layer, 4):  # the verification: all nodes at once
        assert seen[layer][1:] == [size] * steps, layer
    assert out.stats.extra["layer_tokens"] == [steps * size] * 4
    assert out.stats.extra["draft_layer_evals"] == steps * exit_layer * (1 + 2 + 4)
    assert out.stats.extra["target_layer_evals"] == steps * (exit_layer * 4 + (4 - exit_layer) * size)


@pytest.mark.parametrize("max_new_tokens", [1, 2, 7])
def test_tree_max_new_tokens_and_eos(max_new_tokens, llama4):
    ids, mask = left_padded_batch([5, 9], seed=2)
    out = generate(llama4, ids, mask, exit_layer=2, tree=[2, 2, 1], max_new_tokens=max_new_tokens)
    assert torch.equal(out.sequences, hf_greedy(llama4, ids, mask, max_new_tokens))
    free = hf_greedy(llama4, ids, mask, 30)
    eos = int(free[1, ids.shape[1] + max_new_tokens])
    out = generate(llama4, ids, mask, exit_layer=2, tree=[2, 2, 1], max_new_tokens=30, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out.sequences, hf_greedy(llama4, ids, mask, 30, eos=[eos]))


@pytest.mark.parametrize("do_sample", [False, True])
def test_tree_no_recompiles_after_warmup(llama4, do_sample):
    counter = CompileCounterWithBackend("eager")
    sampling = {"do_sample": True, "temperature": 0.7} if do_sample else {}
    for seed in (1, 8):
        ids, mask = left_padded_batch([7, 12], seed=seed)
        out = generate(llama4, ids, mask, exit_layer=2, tree=[3, 2, 1], compile=True, backend=counter,
                       generator=torch.Generator().manual_seed(seed), **sampling)
        if not do_sample:
            assert torch.equal(out.sequences, hf_greedy(llama4, ids, mask, 40))
        # greedy: the prefill and the whole tree step; sampling: the prefill, draft + verification, the commit
        assert counter.frame_count == (3 if do_sample else 2)
    assert out.stats.compiles == 0


def test_tree_arguments_are_checked(llama4):
    ids, mask = left_padded_batch([5, 5])
    with pytest.raises(ValueError, match="num_draft=3 but the tree has 6 drafted nodes"):
        generate(llama4, ids, mask, tree=[2, 2], num_draft=3)
    with pytest.raises(TypeError, match="tree must be None"):
        generate(llama4, ids, mask, tree="3,2")
    with pytest.raises(ValueError, match="tree branching"):
        generate(llama4, ids, mask, tree=[2, 0])
    with pytest.raises(ValueError, match="200 children but the vocabulary has 128"):
        generate(llama4, ids, mask, tree=[200])


def test_tree_sampling_near_zero_temperature_is_greedy(llama4):
    """Sampling's own path (host verification, point-mass proposals, the commit graph that
    gathers the accepted path) over many steps: at a temperature where the target's
    distribution is a point mass on its argmax, the output is greedy's."""
    ids, mask = left_padded_batch([6, 10, 3], seed=4)
    out = generate(llama4, ids, mask, exit_layer=2, tree=[3, 2, 1], do_sample=True, temperature=1e-4,
                   generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.sequences, hf_greedy(llama4, ids, mask, 40))
    assert out.stats.extra["mean_accepted_per_step"] > 0.3
