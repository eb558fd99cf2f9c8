import pytest

from lightning_timeprest.schedules import (
    Op,
    OpKind,
    Schedule,
    ScheduleError,
    bubble_fraction,
    build_schedule,
    gpipe,
    one_f_one_b,
    simulate,
    validate,
)

F, B = OpKind.FORWARD, OpKind.BACKWARD


def test_gpipe_order_and_grid():
    s = gpipe(3, 2)
    assert s.ops(1) == (Op(F, 0, 0), Op(F, 0, 1), Op(B, 0, 1), Op(B, 0, 0))
    grid = simulate(s)
    # stage 2 starts at slot 2; the last backward runs on stage 0 at the last slot
    assert grid[2][:2] == [None, None] and grid[2][2] == Op(F, 0, 0)
    assert grid[0][-1] == Op(B, 0, 0)
    assert len(grid[0]) == 2 * (2 + 3 - 1)


@pytest.mark.parametrize("w,n", [(2, 4), (4, 4), (4, 8), (3, 1)])
def test_1f1b_holds_at_most_w_minus_s_microbatches(w, n):
    s = one_f_one_b(w, n)
    for stage in range(w):
        assert s.max_forwards_in_flight(stage) == min(n, w - stage)
    assert gpipe(w, n).max_forwards_in_flight(0) == n


@pytest.mark.parametrize("w,n", [(2, 4), (4, 4), (4, 8)])
def test_synchronous_bubbles_are_equal_and_match_theory(w, n):
    expected = (w - 1) / (n + w - 1)
    assert bubble_fraction(gpipe(w, n)) == pytest.approx(expected)
    assert bubble_fraction(one_f_one_b(w, n)) == pytest.approx(expected)


def test_single_stage():
    assert simulate(gpipe(1, 3))[0] == list(gpipe(1, 3).ops(0))


def test_build_schedule_names():
    assert build_schedule("1f1b", 2, 4).name == "1f1b"
    with pytest.raises(ScheduleError, match="unknown schedule 'pipedreamx'; choose one of"):
        build_schedule("pipedreamx", 2, 4)
    with pytest.raises(ScheduleError, match="num_microbatches must be >= 1"):
        gpipe(2, 0)


def test_validation_rejects_deadlock_and_missing_ops():
    # stage 1 wants the backward before the forward it depends on
    bad = Schedule("bad", 2, 1, ((Op(F, 0, 0), Op(B, 0, 0)), (Op(B, 0, 0), Op(F, 0, 0))), synchronous=True)
    with pytest.raises(ScheduleError, match="deadlocks|without its forward"):
        validate(bad)
    missing = Schedule("missing", 2, 2, ((Op(F, 0, 0), Op(B, 0, 0)),) * 2, synchronous=True)
    with pytest.raises(ScheduleError, match="every forward"):
        validate(missing)
    repeated = Schedule("rep", 1, 1, ((Op(F, 0, 0), Op(F, 0, 0), Op(B, 0, 0)),), synchronous=True)
    with pytest.raises(ScheduleError, match="repeats"):
        validate(repeated)
