"""The asynchronous policies with real processes over gloo, against tests/async_reference.py: a single-process
reference that applies the same weight rule on the same static schedule."""

from __future__ import annotations

import math
import time

import models
import pytest
import torch
import torch.nn.functional as F
from async_reference import recorded_schedules, reference
from conftest import assert_same_params, run_script, train, wait_for_ranks_to_exit
from models import StemNetHead
from processes import GRACE_S

from lightning_timeprest.schedules import NF1BOrder, OpCosts, OpKind, choose_order, nf1b, staleness, version_difference

EPOCHS = ("--epochs", "2", "--batch-size", "18")  # 6 mini-batches per epoch (the last one of 10 samples)

# (policy, W, N, optimizer, rule): every policy at W = 2, 3, 4, each with SGD (momentum) and with Adam, both
# backward rules, with W > N + 1 (v = 2 in the paper's grid) among them
CASES = [
    ("timeprest_v", 2, 2, "sgd", "graph"),
    ("timeprest_v", 3, 2, "adam", "graph"),
    ("timeprest_v", 4, 2, "sgd", "recompute"),  # W > N + 1: refused in the paper's grid, v = 1 in the order chosen
    ("timeprest", 2, 2, "adam", "graph"),
    ("timeprest", 3, 2, "sgd", "recompute"),
    ("timeprest", 4, 2, "adam", "graph"),
    ("timeprest_i", 2, 3, "adam", "recompute"),
    ("timeprest_i", 3, 2, "sgd", "graph"),
    ("timeprest_i", 4, 2, "adam", "graph"),
    ("pipedream", 2, 1, "sgd", "graph"),
    ("pipedream", 3, 1, "adam", "recompute"),
    ("pipedream", 4, 1, "sgd", "graph"),
]


def _run(tmp_path, policy, w, n, optimizer, rule, *extra):
    # --defer-all: every Linear takes its weight gradient once per mini-batch (weight_gradients), as the larger
    # layers of real models do by default: the reference takes them per micro-batch, as autograd does
    return train(
        tmp_path,
        f"{policy}-{w}",
        *EPOCHS,
        "--defer-all",
        "--devices",
        str(w),
        "--schedule",
        policy,
        "--n",
        str(n),
        "--optimizer",
        optimizer,
        "--rule",
        rule,
        *extra,
    )


def _streams_run(tmp_path, name, w, n):
    """The op order every stream ran (recorded by each rank), and the order each was generated in."""
    out = tmp_path / f"{name}.pt"
    traces = [torch.load(f"{out}.trace{r}") for r in range(w)]
    orders = torch.load(f"{out}.orders0", weights_only=False)
    ran = [i for i, t in enumerate(traces[0]) if t]
    return recorded_schedules(traces, w, n), [orders["orders"][i] for i in ran], orders["op_costs"]


# in the fast subset: timeprest_i at W = 3 against the reference; the other cases in the whole suite
FAST_CASE = ("timeprest_i", 3, 2, "sgd", "graph")


@pytest.mark.parametrize(
    "policy, w, n, optimizer, rule",
    [case if case == FAST_CASE else pytest.param(*case, marks=pytest.mark.slow) for case in CASES],
)
def test_matches_single_process_reference(tmp_path, policy, w, n, optimizer, rule):
    """With op costs measured at setup and re-derived from the first steps (a drain at the first epoch end), every
    stream ran the order the generator gives, and replaying those orders by the same rule gives the same model."""
    got = _run(tmp_path, policy, w, n, optimizer, rule)
    schedules, orders, _ = _streams_run(tmp_path, f"{policy}-{w}", w, n)
    assert len(schedules) == 2  # one stream per epoch (6 steps each: no drain to measure op times in between)
    if policy != "pipedream":
        for schedule, order in zip(schedules, orders, strict=True):
            count = sum(op.kind is OpKind.BACKWARD for op in schedule.ops(0))
            assert schedule.stage_ops == nf1b(w, n, count, order).stage_ops
            if order.costs is not None:  # a cost-aware order is the one the generator picks for its costs
                assert choose_order(w, n, order.costs, staleness_free=policy == "timeprest_v").order == order
    ref = reference(policy, w, n, optimizer=optimizer, rule=rule, epochs=2, schedules=schedules)
    params = {k: v for k, v in got["state_dict"].items() if k in ref}
    assert set(params) == set(ref)
    assert_same_params(ref, params, atol=1e-6, rtol=1e-6)  # equal but for float32 rounding (measured: <= 6e-8)
    assert got["global_step"] == 12
    placements = [torch.load(tmp_path / f"{policy}-{w}.pt.rank{r}", weights_only=False) for r in range(w)]
    # every stage's Linear layers ran deferred, where a mini-batch has several micro-batches to take together
    assert all((p["deferred_layers"] >= 1) == (n > 1) for p in placements)
    pipeline = got["pipeline"][-1]
    last = schedules[-1]
    for s in range(w):
        held = pipeline[f"pipeline/stage{s}/versions_held_epoch"]
        if policy == "timeprest_v":
            assert held == 1  # one live version, nothing stashed
        elif policy == "pipedream":
            # PipeDream stashes at most W - s versions, and nothing more: under the graph rule a backward reads its
            # stash in the storage the forward's graph saved (the step moved the live weights to a copy)
            assert 1 <= held <= w - s
            assert held == w - s or w - s > 6  # 6 mini-batches per epoch: each stage's stash fills up
        if policy != "timeprest":  # live forward weights: d is the order's (vertical sync reads stage 0's version)
            assert pipeline[f"pipeline/stage{s}/staleness_max_epoch"] == max(staleness(last)[s])
    if policy != "timeprest":
        assert pipeline[f"pipeline/stage{w - 1}/staleness_max_epoch"] == 0
    v = 0 if policy == "pipedream" else version_difference(w, n, orders[-1])
    assert pipeline["pipeline/v_epoch"] == v
    if policy == "timeprest_v":
        assert v == 1


