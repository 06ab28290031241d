"""``dynexec bench lookahead|speculative --model PATH``: users benchmark their own checkpoint."""

import json

import pytest
import torch
import transformers as T

from dynexec_compile.bench.common import file_prompts, lm_setup, load_causal_lm
from dynexec_compile.cli import main
from dynexec_compile.models import demo_lm_path


def _save_tiny_lm(folder, layers=2):
    """A tiny random LLaMA with the demo tokenizer, saved as a user would save theirs."""
    tokenizer = T.AutoTokenizer.from_pretrained(demo_lm_path("target"))
    torch.manual_seed(0)
    config = T.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    T.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def user_lm(tmp_path_factory):
    return _save_tiny_lm(tmp_path_factory.mktemp("user-lm"))


def test_the_setup_loads_the_users_model_and_prompt_file(user_lm, tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("def add(a, b):\n    return a + b\n\n" * 40)
    args = type("Args", (), {"model": str(user_lm), "prompt_file": str(text)})()
    setup = lm_setup(args, 3, 12)
    assert not setup.is_demo and setup.model.config.hidden_size == 32 and not setup.model.training
    assert setup.prompts.shape == (3, 12) and str(user_lm) in setup.label
    ids = setup.tokenizer(text.read_text(), add_special_tokens=False)["input_ids"]
    assert setup.prompts.flatten().tolist() == ids[:36], "consecutive windows of the file's tokens"


def test_bad_model_arguments_are_refused(user_lm, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_causal_lm(tmp_path / "nothing-here")
    short = tmp_path / "short.txt"
    short.write_text("x = 1\n")
    tokenizer = T.AutoTokenizer.from_pretrained(user_lm)
    with pytest.raises(ValueError, match="longer file"):
        file_prompts(short, 4, 64, tokenizer)
    with pytest.raises(ValueError, match="does not take --model"):
        main(["bench", "overhead", "--model", str(user_lm)])
    with pytest.raises(ValueError, match="exclude each other"):
        main(["bench", "lookahead", "--quick", "--model", str(user_lm)])


def test_the_dynexec_command_prints_a_bad_option_as_one_error_line(capsys):
    from dynexec_compile.cli import console_main

    assert console_main(["bench", "overhead", "--compile-mode", "max-autotune"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dynexec: error: dynexec bench overhead does not take --compile-mode")
    assert "Traceback" not in err


def test_compile_modes_map_to_generate_settings():
    from dynexec_compile.bench.common import compile_settings

    assert compile_settings(None) == {}
    assert compile_settings("max-autotune") == {"mode": "max-autotune"}
    # whole-step: regional compilation off, so Inductor freezes the weights and its GEMM template applies
    assert compile_settings("max-autotune-whole-step") == {"mode": "max-autotune", "regional": False}


@pytest.mark.slow
def test_speculative_suite_runs_on_the_users_models(user_lm, tmp_path):
    draft = _save_tiny_lm(tmp_path / "draft", layers=1)
    out = tmp_path / "result.json"
    code = main([
        "bench", "speculative", "--model", str(user_lm), "--draft-model", str(draft), "--ks", "2", "--trees", "2,1",
        "--prompts", "1", "--prompt-tokens", "16", "--new-tokens", "8", "--batch-sizes", "1", "--repeats", "1",
        "--threads", "1", "--out", str(out),
    ])
    assert code == 0
    result = json.loads(out.read_text())
    variants = {row["variant"] for row in result["rows"]}
    assert {"hf_greedy", "hf_assisted_k2", "dynexec_spec_k2"} <= variants
    assert not any(v.startswith("dynexec_draft_heads") for v in variants), "no heads given: no head rows"
    assert all(row.get("outputs equal", True) for row in result["rows"])
