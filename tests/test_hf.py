"""The Hugging Face habits: model.generate(custom_generate=hf_generate), wrap_generate, compile.

Every decoding here runs with compile=False (the eager step) and is compared with the stock
``model.generate`` of the same model, greedy, fp32: the tokens must be identical.
"""

from __future__ import annotations

import contextlib
import io
import threading

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    StoppingCriteriaList,
    TextIteratorStreamer,
    TextStreamer,
)
from transformers.generation.logits_process import TopKLogitsWarper
from transformers.generation.stopping_criteria import MaxLengthCriteria

import dynexec_compile as dx
from dynexec_compile.config import parse_options
from tests.hf_models import VOCAB, causal_lm

EAGER = {"compile": False}


@pytest.fixture(scope="module")
def lm():
    return causal_lm("llama")


@pytest.fixture(scope="module")
def draft():
    return causal_lm("llama", seed=1)


@pytest.fixture(scope="module")
def demo():
    try:
        return dx.load_demo_lm("target")
    except FileNotFoundError as err:
        pytest.skip(str(err))


def prompt(batch: int = 1, length: int = 10, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def padded_batch() -> dict:
    """Two rows, the second left-padded by 3 (pad id 0)."""
    ids = prompt(2, 10)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def hf(model, **kwargs):
    return model.generate(**kwargs)


def ours(model, decoding=EAGER, **kwargs):
    return model.generate(**kwargs, custom_generate=dx.hf_generate, decoding=decoding)


def snapshot(model) -> tuple:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return state, sorted(model.__dict__), model.generation_config.to_dict(), model.training


# torch.compile(model) itself sets this flag on the model (OptimizedModule forwards setattr)
TORCH_COMPILE_MARK = "_is_torch_compile"


def assert_unchanged(model, before: tuple) -> None:
    state, keys, gen_config, training = snapshot(model)
    assert [k for k in keys if k != TORCH_COMPILE_MARK] == before[1]
    assert gen_config == before[2] and training == before[3]
    assert all(torch.equal(state[k], before[0][k]) for k in state)
    assert "generate" not in model.__dict__


# ---- token identity with model.generate ------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_greedy_matches_model_generate(family):
    model = causal_lm(family)
    ids = prompt()
    assert torch.equal(ours(model, input_ids=ids, max_new_tokens=24), hf(model, input_ids=ids, max_new_tokens=24))


@pytest.mark.parametrize(
    "hf_args, strategy",
    [
        ({}, "greedy"),
        ({"prompt_lookup_num_tokens": 3}, "lookahead"),
        ({"assistant_early_exit": 1}, "self_speculative"),
        ({"assistant_early_exit": 2, "num_assistant_tokens": 3}, "self_speculative"),
    ],
)
def test_hf_strategy_arguments_match_model_generate(lm, hf_args, strategy):
    ids = prompt(length=16)
    ref = hf(lm, input_ids=ids, max_new_tokens=30, **hf_args)
    out = ours(lm, input_ids=ids, max_new_tokens=30, return_dict_in_generate=True, **hf_args)
    assert isinstance(out, dx.DynexecGenerateOutput)
    assert torch.equal(out.sequences, ref)
    assert out.stats.strategy == strategy
    if "num_assistant_tokens" in hf_args:
        assert max(max(step) for step in out.stats.accepted_per_step) <= hf_args["num_assistant_tokens"] + 1


def test_prompt_lookup_maps_to_lookahead_without_a_window(lm):
    out = ours(lm, input_ids=prompt(), max_new_tokens=8, prompt_lookup_num_tokens=4, return_dict_in_generate=True)
    # a prompt-lookup candidate of k tokens is a lookahead n-gram of k + 1, one guess, no Jacobi window
    extra = out.stats.extra
    assert (extra["window"], extra["ngram"], extra["guesses"], extra["prompt_lookup"]) == (0, 5, 1, True)
    assert extra["step_tokens"] == 5
    assert max(max(step) for step in out.stats.accepted_per_step) <= 5
    # decoding settings may still ask for a window
    gen = dx.wrap_generate(lm, window=2, **EAGER)
    out = gen(input_ids=prompt(), max_new_tokens=8, prompt_lookup_num_tokens=4, return_dict_in_generate=True)
    assert (out.stats.extra["window"], out.stats.extra["guesses"]) == (2, 1)


def test_assistant_model_through_wrap_generate(lm, draft):
    ids = prompt(length=16)
    gen = dx.wrap_generate(lm, **EAGER)
    out = gen(input_ids=ids, max_new_tokens=30, assistant_model=draft, return_dict_in_generate=True)
    assert torch.equal(out.sequences, hf(lm, input_ids=ids, max_new_tokens=30, assistant_model=draft))
    assert out.stats.strategy == "speculative"
    out = gen(input_ids=ids, max_new_tokens=30, assistant_model=draft, num_assistant_tokens=2, return_dict_in_generate=True)
    assert torch.equal(out.sequences, hf(lm, input_ids=ids, max_new_tokens=30, assistant_model=draft))
    assert max(max(step) for step in out.stats.accepted_per_step) <= 3


@pytest.mark.parametrize("hf_args", [{}, {"prompt_lookup_num_tokens": 2}, {"assistant_early_exit": 1}])
def test_batch_eos_list_and_pad_match_model_generate(lm, hf_args):
    inputs = padded_batch()
    free = hf(lm, **inputs, max_new_tokens=20)
    # EOS ids that the rows do produce, so that rows stop at different steps
    eos = [int(free[0, 10 + 4]), int(free[1, 10 + 9])]
    kwargs = dict(max_new_tokens=20, eos_token_id=eos, pad_token_id=1)
    out = ours(lm, **inputs, **kwargs, **hf_args)
    if not hf_args:
        assert torch.equal(out, lm.generate(**inputs, **kwargs))
    # transformers' assisted decoding runs batch 1 only: compare row by row as well
    for row in (0, 1):
        one = {k: v[row : row + 1] for k, v in inputs.items()}
        row_ref = lm.generate(**one, **kwargs)[0]
        assert torch.equal(out[row, : row_ref.numel()], row_ref)
        assert (out[row, row_ref.numel() :] == 1).all()
    assert out.shape[1] < 30  # both rows stopped before max_new_tokens


def test_max_length_and_generation_config(lm):
    from transformers import GenerationConfig

    ids = prompt()
    config = GenerationConfig(max_length=22, eos_token_id=None, pad_token_id=0)
    ref = lm.generate(input_ids=ids, generation_config=config)
    out = lm.generate(input_ids=ids, generation_config=config, custom_generate=dx.hf_generate, decoding=EAGER)
    assert out.shape[1] == 22 and torch.equal(out, ref)


def test_sampling_arguments_reach_the_sampler(lm):
    """top_k=1 makes sampling deterministic: it must then equal greedy decoding (HF's too), at
    any temperature; a second seeded run with a real top-k reproduces itself."""
    ids = prompt()
    greedy = hf(lm, input_ids=ids, max_new_tokens=16)
    out = ours(lm, input_ids=ids, max_new_tokens=16, do_sample=True, top_k=1, temperature=0.6, return_dict_in_generate=True)
    assert torch.equal(out.sequences, greedy) and out.stats.strategy == "sample"
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(ours(lm, input_ids=ids, max_new_tokens=16, do_sample=True, top_k=5, top_p=0.9))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], greedy)