def test_without_deferred_weight_gradients_autograd_takes_them_and_the_model_is_the_same(tmp_path):
    """defer_weight_grads=False: no layer runs deferred (even where every one would), and the run still equals the
    reference."""
    policy, w, n = "timeprest_v", 2, 2
    got = _run(tmp_path, policy, w, n, "sgd", "graph", "--no-defer")
    placements = [torch.load(tmp_path / f"{policy}-{w}.pt.rank{r}", weights_only=False) for r in range(w)]
    assert [p["deferred_layers"] for p in placements] == [0] * w
    schedules, _, _ = _streams_run(tmp_path, f"{policy}-{w}", w, n)
    ref = reference(policy, w, n, optimizer="sgd", rule="graph", epochs=2, schedules=schedules)
    assert_same_params(ref, {k: v for k, v in got["state_dict"].items() if k in ref})


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["timeprest_v", "timeprest_i"])
def test_the_recompute_rule_updates_batch_norm_statistics_once_per_forward(tmp_path, policy):
    """The recompute rule reruns a stage's forward at backward time; that rerun must not update the stage's buffers
    again. With a learning rate of 0 every forward sees the same weights, so the graph rule (one forward per
    micro-batch) and the recompute rule must leave the same running statistics and batch counts."""
    buffers = {}
    for rule in ("graph", "recompute"):
        train(tmp_path, f"{rule}", "--epochs", "1", "--model", "BatchNormNet", "--lr", "0", "--devices", "2",
              "--schedule", policy, "--n", "2", "--rule", rule)  # fmt: skip
        ranks = [torch.load(tmp_path / f"{rule}.pt.rank{r}", weights_only=False)["buffers"] for r in range(2)]
        buffers[rule] = {k: v for rank in ranks for k, v in rank.items() if k.startswith("net.")}
    counts = [v for k, v in buffers["graph"].items() if k.endswith("num_batches_tracked")]
    assert len(counts) == 2 and all(int(c) == 6 * 2 for c in counts)  # 6 mini-batches of 2 micro-batches each
    assert buffers["graph"].keys() == buffers["recompute"].keys()
    for name, value in buffers["graph"].items():
        assert torch.equal(buffers["recompute"][name], value), name


@pytest.mark.slow
@pytest.mark.parametrize("policy, w, n, optimizer, rule", [("timeprest_i", 3, 4, "adam", "graph"),
                                                            ("timeprest", 4, 3, "sgd", "recompute")])  # fmt: skip
def test_given_op_costs_run_the_generated_order_exactly(tmp_path, policy, w, n, optimizer, rule):
    """Given op costs, the order is a pure function of them (no calibration drain): the reference generates the
    same order on its own and ends with the same model."""
    step_heavy = ";".join(["1,2,3"] * w)  # an optimizer step that costs 1.5 backwards: not the paper's grid
    got = _run(tmp_path, policy, w, n, optimizer, rule, "--op-costs", step_heavy)
    costs = OpCosts((1.0,) * w, (2.0,) * w, (3.0,) * w)
    order = choose_order(w, n, costs).order
    assert order.costs is not None and nf1b(w, n, 6, order).stage_ops != nf1b(w, n, 6).stage_ops
    schedules, orders, _ = _streams_run(tmp_path, f"{policy}-{w}", w, n)
    assert orders == [order, order] and all(s.stage_ops == nf1b(w, n, 6, order).stage_ops for s in schedules)
    ref = reference(policy, w, n, optimizer=optimizer, rule=rule, epochs=2, order=order)
    assert_same_params(ref, {k: v for k, v in got["state_dict"].items() if k in ref})


