"""Additive masks over cache slots: structure and values."""

import torch

from dynexec_compile.decoding import chain_mask, step_mask

NEG = torch.finfo(torch.float32).min


def test_chain_mask_sees_every_slot_up_to_its_own():
    slots = torch.tensor([[3, 4], [0, 1]])  # [B, T]
    mask = chain_mask(slots, 6, torch.float32)
    assert mask.shape == (2, 1, 2, 6) and mask.dtype == torch.float32
    expected = torch.tensor(
        [
            [[0, 0, 0, 0, NEG, NEG], [0, 0, 0, 0, 0, NEG]],
            [[0, NEG, NEG, NEG, NEG, NEG], [0, 0, NEG, NEG, NEG, NEG]],
        ]
    )
    assert torch.equal(mask[:, 0], expected)


def test_step_mask_with_causal_visibility_is_the_chain_mask():
    lengths = torch.tensor([3, 5])
    slots = lengths[:, None] + torch.arange(4)
    visible = torch.tril(torch.ones(4, 4, dtype=torch.bool))
    assert torch.equal(step_mask(lengths, slots, visible, 12, torch.float32), chain_mask(slots, 12, torch.float32))


def test_step_mask_hides_scratch_and_non_ancestors():
    # row 0: prefix of 2, tokens at slots 4 and 2 where token 1 sees token 0; row 1: prefix 1,
    # tokens at 1 and 2 that see only themselves
    lengths = torch.tensor([2, 1])
    slots = torch.tensor([[4, 2], [1, 2]])
    visible = torch.tensor([[[True, False], [True, True]], [[True, False], [False, True]]])
    allowed = step_mask(lengths, slots, visible, 6, torch.bfloat16)[:, 0] == 0
    assert torch.equal(
        allowed,
        torch.tensor(
            [
                [[1, 1, 0, 0, 1, 0], [1, 1, 1, 0, 1, 0]],
                [[1, 1, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0]],
            ],
            dtype=torch.bool,
        ),
    )
    hidden = step_mask(lengths, slots, visible, 6, torch.bfloat16)[0, 0, 0, 5]
    assert hidden == torch.finfo(torch.bfloat16).min
