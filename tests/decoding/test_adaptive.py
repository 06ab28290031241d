"""WidthChooser: each step's shape by expected tokens per second, from measured step times."""

import pytest

from dynexec_compile.decoding.adaptive import WidthChooser
from dynexec_compile.decoding.verify import StepShape, TreeSpec

PLAIN, CHAIN, WIDE = (StepShape.of_tree(t) for t in (TreeSpec.root_only(), TreeSpec.chain(1), TreeSpec.chain(4)))


def timed(chooser, shape, *seconds):
    for s in seconds:
        chooser.timed(shape, s)


def test_untimed_shapes_are_tried_first_and_a_first_call_is_taken_as_a_compile():
    chooser = WidthChooser()
    assert chooser.choose([(CHAIN, 1.5), (PLAIN, 1.0)]) is CHAIN
    chooser.timed(CHAIN, 9.0)  # the first call compiles: not a cost
    assert chooser.costs[CHAIN.name] is None
    assert chooser.choose([(CHAIN, 1.5), (PLAIN, 1.0)]) is CHAIN
    chooser.timed(CHAIN, 0.06)
    assert chooser.choose([(CHAIN, 1.5), (PLAIN, 1.0)]) is PLAIN, "the plain step is not timed yet"
    timed(chooser, PLAIN, 5.0, 0.05)
    assert chooser.costs == {CHAIN.name: 0.06, PLAIN.name: 0.05}
    assert chooser.chosen == {CHAIN.name: 2, PLAIN.name: 1}
    chooser.begin()
    assert chooser.chosen == {} and chooser.costs[PLAIN.name] == 0.05, "a new request keeps what was measured"


@pytest.mark.parametrize(("expected", "choice"), [(1.1, PLAIN), (1.3, CHAIN), (3.0, WIDE)])
def test_the_most_expected_tokens_per_second_wins(expected, choice):
    chooser = WidthChooser()
    timed(chooser, PLAIN, 1.0, 0.050)
    timed(chooser, CHAIN, 1.0, 0.060)  # 1.2x a plain step
    timed(chooser, WIDE, 1.0, 0.120)  # 2.4x
    # CHAIN keeps `expected` tokens, WIDE 1 + 3 (expected - 1): it pays only for confident guesses
    assert chooser.choose([(WIDE, 1 + 3 * (expected - 1)), (CHAIN, expected), (PLAIN, 1.0)]) is choice


def test_costs_follow_the_machine_and_estimates_learn_from_outcomes():
    chooser = WidthChooser()
    timed(chooser, CHAIN, 1.0, 0.060)
    timed(chooser, CHAIN, *[0.120] * 20)  # the machine slowed down
    assert chooser.costs[CHAIN.name] == pytest.approx(0.120, rel=0.01)
    assert chooser.calibration == 1.0 and chooser.lookup_expectation(CHAIN, 3) == 3.0, "neutral and optimistic starts"
    chooser.observe(CHAIN, accepted=1.0, rows=4, hits=2, predicted=8.0)
    assert chooser.calibration == pytest.approx(0.4)  # (2 + 2) / (8 + 2): the draft was overconfident
    assert chooser.lookup_expectation(CHAIN, 3) == pytest.approx((1.0 + 3) / 5)
    assert chooser.lookup_expectation(WIDE, 10) == 10.0, "each shape learns apart"


def test_timing_records_the_wall_time_of_what_runs_inside():
    import time

    import torch

    chooser = WidthChooser()
    for _ in range(2):  # the first is taken as a compile
        with chooser.timing(CHAIN, torch.device("cpu")):
            time.sleep(0.02)
    assert 0.02 <= chooser.costs[CHAIN.name] < 1.0


def test_a_shape_whose_steps_keep_less_than_expected_loses_its_lead():
    """Chosen for a high estimate, a shape's steps keep less than expected (its estimates are
    biased upwards where it runs): its expectations are scaled by kept / expected."""
    chooser = WidthChooser()
    timed(chooser, PLAIN, 1.0, 0.050)
    timed(chooser, WIDE, 1.0, 0.110)  # 2.2x a plain step
    options = [(WIDE, 2.5), (PLAIN, 1.0)]
    assert chooser.kept_ratio(WIDE) == 1.0 and chooser.choose(options) is WIDE, "2.5 / 2.2 > 1 before any outcome"
    chooser.kept_on_step(2.0)
    assert chooser.kept[WIDE.name] == (2.0, 2.5) and chooser.kept_ratio(WIDE) == pytest.approx(4.0 / 4.5)
    for _ in range(10):
        if chooser.choose(options) is not WIDE:
            break
        chooser.kept_on_step(2.0)  # 2.0 / 2.2 < 1: the plain step pays more
    assert chooser.choose(options) is PLAIN
    chooser.kept_on_step(1.0)
    assert chooser.kept_ratio(PLAIN) == 1.0, "the plain step keeps what it is expected to"
    assert chooser.kept_ratio(CHAIN) == 1.0, "each shape apart"


def test_a_close_second_not_run_for_a_while_runs_once():
    """Costs and yields are measured only on the steps that run a shape: a shape scoring within
    RETRY_WITHIN of the best runs once after RETRY_AFTER choices without it; a far one never."""
    from dynexec_compile.decoding.adaptive import RETRY_AFTER

    chooser = WidthChooser()
    timed(chooser, PLAIN, 1.0, 0.050)
    timed(chooser, CHAIN, 1.0, 0.060)
    timed(chooser, WIDE, 1.0, 0.200)
    close = [(CHAIN, 1.15), (WIDE, 1.5), (PLAIN, 1.0)]  # per second: CHAIN 0.96 of PLAIN, WIDE 0.38
    picks = [chooser.choose(close).name for _ in range(3 * RETRY_AFTER)]
    assert WIDE.name not in picks
    # a shape never chosen counts from the first choice; then RETRY_AFTER choices after its last run
    assert [i for i, name in enumerate(picks) if name == CHAIN.name] == [RETRY_AFTER, 2 * RETRY_AFTER + 1]