def test_min_new_tokens_without_eos_is_a_no_op(lm):
    ids = prompt()
    kwargs = dict(input_ids=ids, max_new_tokens=10, min_new_tokens=4, eos_token_id=None)
    assert torch.equal(ours(lm, **kwargs), hf(lm, **kwargs))


def test_demo_lm_matches_model_generate(demo):
    model, tok = demo
    ids = tok("def parse_args(argv):\n    parser = ", return_tensors="pt")
    for hf_args in ({}, {"prompt_lookup_num_tokens": 3}):
        ref = hf(model, **ids, max_new_tokens=40, **hf_args)
        assert torch.equal(ours(model, **ids, max_new_tokens=40, **hf_args), ref)
    draft_model, _ = dx.load_demo_lm("draft")
    ref = hf(model, **ids, max_new_tokens=40)
    out = dx.wrap_generate(model, **EAGER)(**ids, max_new_tokens=40, assistant_model=draft_model)
    assert torch.equal(out, ref)


# ---- stop strings ----------------------------------------------------------------------------


@pytest.mark.parametrize("hf_args", [{}, {"prompt_lookup_num_tokens": 3}])
def test_stop_strings_match_model_generate(demo, hf_args):
    model, tok = demo
    ids = tok("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):", return_tensors="pt")
    kwargs = dict(max_new_tokens=40, stop_strings=["\n\n", "return"], **ids)
    ref = model.generate(**kwargs, tokenizer=tok)
    out = dx.wrap_generate(model, **EAGER)(**kwargs, tokenizer=tok, **hf_args)
    assert torch.equal(out, ref)
    assert ref.shape[1] < ids["input_ids"].shape[1] + 40  # the stop string was met


