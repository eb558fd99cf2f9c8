"""The strategy's arguments, checked once, at construction: a wrong value fails before any process starts, with a
message that says what to change (:class:`~lightning_timeprest.errors.PipelineConfigError`)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from lightning_timeprest import compat
from lightning_timeprest.errors import PipelineConfigError
from lightning_timeprest.partition import BALANCE_MODES
from lightning_timeprest.schedules import ASYNCHRONOUS_SCHEDULES, SCHEDULES, OpCosts, ScheduleError
from lightning_timeprest.versions import significance_function

__all__ = ["PIPELINE_ARGUMENTS", "PipelineConfig", "pipeline_config"]


@dataclass(frozen=True)
class PipelineConfig:
    """The checked arguments of :class:`~lightning_timeprest.TiMePReStStrategy` (see there for their meaning)."""

    schedule: str
    num_microbatches: int | None
    balance: list[int] | str | None
    module_name: str | None
    split_points: list[str] | None
    stages: int | None
    sharded_checkpoint: bool
    processes_per_device: int
    p2p_timeout: timedelta
    significance: str | Callable[[int], float]
    alpha: Callable[[int], float]
    backward_rule: str
    dynamic: bool
    order: str
    max_inflight: int | None
    op_costs: OpCosts | None
    defer_weight_grads: bool
    loss_reduction: str

    @property
    def is_asynchronous(self) -> bool:
        return self.schedule in ASYNCHRONOUS_SCHEDULES

    def microbatches(self, num_stages: int) -> int:
        """N: as given, else 2 x stages for the synchronous schedules, ``max(2, stages - 1)`` for nF1B (so that
        ``W <= N + 1``), 1 for pipedream."""
        if self.num_microbatches is not None:
            return self.num_microbatches
        if self.schedule == "pipedream":
            return 1
        if self.is_asynchronous:
            return max(2, num_stages - 1)
        return 2 * num_stages

    def defers_weight_grads(self, num_stages: int) -> bool:
        """Whether the stages' ``nn.Linear`` layers take their weight gradients once per mini-batch
        (:mod:`~lightning_timeprest.weight_gradients`): with ``defer_weight_grads``, N > 1 (one micro-batch: nothing
        to take together), and not under 1f1b, which frees each micro-batch's activations at its backward (keeping
        the layers' inputs to the end of the mini-batch would undo that)."""
        return self.defer_weight_grads and self.schedule != "1f1b" and self.microbatches(num_stages) > 1

    def check_trainer(self, trainer: Any, module: Any, fitting: bool) -> None:
        """What the Trainer and the LightningModule ask for that a pipeline cannot do (checked at setup)."""
        if fitting and not module.automatic_optimization:
            raise PipelineConfigError(
                "manual optimization (automatic_optimization = False) is not supported by pipeline strategies: the "
                "pipeline runs the forward and backward passes itself; use automatic optimization"
            )
        callbacks = compat.lightning_callbacks(trainer)

        def given(cls: type) -> bool:
            return any(isinstance(cb, cls) for cb in trainer.callbacks)

        if fitting and given(callbacks.StochasticWeightAveraging):
            raise PipelineConfigError(
                "StochasticWeightAveraging is not supported by pipeline strategies: it replaces the learning-rate "
                "scheduler and runs an extra epoch without backward passes, which the pipeline runs itself; use "
                "WeightAveraging (an equal average of the weights, as SWA takes; override should_update to start "
                "later) or EMAWeightAveraging, which average each stage's weights"
            )
        if fitting and self.is_asynchronous and given(callbacks.LearningRateFinder):
            raise PipelineConfigError(
                f"the learning-rate finder (Tuner.lr_find, LearningRateFinder) pairs each step's loss with that "
                f"step's learning rate, but under {self.schedule!r} a mini-batch's loss is known a few steps after it "
                "entered (NaN before the first one completes): the curve would be shifted and the suggestion missing "
                f"or wrong. Find the learning rate with schedule='gpipe' (same model and stages), then train with "
                f"{self.schedule!r}"
            )
        if fitting and given(callbacks.ModelPruning):
            raise PipelineConfigError(
                "ModelPruning is not supported by pipeline strategies: it prunes the whole model in one process (a "
                "global threshold over every stage's weights) and renames the pruned parameters (weight_orig, "
                "weight_mask) under the pipeline while it trains; prune the trained model in one process (load the "
                "checkpoint, apply torch.nn.utils.prune, fine-tune) or train with a mask of your own in the model"
            )
        if fitting and self.is_asynchronous and given(callbacks.GradientAccumulationScheduler):
            raise PipelineConfigError(
                f"GradientAccumulationScheduler does not apply to {self.schedule!r}: an asynchronous policy steps "
                "every stage once per mini-batch inside the pipeline, so the accumulation it sets would be ignored; "
                "remove it (or use a larger batch), or use a synchronous schedule (gpipe, 1f1b) with it"
            )
        if fitting and self.is_asynchronous and trainer.accumulate_grad_batches != 1:
            raise PipelineConfigError(
                f"accumulate_grad_batches={trainer.accumulate_grad_batches} does not apply to {self.schedule!r}: "
                "an asynchronous policy steps every stage once per mini-batch inside the pipeline; remove it (or use "
                "a larger batch)"
            )


