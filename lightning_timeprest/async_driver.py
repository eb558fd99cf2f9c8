"""The asynchronous policies (timeprest_v, timeprest, timeprest_i, pipedream), driven from Lightning's loop.

Each ``training_step`` takes one mini-batch into the pipeline and runs this stage's ops of the step
(:class:`~lightning_timeprest.async_runtime.AsyncRuntime`): forwards of the new mini-batch and backwards, each with
its stage update through the precision hook, of earlier ones still in flight. Nothing flushes between steps.

What the user's step logged reaches Lightning with a lag (the lag/replay protocol, :class:`Ledger`): the last stage
finishes mini-batch ``m`` first and sends its loss, logged values, metric states and stage record to every other
stage; every rank replays them in the step in which stage 0 finishes ``m`` under the static schedule, which every
rank knows, so all ranks log the same values at the same step without waiting on each other. Middle stages send
their records to rank 0, which receives only those sent before the mini-batch it is reporting reached stage 0.
:meth:`AsyncDriver.drain` finishes everything in flight (epoch end, validation, checkpoints, end of fit).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from lightning_timeprest import averaging, compat, metrics
from lightning_timeprest.async_runtime import AsyncRuntime
from lightning_timeprest.config import PipelineConfig
from lightning_timeprest.costs import OpClock, agreed_costs
from lightning_timeprest.errors import PipelineConfigError, peer_lost
from lightning_timeprest.metrics import LoggedValue
from lightning_timeprest.microbatch import split_at_most
from lightning_timeprest.schedules import OpCosts, OrderChoice, choose_order, version_difference
from lightning_timeprest.stage import Stage, loss_of, loss_weights, step_extras, weighted_loss, with_extras
from lightning_timeprest.stage_stats import cuda_peak_bytes, last_step_of_epoch
from lightning_timeprest.versions import POLICIES

__all__ = [
    "CALIBRATION_STEPS",
    "AsyncDriver",
    "Ledger",
    "OrderState",
    "check_untied",
    "choose_nf1b_order",
    "measures_op_times",
]

#: With measured op costs, the nF1B order is re-derived from the op times measured in the steps since the previous
#: drain, at every drain; at the start of training the pipeline drains for it twice, after this many steps each
#: (the second measures the ops in the order the first chose, which changes what they cost a little).
CALIBRATION_STEPS = 10
CALIBRATION_DRAINS = 2


def measures_op_times(config: PipelineConfig, device: torch.device, choice: OrderChoice | None) -> bool:
    """Whether the nF1B order is re-derived from the op times measured as the ops run (see ``CALIBRATION_STEPS``):
    with the cost-aware order and no ``op_costs`` given, on a CPU. The stage times its ops on the host, which is
    the op's time only where the host runs it; CUDA runs ops asynchronously (the host waits only where it reads a
    result), so there the order stays the one made from the setup measurement, which synchronizes the device."""
    return choice is not None and config.op_costs is None and config.order == "cost" and device.type == "cpu"


Record = tuple[list[float], list[LoggedValue]]  # a stage record and what its gradient hooks logged


@dataclass
class OrderState:
    """The op costs the nF1B order was generated from, and the order (``None`` outside nF1B)."""

    op_costs: OpCosts | None = None
    choice: OrderChoice | None = None

    def settle(self, config: PipelineConfig, costs: OpCosts, num_stages: int, num_microbatches: int) -> None:
        """Take this fit's op costs (one ``[forward, backward, step]`` per stage) and, for an nF1B policy, the
        order they give."""
        if costs.num_stages != num_stages:
            raise PipelineConfigError(
                f"op_costs lists {costs.num_stages} stages for a {num_stages}-stage pipeline; give one "
                "[forward, backward, step] per stage"
            )
        self.op_costs, self.choice = costs, None
        if config.is_asynchronous and config.schedule != "pipedream":
            self.choice = choose_nf1b_order(config, num_stages, num_microbatches, costs)


def choose_nf1b_order(config: PipelineConfig, num_stages: int, num_microbatches: int, costs: OpCosts) -> OrderChoice:
    """The nF1B order for ``costs`` (see :func:`~lightning_timeprest.schedules.choose_order`); for timeprest_v one
    with version difference v = 1, or a ``PipelineConfigError`` that says which setting allows one."""
    w, n, cap = num_stages, num_microbatches, config.max_inflight
    v_one, unit = config.schedule == "timeprest_v", config.order == "unit"
    choice = choose_order(w, n, costs, cap, staleness_free=v_one, unit_grid=unit)
    if not v_one or choice.version_difference <= 1:
        return choice
    if unit and cap is None:
        smallest = next(k for k in range(1, w + 1) if version_difference(w, k) == 1)
        raise PipelineConfigError(
            f"timeprest_v is staleness-free only when the version difference v is 1; in the paper's grid "
            f"(order='unit') that needs W <= N + 1, and with W={w} stages and N={n} micro-batches "
            f"v={choice.version_difference}. Use num_microbatches >= {smallest}, order='cost' (it keeps v = 1 "
            "at any W), fewer stages, or schedule='timeprest_i'"
        )
    assert cap is not None
    fine = [k for k in range(1, cap) if choose_order(w, n, costs, k, unit_grid=unit).version_difference == 1]
    raise PipelineConfigError(
        f"timeprest_v is staleness-free only when the version difference v is 1; with W={w} stages, N={n} "
        f"micro-batches and max_inflight={cap} v={choice.version_difference}. Use max_inflight <= "
        f"{max(fine, default=1)}, leave it unset (the fastest order with v = 1 is chosen), or schedule='timeprest_i'"
    )


def check_untied(tied: list[str]) -> None:
    """Refuse parameters read by blocks on several stages: an asynchronous policy cannot keep their copies equal."""
    if tied:
        raise PipelineConfigError(
            f"parameters {tied[:3]} are read by blocks on several stages (tied weights); the asynchronous policies "
            "update each stage at its own time and cannot keep such copies equal. Ways out: a balance or "
            "split_points that puts every block reading them on one stage (for an encoder-decoder's shared "
            "embedding, the decoder's embedding on the encoder's stage); untying them (a Hugging Face model: "
            "tie_word_embeddings=False in its config gives the output layer its own weight); or schedule='gpipe' "
            "or '1f1b', which keep the copies equal"
        )


@dataclass
class Ledger:
    """The lag/replay protocol's bookkeeping for one stream (between drains): which mini-batches' results are due
    for replay, and (rank 0) how many records each middle stage owes. Pure: no communication."""

    num_stages: int
    reported: int = -1  # the newest mini-batch whose results this rank has replayed
    sent: int = 0  # records each middle stage has sent (one per step and per drain)
    received: dict[int, int] = field(default_factory=dict)  # rank 0: records received from each middle stage

    def __post_init__(self) -> None:
        self.received = dict.fromkeys(range(1, self.num_stages - 1), 0)

    def owes_results(self, completed: int) -> bool:
        """Whether :meth:`results_due` would give any mini-batch for ``completed`` (without marking them)."""
        return completed > self.reported

    def results_due(self, completed: int) -> range:
        """The mini-batches to replay once stage 0 has completed those up to ``completed``; marks them reported."""
        due = range(self.reported + 1, completed + 1)
        self.reported = max(self.reported, completed)
        return due

    def records_due(self, stage: int, completed: int | None) -> int:
        """How many records to receive now from middle stage ``stage``: those sent before mini-batch ``completed``
        reached stage 0 (so receiving never waits on the pipeline), or every one sent (``None``: after a drain)."""
        limit = self.sent if completed is None else min(completed, self.sent)
        due = max(0, limit - self.received[stage])
        self.received[stage] += due
        return due


class AsyncDriver:
    """Runs an asynchronous policy's training steps and drains on one stage."""

    def __init__(
        self, stage: Stage, config: PipelineConfig, module: Any, optimizer: Optimizer, order: OrderState
    ) -> None:
        self.stage, self.config, self.module, self.order = stage, config, module, order
        choice = order.choice
        self.engine = AsyncRuntime(
            stage=stage.index,
            num_stages=stage.num_stages,
            stage_module=stage.runtime.module,
            root=module,
            comm=stage.comm,
            optimizer=optimizer,
            schedule=config.schedule,
            num_microbatches=stage.num_microbatches,
            policy=POLICIES[config.schedule],
            alpha=config.alpha,
            rule=config.backward_rule,  # type: ignore[arg-type]
            dynamic=config.dynamic,
            loss_of=loss_of,
            update=self._stage_update,
            loss_scale=stage.precision.loss_scale,
            order=choice.order if choice is not None else None,
            defer_weight_grads=config.defers_weight_grads(stage.num_stages),
        )
        self.optimizer = optimizer
        stage.stats.version_difference = choice.version_difference if choice is not None else 0
        self._next_version_difference: int | None = None  # v of the order the next stream runs in
        # measured costs: re-derive the order from the op times as they run (see _recalibrate)
        self.measuring = measures_op_times(config, stage.device, choice)
        self.calibrations_left = CALIBRATION_DRAINS if self.measuring else 0
        self.ledger = Ledger(stage.num_stages)
        self._payloads: dict[int, Any] = {}  # last stage: what each finished mini-batch logged, for every stage
        self._queued: list[Callable[[], None]] = []  # logging owed by drains that ran outside a training step
        self.last_loss = float("nan")
        self.last_extras: dict[str, Any] | None = None  # what that mini-batch's training_step returned besides
        self._clock = time.perf_counter()
        self.owners = [r.source for r in stage.placement.replicated]  # which stage trains each replicated parameter

    def _stage_update(self, loss: Tensor, backward: Callable[[Tensor], None], **kwargs: Any) -> bool:
        params = self.engine.store.params
        return self.stage.precision.stage_update(self.module, self.optimizer, params, loss, backward, **kwargs)

    # -- the step -------------------------------------------------------------------------------------------

    def train_step(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | dict[str, Any]:
        """Take one mini-batch in and run this stage's ops of the step; return the loss of the newest mini-batch
        completed on every stage (it lags by a few steps; NaN before the first one completes)."""
        module, stage, engine = self.module, self.stage, self.engine
        runtime = stage.runtime
        if self._next_version_difference is not None:
            stage.stats.version_difference, self._next_version_difference = self._next_version_difference, None
        owed, self._queued = self._queued, []
        for replay in owed:
            replay()
        batch, rest = stage.stage0_batch(args[0]), args[1:]
        # a mini-batch smaller than N (a short last batch) runs in fewer micro-batches, the others' slots idle
        microbatches, sizes = split_at_most(
            batch, stage.num_microbatches, compat.combined_training_batches(module.trainer)
        )
        weights = loss_weights(sizes, self.config.loss_reduction)
        capture = metrics.LogCapture(module)

        def call_user(j: int) -> Any:
            with capture.microbatch():
                return module.training_step(microbatches[j], *rest, **kwargs)

        k = engine.newest + 1
        scope = metrics.metric_step_scope(module) if runtime.is_last else nullcontext()
        # dynamic mode: wait for the results to replay while running the backwards that become ready
        until = self._results_arriving if engine.dynamic and not runtime.is_last else None
        with stage.precision.train_step_context(), scope:
            engine.run_step(call_user if runtime.runs_user_code else None, sizes, weights, until)
        if runtime.is_last:
            outputs = engine.finished.pop(k)
            summed = [loss_of(o) for o in outputs] if self.config.loss_reduction == "sum" else []
            logged = metrics.reduce_logged(module, capture.calls[-len(sizes) :], sizes, summed)
            loss, extras = weighted_loss(outputs, sizes, self.config.loss_reduction), step_extras(outputs, sizes)
            payload = (loss, extras, logged, metrics.metric_states(module, logged), self._record())
            self._payloads[k] = payload
            for s in range(stage.num_stages - 1):
                stage.comm.isend_object(payload, s)
        elif not runtime.is_first:
            stage.comm.isend_object(self._record(), 0)
        else:
            stage.stats.add(0, *self._record())
        self.ledger.sent += 1
        if k == 0:  # the first step's ops include allocations and other warm-up: not a cost to plan with
            engine.clock = OpClock()
        final = last_step_of_epoch(module.trainer)
        if final or (self.calibrations_left and k + 1 >= CALIBRATION_STEPS):
            self.drain(in_step=True)
        else:
            self._report(engine.completed_on_stage0, in_step=True)
        for hook_logs in stage.stats.take_hook_logs():  # stage 0 gathers every stage's
            metrics.replay(module, hook_logs, {})
        stage.stats.emit(module, final, stage.global_rank == 0, stage.share)
        return with_extras(
            torch.tensor(self.last_loss, dtype=torch.float32, device=stage.device), self.last_extras, stage.device
        )

    def _record(self) -> Record:
        """This stage's record since the last one, and what the user's gradient hooks logged in its updates."""
        now = time.perf_counter()
        stats = self.engine.take_stats()
        stats.wait_s = self.stage.comm.wait_seconds
        stats.cuda_peak_bytes = cuda_peak_bytes(self.stage.device)
        stats.step = self.module.trainer.global_step
        self.stage.stats.history.append(stats)
        self.stage.comm.wait_seconds = 0.0
        record = stats.as_tensor(now - self._clock).tolist()
        self._clock = now
        return record, self.stage.precision.take_hook_logs()

    def _results_arriving(self) -> bool:
        """Whether the step results :meth:`_report` replays next (from the last stage) are due and arriving, or
        none are due."""
        if not self.ledger.owes_results(self.engine.completed_on_stage0):
            return True
        return self.stage.comm.object_arriving(self.stage.last_stage)

    def _report(self, completed: int, in_step: bool) -> None:
        """Replay what the mini-batches up to ``completed`` logged, and (rank 0) take the stage records owed."""
        stage, runtime = self.stage, self.stage.runtime
        for m in self.ledger.results_due(completed):
            payload = self._payloads.pop(m) if runtime.is_last else stage.comm.recv_object_from(stage.last_stage)
            loss, extras, logged, states, last_record = payload
            self.last_loss, self.last_extras = loss, extras
            self._replay(logged, states, in_step)
            if runtime.is_first and not runtime.is_last:
                stage.stats.add(stage.last_stage, *last_record)
        if runtime.is_first:
            self._take_records(completed)

    def _take_records(self, completed: int | None) -> None:
        for s in range(1, self.stage.num_stages - 1):
            for _ in range(self.ledger.records_due(s, completed)):
                self.stage.stats.add(s, *self.stage.comm.recv_object_from(s))

    def _replay(self, logged: Any, states: Any, in_step: bool) -> None:
        module, runtime = self.module, self.stage.runtime

        def replay() -> None:
            if runtime.is_last:  # keep the running metric state of the mini-batches after this one
                current = metrics.metric_states(module, logged)
                metrics.replay(module, logged, states)
                metrics.restore_states(module, current, module.device)
            else:
                metrics.replay(module, logged, states)

        if in_step:
            replay()
        else:
            self._queued.append(replay)

    # -- draining --------------------------------------------------------------------------------------------

    def drain(self, in_step: bool = False) -> None:
        """Finish every mini-batch in flight on every stage (a collective: all ranks call it at the same point)."""
        engine, stage = self.engine, self.stage
        runtime = stage.runtime
        if engine.newest < 0:
            return
        newest = engine.newest
        with stage.precision.train_step_context():
            engine.drain()
        record = self._record()
        if runtime.is_first:
            stage.stats.add(0, *record)
        elif not runtime.is_last:
            stage.comm.isend_object(record, 0)
        self.ledger.sent += 0 if runtime.is_last else 1
        self._report(newest, in_step)
        if runtime.is_first:
            self._take_records(None)
        stage.comm.wait_sends()
        self._payloads, self.ledger = {}, Ledger(stage.num_stages)
        self._sync_replicated()
        if self.measuring:
            self._recalibrate()

    def _sync_replicated(self) -> None:
        """Copy each replicated parameter from the stage that trained it to every stage that holds it."""
        stage, replicated = self.stage, self.stage.placement.replicated
        if not replicated or stage.num_stages == 1:
            return
        flags = torch.zeros(len(replicated), stage.num_stages)
        for i, p in enumerate(stage.replicated_local):
            if p is not None and id(p) in self.engine.trained:
                flags[i, stage.index] = 1.0
        stage.comm.all_reduce_sum(flags)
        for i, r in enumerate(replicated):
            trainers = [s for s in range(stage.num_stages) if flags[i, s] > 0]
            if len(trainers) > 1:
                raise PipelineConfigError(
                    f"parameter {r.name!r} received gradients on stages {trainers}; an asynchronous policy updates "
                    "each stage at its own time, so a parameter used on several stages (e.g. an embedding tied to the "
                    "output layer) cannot stay consistent. Untie it, or use schedule='gpipe' or '1f1b'"
                )
            if trainers:
                self.owners[i] = trainers[0]
        # (with the parameters, the weight-averaging callbacks' averages of them: see lightning_timeprest.averaging)
        averages = averaging.replicated_averages(self.module.trainer, [r.name for r in replicated])
        with torch.no_grad():
            for i, (r, owner) in enumerate(zip(replicated, self.owners, strict=True)):
                for p in [stage.replicated_local[i], *(held[i] for held in averages)]:
                    wire = p.detach().cpu() if p is not None else torch.empty(r.shape, dtype=r.dtype)
                    stage.comm.broadcast_tensor(wire, owner)
                    if p is not None:
                        p.copy_(wire)

    # -- the order ------------------------------------------------------------------------------------------

    def _recalibrate(self) -> None:
        """Re-derive the nF1B order from how long each stage's ops took in the stream that just drained (a
        collective, called by every rank right after a drain)."""
        stage, engine = self.stage, self.engine
        self.calibrations_left = max(0, self.calibrations_left - 1)
        rows = torch.zeros(stage.num_stages, 4, dtype=torch.float64)
        medians = engine.clock.medians()
        if medians is not None:
            rows[stage.index] = torch.tensor([*medians, len(engine.clock.backward)], dtype=torch.float64)
        with peer_lost(stage.where, "agreeing on the measured op costs"):
            dist.all_reduce(rows, group=stage.groups.world)
        if bool((rows[:, 3] < 2 * stage.num_replicas).any()):  # a stage ran too few backwards to tell: keep it
            return
        costs = agreed_costs(rows[:, :3], stage.num_replicas)
        try:
            choice = choose_nf1b_order(self.config, stage.num_stages, stage.num_microbatches, costs)
        except PipelineConfigError as err:  # an explicit max_inflight that now gives v > 1: keep the order
            rank_zero_warn(f"kept the nF1B order chosen at start: {err}")
            return
        changed = choice.order != engine.order
        self.order.op_costs, self.order.choice = costs, choice
        engine.replan(choice.order)
        self._next_version_difference = choice.version_difference  # logged from the next stream's first step on
        if changed:
            rank_zero_info(f"TiMePReStStrategy: from the op times measured, {choice.describe()}")

    def restore_order(self, costs: OpCosts) -> None:
        """Continue in the order of a checkpointed run (generated from its op costs); no calibration drains."""
        if self.order.choice is None or self.config.op_costs is not None or costs.num_stages != self.stage.num_stages:
            return  # (resumed with another number of stages: calibrate anew)
        choice = choose_nf1b_order(self.config, self.stage.num_stages, self.stage.num_microbatches, costs)
        self.order.op_costs, self.order.choice, self.calibrations_left = costs, choice, 0
        self.engine.replan(choice.order)
        self.stage.stats.version_difference = choice.version_difference