@pytest.mark.slow
def test_the_unit_order_replays_the_paper_grid(tmp_path):
    got = _run(tmp_path, "timeprest_v", 3, 2, "sgd", "graph", "--order", "unit")
    schedules, orders, _ = _streams_run(tmp_path, "timeprest_v-3", 3, 2)
    assert orders == [NF1BOrder(), NF1BOrder()] and all(s.stage_ops == nf1b(3, 2, 6).stage_ops for s in schedules)
    ref = reference("timeprest_v", 3, 2, epochs=2)
    assert_same_params(ref, {k: v for k, v in got["state_dict"].items() if k in ref})


def _reported(stage0: list[list[tuple]], steps: int) -> list[int | None]:
    """Per training step, the mini-batch whose loss the step reports: the newest one stage 0 (the last to finish a
    backward) has completed, numbered from the start of training (``None``: none yet). Step ``k`` of a stream runs
    stage 0's ops from the forward of mini-batch ``k`` up to the forward of ``k + 1``; a stream's last step drains."""
    out: list[int | None] = []
    newest, first = None, 0
    for stream in stage0:
        count = sum(kind == "B" for kind, *_ in stream)
        for k in range(count):
            upto = next((i for i, (kind, m, j, _) in enumerate(stream) if (kind, m, j) == ("F", k + 1, 0)), None)
            done = count if upto is None else sum(kind == "B" for kind, *_ in stream[:upto])
            if done:
                newest = first + done - 1
            out.append(newest)
        first += count
    assert len(out) == steps
    return out


@pytest.mark.slow
def test_logged_losses_lag_and_equal_the_reference(tmp_path):
    w, n = 3, 2
    got = _run(tmp_path, "timeprest_i", w, n, "sgd", "graph")
    schedules, _, _ = _streams_run(tmp_path, f"timeprest_i-{w}", w, n)
    losses: list[float] = []
    ref = reference("timeprest_i", w, n, epochs=2, schedules=schedules, losses=losses)
    assert_same_params(ref, {k: v for k, v in got["state_dict"].items() if k in ref})
    # training_step returns the loss of the newest mini-batch completed on every stage, and what the step logged is
    # replayed with it: NaN until the first one completes, then the reference's loss of that mini-batch
    stage0 = torch.load(tmp_path / f"timeprest_i-{w}.pt.trace0")
    reported = _reported(stage0, got["global_step"])
    assert reported[0] is None and reported[5] == 5 and reported[11] == 11  # each epoch's last step drains
    for step, m in zip(got["steps"], reported, strict=True):
        for value in (step["returned"], step["train_loss_step"], step["logged"]):
            if m is None:
                assert math.isnan(value)
            else:
                assert value == pytest.approx(losses[m], rel=1e-6), (m, value)
    # every mini-batch is logged exactly once per epoch (the drain at the epoch end logs the rest): the epoch's loss
    # is their mean weighted by batch size (5 batches of 18 samples, one of 10)
    sizes = [18] * 5 + [10]
    for e, epoch in enumerate(got["epochs"]):
        expected = sum(size * loss for size, loss in zip(sizes, losses[6 * e : 6 * e + 6], strict=True)) / 100
        assert epoch["train_loss_epoch"] == pytest.approx(expected, rel=1e-6)
    # the stage records reach rank 0 late, and its values reach every rank: all log the same pipeline/ values, the
    # mean d of the last epoch's order on each stage
    placements = [torch.load(tmp_path / f"timeprest_i-{w}.pt.rank{rank}") for rank in range(w)]
    seen = [p["pipeline"] for p in placements]
    assert all(s == seen[0] for s in seen)
    for s in range(w):
        ds = staleness(schedules[-1])[s]
        assert seen[0][f"pipeline/stage{s}/staleness_mean_epoch"] == pytest.approx(sum(ds) / len(ds))
    # strategy.stats: each stage's record of each step and of each drain (here one at each of the 2 epoch ends),
    # with the d of every micro-batch backward it ran: the d of the recorded orders, in order
    for s, p in enumerate(placements):
        assert len(p["stats"]) == got["global_step"] + 2
        assert [d for step in p["stats"] for d in step] == [d for sch in schedules for d in staleness(sch)[s]]
    assert max(staleness(schedules[-1])[0]) > 0  # (stage 0's backwards are stale in this order)


