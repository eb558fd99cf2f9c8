"""The two single-process references of the asynchronous policies agree on StemNetHead:
tests/generic_async_reference.py (any model: the user's step in eager mode, a stage as the set of parameters it
trains, mini-batch by mini-batch) and tests/async_reference.py (StemNetHead's stages written by hand, op by op in
the schedule's slot order). No processes: a check of the references themselves."""

from __future__ import annotations

import async_reference
import generic_async_reference
import models
import pytest
import torch
from lightning.pytorch import seed_everything

from lightning_timeprest.partition import plan_sequential
from lightning_timeprest.schedules import OpCosts, choose_order, nf1b, pipedream_1f1b


@pytest.mark.parametrize(
    "policy, w, n, order",
    [("timeprest_v", 3, 2, "unit"), ("timeprest", 3, 2, "cost"), ("timeprest_i", 2, 3, "cost"),
     ("timeprest_i", 4, 2, "unit"), ("pipedream", 3, 1, None)],
)  # fmt: skip
def test_the_generic_reference_equals_the_hand_written_one(policy, w, n, order):
    batches = list(models.loader(18))  # 6 mini-batches, the last of 10 samples
    if policy == "pipedream":
        schedule = pipedream_1f1b(w, len(batches))
    else:
        costs = OpCosts((1.0,) * w, (2.0,) * w, (1.0,) * w)
        schedule = nf1b(w, n, len(batches), choose_order(w, n, costs).order if order == "cost" else None)
    expected = async_reference.reference(policy, w, n, epochs=1, schedules=[schedule])

    seed_everything(0)  # the hand-written reference's initial model
    model = models.StemNetHead()
    plan = plan_sequential("net", model.net, w, "parameters")
    split_points = [f"net.{plan.layers_of(s)[0]}" for s in range(1, w)]
    # each stage's ops as a rank records them (the versions read are not known here: not checked)
    traces = [[[(op.kind.value, op.minibatch, op.microbatch, -1) for op in schedule.ops(s)]] for s in range(w)]
    got, stage_of = generic_async_reference.reference(
        model, batches, split_points, traces, policy, n, check_recorded=False
    )
    # the stages found by watching the step are the hand-written ones: the stem on the first, the head on the last
    assert {name for name, s in stage_of.items() if s == 0} >= {"stem.weight", "stem.bias"}
    assert {name for name, s in stage_of.items() if s == w - 1} >= {"head.weight", "head.bias"}
    assert set(stage_of) == set(expected)
    # float32: they agree bit for bit here; 1e-6 leaves room for sums in another order (one backward of the whole
    # model against one per stage)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
    # and the comparison tells the policies apart (another rule: 9.5e-5 and more)
    other = "timeprest_v" if policy != "timeprest_v" else "timeprest_i"
    wrong = async_reference.reference(other, w, n, epochs=1, schedules=[schedule])
    assert max((got[k] - v).abs().max().item() for k, v in wrong.items()) > 2e-5
