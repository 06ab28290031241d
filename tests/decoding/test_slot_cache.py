"""SlotCache: per-row in-place writes, prefill equal to transformers' cache, surgery by gather."""

import pytest
import torch
from conftest import build_model, left_padded_batch
from transformers import DynamicCache, Qwen2Config

from dynexec_compile.decoding import DecodeEngine, SlotCache, step_mask
from dynexec_compile.decoding.cache import SlotLayer

# A candidate tree of 4 nodes: 0 is the root (child of the committed prefix), 1 and 2 are
# children of 0, 3 is a child of 2.
PARENTS = [-1, 0, 0, 2]


def tree_visibility(parents: list[int]) -> torch.Tensor:
    """visible[t, u]: node u is t itself or an ancestor of t."""
    n = len(parents)
    visible = torch.eye(n, dtype=torch.bool)
    for t in range(n):
        u = parents[t]
        while u >= 0:
            visible[t, u] = True
            u = parents[u]
    return visible


def tree_depths(parents: list[int]) -> list[int]:
    depths = []
    for p in parents:
        depths.append(0 if p < 0 else depths[p] + 1)
    return depths


def test_layer_writes_each_row_at_its_own_slots():
    layer = SlotLayer(torch.zeros(2, 1, 6, 2), torch.zeros(2, 1, 6, 2))
    new = torch.arange(1, 9, dtype=torch.float32).reshape(2, 1, 2, 2)  # [B, H, T, Dh]
    keys, values = layer.update(new, -new, torch.tensor([[0, 1], [3, 5]]))
    assert torch.equal(keys[0, 0, :2], new[0, 0]) and torch.equal(keys[0, 0, 2:], torch.zeros(4, 2))
    assert torch.equal(keys[1, 0, 3], new[1, 0, 0]) and torch.equal(keys[1, 0, 5], new[1, 0, 1])
    assert torch.equal(keys[1, 0, [0, 1, 2, 4]], torch.zeros(4, 2))
    assert torch.equal(values, -keys)


def test_update_without_write_slots_is_an_error():
    cache = SlotCache(build_model("llama").config, batch_size=1, max_len=8)
    with pytest.raises(RuntimeError, match="no write slots"):
        cache.update(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16), 0)


def test_prefill_cache_equals_transformers_dynamic_cache(lm):
    ids, mask = left_padded_batch([5, 11, 8])
    engine = DecodeEngine(lm, batch_size=3, max_len=64, compile=False)
    engine.prefill(ids, mask)
    assert engine.lengths.tolist() == [5, 11, 8]
    for row in range(3):
        prompt = ids[row, mask[row] == 1][None]  # [1, n]
        ref = DynamicCache(config=lm.config)
        with torch.no_grad():
            lm(input_ids=prompt, past_key_values=ref, use_cache=True)
        n = prompt.shape[1]
        for layer, ref_layer in zip(engine.cache.layers, ref.layers, strict=True):
            torch.testing.assert_close(layer.keys[row, :, :n], ref_layer.keys[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(layer.values[row, :, :n], ref_layer.values[0], atol=1e-5, rtol=1e-5)


def test_commit_after_tree_step_equals_fresh_prefill(lm):
    """Verify a candidate tree in one step, keep a different path per row, gather its K/V:
    the cache then equals a fresh prefill of prompt + kept tokens, and decoding goes on alike."""
    ids, mask = left_padded_batch([6, 9, 4], seed=3)
    engine = DecodeEngine(lm, batch_size=3, max_len=64, compile=False)
    engine.prefill(ids, mask)
    lengths = engine.lengths.clone()
    gen = torch.Generator().manual_seed(7)
    candidates = torch.randint(3, 128, (3, len(PARENTS)), generator=gen)  # [B, T]
    slots = lengths[:, None] + torch.arange(len(PARENTS))  # [B, T]
    positions = lengths[:, None] + torch.tensor(tree_depths(PARENTS))  # [B, T]
    visible = tree_visibility(PARENTS)
    mask4 = step_mask(lengths, slots, visible, engine.max_len, torch.float32)
    engine.step(candidates, positions, mask4, slots)

    paths = [[0, 2, 3], [0, 1], []]  # row 2 keeps nothing
    counts = torch.tensor([len(p) for p in paths])
    accepted = torch.zeros(3, 3, dtype=torch.long)
    for row, path in enumerate(paths):
        accepted[row, : len(path)] = slots[row, path]
    engine.commit(counts, accepted)
    assert engine.lengths.tolist() == (lengths + counts).tolist()

    kept = [torch.cat([ids[r, mask[r] == 1], candidates[r, paths[r]]]) for r in range(3)]
    width = max(len(k) for k in kept)
    fresh_ids = torch.zeros(3, width, dtype=torch.long)
    fresh_mask = torch.zeros(3, width, dtype=torch.long)
    for r, k in enumerate(kept):
        fresh_ids[r, width - len(k) :] = k
        fresh_mask[r, width - len(k) :] = 1
    fresh = DecodeEngine(lm, batch_size=3, max_len=64, compile=False)
    fresh.prefill(fresh_ids, fresh_mask)
    assert torch.equal(fresh.lengths, engine.lengths)
    for row in range(3):
        n = int(engine.lengths[row])
        for a, b in zip(engine.cache.layers, fresh.cache.layers, strict=True):
            torch.testing.assert_close(a.keys[row, :, :n], b.keys[row, :, :n], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(a.values[row, :, :n], b.values[row, :, :n], atol=1e-5, rtol=1e-5)
    nxt = torch.tensor([[5], [6], [7]])
    torch.testing.assert_close(engine.decode(nxt), fresh.decode(nxt), atol=1e-5, rtol=1e-5)


def test_commit_of_a_chain_prefix_only_moves_lengths(llama):
    ids, mask = left_padded_batch([5, 7])
    engine = DecodeEngine(llama, batch_size=2, max_len=32, compile=False)
    engine.prefill(ids, mask)
    before = [layer.keys.clone() for layer in engine.cache.layers]
    engine.commit(torch.tensor([2, 0]))
    assert engine.lengths.tolist() == [7, 7]
    assert all(torch.equal(a, layer.keys) for a, layer in zip(before, engine.cache.layers, strict=True))


@pytest.mark.parametrize(
    ("counts", "accepted", "message"),
    [
        ([1], None, "counts must have shape"),
        ([-1, 0], None, ">= 0"),
        ([30, 0], None, "fit in max_len"),
        ([3, 0], [[10, 11], [10, 11]], "exceed A=2"),
        ([1, 0], [[40, 0], [0, 0]], r"lie in \[0, 32\)"),
        ([1, 0], [10, 11], r"must be \[B, A\]"),
    ],
)
def test_commit_rejects_bad_arguments(llama, counts, accepted, message):
    ids, mask = left_padded_batch([5, 7])
    engine = DecodeEngine(llama, batch_size=2, max_len=32, compile=False)
    engine.prefill(ids, mask)
    with pytest.raises(ValueError, match=message):
        engine.commit(torch.tensor(counts), None if accepted is None else torch.tensor(accepted))


def test_sliding_window_layers_are_served_and_linear_attention_refused():
    config = Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=64, use_sliding_window=True, sliding_window=8, max_window_layers=1,
    )
    assert "sliding_attention" in config.layer_types
    assert SlotCache(config, batch_size=1, max_len=16).max_len == 16  # the mask narrows sliding layers
    config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(NotImplementedError, match="linear_attention"):
        SlotCache(config, batch_size=1, max_len=16)
