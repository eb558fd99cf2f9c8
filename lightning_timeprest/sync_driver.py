"""The synchronous schedules (gpipe, 1f1b) and every evaluation step, driven from Lightning's loop.

Each ``training_step`` runs one whole mini-batch through this stage's part of the schedule
(:meth:`SyncDriver.train_step`). Lightning zeroes the gradients between the step and its backward, so the gradients
the schedule produced are set aside until the precision hook's backward asks for them
(:meth:`SyncDriver.install_gradients`); then the optimizer steps on every stage at once, as on one device.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn

from lightning_timeprest import compat, metrics
from lightning_timeprest.microbatch import join, split_at_most
from lightning_timeprest.schedules import Schedule, build_schedule
from lightning_timeprest.stage import Stage, loss_of, loss_weights, step_extras, weighted_loss, with_extras
from lightning_timeprest.stage_stats import StepStats, cuda_peak_bytes, last_step_of_epoch

__all__ = ["SyncDriver"]


class SyncDriver:
    """Runs synchronous training steps and forward-only evaluation steps on one stage."""

    def __init__(self, stage: Stage, schedule: str, loss_reduction: str = "mean") -> None:
        self.stage = stage
        self.schedule = schedule
        self.loss_reduction = loss_reduction
        self._schedules: dict[tuple[str, int], Schedule] = {}
        self._new_grads: dict[nn.Parameter, Tensor | None] | None = None
        self._step_s = 0.0  # the optimizer steps not yet counted in a stage record
        self._clock: float | None = None  # when the previous training step's record was taken
        self._weight_bytes: int | None = None  # the bytes of this stage's parameters

    def _schedule(self, name: str, num_microbatches: int) -> Schedule:
        key = (name, num_microbatches)
        if key not in self._schedules:
            self._schedules[key] = build_schedule(name, self.stage.num_stages, num_microbatches)
        return self._schedules[key]

    def train_step(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | dict[str, Any]:
        """One mini-batch forward and backward through the pipeline; its loss on every rank (and the step's extras).
        The gradients are set aside for :meth:`install_gradients` (Lightning zeroes ``.grad`` in between)."""
        params = list(module.parameters())
        earlier = [p.grad for p in params]
        for p in params:
            p.grad = None
        context = self.stage.precision.train_step_context
        out = self.step(module, "training_step", context, args, kwargs, train=True)
        self._new_grads = {p: p.grad for p in params}
        for p, g in zip(params, earlier, strict=True):
            p.grad = g
        return out

    def install_gradients(self) -> None:
        """Put the gradients of the last training step on the parameters, summed over the stages for replicated
        parameters and averaged over the data-parallel replicas (the precision hook's backward)."""
        new = self._new_grads or {}
        self._new_grads = None
        self._sum_shared_gradients(new)
        for p, g in new.items():
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)
        self.stage.average_over_replicas(list(new))

    def _sum_shared_gradients(self, grads: dict[nn.Parameter, Tensor | None]) -> None:
        """Sum over stages the gradients of the replicated parameters (stems, heads, tied weights).

        A parameter no stage computed a gradient for keeps ``grad=None``, as on one device (so momentum or weight
        decay do not move it).
        """
        replicated, here = self.stage.placement.replicated, self.stage.replicated_local
        if not replicated or self.stage.num_stages == 1:
            return
        local = [grads.get(p) if p is not None else None for p in here]
        flat = torch.cat(
            [torch.tensor([g is not None for g in local], dtype=torch.float32)]
            + [
                (g.detach().reshape(-1).float().cpu() if g is not None else torch.zeros(r.shape.numel()))
                for r, g in zip(replicated, local, strict=True)
            ]
        )
        self.stage.comm.all_reduce_sum(flat)
        offset = len(here)
        for i, (r, p) in enumerate(zip(replicated, here, strict=True)):
            n = r.shape.numel()
            if p is not None and flat[i] > 0:
                grads[p] = flat[offset : offset + n].view(r.shape).to(device=p.device, dtype=p.dtype)
            offset += n

    def optimizer_step(self, module: Any, step: Callable[[Callable[[], Any]], Any], closure: Callable[[], Any]) -> Any:
        """Lightning's optimizer step (``step(closure)``), timed: what the closure does not take (clipping and the
        optimizer's own step) counts as this stage's compute in the next record. Then what the stages' gradient
        hooks logged goes to every rank (one exchange, only when a hook is overridden)."""
        closure_s = 0.0

        def timed() -> Any:
            nonlocal closure_s
            begin = time.perf_counter()
            try:
                return closure()
            finally:
                closure_s = time.perf_counter() - begin

        start = time.perf_counter()
        result = step(timed)
        step_s = time.perf_counter() - start - closure_s
        self._step_s += step_s
        self.stage.runtime.clock.add("step", step_s)
        if self.stage.precision.shares_hook_logs:
            for hook_logs in self.stage.comm.all_gather_objects(self.stage.precision.take_hook_logs()):
                metrics.replay(module, hook_logs, {})
        return result

    def step(
        self,
        module: Any,
        hook: str,
        context: Callable[[], Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        train: bool,
    ) -> Any:
        """Run the user's ``hook`` on one mini-batch through the pipeline and log what it logged, on every rank.

        Returns, on every rank: the mini-batch loss when training, the joined outputs of ``predict_step``,
        otherwise ``None``.
        """
        stage, runtime = self.stage, self.stage.runtime
        batch, rest = stage.stage0_batch(args[0]), args[1:]
        # a batch smaller than N runs in fewer micro-batches: the size-weighted mean of their losses is still the
        # batch's mean, so the gradient equals one device's
        combined = train and compat.combined_training_batches(module.trainer)
        microbatches, sizes = split_at_most(batch, stage.num_microbatches, combined)
        total = sum(sizes)
        scaler = stage.precision.scaler
        scale = float(scaler.get_scale()) if train and scaler is not None else 1.0  # 16-mixed: the scaled loss
        factor = scale / module.trainer.accumulate_grad_batches
        weights = [w * factor for w in loss_weights(sizes, self.loss_reduction)]
        capture = metrics.LogCapture(module)
        user_step = getattr(module, hook)

        def call_user(j: int) -> Any:
            with capture.microbatch():
                return user_step(microbatches[j], *rest, **kwargs)

        # evaluation is forward-only, for which every synchronous schedule is gpipe's forward order
        schedule = self._schedule(self.schedule if train else "gpipe", len(sizes))
        scope = metrics.metric_step_scope(module) if runtime.is_last else nullcontext()
        start, waited = time.perf_counter(), runtime.comm.wait_seconds
        with context(), scope:
            result = runtime.run(schedule, call_user, train=train, loss_of=loss_of, loss_weights=weights)
        record = self._record(module, start, runtime.comm.wait_seconds - waited, total) if train else None
        payload = None
        if runtime.is_last:
            extras = None
            if train:
                value = weighted_loss(result.outputs, sizes, self.loss_reduction)
                extras = step_extras(result.outputs, sizes)
            else:
                value = move_data_to_device(join(result.outputs, sizes), "cpu") if hook == "predict_step" else None
            summed = [loss_of(o) for o in result.outputs] if train and self.loss_reduction == "sum" else []
            logged = metrics.reduce_logged(module, capture.calls, sizes, summed)
            payload = (value, extras, logged, metrics.metric_states(module, logged))
        if record is None:
            value, extras, logged, states = runtime.comm.broadcast_object(payload, stage.last_stage)
        else:  # one exchange carries the last stage's results to every stage and every stage's record to stage 0
            gathered = runtime.comm.all_gather_objects((payload, record))
            value, extras, logged, states = gathered[stage.last_stage][0]
            if runtime.is_first:
                for s, (_, stage_record) in enumerate(gathered):
                    stage.stats.add(s, stage_record)
            stage.stats.emit(module, last_step_of_epoch(module.trainer), stage.global_rank == 0, stage.share)
        metrics.replay(module, logged, states)
        if not train:
            return value
        return with_extras(torch.tensor(value, dtype=torch.float32, device=stage.device), extras, stage.device)

    def _record(self, module: Any, start: float, wait_s: float, samples: int) -> list[float]:
        """This stage's record of one synchronous training step (the same fields as the asynchronous engine's).

        Busy time is the schedule's run less the time blocked on transfers, plus the optimizer step taken since the
        previous record; wall time runs from the previous step's record, so Lightning's loop between steps counts as
        idle, as it does for the asynchronous policies.
        """
        now = time.perf_counter()
        if self._weight_bytes is None:  # this stage's parameters do not change during fit
            self._weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters() if not p.is_meta)
        step_s, self._step_s = self._step_s, 0.0  # the previous steps' optimizer steps
        stats = StepStats(
            versions_held=1,
            weight_bytes=self._weight_bytes,
            busy_s=max(0.0, now - start - wait_s) + step_s,
            wait_s=wait_s,
            samples=samples,
            cuda_peak_bytes=cuda_peak_bytes(self.stage.device),
            step=module.trainer.global_step,
        )
        wall = now - (self._clock if self._clock is not None else start)
        self._clock = now
        self.stage.stats.history.append(stats)
        return stats.as_tensor(wall).tolist()