def _positive(name: str, value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or int(value) < 1):
        raise PipelineConfigError(f"{name} must be a positive integer, got {value!r}")
    return None if value is None else int(value)


def _op_costs(op_costs: Sequence[Sequence[float]] | None) -> OpCosts | None:
    if op_costs is None:
        return None
    try:
        rows = [tuple(float(c) for c in row) for row in op_costs]
        if any(len(row) != 3 for row in rows):
            raise ValueError("each stage needs [forward, backward, step]")
        return OpCosts(*(tuple(col) for col in zip(*rows, strict=True)))
    except (TypeError, ValueError, ScheduleError) as err:
        raise PipelineConfigError(
            f"op_costs must list [forward, backward, step] per stage, positive forward and backward costs "
            f"(e.g. [[1, 2, 0.5], [1, 2, 0.5]]), got {op_costs!r}: {err}"
        ) from None


def _check_layout(balance: Any, split_points: Any) -> None:
    if isinstance(balance, str) and balance not in BALANCE_MODES:
        raise PipelineConfigError(
            f"unknown balance {balance!r}; give one of {', '.join(BALANCE_MODES)} or a list of block counts"
        )
    if balance is not None and not isinstance(balance, str) and (not balance or any(int(b) < 1 for b in balance)):
        raise PipelineConfigError(f"balance must list a positive block count per stage, got {balance!r}")
    if split_points is not None and (
        isinstance(split_points, str) or not all(isinstance(n, str) and n for n in split_points)
    ):
        raise PipelineConfigError(
            f"split_points must be a list of submodule names (e.g. ['model.layer3']), got {split_points!r}"
        )
    if split_points and balance is not None and not isinstance(balance, str):
        raise PipelineConfigError("give either split_points or a balance list, not both: each fixes the stages")


def _check_policy(schedule: str, num_microbatches: Any, backward_rule: str, dynamic: bool, order: str) -> None:
    if schedule not in SCHEDULES:
        raise PipelineConfigError(f"unknown schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    if backward_rule not in ("graph", "recompute"):
        raise PipelineConfigError(f"unknown backward_rule {backward_rule!r}; choose 'graph' or 'recompute'")
    if schedule == "pipedream" and num_microbatches not in (None, 1):
        raise PipelineConfigError(
            "pipedream treats every mini-batch as one unit (N = 1); remove num_microbatches, or use an nF1B "
            "policy (timeprest_v, timeprest, timeprest_i) to split mini-batches into micro-batches"
        )
    if dynamic and schedule not in ASYNCHRONOUS_SCHEDULES:
        raise PipelineConfigError(f"dynamic=True applies to the asynchronous schedules only, not {schedule!r}")
    if order not in ("cost", "unit"):
        raise PipelineConfigError(f"unknown order {order!r}; choose 'cost' (generated from op costs) or 'unit'")


def pipeline_config(
    *,
    schedule: str,
    num_microbatches: int | None,
    balance: list[int] | str | None,
    module_name: str | None,
    split_points: list[str] | None,
    stages: int | None,
    sharded_checkpoint: bool,
    processes_per_device: int,
    p2p_timeout: float,
    significance: str | Callable[[int], float],
    decay_lambda: float,
    power_beta: float,
    backward_rule: str,
    dynamic: bool,
    order: str,
    max_inflight: int | None,
    op_costs: list[list[float]] | None,
    defer_weight_grads: bool,
    loss_reduction: str,
) -> PipelineConfig:
    """Check the strategy's arguments and return them normalised; raise ``PipelineConfigError`` on a bad one."""
    schedule = str(schedule).lower()
    _check_policy(schedule, num_microbatches, backward_rule, dynamic, order)
    _check_layout(balance, split_points)
    if p2p_timeout <= 0:
        raise PipelineConfigError(f"p2p_timeout must be positive, got {p2p_timeout}")
    try:
        alpha = significance_function(significance, decay_lambda, power_beta)
    except ValueError as err:
        raise PipelineConfigError(str(err)) from None
    per_device = _positive("processes_per_device", processes_per_device)
    assert per_device is not None
    if loss_reduction not in ("mean", "sum"):
        raise PipelineConfigError(
            f"loss_reduction must be 'mean' (your loss averages over the batch's samples) or 'sum' (it sums over "
            f"them), got {loss_reduction!r}"
        )
    return PipelineConfig(
        schedule=schedule,
        num_microbatches=_positive("num_microbatches", num_microbatches),
        balance=balance,
        module_name=module_name,
        split_points=list(split_points) if split_points else None,
        stages=_positive("stages", stages),
        sharded_checkpoint=bool(sharded_checkpoint),
        processes_per_device=per_device,
        p2p_timeout=timedelta(seconds=p2p_timeout),
        significance=significance,
        alpha=alpha,
        backward_rule=backward_rule,
        dynamic=bool(dynamic),
        order=order,
        max_inflight=_positive("max_inflight", max_inflight),
        op_costs=_op_costs(op_costs),
        defer_weight_grads=bool(defer_weight_grads),
        loss_reduction=loss_reduction,
    )


#: the names of the strategy's own arguments, which :func:`pipeline_config` checks
PIPELINE_ARGUMENTS = tuple(inspect.signature(pipeline_config).parameters)
