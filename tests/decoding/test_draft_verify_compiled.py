"""draft_heads and self_speculative compiled with Inductor (freezing on CPU): tokens unchanged,
nothing recompiles on the next call. Slow: Inductor compiles each graph in tens of seconds."""

import pytest
import torch
from conftest import build_model, left_padded_batch
from torch._dynamo.testing import CompileCounterWithBackend

import dynexec_compile as dx
from dynexec_compile.decoding import DraftHeads


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "options"),
    [
        ("draft_heads", {"heads": DraftHeads(64, 3, vocab_size=128)}),
        ("self_speculative", {"exit_layer": 1, "num_draft": 3}),
        ("self_speculative", {"exit_layer": 1, "tree": [3, 2, 1]}),
    ],
    ids=["draft_heads", "self_speculative", "self_speculative_tree"],
)
def test_inductor_greedy_equals_transformers_without_recompiles(strategy, options):
    model = build_model("qwen2")
    counter = CompileCounterWithBackend("inductor")
    ids, mask = left_padded_batch([7, 12, 3])
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=100, eos_token_id=[], pad_token_id=0)
    out = dx.generate(model, ids, mask, strategy=strategy, max_new_tokens=100, eos_token_id=[], backend=counter, **options)
    assert torch.equal(out.sequences, ref)
    assert counter.frame_count == 2, "the prefill and the one-graph greedy step"
    again = dx.generate(model, ids, mask, strategy=strategy, max_new_tokens=100, eos_token_id=[], backend=counter, **options)
    assert torch.equal(again.sequences, ref) and again.stats.compiles == 0 and counter.frame_count == 2


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "options"),
    [("draft_heads", {"heads": DraftHeads(64, 3, vocab_size=128)}), ("self_speculative", {"exit_layer": 1})],
)
def test_inductor_tree_sampling_is_reproducible_without_recompiles(strategy, options):
    """Sampling with a candidate tree under Inductor: the same seed gives the eager run's tokens,
    the second call compiles nothing."""
    model = build_model("qwen2")
    ids, mask = left_padded_batch([7, 12, 3])

    def run(**compile_options):
        return dx.generate(
            model, ids, mask, strategy=strategy, tree=[3, 2, 1], max_new_tokens=40, eos_token_id=[], do_sample=True,
            temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(0), **options, **compile_options,
        )

    first, again, eager = run(), run(), run(compile=False)
    assert again.stats.compiles == 0
    assert torch.equal(first.sequences, again.sequences) and torch.equal(first.sequences, eager.sequences)
