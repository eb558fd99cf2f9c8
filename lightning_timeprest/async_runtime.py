"""Executing an asynchronous schedule (nF1B or PipeDream's 1F1B) across Lightning ``training_step`` calls.

Nothing flushes between mini-batches: in the step of mini-batch ``k`` a stage runs its forwards of ``k`` and the
backwards the schedule puts between them, of earlier mini-batches still in flight, each followed by this
stage's own optimizer step (:meth:`AsyncRuntime.run_step`). :meth:`AsyncRuntime.drain` finishes every mini-batch
in flight; the strategy calls it at the end of an epoch, before validation, before a checkpoint and at the end
of fit.

Static replay (the default) executes the op order of :class:`~lightning_timeprest.schedules.StreamPlan`, so a
run is reproducible and equals a single-process reference of the same rule. ``dynamic=True`` applies the same
priority rule (a ready backward first, forwards in order) to what has actually arrived, and records the order
and the weight version of every op in :attr:`AsyncRuntime.trace`.

Which weights each op reads is the policy's (:mod:`lightning_timeprest.versions`). Two ways to take a backward
when its weights differ from the forward's: ``graph`` keeps the forward graph and makes its saved weights read
the backward weights; ``recompute`` keeps only the stage input and reruns the stage forward with the backward
weights. The last stage always keeps its graph: it runs the user's loss code, and under every policy but
vertical sync its backward follows its forwards with no optimizer step in between (``d = 0``).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.optim import Optimizer

from lightning_timeprest import compat
from lightning_timeprest.comm import PipelineCommError, StageComm
from lightning_timeprest.costs import OpClock
from lightning_timeprest.precision import autocasting
from lightning_timeprest.runtime import StageRunner, through_stage
from lightning_timeprest.schedules import NF1BOrder, Op, OpKind, StreamPlan
from lightning_timeprest.stage_stats import StepStats
from lightning_timeprest.versions import LeafSet, Policy, VersionStore
from lightning_timeprest.weight_gradients import WeightGradients

__all__ = ["AsyncRuntime", "StageUpdate", "StepStats", "TraceEntry"]

BackwardRule = Literal["graph", "recompute"]


class StageUpdate(Protocol):
    """One stage's update for one mini-batch (:meth:`lightning_timeprest.precision.PipelinePrecision.stage_update`
    bound to the module, optimizer and parameters): runs ``backward`` and the hooks around it, then the step inside
    ``stepping``; returns whether the step was skipped."""

    def __call__(
        self,
        loss: Tensor,
        backward: Callable[[Tensor], None],
        *,
        scale: float,
        upstream_overflow: bool,
        stepping: Callable[[], AbstractContextManager],
    ) -> bool: ...


@dataclass
class _Micro:
    version: int  # the weight version the forward read
    leaves: LeafSet | None = None  # what the forward read, when its graph is kept
    inputs: Any = None  # the activation received (not on stage 0)
    outputs: Any = None  # the activation sent (graph kept)
    rng: Any = None  # the random states at the forward, global and the layers' (recompute reruns it identically)
    loss: Tensor | None = None  # last stage: the user's micro-batch loss
    pinned: bool = False
    grads: Any = None  # the receives of the output's gradients, posted when it was sent
    meta: Any = None  # micro-batch 0: the receive of the mini-batch's loss scale and loss, posted with its gradients


@dataclass
class _MiniBatch:
    index: int
    call_user: Callable[[int], Any] | None
    weights: Sequence[float]
    sizes: Sequence[int]
    lrs: list[Any] = field(default_factory=list)  # the optimizer's learning rates when the mini-batch entered
    micro: dict[int, _Micro] = field(default_factory=dict)
    outputs: list[Any] = field(default_factory=list)  # last stage: what the user's step returned, per micro-batch
    meta: tuple[float, float] = (1.0, float("nan"))  # (loss scale, loss) sent back with the gradients


@dataclass(frozen=True)
class TraceEntry:
    """One op as it ran: the op, the weight version its forward read and, for a backward, the step count."""

    op: Op
    version: int


class AsyncRuntime:
    """One stage's executor of an asynchronous schedule."""

    def __init__(
        self,
        *,
        stage: int,
        num_stages: int,
        stage_module: StageRunner,
        root: nn.Module,
        comm: StageComm,
        optimizer: Optimizer,
        schedule: str,
        num_microbatches: int,
        policy: Policy,
        alpha: Callable[[int], float],
        rule: BackwardRule,
        dynamic: bool,
        loss_of: Callable[[Any], Tensor],
        update: StageUpdate,
        loss_scale: Callable[[], float] = lambda: 1.0,
        order: NF1BOrder | None = None,
        defer_weight_grads: bool = False,
    ) -> None:
        self.stage = stage
        self.num_stages = num_stages
        self.module = stage_module
        self.root = root
        self.comm = comm
        self.optimizer = optimizer
        self.schedule = schedule
        self.num_microbatches = num_microbatches
        self.policy = policy
        self.alpha = alpha
        self.rule = rule
        self.dynamic = dynamic
        self.loss_of = loss_of
        self.update = update  # one stage update: hooks, backward, unscaling, clipping, the step (the precision hook)
        self.loss_scale = loss_scale  # last stage: the scale the loss is multiplied by now
        self.order = order or NF1BOrder()  # how the nF1B order is generated (pipedream has its own)
        if schedule == "pipedream":
            self.max_inflight: int | None = num_stages - stage
        else:
            self.max_inflight = self.order.max_inflight
        self.is_first = stage == 0
        self.is_last = stage == num_stages - 1
        self._version(self._trainable())  # self.store, self._call_names
        # (a traced stage reads the user's modules' own tensor tables, so replacing tensors there reaches it too)
        self._call = _Call(root)
        #: the stage's Linear layers take their weight gradients once per mini-batch backward (weight_gradients)
        self.weight_grads = WeightGradients()
        if defer_weight_grads:
            self.weight_grads.install(stage_module)
        #: the learning rates of each update this stage made, in order (one update per mini-batch)
        self.learning_rates: list[list[Any]] = []
        #: per stream (one per drain), per op as it ran on this stage
        self.trace: list[list[TraceEntry]] = [[]]
        #: per stream, the order it was generated in
        self.stream_orders: list[NF1BOrder] = []
        self.trained: set[int] = set()  # ids of the parameters that received a gradient
        self._reset_stream()
        self.stats = StepStats()
        #: how long this stage's ops took (the costs the order is re-derived from)
        self.clock = OpClock()
        self._step_s = 0.0  # the optimizer step of the backward running now
        self.skipped = 0  # updates this stage skipped (16-mixed: its gradients overflowed)
        self._upstream_skips = 0  # updates the earlier stages skipped, as the last activation header said
        self._skips_heard = 0  # last stage: the upstream skips its loss scale has backed off for

    # -- stream state ---------------------------------------------------------------------------------------

    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.root.named_parameters() if p.requires_grad and not p.is_meta]

    def _version(self, named: list[tuple[str, nn.Parameter]]) -> None:
        """Keep the weight versions of ``named`` (the stage's parameters that train), in a new store."""
        self.store = VersionStore([n for n, _ in named], [p for _, p in named])
        self._call_names = [f"m.{n}" for n in self.store.names]  # the names functional_call replaces, via _Call

    def _follow_trainable(self) -> None:
        """At the start of a stream (nothing in flight): if the parameters that train changed since the store was
        made (layers frozen or unfrozen between epochs, as ``BackboneFinetuning`` does), version those instead.
        A parameter left out of the store would be read and updated in place, unversioned, under pending graphs."""
        named = self._trainable()
        if [id(p) for _, p in named] != [id(p) for p in self.store.params]:
            self._version(named)
            if self.policy.forward == "vertical" and not self.is_first:
                self.store.keep_versions_from(0)  # (as _reset_stream leaves a fresh stream)

    def _reset_stream(self) -> None:
        self.stream_orders = [*self.stream_orders[: len(self.trace) - 1], self.order]
        w, n = self.num_stages, self.num_microbatches
        self.plan = StreamPlan(self.schedule, w, n, track=(self.stage,), order=self.order)
        self.report_plan = StreamPlan(self.schedule, w, n, track=(0,), order=self.order)
        self.pending: dict[int, _MiniBatch] = {}
        self.finished: dict[int, list[Any]] = {}  # last stage: the user's step outputs of finished mini-batches
        self.next_forward = (0, 0)  # (mini-batch, micro-batch)
        self.next_backward = 0
        self.newest = -1
        self.completed_on_stage0 = -1  # static plan: mini-batches stage 0 has finished (for reporting)
        self.store.reset()
        if self.policy.forward == "vertical" and not self.is_first:
            self.store.keep_versions_from(0)

    # -- steps ------------------------------------------------------------------------------------------------

    def run_step(
        self,
        call_user: Callable[[int], Any] | None,
        sizes: Sequence[int],
        weights: Sequence[float],
        until: Callable[[], bool] | None = None,
    ) -> list[int]:
        """Take in the next mini-batch and run this stage's ops of its step; return the mini-batches whose
        backward (and optimizer step) completed on this stage.

        In dynamic mode the step also waits, running backwards as they become ready, until ``until()`` holds
        (the driver's: the step results it must replay now have arrived)."""
        k = self.newest + 1
        if k == 0:
            self._follow_trainable()
        self.newest = k
        self.pending[k] = _MiniBatch(k, call_user, weights, sizes, [g["lr"] for g in self.optimizer.param_groups])
        done_before = self.next_backward
        # reporting follows the static schedule on every rank, dynamic or not, so that all ranks agree
        stage0_ops = self.report_plan.step_ops(0, k)
        self.completed_on_stage0 += sum(op.kind is OpKind.BACKWARD for op in stage0_ops)
        if self.dynamic:
            self._run_dynamic(k, until)
        else:
            for op in self.plan.step_ops(self.stage, k):
                self._run(op)
        return list(range(done_before, self.next_backward))

    def drain(self) -> list[int]:
        """Finish every mini-batch in flight (backwards and optimizer steps); return those completed here."""
        done_before = self.next_backward
        for m in range(self.next_backward, self.newest + 1):
            self._run(Op(OpKind.BACKWARD, m, None))
        self.comm.wait_sends()
        self.completed_on_stage0 = self.newest
        done = list(range(done_before, self.next_backward))
        self.trace.append([])
        self._reset_stream()
        return done

    def take_stats(self) -> StepStats:
        """What this stage did since the last call (the peak of versions held restarts from what is held now)."""
        stats, self.stats = self.stats, StepStats()
        self.store.peak_versions = self.store.versions_held
        return stats

    def replan(self, order: NF1BOrder) -> None:
        """Generate the op order of the streams to come as ``order`` says (right after a drain: nothing in flight)."""
        assert not self.pending, "the order can change only when the pipeline is drained"
        self.order = order
        if self.schedule != "pipedream":
            self.max_inflight = order.max_inflight
        self._reset_stream()

    def _run(self, op: Op) -> None:
        start, waited = time.perf_counter(), self.comm.wait_seconds
        clock = self.clock
        if op.kind is OpKind.FORWARD:
            assert op.microbatch is not None
            self._forward(op.minibatch, op.microbatch)
        else:
            self._backward(op.minibatch)
        busy = (time.perf_counter() - start) - (self.comm.wait_seconds - waited)
        if op.kind is OpKind.FORWARD:
            clock.add("forward", busy)
        else:
            clock.add("backward", (busy - self._step_s) / self.num_microbatches)
            clock.add("step", self._step_s)
        self.stats.busy_s += busy
        self.stats.versions_held = max(self.stats.versions_held, self.store.peak_versions)
        self.stats.weight_bytes = max(self.stats.weight_bytes, self.store.peak_versions * self.store.param_bytes)

    # -- the dynamic driver ------------------------------------------------------------------------------------

    def _backward_ready(self) -> bool:
        m = self.next_backward
        if m > self.newest or m not in self.pending:
            return False
        if len(self.pending[m].micro) < len(self.pending[m].sizes):
            return False
        if self.is_last:
            return True
        meta = self.pending[m].micro[0].meta  # posted at its forward; sent just before the gradients
        return meta is not None and meta.ready()

    def _forward_ready(self, k: int) -> bool:
        m, j = self.next_forward
        if m > k:
            return False
        if j == 0 and self.max_inflight is not None and m - self.next_backward >= self.max_inflight:
            return False
        if self.is_first or j >= len(self.pending[m].sizes):  # (the idle slot of a short mini-batch)
            return True
        return self.comm.post_activation_header().ready()

    def _run_dynamic(self, k: int, until: Callable[[], bool] | None) -> None:
        """Backward priority on what has arrived; return once the forwards of ``k`` ran, no backward is ready and
        ``until()`` holds. (Waiting for ``until`` here rather than after the step lets a backward whose gradient
        arrives meanwhile run at once: the step results a stage waits for come right after that gradient.)"""
        deadline = time.monotonic() + self.comm.timeout.total_seconds()
        while True:
            # cleared before the checks, so that an arrival during them makes the wait below return at once
            self.comm.arrived.clear()
            if self._backward_ready():
                self._run(Op(OpKind.BACKWARD, self.next_backward, None))
            elif self._forward_ready(k):
                m, j = self.next_forward
                self._run(Op(OpKind.FORWARD, m, j))
            elif self.next_forward[0] > k and (until is None or until()):
                return
            else:
                if time.monotonic() > deadline:
                    raise PipelineCommError(
                        f"stage {self.stage}: nothing it waits for (an activation, a gradient, step results) arrived "
                        f"within {self.comm.timeout.total_seconds():.0f} s; a neighbouring stage is stuck"
                    )
                waited = time.perf_counter()
                self.comm.arrived.wait(timeout=1.0)
                self.comm.wait_seconds += time.perf_counter() - waited
                continue
            deadline = time.monotonic() + self.comm.timeout.total_seconds()

    # -- ops --------------------------------------------------------------------------------------------------

    def _forward(self, m: int, j: int) -> None:
        assert self.next_forward == (m, j), f"stage {self.stage}: forward {(m, j)} out of order"
        mb = self.pending[m]
        n = self.num_microbatches
        self.next_forward = (m, j + 1) if j + 1 < n else (m + 1, 0)
        if j >= len(mb.sizes):  # a mini-batch smaller than N runs in fewer micro-batches: this slot idles
            self.trace[-1].append(TraceEntry(Op(OpKind.FORWARD, m, j), self.store.version))
            return
        inputs, tag = None, 0
        if not self.is_first:
            inputs, tag = self.comm.recv_tagged_activation(requires_grad=True)
            self._upstream_skips = self.comm.note
        if self.policy.forward == "vertical" and not self.is_first:
            version = tag
            self.store.keep_versions_from(tag)
        else:
            version = self.store.version
        keep_graph = self.is_last or self.rule == "graph"
        record = _Micro(version=version, inputs=inputs)
        if self.rule == "recompute" and not self.is_last:
            streams = self.module.streams
            record.rng = _rng_state(), streams.layers.state() if streams is not None else None
        if self.policy.backward in ("stashed", "intermediate") and not self.is_last:
            self.store.pin(version)
            record.pinned = True
        if keep_graph:
            record.leaves = self.store.leaves_for(version)
            with _recasting(record.leaves.leaves) if autocasting() else nullcontext():
                user_out, out = self._stage_forward(mb, j, inputs, record.leaves)
        else:
            with torch.no_grad():
                user_out, out = self._stage_forward(mb, j, inputs, self.store.leaves_for(version))
        mb.micro[j] = record
        self.trace[-1].append(TraceEntry(Op(OpKind.FORWARD, m, j), version))
        self.stats.samples += mb.sizes[j] if j < len(mb.sizes) else 0
        if self.is_last:
            mb.outputs.append(user_out)
            record.loss = self.loss_of(user_out)
        else:
            differentiable = None if keep_graph else torch.is_grad_enabled()
            tag = version if self.policy.forward == "vertical" else 0
            note = self.skipped + self._upstream_skips
            self.comm.send_activation(out, tag=tag, differentiable=differentiable, note=note)
            if keep_graph:
                record.outputs = out
            if j == 0:  # the mini-batch's loss scale and loss come back before its gradients
                record.meta = self.comm.post_meta(2)
            record.grads = self.comm.post_gradients(out, differentiable)

    def _stage_forward(self, mb: _MiniBatch, j: int, inputs: Any, leaves: LeafSet) -> tuple[Any, Any]:
        """Run this stage on micro-batch ``j`` reading ``leaves``; return (user output, stage output)."""
        call_user = mb.call_user
        step = (lambda: call_user(j)) if call_user is not None else None

        def body() -> tuple[Any, Any]:
            return through_stage(self.module, self.is_first, self.is_last, inputs, step)

        return functional_call(
            self._call, dict(zip(self._call_names, leaves.leaves, strict=True)), (body,), strict=False
        )

    def _backward(self, m: int) -> None:
        """Mini-batch ``m``'s backward and this stage's update for it, through the precision hook (``self.update``):
        the hooks Lightning calls around a backward and a step run here, once per stage update."""
        assert m == self.next_backward, f"stage {self.stage}: backward {m} out of order"
        mb = self.pending.pop(m)
        if self.is_last:
            loss = self._total_loss(mb)
            scale = self.loss_scale()
            mb.meta = (scale, float(loss.detach()))
            upstream_overflow = self._upstream_skips > self._skips_heard
            self._skips_heard = self._upstream_skips
        else:
            scale, value = self.comm.recv_meta(2, mb.micro[0].meta)
            mb.meta = (scale, value)
            loss, upstream_overflow = torch.tensor(value), False

        def backward(tensor: Tensor) -> None:
            if self.is_last:
                self._backward_last(mb, tensor)
                return
            # consecutive micro-batches whose forwards read the same weights share their backward weights (W~ is
            # built once) and, under the graph rule, one exchange of the weights their graphs saved
            runs = itertools.groupby(range(len(mb.sizes)), key=lambda j: (mb.micro[j].version, id(mb.micro[j].leaves)))
            for (version, _), js in runs:
                self._backward_micros(mb, version, list(js))
            self.weight_grads.flush()  # every run's Linear weight gradients, in one product per weight

        # the update of mini-batch m uses the learning rates of the step m entered in, on every stage (a scheduler
        # has moved on by the time a stage steps for it, by as many steps as the stage is behind)
        groups = self.optimizer.param_groups
        current = [g["lr"] for g in groups]
        for g, lr in zip(groups, mb.lrs, strict=True):
            g["lr"] = lr
        try:
            skipped = self.update(
                loss, backward, scale=scale, upstream_overflow=upstream_overflow, stepping=lambda: self._stepping(mb)
            )
        finally:
            for g, lr in zip(groups, current, strict=True):
                g["lr"] = lr
            self.weight_grads.discard()  # (what a failed backward kept)
        self.skipped += int(skipped)
        if self.is_last:
            self.finished[m] = mb.outputs
        self.next_backward = m + 1
        self.trace[-1].append(TraceEntry(Op(OpKind.BACKWARD, m, None), self.store.version))

    @contextmanager
    def _stepping(self, mb: _MiniBatch) -> Iterator[None]:
        """Around the optimizer step of ``mb``'s update: what trained, the stale versions let go, the step timed and
        made a new weight version."""
        for p in self.store.params:
            if p.grad is not None:
                self.trained.add(id(p))
        for record in mb.micro.values():  # the backward is done: its stale version is needed no more
            if record.pinned:
                self.store.unpin(record.version)
        self.learning_rates.append([g["lr"] for g in self.optimizer.param_groups])  # what optimizer.step() reads
        start = time.perf_counter()
        try:
            with self.store.stepping():
                yield
        finally:
            self._step_s = time.perf_counter() - start

    def _total_loss(self, mb: _MiniBatch) -> Tensor:
        """The last stage: the mini-batch loss, its micro-batch losses weighted by ``stage.loss_weights``."""
        total = None
        for j, record in sorted(mb.micro.items()):
            assert record.loss is not None
            if not record.loss.requires_grad:
                raise RuntimeError(
                    "the loss returned by training_step does not require grad; it cannot be back-propagated"
                )
            term = record.loss * mb.weights[j]
            total = term if total is None else total + term
        assert total is not None
        return total

    def _backward_last(self, mb: _MiniBatch, total: Tensor) -> None:
        """Back-propagate ``total`` (the mini-batch loss, scaled by the precision hook) through every micro-batch's
        graph, then send the inputs' gradients back."""
        sets: dict[int, LeafSet] = {}
        for record in mb.micro.values():
            assert record.leaves is not None
            sets.setdefault(id(record.leaves), record.leaves)
            self.stats.staleness.append(self.store.version - record.version)
        for leaves in sets.values():
            self.store.lend_grads(leaves)
        with _reading_all(self.store, self.policy, self.alpha, list(sets.values())), self.weight_grads.deferring():
            if len(sets) == 1:
                self._as_in_forward(next(iter(sets.values())), [total], None)
            else:  # (forwards that read several versions: rerun code reads the live weights)
                torch.autograd.backward(total)
        for leaves in sets.values():
            self._retarget(leaves)
        self.weight_grads.flush()
        for leaves in sets.values():
            self.store.harvest(leaves)
        if not self.is_first:
            for j in range(len(mb.sizes)):
                self._send_gradients(mb, j)

    def _backward_micros(self, mb: _MiniBatch, version: int, js: list[int]) -> None:
        """Back-propagate micro-batches ``js`` of ``mb``, whose forwards read weight ``version``, in order."""
        graph = mb.micro[js[0]].leaves  # the same leaf set for all of js (None: the recompute rule)
        if graph is not None:  # graph rule: the saved weights read the backward weights
            leaves = graph
            self.store.lend_grads(leaves)
            readers = sum(mb.micro[j].pinned for j in js)
            with (
                self.store.reading_backward(leaves, self.policy, version, self.alpha, readers) as d,
                self.weight_grads.deferring(),
            ):
                self.stats.staleness += [d] * len(js)
                for j in js:
                    record = mb.micro[j]
                    pairs = self.comm.recv_gradients(record.outputs, record.grads)
                    if pairs:
                        self._as_in_forward(leaves, [o for o, _ in pairs], [g for _, g in pairs])
                    self._send_gradients(mb, j)
            self._retarget(leaves)
            self.store.harvest(leaves)
            return
        # recompute: rerun the stage with the backward weights
        values, d = self.store.backward_values(self.policy, version, self.alpha)
        self.stats.staleness += [d] * len(js)
        if values[0].data_ptr() == self.store.params[0].data_ptr():
            leaves = self.store.live_leaves()
        else:
            leaves = LeafSet(-1, values, self.store.params)
        self.store.lend_grads(leaves)
        for j in js:
            record = mb.micro[j]
            with self._drawing_again(record.rng), _buffers_kept(self.root):
                _, out = self._stage_forward(mb, j, record.inputs, leaves)
            pairs = self.comm.recv_gradients(out, record.grads)
            if pairs:
                with self.weight_grads.deferring():
                    self._as_in_forward(leaves, [o for o, _ in pairs], [g for _, g in pairs])
            self._send_gradients(mb, j)
        self._retarget(leaves)
        self.store.harvest(leaves)

    def _as_in_forward(self, leaves: LeafSet, outputs: list[Tensor], grads: list[Tensor] | None) -> None:
        """Back-propagate with the stage's parameters replaced by ``leaves``, as in the forwards: code the backward
        reruns (``torch.utils.checkpoint``'s recomputation) reads the leaves, whose storage holds the weights this
        backward reads, instead of the live parameters."""

        def backward() -> None:
            torch.autograd.backward(outputs, grads)

        functional_call(self._call, dict(zip(self._call_names, leaves.leaves, strict=True)), (backward,), strict=False)

    @contextmanager
    def _drawing_again(self, rng: Any) -> Iterator[None]:
        """A recomputed forward draws what its forward drew: the step's code from the global generators as they
        stood then, the layers from the stage's stream as it stood then (streams.py)."""
        if rng is None:
            yield
            return
        outer, layers = rng
        streams = self.module.streams
        with _rng_restored(outer), streams.layers.replaying(layers) if streams is not None else nullcontext():
            yield

    def _retarget(self, leaves: LeafSet) -> None:
        """Send what the deferred Linear layers kept for ``leaves`` to the parameters' gradients, where the mini-batch's
        flush takes it in one product per weight with the other leaf sets' (:meth:`WeightGradients.retarget`)."""
        if self.weight_grads.layers:
            self.weight_grads.retarget(zip(leaves.leaves, self.store.params, strict=True))

    def _send_gradients(self, mb: _MiniBatch, j: int) -> None:
        if not self.is_first:
            if j == 0:
                self.comm.send_meta(mb.meta)
            self.comm.send_gradients(mb.micro[j].inputs)


