"""On CUDA, the one-graph greedy steps of draft_heads and self_speculative are captured as CUDA
graphs (the cache lengths updated in place by the replay) and give greedy's tokens."""

import pytest
import torch
from conftest import build_model, left_padded_batch

import dynexec_compile as dx
from dynexec_compile.decoding import DraftHeads

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph replay needs CUDA"),
]


@pytest.mark.parametrize(
    ("strategy", "options"),
    [
        ("draft_heads", {"heads": DraftHeads(64, 3, vocab_size=128)}),
        ("self_speculative", {"exit_layer": 1, "num_draft": 3}),
        ("self_speculative", {"exit_layer": 1, "tree": [3, 2, 1]}),
    ],
    ids=["draft_heads", "self_speculative", "self_speculative_tree"],
)
def test_cuda_graph_replay_equals_transformers(strategy, options):
    model = build_model("llama").cuda()
    ids, mask = (t.cuda() for t in left_padded_batch([7, 12]))
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=60, eos_token_id=[], pad_token_id=0)
    for _ in range(2):  # capture, then replay
        out = dx.generate(model, ids, mask, strategy=strategy, max_new_tokens=60, eos_token_id=[], cuda_graphs=True, **options)
        assert torch.equal(out.sequences, ref)
