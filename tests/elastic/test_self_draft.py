"""Elastic self-drafting: a level of the model's own weights drafts for the full model.

What a user depends on: the draft is exactly the sliced level, holds no weight of its own
(every tensor aliases the model's storage), leaves the model untouched, and speculative
decoding with it gives the full model's greedy tokens (random LLaMA / Qwen2 from configs, the
demo target reordered by importance) and the full model's sampling distribution (chi-square).
"""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_gpt2, tiny_llama, tiny_qwen2

import dynexec_compile as dx
from dynexec_compile.decoding import SamplingParams
from dynexec_compile.elastic import ElasticModel, LevelLoRA, elastic_forward, random_importance
from dynexec_compile.elastic.self_draft import LoRALinear, draft_extra_bytes, elastic_draft

_spec = importlib.util.spec_from_file_location("decoding_conftest", Path(__file__).parents[1] / "decoding" / "conftest.py")
decoding = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(decoding)

FACTORIES = {"llama": tiny_llama, "qwen2": tiny_qwen2}


def reordered(factory, seed: int = 3):
    torch.manual_seed(seed)
    model = factory()
    for p in model.parameters():  # a wider init: continuations that are not one repeated token
        p.data.normal_(0, 0.2)
    dx.reorder_by_importance(model, importance=random_importance(model, seed=seed))
    return model


def hf_greedy(model, ids, mask, n):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, eos_token_id=[], pad_token_id=0)


def speculative(model, draft, ids, mask, n, **kwargs):
    kwargs = {"compile": False, "eos_token_id": [], "pad_token_id": 0, **kwargs}
    return dx.generate(model, ids, mask, strategy="speculative", draft_model=draft, max_new_tokens=n, **kwargs)


@pytest.mark.parametrize("arch", sorted(FACTORIES))
@pytest.mark.parametrize("level", [0.75, 0.5, 0.25])
def test_the_draft_is_the_sliced_level_and_copies_nothing(arch, level):
    model = reordered(FACTORIES[arch])
    before = {n: (p, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    draft = elastic_draft(model, level)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        reference = ElasticModel(model, levels=[1.0, level], backend=None)
        with dx.elastic_level(level):
            want = reference(input_ids=ids).logits
        got = draft(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert draft_extra_bytes(draft, model) == 0
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    assert all(p.untyped_storage().data_ptr() in owned for p in [*draft.parameters(), *draft.buffers()])
    assert sum(p.numel() for p in draft.parameters()) < sum(p.numel() for p in model.parameters())
    for name, p in model.named_parameters():  # the model is untouched
        same, value, grad = before[name]
        assert p is same and p.requires_grad == grad and torch.equal(p, value)
    assert type(draft) is type(model) and draft.config.num_hidden_layers == model.config.num_hidden_layers
    assert model.config.num_attention_heads == 8  # the draft's config is its own


def test_draft_extra_bytes_counts_a_copy():
    model = reordered(tiny_llama)
    draft = elastic_draft(model, 0.5)
    copied = copy.deepcopy(draft)
    assert draft_extra_bytes(copied, model) == sum(
        t.numel() * t.element_size() for t in {id(t): t for t in [*copied.parameters(), *copied.buffers()]}.values()
    )


@pytest.mark.parametrize("arch", sorted(FACTORIES))
@pytest.mark.parametrize("shape", [{"num_draft": 3}, {"tree": [2, 2, 1]}])
def test_greedy_is_token_identical_to_the_full_model(arch, shape):
    model = decoding.build_model(arch)  # seeded models whose greedy continuations vary
    dx.reorder_by_importance(model, importance=random_importance(model, seed=3))
    ids, mask = decoding.left_padded_batch([7, 12, 4])
    ref = hf_greedy(model, ids, mask, 30)
    assert len(set(ref[:, ids.shape[1]:].flatten().tolist())) >= 8, "degenerate model: the test could not fail"
    out = speculative(model, elastic_draft(model, 0.5), ids, mask, 30, **shape)
    assert torch.equal(out.sequences, ref)
    assert 0.0 < out.stats.extra["acceptance_rate"] < 1.0, "drafts must be both kept and rejected"


def test_compiled_steps_read_the_strided_views():
    """The sliced output projections are strided views; a compiled draft (Dynamo tracing the
    views as graph inputs, regional layers) gives the same tokens."""
    model = reordered(tiny_llama)
    ids, mask = decoding.left_padded_batch([5, 9])
    out = speculative(model, elastic_draft(model, 0.5), ids, mask, 20, num_draft=3, compile=True,
                      backend="eager", regional=True)
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, 20))
    assert out.stats.compiles > 0


def test_the_draft_is_cached_and_follows_the_weights_in_place():
    model = reordered(tiny_llama)
    draft = elastic_draft(model, 0.5)
    assert elastic_draft(model, 0.5) is draft and elastic_draft(model, 0.25) is not draft
    dx.reorder_by_importance(model, importance=random_importance(model, seed=9))  # in place again
    ids = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad(), dx.elastic_level(0.5):
        want = ElasticModel(model, levels=[1.0, 0.5], backend=None)(input_ids=ids).logits
    torch.testing.assert_close(draft(input_ids=ids).logits, want, rtol=0, atol=0)


def random_lora(model, level, seed=0):
    lora = LevelLoRA.create(model, level, rank=4, seed=seed)
    with torch.no_grad():
        for b in lora.B:
            b.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))  # B = 0 would change nothing
    return lora