def test_stop_strings_in_a_padded_batch_match_model_generate(demo):
    model, tok = demo
    texts = ["def add(a, b):\n    return a + b\n\n\ndef sub(a, b):", "import os\n"]
    side, tok.padding_side = tok.padding_side, "left"
    try:
        inputs = tok(texts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    kwargs = dict(max_new_tokens=30, stop_strings=["\n\n"], **inputs)
    ref = model.generate(**kwargs, tokenizer=tok)
    out = dx.wrap_generate(model, **EAGER)(**kwargs, tokenizer=tok)
    assert torch.equal(out, ref)
    assert not torch.equal(ref, model.generate(**inputs, max_new_tokens=30))  # a row met the stop string


def test_stop_strings_need_the_wrapper_and_a_tokenizer(demo):
    model, tok = demo
    ids = tok("x = 1\n", return_tensors="pt")
    with pytest.raises(ValueError, match="tokenizer"):  # transformers drops it before custom_generate
        model.generate(**ids, max_new_tokens=4, stop_strings=["\n"], tokenizer=tok, custom_generate=dx.hf_generate)
    with pytest.raises(ValueError, match="tokenizer="):
        dx.wrap_generate(model, **EAGER)(**ids, max_new_tokens=4, stop_strings=["\n"])


# ---- streaming -------------------------------------------------------------------------------


class Recorder:
    """Records every put() (as a list of ints) and whether end() came."""

    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


def test_stream_tokens_in_order_several_per_step(demo):
    model, tok = demo
    ids = tok("import os\nimport sys\nimport os\nimport sys\nimport", return_tensors="pt")
    rec = Recorder()
    out = dx.wrap_generate(model, **EAGER)(**ids, max_new_tokens=40, prompt_lookup_num_tokens=4, streamer=rec)
    assert torch.equal(out, hf(model, **ids, max_new_tokens=40))
    assert rec.puts[0] == ids["input_ids"][0].tolist() and rec.ended
    streamed = [t for put in rec.puts[1:] for t in put]
    assert streamed == out[0, ids["input_ids"].shape[1] :].tolist()
    assert max(len(put) for put in rec.puts[1:]) > 1  # lookahead kept several tokens in a step


def test_text_streamer_and_iterator_give_the_final_text(demo):
    model, tok = demo
    ids = tok("def main():\n    ", return_tensors="pt")
    gen = dx.wrap_generate(model, **EAGER)
    out = gen(**ids, max_new_tokens=30, prompt_lookup_num_tokens=3)
    text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        gen(**ids, max_new_tokens=30, prompt_lookup_num_tokens=3, streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True))
    assert buffer.getvalue().rstrip("\n") == text.rstrip("\n")

    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    worker = threading.Thread(target=gen, kwargs=dict(**ids, max_new_tokens=30, prompt_lookup_num_tokens=3, streamer=streamer))
    worker.start()
    pieces = list(streamer)
    worker.join()
    assert "".join(pieces) == text


def test_stream_stops_at_stop_string(demo):
    model, tok = demo
    ids = tok("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):", return_tensors="pt")
    rec = Recorder()
    out = dx.wrap_generate(model, **EAGER)(**ids, max_new_tokens=40, stop_strings=["\n\n"], tokenizer=tok, streamer=rec)
    streamed = [t for put in rec.puts[1:] for t in put]
    assert streamed == out[0, ids["input_ids"].shape[1] :].tolist() and rec.ended


