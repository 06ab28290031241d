"""The regression gate: deterministic metrics exactly, wall-clock ratios with a tolerance."""

import json

import pytest

from dynexec_compile.bench.common import SuiteResult, compare, parse_percent


def result(**metrics):
    r = SuiteResult("x")
    for name, (value, gate, better) in metrics.items():
        r.metric(name, value, gate, better, tol=0.005 if gate == "tolerance" else 0.0)
    return json.loads(json.dumps(r.to_json()))


BASE = result(tokens_per_forward=(2.5, "exact", "higher"), compiles=(2, "exact", "lower"), equal=(1.0, "exact", "equal"),
              accuracy=(0.90, "tolerance", "higher"), speedup=(2.0, "timing", "higher"), run_ratio=(1.0, "timing", "lower"))


def test_no_regression_when_equal_or_better():
    cur = result(tokens_per_forward=(2.6, "exact", "higher"), compiles=(1, "exact", "lower"), equal=(1.0, "exact", "equal"),
                 accuracy=(0.899, "tolerance", "higher"), speedup=(1.85, "timing", "higher"), run_ratio=(1.09, "timing", "lower"))
    assert compare(cur, BASE, 0.10) == []


@pytest.mark.parametrize("name, value", [
    ("tokens_per_forward", 2.49), ("compiles", 3), ("equal", 0.0), ("accuracy", 0.89), ("speedup", 1.7), ("run_ratio", 1.2),
])
def test_each_kind_of_regression_is_caught(name, value):
    cur = json.loads(json.dumps(BASE))
    cur["metrics"][name]["value"] = value
    problems = compare(cur, BASE, 0.10)
    assert len(problems) == 1 and problems[0].startswith(name)


def test_a_metric_that_stopped_being_measured_is_a_regression():
    cur = json.loads(json.dumps(BASE))
    del cur["metrics"]["compiles"]
    assert compare(cur, BASE, 0.1) == ["compiles: in the baseline but not measured now"]


def test_parse_percent():
    assert parse_percent("10%") == pytest.approx(0.1) and parse_percent("0.05") == 0.05
    with pytest.raises(ValueError):
        parse_percent("5000%")
