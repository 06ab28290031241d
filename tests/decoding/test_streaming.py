"""``generate(..., streamer=)``: transformers' BaseStreamer protocol for every strategy.

The streamer sees the prompt once, then each step's kept tokens in order, then ``end()``;
the streamed tokens are exactly the generated ones (nothing after EOS, no padding), so the
text transformers' ``TextStreamer`` / ``TextIteratorStreamer`` build equals the decoded
non-streamed output. A tiny random LLaMA over the demo LM's tokenizer (built offline).
"""

import pytest
import torch
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    TextIteratorStreamer,
    TextStreamer,
)

import dynexec_compile as dx
from dynexec_compile.decoding import DraftHeads
from dynexec_compile.models import demo_lm_path

NEW = 24


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(demo_lm_path("target"))


def _llama(vocab: int, seed: int, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, eos_token_id=None, bos_token_id=None, pad_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def models(tokenizer):
    target, draft = _llama(len(tokenizer), 0, layers=3), _llama(len(tokenizer), 1)
    draft.config.eos_token_id = target.config.eos_token_id
    heads = DraftHeads(32, 3, vocab_size=len(tokenizer))  # untrained: each head repeats the model's next token
    return target, draft, heads


STRATEGIES = {
    "greedy": lambda m: {},
    "lookahead": lambda m: {"window": 2, "ngram": 3, "guesses": 2},
    "speculative": lambda m: {"draft_model": m[0], "num_draft": 3},
    "speculative_draft": lambda m: {"draft_model": m[1], "num_draft": 3},
    "draft_heads": lambda m: {"heads": m[2]},
    "self_speculative": lambda m: {"exit_layer": 1, "num_draft": 2},
}


class Recorder:
    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(("put", value.clone()))

    def end(self):
        self.calls.append(("end", None))


def _prompt(tokenizer) -> torch.Tensor:
    return tokenizer("def add(a, b):\n    return", return_tensors="pt").input_ids


def _run(models, strategy, ids, **kwargs):
    return dx.generate(
        models[0], ids, strategy=strategy.split("_draft")[0], max_new_tokens=NEW, compile=False, **STRATEGIES[strategy](models), **kwargs
    )


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_recorded_stream_is_prompt_then_kept_tokens_then_end(models, tokenizer, strategy):
    ids = _prompt(tokenizer)
    plain = _run(models, strategy, ids)
    rec = Recorder()
    out = _run(models, strategy, ids, streamer=rec)
    assert torch.equal(out.sequences, plain.sequences), "streaming changed the output"
    kinds = [kind for kind, _ in rec.calls]
    assert kinds[0] == "put" and kinds[-1] == "end" and kinds.count("end") == 1
    assert torch.equal(rec.calls[0][1], ids), "the first put is the prompt"
    steps = [value for kind, value in rec.calls[1:-1]]
    assert all(v.ndim == 1 and v.dtype == torch.long and v.numel() > 0 for v in steps)
    assert torch.equal(torch.cat(steps), out.sequences[0, ids.shape[1]:])
    assert [v.numel() for v in steps] == [1] + [kept for (kept,) in out.stats.accepted_per_step], (
        "one put for the prefill's token, then one per step with the tokens it kept"
    )
    if strategy == "speculative":  # the draft is the target itself: every draft is accepted
        assert max(v.numel() for v in steps) == 4, "a multi-token step streams its tokens in one put"


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_stream_stops_at_eos(models, tokenizer, strategy):
    ids = _prompt(tokenizer)
    new = _run(models, strategy, ids).sequences[0, ids.shape[1]:].tolist()
    eos = new[NEW // 2]
    rec = Recorder()
    out = _run(models, strategy, ids, eos_token_id=eos, pad_token_id=0, streamer=rec)
    streamed = torch.cat([value for kind, value in rec.calls[1:-1]]).tolist()
    assert streamed == new[: new.index(eos) + 1], "the stream ends with the first EOS"
    assert streamed == out.sequences[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_text_streamers_give_the_decoded_output(models, tokenizer, strategy, capsys):
    ids = _prompt(tokenizer)
    out = _run(models, strategy, ids)
    text = tokenizer.decode(out.sequences[0, ids.shape[1]:])
    iterator = TextIteratorStreamer(tokenizer, skip_prompt=True)
    _run(models, strategy, ids, streamer=iterator)  # the queue is unbounded: read it afterwards
    assert "".join(iterator) == text
    capsys.readouterr()
    _run(models, strategy, ids, streamer=TextStreamer(tokenizer, skip_prompt=True))
    assert capsys.readouterr().out == text + "\n"


def test_streamer_needs_batch_one_and_the_protocol(models, tokenizer):
    ids = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"streamer= streams one sequence: input_ids must be \[1, L\]"):
        dx.generate(models[0], ids, max_new_tokens=2, compile=False, streamer=Recorder())
    with pytest.raises(TypeError, match="streamer must have put"):
        dx.generate(models[0], ids[:1], max_new_tokens=2, compile=False, streamer=object())


def test_sampling_streams_the_sampled_tokens(models, tokenizer):
    ids = _prompt(tokenizer)
    rec = Recorder()
    out = dx.generate(
        models[0], ids, strategy="lookahead", do_sample=True, max_new_tokens=NEW, compile=False,
        generator=torch.Generator().manual_seed(3), streamer=rec,
    )
    assert torch.equal(torch.cat([v for k, v in rec.calls[1:-1]]), out.sequences[0, ids.shape[1]:])