# ---- what is refused -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_beams=2), "num_beams"),
        (dict(num_return_sequences=2, do_sample=True), "num_return_sequences"),
        (dict(repetition_penalty=1.3), "repetition_penalty"),
        (dict(no_repeat_ngram_size=2), "no_repeat_ngram_size"),
        (dict(do_sample=True, min_p=0.1), "min_p"),
        (dict(do_sample=True, typical_p=0.5), "typical_p"),
        (dict(suppress_tokens=[5]), "suppress_tokens"),
        (dict(max_time=5.0), "max_time"),
        (dict(min_new_tokens=3), "min_new_tokens"),
        (dict(min_length=15), "min_length"),
        (dict(return_dict_in_generate=True, output_scores=True), "output_scores"),
        (dict(return_dict_in_generate=True, output_logits=True), "output_logits"),
        (dict(prompt_lookup_num_tokens=3, max_matching_ngram_size=3), "max_matching_ngram_size"),
        (dict(assistant_early_exit=1, num_assistant_tokens_schedule="heuristic"), "num_assistant_tokens_schedule"),
        (dict(prompt_lookup_num_tokens=3, assistant_early_exit=1), "prompt_lookup_num_tokens and assistant_early_exit"),
        (dict(logits_processor=LogitsProcessorList([TopKLogitsWarper(3)])), "logits_processor"),
        (dict(position_ids=torch.arange(10)[None]), "position_ids"),
        (dict(stopping_criteria=StoppingCriteriaList([MaxLengthCriteria(12)])), "stopping_criteria"),
        (dict(prefix_allowed_tokens_fn=lambda batch, ids: [5]), "prefix_allowed_tokens_fn"),
    ],
)
def test_unsupported_arguments_raise_naming_them(lm, kwargs, name):
    with pytest.raises((ValueError, NotImplementedError), match=name):
        ours(lm, input_ids=prompt(), max_new_tokens=5, **kwargs)


def test_dropped_arguments_raise_and_point_to_the_wrapper(lm, draft):
    for kwargs in (dict(assistant_model=draft), dict(streamer=Recorder())):
        with pytest.raises(ValueError, match="wrap_generate"):
            ours(lm, input_ids=prompt(), max_new_tokens=5, **kwargs)


def test_wrapper_and_direct_call_errors(lm, draft):
    gen = dx.wrap_generate(lm, **EAGER)
    with pytest.raises(ValueError, match="custom_generate= is dynexec's own"):
        gen(input_ids=prompt(), max_new_tokens=5, custom_generate=dx.hf_generate)
    with pytest.raises(ValueError, match="assistant_tokenizer"):
        gen(input_ids=prompt(), max_new_tokens=5, assistant_model=draft, assistant_tokenizer=object())
    with pytest.raises(ValueError, match="runs inside model.generate"):
        dx.hf_generate(lm, prompt())
    with pytest.raises(ValueError, match="backend is 'dynexec'"):
        dx.compile(lm, backend="inductor")


def test_decoding_settings_are_checked(lm):
    with pytest.raises(ValueError, match="valid keys are"):
        ours(lm, input_ids=prompt(), max_new_tokens=5, decoding={"compile": False, "windw": 2})
    with pytest.raises(ValueError, match="assistant_early_exit asks for strategy 'self_speculative'"):
        lm.generate(input_ids=prompt(), max_new_tokens=5, assistant_early_exit=1, custom_generate=dx.hf_generate,
                    decoding={"compile": False, "strategy": "lookahead"})
    out = lm.generate(input_ids=prompt(), max_new_tokens=12, custom_generate=dx.hf_generate, return_dict_in_generate=True,
                      decoding={"compile": False, "strategy": "lookahead", "window": 2, "ngram": 4})
    assert torch.equal(out.sequences, hf(lm, input_ids=prompt(), max_new_tokens=12))
    assert out.stats.strategy == "lookahead" and out.stats.extra["window"] == 2


# ---- the user's model is not modified; the compile entry -----------------------------------------


def test_the_users_model_is_not_modified(draft):
    lm = causal_lm("llama")
    before = snapshot(lm)
    ids = prompt()
    ours(lm, input_ids=ids, max_new_tokens=6, prompt_lookup_num_tokens=2)
    dx.wrap_generate(lm, **EAGER)(input_ids=ids, max_new_tokens=6, assistant_model=draft)
    compiled = dx.compile(lm, options={"decoding": {"strategy": "lookahead", "compile": False}})
    compiled.generate(input_ids=ids, max_new_tokens=6)
    assert_unchanged(lm, before)
    assert lm.generate.__func__ is type(lm).generate
    fresh = causal_lm("llama")
    keys = set(fresh.__dict__)
    torch.compile(fresh, backend="eager")
    assert set(fresh.__dict__) - keys == {TORCH_COMPILE_MARK}  # the mark is torch's, not dynexec's