@pytest.mark.slow
@pytest.mark.parametrize("w, n", [(2, 2), (3, 2)])
def test_significance_one_is_pipedream_stashing_and_zero_is_timeprest_v(tmp_path, w, n):
    unit = ("--order", "unit")  # the same order for every run: v = 1 in the paper's grid when W <= N + 1
    stashed = _run(tmp_path, "timeprest_i", w, n, "adam", "graph", "--significance", "one", *unit)
    ref = reference("pipedream", w, n, optimizer="adam", epochs=2, schedules=[nf1b(w, n, 6)] * 2)
    assert_same_params(ref, {k: v for k, v in stashed["state_dict"].items() if k in ref})
    latest = _run(tmp_path, "timeprest_i", w, n, "adam", "graph", "--significance", "zero", *unit)
    if w <= n + 1:
        v = _run(tmp_path, "timeprest_v", w, n, "adam", "graph", *unit)
        assert_same_params(v["state_dict"], latest["state_dict"], atol=0)
    ref = reference("timeprest_v", w, n, optimizer="adam", epochs=2)
    assert_same_params(ref, {k: v for k, v in latest["state_dict"].items() if k in ref})


@pytest.mark.slow
def test_dynamic_mode_records_what_it_ran(tmp_path):
    """dynamic=True orders ops by arrival; replaying the recorded order with the same rule gives the same model."""
    w, n = 3, 2
    got = _run(tmp_path, "timeprest_i", w, n, "sgd", "graph", "--dynamic")
    out = tmp_path / f"timeprest_i-{w}.pt"
    traces = [torch.load(f"{out}.trace{r}") for r in range(w)]
    schedules = recorded_schedules(traces, w, n)
    assert len(schedules) == 2  # one stream per epoch
    ref = reference("timeprest_i", w, n, epochs=2, schedules=schedules)
    assert_same_params(ref, {k: v for k, v in got["state_dict"].items() if k in ref})
    # the versions each forward recorded are those the replay computes
    for stream, _schedule in enumerate(schedules):
        for s in range(w):
            steps = 0
            for kind, _m, _j, version in traces[s][stream]:
                if kind == "F":
                    assert version == steps
                else:
                    steps += 1


@pytest.mark.slow
def test_checkpoint_after_the_drain_resumes_exactly(tmp_path):
    ckpts = tmp_path / "ckpts"
    args = ("--devices", "3", "--schedule", "timeprest", "--n", "2", "--optimizer", "adam", "--batch-size", "18")
    full = train(tmp_path, "full", *args, "--epochs", "2", "--ckpt-dir", str(ckpts))
    resumed = train(tmp_path, "resumed", *args, "--epochs", "2", "--resume", str(ckpts / "epoch=0-step=6.ckpt"))
    assert_same_params(full["state_dict"], resumed["state_dict"], atol=0)
    # and the checkpoint is an ordinary whole-model one
    model = StemNetHead.load_from_checkpoint(ckpts / "epoch=1-step=12.ckpt")
    assert_same_params(model.state_dict(), full["state_dict"], atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [False, True])
