"""Speculative decoding of the trained demo code LMs (fp32): token-identical to greedy."""

import pytest
import torch

import dynexec_compile as dx
from dynexec_compile.models import heldout_prompts, load_demo_lm

# committed with the repository (models/code-lm): a missing model is an error, not a skip
TARGET, TOKENIZER = load_demo_lm("target")
DRAFT, _ = load_demo_lm("draft")


@pytest.mark.parametrize("shape", [{"num_draft": 4}, {"tree": [3, 2, 1]}], ids=["chain", "tree"])
def test_speculative_on_heldout_code_equals_transformers(shape):
    prompts = heldout_prompts(3, 40, TOKENIZER)
    pad = TARGET.generation_config.pad_token_id
    ids, mask = prompts.clone(), torch.ones_like(prompts)
    ids[1, :8], mask[1, :8] = pad, 0  # rows of 40, 32 and 24 tokens, left-padded
    ids[2, :16], mask[2, :16] = pad, 0
    for rows in (slice(0, 1), slice(0, 3)):  # batch 1 and batch 3
        with torch.no_grad():
            ref = TARGET.generate(ids[rows], attention_mask=mask[rows], do_sample=False, max_new_tokens=40)
        out = dx.generate(
            TARGET, ids[rows], mask[rows], strategy="speculative", draft_model=DRAFT, max_new_tokens=40,
            compile=False, **shape,
        )
        assert torch.equal(out.sequences, ref)
        assert out.stats.extra["acceptance_rate"] > 0.1, "a trained draft agrees with the target often"
        assert out.stats.forward_passes == out.stats.steps + 1