@pytest.mark.parametrize("arch", sorted(FACTORIES))
def test_a_level_lora_rides_on_the_draft_without_copies(arch):
    model = reordered(FACTORIES[arch])
    lora = random_lora(model, 0.5)
    draft = elastic_draft(model, 0.5, lora=lora)
    assert elastic_draft(model, 0.5, lora=lora) is draft and elastic_draft(model, 0.5) is not draft
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        want = elastic_forward(model, 0.5, kwargs={"input_ids": ids}, lora=lora).logits
        plain = elastic_draft(model, 0.5)(input_ids=ids).logits
        got = draft(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3), "the LoRA changes the draft"
    lora_bytes = sum(t.numel() * t.element_size() for t in lora.parameters())
    assert draft_extra_bytes(draft, model) == lora_bytes, "only the LoRA's own tensors, shared with it"
    adapted = [m for m in draft.modules() if isinstance(m, LoRALinear)]
    assert len(adapted) == len(lora.targets) and adapted[0].lora_A is lora.A[0]


def test_greedy_with_a_lora_draft_compiled_and_eager():
    model = decoding.build_model("llama")
    dx.reorder_by_importance(model, importance=random_importance(model, seed=3))
    draft = elastic_draft(model, 0.5, lora=random_lora(model, 0.5))
    ids, mask = decoding.left_padded_batch([7, 12, 4])
    ref = hf_greedy(model, ids, mask, 24)
    assert torch.equal(speculative(model, draft, ids, mask, 24, num_draft=3).sequences, ref)
    out = speculative(model, draft, ids, mask, 24, num_draft=3, compile=True, backend="eager", regional=True)
    assert torch.equal(out.sequences, ref)


def test_a_lora_for_another_level_or_order_is_refused():
    model = reordered(tiny_llama)
    with pytest.raises(ValueError, match="level 0.25, not 0.5"):
        elastic_draft(model, 0.5, lora=random_lora(model, 0.25))
    other = reordered(tiny_llama, seed=4)
    with pytest.raises(ValueError, match="another head/neuron order"):
        elastic_draft(model, 0.5, lora=random_lora(other, 0.5))
    with pytest.raises(TypeError, match="LevelLoRA"):
        elastic_draft(model, 0.5, lora={"A": 1})


def test_bad_levels_and_models_are_refused():
    model = reordered(tiny_llama)
    for level in (1.0, 0.0, 1.5, True):
        with pytest.raises(ValueError, match="must be a fraction in \\(0, 1\\)"):
            elastic_draft(model, level)
    with pytest.raises(NotImplementedError, match="fused projection"):
        elastic_draft(tiny_gpt2(), 0.5)


def test_demo_target_reordered_on_a_copy_then_self_drafted():
    """Reordering the demo target (on a copy: it edits in place) changes its weights, not its
    greedy tokens; its 0.75 level then drafts (a good share of its drafts kept: a trained model reordered by
    importance) and the output stays the original model's."""
    model, tok = dx.load_demo_lm("target")
    prompts = dx.heldout_prompts(10, 48, tok)
    ids = prompts[8:]
    original = hf_greedy(model, ids, None, 40)
    work = copy.deepcopy(model)
    calibration = [{"input_ids": prompts[i : i + 4], "labels": prompts[i : i + 4]} for i in (0, 4)]
    dx.reorder_by_importance(work, calibration, progress=False)
    assert not torch.equal(work.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    with torch.no_grad():
        torch.testing.assert_close(work(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(hf_greedy(work, ids, None, 40), original)
    out = speculative(work, elastic_draft(work, 0.75), ids, None, 40, num_draft=3)
    assert torch.equal(out.sequences, original)
    assert out.stats.extra["acceptance_rate"] > 0.1


# ---- sampling: the full model's distribution, whatever the level drafts ----------------------

V, ROWS, N = 8, 2000, 3
PROMPT = [1, 5, 2, 7]


@pytest.fixture(scope="module")
def sampling_pair():
    model = decoding.tiny_sampling_lm(V, 64)
    dx.reorder_by_importance(model, importance=random_importance(model, seed=5))
    return model, elastic_draft(model, 0.5)


@pytest.mark.parametrize("shape", [{"num_draft": 2}, {"tree": [2, 1]}])
@pytest.mark.parametrize("warp", sorted(decoding.SAMPLING_WARPS))
def test_sampling_follows_the_full_model(sampling_pair, warp, shape):
    model, draft = sampling_pair
    params = decoding.SAMPLING_WARPS[warp]
    out = speculative(
        model, draft, torch.tensor([PROMPT]).expand(ROWS, -1), None, N, do_sample=True,
        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
        generator=torch.Generator().manual_seed(1), **shape,
    )
    samples = out.sequences[:, len(PROMPT):]
    assert 0.05 < out.stats.extra["acceptance_rate"] < 0.95, "drafts must be both kept and rejected"
    assert decoding.chi_square_pvalue(samples, V, decoding.exact_joint(model, PROMPT, params, N)) > 1e-3
    other = decoding.exact_joint(model, PROMPT, SamplingParams(temperature=0.5), N)
    assert decoding.chi_square_pvalue(samples, V, other) < 1e-6, "the test must tell another distribution apart"
