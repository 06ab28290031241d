import dataclasses

import pytest

from dynexec_compile.config import DynexecConfig, EarlyExitConfig, parse_options


def test_defaults():
    cfg = parse_options(None)
    assert cfg.lowering == "inductor" and cfg.strict is False and cfg.early_exit is None
    assert not cfg.needs_stages
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lowering = "eager"


def test_unknown_key_names_valid_keys():
    with pytest.raises(ValueError, match=r"unknown option.*'lowerin'.*valid keys are.*'lowering'"):
        parse_options({"lowerin": "eager"})
    with pytest.raises(ValueError, match=r"early_exit.*valid keys.*'threshold'"):
        parse_options({"early_exit": {"treshold": 0.1}})


@pytest.mark.parametrize(
    "options, match",
    [
        ({"lowering": "tvm"}, r"lowering='tvm'.*\['inductor', 'eager', 'tensorrt'\]"),
        ({"strict": "yes"}, "strict must be True or False"),
        ({"partition": "layers"}, "partition"),
        ({"early_exit": {"rule": "confidence"}}, r"rule.*'entropy', 'max_prob', 'patience'"),
        ({"early_exit": {"rule": "entropy", "threshold": -0.1}}, "out of range"),
        ({"early_exit": {"rule": "max_prob", "threshold": 1.5}}, r"\(0, 1\]"),
        ({"early_exit": {"rule": "max_prob", "threshold": 0.0}}, r"\(0, 1\]"),
        ({"early_exit": {"rule": "patience", "patience": 0}}, "patience"),
        ({"early_exit": {"layers": [1, 1]}}, "distinct"),
        ({"early_exit": {"layers": 3}}, "list of block indices"),
        ({"early_exit": {"heads": "mine"}}, "heads"),
        ({"elastic": {"levels": [1.0, 0.0]}}, r"\(0, 1\]"),
        ({"elastic": {"anchor_layers": -1}}, "anchor_layers"),
        ({"partition": "none", "early_exit": {}}, "partition='none'"),
    ],
)
def test_bad_values(options, match):
    with pytest.raises(ValueError, match=match):
        parse_options(options)


def test_nested_sections_are_parsed_and_normalised():
    cfg = parse_options({"lowering": "eager", "early_exit": {"rule": "max_prob", "threshold": 0.9, "layers": [3, 1]}, "elastic": {"levels": [0.5, 1.0]}})
    assert cfg.early_exit == EarlyExitConfig(rule="max_prob", threshold=0.9, layers=(1, 3))
    assert cfg.elastic.levels == (1.0, 0.5)
    assert cfg.needs_stages
    assert parse_options(cfg) is cfg
    assert isinstance(dataclasses.replace(cfg, strict=True), DynexecConfig)