def test_compile_gives_a_module_whose_generate_runs_the_strategy(lm):
    ids = prompt(length=14)
    ref = hf(lm, input_ids=ids, max_new_tokens=20)
    compiled = dx.compile(lm, options={"lowering": "eager", "decoding": {"strategy": "lookahead", "compile": False, "window": 2}})
    out = compiled.generate(input_ids=ids, max_new_tokens=20, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    assert out.stats.strategy == "lookahead" and out.stats.extra["window"] == 2
    assert torch.allclose(compiled(input_ids=ids).logits, lm(input_ids=ids).logits, atol=1e-5)  # the forward still works


def test_plain_torch_compile_module_goes_through_wrap_generate(lm):
    compiled = torch.compile(lm, backend="dynexec", options={"decoding": {"strategy": "lookahead", "compile": False}})
    assert compiled.generate.__func__ is type(lm).generate  # OptimizedModule forwards .generate to the model
    out = dx.wrap_generate(compiled)(input_ids=prompt(), max_new_tokens=10, return_dict_in_generate=True)
    assert out.stats.strategy == "lookahead"
    assert torch.equal(out.sequences, hf(lm, input_ids=prompt(), max_new_tokens=10))
    with pytest.raises(ValueError, match="not 'dynexec'"):
        dx.wrap_generate(torch.compile(lm, backend="eager"))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"decoding": {"strategy": "lookahead", "windw": 2}}, r"unknown option \['windw'\] in decoding; valid keys are"),
        ({"decoding": {"strategy": "beam"}}, "decoding.strategy='beam' is not valid"),
        ({"decoding": {"cache": "paged"}}, "decoding.cache='paged' is not valid"),
        ({"decoding": {"compile": "yes"}}, "decoding.compile must be True or False"),
        ({"decoding": [1]}, "decoding must be a dict"),
        ({"lowering": "tensorrt", "decoding": {}}, "decoding runs its step on lowering"),
        ({"decoding": {"strategy": "greedy", "window": 2}}, r"options of strategy 'greedy': \[\]"),
    ],
)
def test_decoding_options_are_validated_like_every_option(options, message):
    with pytest.raises(ValueError, match=message):
        parse_options(options)
    with pytest.raises(ValueError, match=message):
        dx.compile(torch.nn.Linear(2, 2), options=options)


def test_decoding_options_parse():
    cfg = parse_options({"decoding": {"strategy": "lookahead", "window": 2, "ngram": 4, "compile": False}}).decoding
    assert cfg == dx.DecodingConfig(strategy="lookahead", compile=False, options={"window": 2, "ngram": 4})
    assert parse_options({}).decoding is None


def test_compile_refuses_forward_only_options(lm):
    compiled = torch.compile(lm, backend="dynexec", options={"early_exit": {}, "decoding": {}})
    with pytest.raises(NotImplementedError, match="early_exit"):
        dx.wrap_generate(compiled)


# ---- dynexec generate ----------------------------------------------------------------------------


def test_cli_generate_streams_the_answer_and_prints_its_speed(demo, capsys):
    from dynexec_compile.cli import console_main
    from dynexec_compile.models import demo_lm_path

    model, tok = demo
    text = "def parse_args(argv):\n"
    argv = ["generate", str(demo_lm_path()), "--prompt", text, "--strategy", "lookahead", "--ngram", "4",
            "--max-new-tokens", "24", "--no-compile"]
    assert console_main(argv) == 0
    printed = capsys.readouterr().out
    ids = tok(text, return_tensors="pt")["input_ids"]
    ref = model.generate(input_ids=ids, max_new_tokens=24)
    answer = tok.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)
    streamed, _, summary = printed.rpartition("\n[lookahead] ")
    assert streamed.rstrip("\n") == answer.rstrip("\n")
    assert "24 tokens" in summary and "tokens per forward" in summary and "tokens/s" in summary


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--chat"], "has no chat template"),
        (["--strategy", "greedy", "--window", "2"], "--window is not an option of strategy 'greedy'"),
        (["--strategy", "lookahead", "--draft", "x"], "--draft is the draft model of --strategy speculative"),
        (["--strategy", "greedy", "--eagle-draft", "x"], "--eagle-draft is for --strategy eagle"),
        (["--strategy", "greedy", "--lookup", "2"], "--lookup is not an option of strategy 'greedy'"),
        (["--strategy", "greedy", "--copy-lookup", "8"], "--copy-lookup is not an option of strategy 'greedy'"),
        (["--strategy", "lookahead", "--alternatives", "2"], "--alternatives is not an option of strategy 'lookahead'"),
    ],
)
def test_cli_generate_errors(demo, capsys, extra, message):
    from dynexec_compile.cli import console_main
    from dynexec_compile.models import demo_lm_path

    assert console_main(["generate", str(demo_lm_path()), "--prompt", "x", "--no-compile", *extra]) == 2
    assert message in capsys.readouterr().err
