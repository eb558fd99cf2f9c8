"""The asynchronous driver's lag/replay bookkeeping (async_driver.Ledger), without processes: every mini-batch's
results are replayed once, in order, in the step in which stage 0 finishes it under the static schedule; rank 0
receives a middle stage's records only once they were sent, and all of them by the end of a drain. And where the
driver re-derives the nF1B order from op times measured as the ops run."""

from __future__ import annotations

import pytest
import torch

from lightning_timeprest.async_driver import Ledger, measures_op_times
from lightning_timeprest.schedules import OpCosts, OpKind, StreamPlan, choose_order
from lightning_timeprest.strategy import TiMePReStStrategy


def _completed_per_step(schedule: str, w: int, n: int, steps: int) -> list[int]:
    """The newest mini-batch stage 0 has finished after each step (-1: none), as every rank computes it."""
    plan = StreamPlan(schedule, w, n, track=(0,))
    done, out = -1, []
    for k in range(steps):
        done += sum(op.kind is OpKind.BACKWARD for op in plan.step_ops(0, k))
        out.append(done)
    return out


@pytest.mark.parametrize("schedule", ["timeprest_v", "timeprest_i", "pipedream"])
@pytest.mark.parametrize("w", [2, 3, 4, 5])
def test_each_result_is_replayed_once_in_order_when_stage_zero_finishes_it(schedule, w):
    n, steps = (1 if schedule == "pipedream" else 2), 9
    completed = _completed_per_step(schedule, w, n, steps)
    ledger = Ledger(w)
    replayed: list[tuple[int, int]] = []  # (mini-batch, step)
    for k, c in enumerate(completed):
        owed = ledger.owes_results(c)  # what dynamic mode waits on before the step ends
        due = ledger.results_due(c)
        assert owed == bool(due) and not ledger.owes_results(c)
        replayed += [(m, k) for m in due]
    replayed += [(m, steps) for m in ledger.results_due(steps - 1)]  # the drain finishes the rest
    assert [m for m, _ in replayed] == list(range(steps))
    # the lag: mini-batch m is replayed in the first step after which stage 0 has finished it (never earlier, as the
    # last stage's results of m reach stage 0 before stage 0 can run m's backward)
    for m, k in replayed:
        first = next((i for i, c in enumerate(completed) if c >= m), steps)
        assert k == first, (m, k, first)
    # in the steady state the lag is the pipeline's depth in steps: more stages, more lag
    lag = [k - m for m, k in replayed if k < steps]
    assert lag and min(lag) >= (1 if w > 2 or schedule == "pipedream" else 0)


def test_records_are_received_only_once_sent_and_all_by_the_end_of_a_drain():
    w = 4
    ledger = Ledger(w)
    completed = _completed_per_step("timeprest_i", w, 3, 8)
    received = dict.fromkeys(range(1, w - 1), 0)
    for c in completed:
        ledger.sent += 1  # every stage sent its record of this step
        for s in received:
            received[s] += ledger.records_due(s, c)
            # only records of steps before the mini-batch stage 0 just finished: those were sent before its backward
            # left the middle stage, so receiving them never waits on the pipeline
            assert received[s] <= max(c, 0) and received[s] <= ledger.sent
    ledger.sent += 1  # the drain's records
    for s in received:
        received[s] += ledger.records_due(s, None)
    assert received == dict.fromkeys(range(1, w - 1), len(completed) + 1)
    assert all(ledger.records_due(s, None) == 0 for s in received)  # nothing twice


def test_the_order_is_re_derived_from_op_times_only_where_the_host_times_the_ops():
    """On a CPU the measured op times re-derive the cost-aware order; on CUDA (ops run asynchronously, host times
    are not theirs) and with given op costs or the unit grid, the order made at setup stays."""
    choice = choose_order(2, 2, OpCosts.uniform(2))

    def measures(device: str, **kwargs: object) -> bool:
        config = TiMePReStStrategy(schedule="timeprest_v", num_microbatches=2, **kwargs).config  # type: ignore[arg-type]
        return measures_op_times(config, torch.device(device), choice)

    assert measures("cpu")
    assert not measures("cuda") and not measures("meta")
    assert not measures("cpu", op_costs=[[1, 2, 0], [1, 2, 0]])
    assert not measures("cpu", order="unit")
    config = TiMePReStStrategy(schedule="gpipe").config
    assert not measures_op_times(config, torch.device("cpu"), None)  # no nF1B order to re-derive
