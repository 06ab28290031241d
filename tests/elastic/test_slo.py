"""The level-for-a-latency-target rule on made-up profiles: the largest level that meets the
target, the smallest when none does, LM targets (time to first token, per-token time), and
the lazy top-down profiling that stops at the first level meeting it."""

import pytest

import dynexec_compile.elastic.slo as slo
from dynexec_compile.elastic import LatencyTarget, LevelLatency, choose_level

CLASSIFIER = [LevelLatency(1.0, call_ms=10.0), LevelLatency(0.75, call_ms=7.5), LevelLatency(0.5, call_ms=5.2), LevelLatency(0.25, call_ms=2.9)]


@pytest.mark.parametrize(
    "target, level",
    [(100.0, 1.0), (10.0, 1.0), (9.99, 0.75), (7.5, 0.75), (6.0, 0.5), (3.0, 0.25), (1.0, 0.25)],
)
def test_the_largest_level_that_meets_the_target(target, level):
    assert choose_level(reversed(CLASSIFIER), target) == level  # order of the profile does not matter


def test_lm_targets():
    lm = [
        LevelLatency(1.0, ttft_ms=40.0, per_token_ms=10.0),
        LevelLatency(0.5, ttft_ms=22.0, per_token_ms=6.0),
        LevelLatency(0.25, ttft_ms=12.0, per_token_ms=4.0),
    ]
    assert choose_level(lm, LatencyTarget(ttft_ms=30.0)) == 0.5
    assert choose_level(lm, LatencyTarget(per_token_ms=10.0)) == 1.0
    assert choose_level(lm, LatencyTarget(ttft_ms=50.0, per_token_ms=5.0)) == 0.25
    # a whole generation of 11 tokens: ttft + 10 * per-token = 140 / 82 / 52 ms
    assert choose_level(lm, LatencyTarget(call_ms=100.0, new_tokens=11)) == 0.5
    assert lm[0].total_ms(11) == 140.0
    with pytest.raises(ValueError, match="no call_ms"):
        choose_level(lm, LatencyTarget(call_ms=100.0))  # an LM profile without a token count
    with pytest.raises(ValueError, match="needs call_ms"):
        LatencyTarget()
    with pytest.raises(ValueError, match="no level latencies"):
        choose_level([], 1.0)


TABLE = {1.0: 10.0, 0.75: 7.5, 0.5: 5.2, 0.25: 2.9}


def fake_timing(monkeypatch, timed: list, load: list | None = None):
    """Profiling a level times it at ``TABLE[level]`` ms times the load ``load[0]``."""
    load = load or [1.0]

    def fake_measure_times(fn, repeats, warmup):
        level = fn()
        return [TABLE[level] * load[0]] * repeats

    monkeypatch.setattr(slo, "measure_times", fake_measure_times)

    def run(level):
        timed.append(level)
        return level

    return run


def test_profiles_lazily_from_the_top_and_remembers(monkeypatch):
    timed = []
    run = fake_timing(monkeypatch, timed)
    chooser = slo.LevelChooser([1.0, 0.75, 0.5, 0.25], quantile=0.9, repeats=3)
    assert chooser.choose(("a",), LatencyTarget(call_ms=6.0), run) == 0.5
    assert timed == [1.0, 0.75, 0.5]  # stopped at the first level that meets 6 ms
    assert chooser.choose(("a",), LatencyTarget(call_ms=6.0), run) == 0.5
    assert timed == [1.0, 0.75, 0.5]  # remembered for the same input shapes
    assert chooser.choose(("a",), LatencyTarget(call_ms=8.0), run) == 0.75  # a looser target: no new timing
    assert chooser.choose(("a",), LatencyTarget(call_ms=1.0), run) == 0.25  # none meets: the fastest
    assert timed == [1.0, 0.75, 0.5, 0.25]
    assert chooser.choose(("b",), LatencyTarget(call_ms=20.0), run) == 1.0  # new shapes, new profile
    assert set(chooser.profiles) == {("a",), ("b",)}
    assert chooser.estimate(("a",), 0.5).call_ms == pytest.approx(5.2)


def test_the_choice_follows_the_load(monkeypatch):
    timed, load = [], [1.0]
    run = fake_timing(monkeypatch, timed, load)
    chooser = slo.LevelChooser([1.0, 0.75, 0.5, 0.25], quantile=0.9, repeats=4, window=20)
    target = LatencyTarget(call_ms=8.0)
    assert chooser.choose("s", target, run) == 0.75
    load[0] = 1.5
    for _ in range(20):  # the machine gets 1.5x slower: served calls at 0.75 take 11.25 ms
        chooser.observe("s", 0.75, 1.5 * TABLE[0.75])
    assert chooser.estimate("s", 0.75).call_ms == pytest.approx(11.25)
    assert chooser.choose("s", target, run) == 0.5  # 0.5 profiled under the load: 7.8 ms
    assert chooser.estimate("s", 0.5).call_ms == pytest.approx(7.8)
    assert timed == [1.0, 0.75, 0.5]
    load[0] = 1.0
    for _ in range(20):  # the load goes: calls at 0.5 take their base time again
        chooser.observe("s", 0.5, TABLE[0.5])
    assert chooser.choose("s", target, run) == 0.75  # back up, without timing anything again
    assert timed == [1.0, 0.75, 0.5]
    chooser.observe("s", 0.25, 1.0)  # a level never profiled for these shapes tells nothing
    assert chooser.estimate("s", 0.25) is None


def test_measure_ms_takes_the_quantile(monkeypatch):
    durations = [5, 1, 3, 2, 4]  # ms of the timed calls, in the order they run
    clock = iter(t for d in durations for t in (0.0, d / 1e3))
    monkeypatch.setattr(slo.time, "perf_counter", lambda: next(clock))
    calls = []
    assert slo.measure_ms(lambda: calls.append(1), repeats=5, warmup=1, q=0.8) == pytest.approx(4.0)
    assert len(calls) == 6  # one warm-up call, untimed