class _Call(nn.Module):
    """Lets :func:`torch.func.functional_call` run arbitrary code (the user's step) with replaced parameters."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.m = module

    def forward(self, body: Callable[[], Any]) -> Any:
        return body()


@contextmanager
def _reading_all(
    store: VersionStore, policy: Policy, alpha: Callable[[int], float], sets: list[LeafSet]
) -> Iterator[None]:
    if not sets:
        yield
        return
    first, rest = sets[0], sets[1:]
    with (
        store.reading_backward(first, policy, first.version, alpha, alone=not rest),
        _reading_all(store, policy, alpha, rest),
    ):
        yield


class _Recast:
    """A low-precision copy of a weight leaf (or a view of one) that a forward's graph saved, remade at backward."""

    __slots__ = ("dtype", "leaf", "view")

    def __init__(self, leaf: Tensor, dtype: torch.dtype, view: tuple[Any, ...] | None) -> None:
        self.leaf, self.dtype, self.view = leaf, dtype, view


def _recasting(leaves: Sequence[Tensor]) -> AbstractContextManager:
    """Under autocast an op casts each weight to bfloat16/float16 and its graph saves that copy, not the weight, so
    the graph rule (which makes the saved weights read the backward weights by swapping the leaves' data) would not
    reach it: the backward would read the forward's weights whatever the policy. Saved copies of ``leaves`` (and
    views of them) are therefore not kept but cast again from the leaf at backward time, when it holds the backward
    weights. Where those equal the forward's (d = 0) the copy is the same as the one the forward made."""
    ids = {id(t) for t in leaves}

    def pack(t: Tensor) -> Any:
        base = compat.view_base(t)
        fn = base.grad_fn
        if fn is None or fn.name() != "ToCopyBackward0" or not fn.next_functions:
            return t
        leaf = getattr(fn.next_functions[0][0], "variable", None)
        if leaf is None or id(leaf) not in ids or leaf.dtype == base.dtype:
            return t
        view = (t.size(), t.stride(), t.storage_offset()) if t is not base else None
        return _Recast(leaf, base.dtype, view)

    def unpack(saved: Any) -> Tensor:
        if not isinstance(saved, _Recast):
            return saved
        copy = saved.leaf.detach().to(saved.dtype)
        return copy.as_strided(*saved.view) if saved.view is not None else copy

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


@contextmanager
def _buffers_kept(module: nn.Module) -> Iterator[None]:
    """Rerunning a forward must not update ``module``'s buffers a second time (BatchNorm's running statistics
    and its batch count: the forward it repeats updated them already): they are put back as they were before."""
    kept = [(name, b, b.clone()) for name, b in module.named_buffers() if not b.is_meta]
    try:
        yield
    finally:
        with torch.no_grad():
            for name, b, before in kept:
                # through .data: the rerun's graph may have saved the buffer (batch norm saves its running
                # statistics, unused by its backward in training), and an in-place write would fail that backward
                b.data.copy_(before)
                owner, _, attr = name.rpartition(".")
                setattr(module.get_submodule(owner), attr, b)  # (in case the forward assigned a new tensor)


def _rng_state() -> tuple[Tensor, list[Tensor]]:
    cuda = (
        [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_initialized() else []
    )
    return torch.get_rng_state(), cuda


@contextmanager
def _rng_restored(state: tuple[Tensor, list[Tensor]] | None) -> Iterator[None]:
    if state is None:
        yield
        return
    cpu, cuda = state
    devices = list(range(len(cuda)))
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(cpu)
        for i, s in enumerate(cuda):
            torch.cuda.set_rng_state(s, i)
        yield