def test_mid_epoch_validation_and_max_steps_drain(tmp_path, dynamic):
    """Validation drains the pipeline first; fit ending on max_steps mid-epoch drains on the last step. (Receives
    posted ahead, such as the next activation's, belong to the stage's communication, not to the engine: the
    validation forward takes the one the training stream left posted.)"""
    w, n = 3, 2
    args = ("--devices", str(w), "--schedule", "timeprest_v", "--n", str(n), "--val", "--max-steps", "8",
            "--epochs", "3")  # fmt: skip
    got = train(tmp_path, "val", *args, *(("--dynamic",) if dynamic else ()))
    assert got["global_step"] == 8
    # two streams: the first epoch's 6 mini-batches (drained before validation), then 2 (drained at max_steps)
    schedules = recorded_schedules([torch.load(tmp_path / f"val.pt.trace{r}") for r in range(w)], w, n)
    assert [sum(op.kind is OpKind.BACKWARD for op in s.ops(0)) for s in schedules] == [6, 2]
    ref = reference("timeprest_v", w, n, epochs=2, schedules=schedules, max_steps=8)
    assert_same_params(ref, {k: v for k, v in got["state_dict"].items() if k in ref})
    # the validation after the first epoch saw the model after its 6 updates: the reference's, on every sample
    after_epoch = reference("timeprest_v", w, n, epochs=1, schedules=schedules[:1])
    x, y = models.dataset().tensors
    with torch.no_grad():
        val_loss = F.cross_entropy(torch.func.functional_call(StemNetHead(), after_epoch, (x,)), y)
    assert got["epochs"][0]["val_loss"] == pytest.approx(val_loss.item(), rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("dynamic, launcher", [(False, "lightning"), (True, "lightning"), (False, "forked")])
def test_a_stage_that_dies_mid_epoch_ends_every_rank(tmp_path, dynamic, launcher):
    """Stage 1 of 3 dies with mini-batches in flight: under Lightning's launcher, and with the ranks started apart
    (as torchrun starts them), where only the pipeline's own failure handling ends stages 0 and 2."""
    out = str(tmp_path / "dies.pt")
    start = time.monotonic()
    args = ["--devices", "3", "--schedule", "timeprest_i", "--n", "2", "--epochs", "3", "--die-rank", "1"]
    args += ["--die-step", "4", "--out", out] + (["--dynamic"] if dynamic else [])
    proc = run_script(tmp_path, *args, check=False, timeout=120, launcher=launcher)
    assert proc.returncode != 0
    wait_for_ranks_to_exit(out)
    # (started apart, a survivor that did not end by itself would be killed GRACE_S after the failure)
    assert time.monotonic() - start < (120 if launcher == "lightning" else GRACE_S)
    assert proc.stderr.count("PipelineCommError: stage") >= (1 if launcher == "lightning" else 2)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["timeprest_i", "pipedream"])
def test_every_stage_updates_a_mini_batch_with_the_learning_rate_of_its_step(tmp_path, schedule):
    """A scheduler moves on every step, while stage 0 steps for mini-batch m a few steps after m entered: each
    stage's update of m must still use the rate of step m (StepLR halving every 2 steps)."""
    out = tmp_path / "lr.pt"
    n = ("--n", "2") if schedule != "pipedream" else ("--n", "1")
    run_script(tmp_path, "--devices", "3", "--schedule", schedule, *n, "--epochs", "2", "--scheduler", "step",
               "--out", str(out))  # fmt: skip
    expected = [[pytest.approx(0.1 * 0.5 ** (step // 2))] for step in range(12)]  # 2 epochs of 6 steps
    for rank in range(3):
        assert torch.load(f"{out}.lrs{rank}", weights_only=False) == expected


@pytest.mark.slow
@pytest.mark.parametrize("policy, w, n", [("timeprest_i", 3, 2), ("pipedream", 2, 1)])
def test_clipping_by_value_matches_the_reference(tmp_path, policy, w, n):
    """Each stage clips its gradients elementwise before each of its updates (what Lightning does before a step)."""
    got = _run(tmp_path, policy, w, n, "sgd", "graph", "--clip", "0.002", "--clip-algorithm", "value")
    # the orders the streams ran (generated from op costs measured in the run, so they may vary between runs)
    schedules, _, _ = _streams_run(tmp_path, f"{policy}-{w}", w, n)
    ref = reference(policy, w, n, optimizer="sgd", rule="graph", epochs=2, clip_value=0.002, schedules=schedules)
    assert_same_params(ref, {k: v for k, v in got["state_dict"].items() if k in ref}, atol=1e-6, rtol=1e-6)
    unclipped = reference(policy, w, n, optimizer="sgd", rule="graph", epochs=2, schedules=schedules)
    assert any(not torch.allclose(ref[k], unclipped[k], atol=1e-5) for k in ref)  # the clipping was active


@pytest.mark.slow
def test_a_batch_smaller_than_n_runs_in_fewer_micro_batches(tmp_path):
    """100 samples in batches of 33: the last mini-batch has 1 sample, fewer than N = 3; it runs as one micro-batch
    (the other slots of its forwards idle) and the model equals the reference, which splits it alike."""
    w, n = 2, 3
    got = train(
        tmp_path, f"timeprest_i-{w}", "--epochs", "1", "--batch-size", "33", "--devices", str(w),
        "--schedule", "timeprest_i", "--n", str(n), "--optimizer", "adam",
    )  # fmt: skip
    schedules, _, _ = _streams_run(tmp_path, f"timeprest_i-{w}", w, n)
    ref = reference("timeprest_i", w, n, optimizer="adam", epochs=1, batch_size=33, schedules=schedules)
    assert_same_params(ref, {k: v for k, v in got["state_dict"].items() if k in ref})
    assert got["global_step"] == 4
