"""A new strategy is one proposer and one registry line: the shared loop and step do the rest.

The proposer here guesses that the last token repeats ``k`` times (a chain); the shared
step verifies it (greedy: one graph; sampling: point-mass proposals, lossless), the shared
loop stops rows at EOS / ``max_new_tokens``. Greedy output must equal transformers'.
"""

import pytest
import torch
from conftest import build_model, left_padded_batch

import dynexec_compile as dx
from dynexec_compile.decoding import TreeSpec, register_strategy, strategy_engine
from dynexec_compile.decoding.generate import decode_loop
from dynexec_compile.decoding.verify import DraftProposer


class RepeatProposer(DraftProposer):
    def guess(self):
        return self.root[:, None].expand(-1, self.tree.size), None  # [B, k+1]: the root, then k guesses of it


def repeat_strategy(model, input_ids, attention_mask, settings, k=3):
    engine = strategy_engine(model, input_ids, attention_mask, settings, "repeat", reserve=k + 1)
    return decode_loop(RepeatProposer("repeat", engine, settings, TreeSpec.chain(k)), input_ids, attention_mask, settings)


register_strategy("repeat", repeat_strategy)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_registered_proposer_is_greedy_exact_with_one_forward_per_step(kind):
    model = build_model(kind)
    ids, mask = left_padded_batch([5, 9, 7], seed=4)
    eos = 5
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=30, eos_token_id=eos, pad_token_id=0)
    out = dx.generate(model, ids, mask, strategy="repeat", max_new_tokens=30, eos_token_id=eos, pad_token_id=0,
                      compile=False, k=2)
    assert torch.equal(out.sequences, ref)
    assert out.stats.strategy == "repeat" and out.stats.forward_passes == out.stats.steps + 1
    assert sum(map(sum, out.stats.accepted_per_step)) + 3 == sum(out.stats.new_tokens)


def test_a_registered_proposer_samples_reproducibly():
    model = build_model("llama")
    ids, mask = left_padded_batch([5, 9], seed=4)
    runs = [
        dx.generate(model, ids, mask, strategy="repeat", max_new_tokens=20, do_sample=True, temperature=0.7,
                    generator=torch.Generator().manual_seed(1), eos_token_id=[], compile=False).sequences
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1]) and runs[0].shape == (2, ids.shape[1] + 20)
