"""CUDA graphs: the captured decode and step replay the uncaptured path's tokens and logits."""

import pytest
import torch
from conftest import build_model, left_padded_batch

import dynexec_compile as dx
from dynexec_compile.decoding import DecodeEngine, chain_mask

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device"),
]


@pytest.mark.parametrize("compile", [False, True])
def test_graph_replay_gives_the_same_tokens(compile):
    model = build_model("llama").cuda()
    ids, mask = left_padded_batch([7, 12, 4])
    ids, mask = ids.cuda(), mask.cuda()
    kwargs = {"max_new_tokens": 64, "eos_token_id": [], "pad_token_id": 0, "compile": compile}
    plain = dx.generate(model, ids, mask, cuda_graphs=False, **kwargs)
    graphed = dx.generate(model, ids, mask, cuda_graphs=True, **kwargs)
    assert torch.equal(graphed.sequences, plain.sequences)
    again = dx.generate(model, ids, mask, cuda_graphs=True, **kwargs)  # replays the captured graph
    assert torch.equal(again.sequences, plain.sequences)
    assert again.stats.compiles == 0


def test_graphed_step_and_commit_equal_the_uncaptured_engine():
    model = build_model("qwen2").cuda()
    ids, mask = left_padded_batch([5, 9])
    graphed = DecodeEngine(model, batch_size=2, max_len=64, compile=False, cuda_graphs=True)
    plain = DecodeEngine(model, batch_size=2, max_len=64, compile=False, cuda_graphs=False)
    for engine in (graphed, plain):
        engine.prefill(ids.cuda(), mask.cuda())
    for i in range(5):
        chain = torch.randint(3, 128, (2, 4), generator=torch.Generator().manual_seed(i)).cuda()
        positions = graphed.lengths[:, None] + torch.arange(4, device="cuda")
        mask4 = chain_mask(positions, 64, torch.float32)
        a = graphed.step(chain, positions, mask4)
        b = plain.step(chain, positions, mask4)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        counts = torch.tensor([i % 4 + 1, 2], device="cuda")
        graphed.commit(counts)
        plain.commit(counts)
        token = a[:, -1].argmax(-1, keepdim=True)
        torch.testing.assert_close(graphed.decode(token), plain.decode(token), atol=1e-5, rtol=1e-5)
    assert torch.equal(graphed.lengths, plain.lengths)
    assert graphed._step_fn.num_graphs == 1 and graphed._decode_fn.num_graphs == 1
