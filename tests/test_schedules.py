import pytest

from lightning_timeprest.schedules import (
    CAP_TOLERANCE,
    NF1BOrder,
    Op,
    OpCosts,
    OpKind,
    Schedule,
    ScheduleError,
    StreamPlan,
    bubble_fraction,
    build_schedule,
    busy_fractions,
    choose_order,
    gpipe,
    nf1b,
    one_f_one_b,
    pipedream_1f1b,
    render_grid,
    simulate,
    staleness,
    steady_state,
    timeline,
    validate,
    version_difference,
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


@pytest.mark.parametrize("w,n", [(2, 4), (3, 2), (4, 8)])
def test_busy_fractions(w, n):
    # one slot per op is the unit-slot model's bubble (an asynchronous backward covers N micro-batches)
    for schedule in (gpipe(w, n), one_f_one_b(w, n)):
        assert busy_fractions(schedule, 1.0, 1.0) == pytest.approx([1 - bubble_fraction(schedule)] * w)
    for schedule in (nf1b(w, n, 6), pipedream_1f1b(w, 6)):
        per_op = 1.0 / schedule.num_microbatches
        unit = [1 - bubble_fraction(schedule)] * w
        timed = busy_fractions(schedule, 1.0, per_op)
        if schedule.num_microbatches > 1 and w > 2:  # a middle stage sends gradients on before its backward op ends
            assert all(t >= u - 1e-9 for t, u in zip(timed, unit, strict=True)) and timed != pytest.approx(unit)
        else:
            assert timed == pytest.approx(unit)
    # a flushed pipeline's bubble does not depend on the forward:backward ratio
    assert busy_fractions(gpipe(w, n)) == pytest.approx([n / (n + w - 1)] * w)
    # a stream without flushes fills once: in the unit-slot model its busy fraction approaches 1 as mini-batches
    # go by; when a backward costs twice its forwards, the fixed nF1B order leaves stages waiting on each other
    short, long = busy_fractions(nf1b(w, n, 4), 1.0, 1.0 / n), busy_fractions(nf1b(w, n, 64), 1.0, 1.0 / n)
    assert all(a < b for a, b in zip(short, long, strict=True)) and min(long) > 0.9
    assert all(0 < f < b for f, b in zip(busy_fractions(nf1b(w, n, 64)), long, strict=True))


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


# -- asynchronous schedules --------------------------------------------------------------------------------

SPEC_GRID = """\
S1: 1A 1B 2A 2B 3A 3B 1  4A 4B 2  5A 5B 3  6A 6B 4  7A 7B
S2: .  1A 1B 2A 2B 1  3A 3B 2  4A 4B 3  5A 5B 4  6A 6B 5
S3: .  .  1A 1B 1  2A 2B 2  3A 3B 3  4A 4B 4  5A 5B 5  6A"""


def test_render_grid_reproduces_spec():
    assert render_grid(3, 2, 7) == SPEC_GRID
    drained = render_grid(3, 2, 7, drain=True).splitlines()
    # drained to the end: every stage runs all 7 backwards, stage 0 last
    assert drained[0].split()[-1] == "7" and all(line.split().count("7") == 1 for line in drained)


@pytest.mark.parametrize("w", [2, 3, 4, 5])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_nf1b_is_valid_and_streams_as_the_finite_schedule(w, n):
    m = 9
    finite = nf1b(w, n, m)  # validate() ran: every op once, every dependency respected
    for s in range(w):
        assert sum(op.kind is OpKind.BACKWARD for op in finite.ops(s)) == m
        assert all(op.microbatch is None for op in finite.ops(s) if op.kind is OpKind.BACKWARD)
        plan = StreamPlan("timeprest_i", w, n, track=[s])
        ops = [op for k in range(m) for op in plan.step_ops(s, k)] + plan.drain_ops(s, m - 1)
        assert tuple(ops) == finite.ops(s)
        # the last stage's backward follows its forwards at once: d = 0 there
    assert set(staleness(finite)[w - 1]) == {0}


@pytest.mark.parametrize("w", [2, 3, 4, 5])
def test_pipedream_caps_in_flight_at_w_minus_s(w):
    schedule = pipedream_1f1b(w, 12)
    for s in range(w):
        in_flight = peak = 0
        for op in schedule.ops(s):
            in_flight += 1 if op.kind is OpKind.FORWARD else -1
            peak = max(peak, in_flight)
        assert peak == w - s
    assert build_schedule("pipedream", w, 1, 12) == schedule
    # weight stashing: stage s keeps at most W - s versions (its forwards in flight)
    assert max(staleness(schedule)[0]) <= w - 1


def test_version_difference_by_simulation():
    for w in range(2, 8):
        for n in range(1, 7):
            v = version_difference(w, n)
            assert (v == 1) == (w <= n + 1), (w, n, v)
            assert v == (w + n - 2) // n, (w, n, v)  # the paper's formula, on the range we checked


def test_asynchronous_validation_rejects_bad_orders():
    good = nf1b(2, 1, 2)
    ops = good.ops(0)
    backward_first = (ops[-2], *[op for op in ops if op != ops[-2]])  # a backward before its forwards
    with pytest.raises(ScheduleError, match="deadlocks"):
        validate(Schedule("x", 2, 1, (backward_first, good.ops(1)), synchronous=False))
    swapped = (*ops[:-2], ops[-1], ops[-2])  # backwards out of mini-batch order
    with pytest.raises(ScheduleError):
        validate(Schedule("x", 2, 1, (swapped, good.ops(1)), synchronous=False))
    twice = (*good.ops(1), good.ops(1)[-1])
    with pytest.raises(ScheduleError, match="repeats"):
        validate(Schedule("x", 2, 1, (good.ops(0), twice), synchronous=False))


# -- the cost-aware nF1B order ------------------------------------------------------------------------------

RATIOS = [(1.0, 2.0, 0.0), (1.0, 1.0, 0.0), (1.0, 3.0, 2.5), (2.0, 1.0, 0.5)]  # forward, backward, step


def _check_nf1b_rules(schedule, costs, cap):
    """The four nF1B rules (SPEC), checked on a generated order and the timeline it was generated with."""
    w, n = schedule.num_stages, schedule.num_microbatches
    validate(schedule)  # every op once, one backward per mini-batch in order, no deadlock
    times = timeline(schedule, costs)
    for s in range(w):
        ops = schedule.ops(s)
        # 1. forwards in mini-batch and micro-batch order
        forwards = [op for op in ops if op.kind is F]
        assert forwards == sorted(forwards)
        # 2. the last stage runs a mini-batch's one backward right after its N forwards
        if s == w - 1:
            for i, op in enumerate(ops):
                if op.kind is F and op.microbatch == n - 1:
                    assert ops[i + 1] == Op(B, op.minibatch, None)
        # 3. one backward (and so one optimizer step) per mini-batch, in order: validate() checked it
        # 4. a ready backward before a ready forward: no forward starts once the next backward could start
        ready: dict[int, float] = {}
        ends = {op: end for op, _, end in times[s]}
        # the backward below sends its first gradient after one micro-batch's backward (the last stage: after all)
        first = costs.backward[s + 1] * (n if s + 1 == w - 1 else 1) if s < w - 1 else 0.0
        after = {op.minibatch: start + first for op, start, _ in times[s + 1] if op.kind is B} if s < w - 1 else {}
        backwards = iter(op.minibatch for op in ops if op.kind is B)
        pending = next(backwards, None)
        held = 0
        for op, start, _ in times[s]:
            if op.kind is B:
                pending = next(backwards, None)
                held -= 1
                continue
            if op.microbatch == 0:
                held += 1
                assert cap is None or held <= cap
            if pending is not None and Op(F, pending, n - 1) in ends and ends[Op(F, pending, n - 1)] <= start:
                ready[pending] = max(ends[Op(F, pending, n - 1)], after.get(pending, float("inf")))
                assert ready[pending] > start, f"stage {s} ran {op} at {start} while backward {pending} was ready"


def test_backwards_overlap_down_the_pipeline():
    # a stage sends each micro-batch's gradient on as soon as its backward is done, and steps after the last one:
    # the stage before starts from the first gradient, not after that step, and waits inside for the others
    costs = OpCosts((1.0,) * 3, (1.0, 2.0, 2.0), (5.0,) * 3)
    times = timeline(nf1b(3, 2, 1), costs)
    backward = [next((start, end) for op, start, end in times[s] if op.kind is B) for s in range(3)]
    assert backward[2] == (4.0, 13.0)  # the last stage: both micro-batches in one pass (4..8), then its step
    assert backward[1] == (8.0, 17.0)  # sends micro-batch 0's gradient at 10, 1's at 12, steps 12..17
    assert backward[0] == (10.0, 18.0)  # micro-batch 0 at 10..11, waits for 1's gradient, 12..13, steps
    assert busy_fractions(nf1b(3, 2, 1), costs=costs)[0] == pytest.approx((2 * 1.0 + 2 * 1.0 + 5.0) / 18.0)


@pytest.mark.parametrize("w", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("ratio", RATIOS)
def test_cost_aware_order_keeps_the_nf1b_rules(w, n, ratio):
    costs = OpCosts.uniform(w, *ratio)
    for cap in (1, 2, w, None):
        _check_nf1b_rules(nf1b(w, n, 10, NF1BOrder(costs, cap)), costs, cap)
    # unequal stages too
    uneven = OpCosts(tuple(1.0 + 0.3 * s for s in range(w)), tuple(2.0 - 0.1 * s for s in range(w)), (0.5,) * w)
    _check_nf1b_rules(nf1b(w, n, 10, NF1BOrder(uneven, w)), uneven, w)


def test_the_rule_check_catches_a_forward_taken_before_a_ready_backward():
    costs = OpCosts.uniform(2)
    good = nf1b(2, 2, 6, NF1BOrder(costs, 2))  # stage 0: ... 3A 3B 2 4A 4B 3 ... in the steady state
    _check_nf1b_rules(good, costs, 2)
    s0 = list(good.ops(0))
    i = s0.index(Op(B, 2, None))
    s0[i], s0[i + 1] = s0[i + 1], s0[i]  # run the next forward first although backward 2 is ready
    with pytest.raises(AssertionError, match="while backward 2 was ready"):
        _check_nf1b_rules(Schedule("x", 2, 2, (tuple(s0), good.ops(1)), synchronous=False), costs, None)


@pytest.mark.parametrize("w", range(2, 9))
@pytest.mark.parametrize("n", range(2, 9))
def test_the_chosen_order_keeps_every_stage_busy(w, n):
    """With a backward twice its forward, the chosen order keeps every stage at least 90% busy, fill and drain of
    64 mini-batches included (the paper's grid: 0.63 at N = 4)."""
    costs = OpCosts.uniform(w)
    choice = choose_order(w, n, costs)
    assert min(busy_fractions(nf1b(w, n, 64, choice.order), costs=costs)) >= 0.9
    assert min(choice.busy) >= 0.99  # in the steady state


def test_cost_aware_order_beats_the_unit_grid_when_backwards_cost_more():
    costs = OpCosts.uniform(2)
    unit = busy_fractions(nf1b(2, 4, 64), costs=costs)
    generated = busy_fractions(nf1b(2, 4, 64, choose_order(2, 4, costs).order), costs=costs)
    assert max(unit) < 0.66 and min(generated) > 0.98


@pytest.mark.parametrize("w, n", [(2, 2), (3, 2), (4, 3), (5, 2), (6, 4)])
def test_streamed_cost_aware_order_equals_the_finite_schedule(w, n):
    order = NF1BOrder(OpCosts((1.0,) * w, (2.0,) * w, tuple(0.5 * s for s in range(w))), w - 1)
    m = 9
    finite = nf1b(w, n, m, order)
    for s in range(w):
        plan = StreamPlan("timeprest_v", w, n, track=[s], order=order)
        assert tuple(op for k in range(m) for op in plan.step_ops(s, k)) + tuple(
            plan.drain_ops(s, m - 1)
        ) == finite.ops(s)


def test_v_follows_the_order_run_and_timeprest_v_keeps_v_one():
    costs = OpCosts.uniform(4)
    # v is ceil(d0 / 2) of the order actually simulated, whatever it is
    for order in (NF1BOrder(), NF1BOrder(costs, 2), NF1BOrder(costs, 4), NF1BOrder(costs, None)):
        d0 = max(staleness(nf1b(4, 3, 40, order))[0])
        assert version_difference(4, 3, order) == max(1, -(-d0 // 2))
    assert version_difference(4, 3, NF1BOrder(costs, 4)) == 2  # the fastest order at W = 4 has v = 2 ...
    fastest, v_one = choose_order(4, 3, costs), choose_order(4, 3, costs, staleness_free=True)
    assert fastest.version_difference == 2 and v_one.version_difference == 1  # ... so V-TiMePReSt gets another
    assert min(v_one.busy) < min(fastest.busy) and v_one.fastest_busy == fastest.busy  # and is told what it costs
    assert "would reach" in v_one.describe()
    assert choose_order(4, 3, costs, 1).version_difference == 1  # one mini-batch in flight: no staleness


def test_the_default_cap_is_the_smallest_that_is_as_fast():
    costs = OpCosts.uniform(3, 1.0, 2.0, 1.0)
    choice = choose_order(3, 4, costs)
    smaller = choose_order(3, 4, costs, choice.order.max_inflight - 1)
    assert min(smaller.busy) < (1 - CAP_TOLERANCE) * min(choice.busy)
    assert choice.in_flight[0] == nf1b(3, 4, 30, choice.order).max_forwards_in_flight(0)


def test_render_grid_weights_slots_by_cost():
    # a backward (2 micro-batches, twice a forward each) fills 4 forward slots
    assert render_grid(2, 2, 3, order=NF1BOrder(OpCosts.uniform(2), 2)) == (
        "S1: 1A 1B 2A 2B .  .  .  1  -  -  -  3A 3B\nS2: .  1A 1B 1  -  -  -  2A 2B 2  -  -  -"
    )
    # unit costs give the paper's grid
    assert render_grid(3, 2, 7, order=NF1BOrder(OpCosts.uniform(3, 1.0, 0.5), None)) == SPEC_GRID


def test_op_costs_are_checked():
    with pytest.raises(ScheduleError, match="positive"):
        OpCosts((1.0, 0.0), (1.0, 1.0))
    with pytest.raises(ScheduleError, match="one forward, backward and step cost per stage"):
        OpCosts((1.0, 1.0), (1.0,))
    with pytest.raises(ScheduleError, match="max_inflight"):
        NF1BOrder(None, 0)
    assert OpCosts((2.0, 4.0), (4.0, 8.0), (0.0, 1.234)).rounded() == OpCosts((0.67, 1.3), (1.3, 2.7), (0.0, 0.41))


def test_an_order_timed_with_other_costs_than_it_was_generated_from():
    """steady_state times the order's ops with the costs given: the ideal of an order run on a machine whose op
    times differ from those the order was made for (the last stage here does more than the first)."""
    planned, actual = OpCosts.uniform(2, 1.0, 2.0, 2.5), OpCosts((0.8, 1.2), (2.0, 2.2), (2.5, 2.5))
    order = NF1BOrder(planned, 3)
    busy = steady_state(2, 4, order, actual)[0]
    work = [4 * actual.forward[s] + actual.backward_op(s, 4) for s in range(2)]
    assert busy[0] <= work[0] / work[1] + 1e-9 and busy[1] <= 1.0  # stage 0 waits for the slower stage 1
    times = timeline(nf1b(2, 4, 64, order), actual)
    assert busy == pytest.approx(busy_fractions(nf1b(2, 4, 64, order), costs=actual), abs=0.03)
    assert len(times[0]) == 64 * 5
