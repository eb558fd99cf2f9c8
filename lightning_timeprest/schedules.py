"""Pipeline schedules as data.

A schedule says, for every stage, the order in which that stage runs its operations. It is pure data: no
process, tensor or device is involved, so a schedule can be built, validated and simulated in a unit test.
The runtime (:mod:`lightning_timeprest.runtime`) executes one stage's list of ops and owns all side effects.

Two timing models. :func:`simulate` is the unit-slot model the TiMePReSt paper draws its grids in: every op takes
one slot, a stage runs at most one op per slot, and an op may only use results produced in earlier slots.
:func:`timeline` gives ops their costs (:class:`OpCosts`: a backward costs about twice its forward, and an nF1B
backward covers N micro-batches and is followed by an optimizer step; it passes each micro-batch's gradient on as
it goes, :meth:`OpCosts.backward_times`), which is what :func:`busy_fractions` measures a schedule's ideal with.

The nF1B order (TiMePReSt's asynchronous schedule) is generated, not written down: :class:`NF1BOrder` says how.
With ``costs=None`` it is the paper's unit-slot grid; with op costs it is list scheduling under the same four rules
(forwards in order, one backward per mini-batch on the last stage after its N forwards, an optimizer step right
after each backward, a ready backward before a ready forward): each stage runs the op that can start earliest.
In the unit-slot grid a stage waits for a backward that costs N forwards; the cost-aware order fills that time
with forwards of later mini-batches (at most ``max_inflight`` held), so its busy fraction is close to 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum

from lightning_timeprest.errors import ScheduleError

__all__ = [
    "ASYNCHRONOUS_SCHEDULES",
    "CAP_TOLERANCE",
    "SCHEDULES",
    "SYNCHRONOUS_SCHEDULES",
    "NF1BOrder",
    "Op",
    "OpCosts",
    "OpKind",
    "OrderChoice",
    "Schedule",
    "ScheduleError",
    "StreamPlan",
    "build_schedule",
    "busy_fractions",
    "choose_order",
    "gpipe",
    "nf1b",
    "one_f_one_b",
    "pipedream_1f1b",
    "render_grid",
    "simulate",
    "staleness",
    "steady_state",
    "timeline",
    "validate",
    "version_difference",
    "weight_versions",
]


class OpKind(str, Enum):
    FORWARD = "F"
    BACKWARD = "B"


@dataclass(frozen=True, order=True)
class Op:
    """One unit of work on one stage.

    ``microbatch`` is the index of the micro-batch inside its mini-batch; ``None`` on a backward op means the
    op back-propagates every micro-batch of the mini-batch at once (the nF1B rule of TiMePReSt).
    """

    kind: OpKind
    minibatch: int
    microbatch: int | None

    def __str__(self) -> str:
        mb = "*" if self.microbatch is None else str(self.microbatch)
        return f"{self.kind.value}{self.minibatch}.{mb}"


@dataclass(frozen=True)
class Schedule:
    """The per-stage op order of a pipeline schedule.

    ``stage_ops[s]`` is the exact order stage ``s`` executes. ``synchronous`` schedules flush the pipeline after
    every mini-batch and take one optimizer step per mini-batch, outside the schedule.
    """

    name: str
    num_stages: int
    num_microbatches: int
    stage_ops: tuple[tuple[Op, ...], ...]
    synchronous: bool

    def ops(self, stage: int) -> tuple[Op, ...]:
        return self.stage_ops[stage]

    def max_forwards_in_flight(self, stage: int) -> int:
        """The largest number of micro-batches whose activations ``stage`` holds at once (memory pressure)."""
        held: set[tuple[int, int | None]] = set()
        peak = 0
        for op in self.stage_ops[stage]:
            if op.kind is OpKind.FORWARD:
                held.add((op.minibatch, op.microbatch))
                peak = max(peak, len(held))
            elif op.microbatch is None:
                held = {h for h in held if h[0] != op.minibatch}
            else:
                held.discard((op.minibatch, op.microbatch))
        return peak


@dataclass(frozen=True)
class OpCosts:
    """How long each stage's ops take (any unit, e.g. seconds): ``forward[s]`` and ``backward[s]`` per micro-batch,
    ``step[s]`` for the optimizer step after an asynchronous backward (and after a synchronous flush), and
    ``transfer`` for an activation or gradient between neighbouring stages.

    An nF1B backward op covers the N micro-batches of its mini-batch and is followed by the step:
    :meth:`backward_op` is ``N * backward[s] + step[s]``.
    """

    forward: tuple[float, ...]
    backward: tuple[float, ...]
    step: tuple[float, ...] = ()
    transfer: float = 0.0

    def __post_init__(self) -> None:
        step = self.step or (0.0,) * len(self.forward)
        object.__setattr__(self, "forward", tuple(float(c) for c in self.forward))
        object.__setattr__(self, "backward", tuple(float(c) for c in self.backward))
        object.__setattr__(self, "step", tuple(float(c) for c in step))
        if not self.forward or not len(self.forward) == len(self.backward) == len(self.step):
            raise ScheduleError(
                f"op costs need one forward, backward and step cost per stage, got {len(self.forward)}, "
                f"{len(self.backward)} and {len(self.step)}"
            )
        # list scheduling relies on every op taking time (an op never ends when it starts)
        if min(self.forward + self.backward) <= 0 or min(self.step) < 0 or self.transfer < 0:
            raise ScheduleError(f"op costs must be positive (steps and transfers may be 0), got {self}")

    @classmethod
    def uniform(cls, num_stages: int, forward: float = 1.0, backward: float = 2.0, step: float = 0.0) -> OpCosts:
        """Every stage alike; the default is the usual ratio of dense layers (a backward costs two forwards)."""
        return cls((forward,) * num_stages, (backward,) * num_stages, (step,) * num_stages)

    @property
    def num_stages(self) -> int:
        return len(self.forward)

    def backward_op(self, stage: int, num_microbatches: int) -> float:
        """An nF1B backward of a whole mini-batch, with its optimizer step (compute only; see
        :meth:`backward_times` for when it ends)."""
        return num_microbatches * self.backward[stage] + self.step[stage]

    def backward_times(
        self, stage: int, num_microbatches: int, start: float, grads: Sequence[float] | None
    ) -> tuple[float, list[float]]:
        """When an nF1B backward op on ``stage`` that starts at ``start`` ends, and when the gradient of each of its
        micro-batches' inputs leaves for the stage before.

        ``grads`` are the times the gradients of the stage's outputs arrive, one per micro-batch (``None`` on the
        last stage, which back-propagates the mini-batch loss through every micro-batch in one pass and sends the
        N gradients after it). A stage before the last back-propagates each micro-batch when its gradient has
        arrived and sends its input's gradient on at once, so consecutive stages overlap their backwards; each
        stage's optimizer step follows its last micro-batch and delays nobody else.
        """
        cost = self.backward[stage]
        if grads is None:
            done = start + num_microbatches * cost
            sent = [done] * num_microbatches
        else:
            done, sent = start, []
            for arrival in grads:
                done = max(done, arrival) + cost
                sent.append(done)
        return done + self.step[stage], sent

    def rounded(self, digits: int = 2) -> OpCosts:
        """The costs relative to the mean forward, to ``digits`` significant digits: measured costs that differ by
        noise give the same order, and the order no longer depends on the unit."""
        unit = sum(self.forward) / len(self.forward)

        def r(x: float) -> float:
            return float(f"{x / unit:.{digits}g}") if x > 0 else 0.0

        return OpCosts(
            tuple(map(r, self.forward)), tuple(map(r, self.backward)), tuple(map(r, self.step)), r(self.transfer)
        )


@dataclass(frozen=True)
class NF1BOrder:
    """How the op order of an nF1B stream is generated.

    ``costs=None`` gives the TiMePReSt paper's unit-slot grid (every op one slot). With :class:`OpCosts` the order
    is list scheduling: every stage runs the op that can start earliest (a backward first on ties), under nF1B's
    rules. ``max_inflight`` caps the mini-batches a stage holds (forwarded, backward not yet run); ``None`` sets
    no cap.
    """

    costs: OpCosts | None = None
    max_inflight: int | None = None

    def __post_init__(self) -> None:
        if self.max_inflight is not None and self.max_inflight < 1:
            raise ScheduleError(f"max_inflight must be >= 1 or None, got {self.max_inflight}")

    def cap(self) -> Callable[[int], int] | None:
        limit = self.max_inflight
        return None if limit is None else (lambda stage: limit)


def _check_shape(num_stages: int, num_microbatches: int) -> None:
    if num_stages < 1:
        raise ScheduleError(f"a pipeline needs at least one stage, got num_stages={num_stages}")
    if num_microbatches < 1:
        raise ScheduleError(f"num_microbatches must be >= 1, got {num_microbatches}")


def gpipe(num_stages: int, num_microbatches: int, minibatch: int = 0) -> Schedule:
    """GPipe: every stage runs all forwards, then all backwards in reverse micro-batch order."""
    _check_shape(num_stages, num_microbatches)
    n = num_microbatches
    fwd = [Op(OpKind.FORWARD, minibatch, j) for j in range(n)]
    bwd = [Op(OpKind.BACKWARD, minibatch, j) for j in reversed(range(n))]
    ops = tuple(tuple(fwd + bwd) for _ in range(num_stages))
    return validate(Schedule("gpipe", num_stages, n, ops, synchronous=True))


def one_f_one_b(num_stages: int, num_microbatches: int, minibatch: int = 0) -> Schedule:
    """1F1B with a flush (PipeDream-Flush): warm-up forwards, alternate one forward and one backward, cool down.

    Stage ``s`` runs ``min(N, W - s - 1)`` warm-up forwards, so it never holds more than ``W - s`` micro-batches'
    activations (GPipe holds ``N``).
    """
    _check_shape(num_stages, num_microbatches)
    n = num_microbatches
    stage_ops = []
    for s in range(num_stages):
        warmup = min(n, num_stages - s - 1)
        ops = [Op(OpKind.FORWARD, minibatch, j) for j in range(warmup)]
        for i in range(n - warmup):
            ops.append(Op(OpKind.FORWARD, minibatch, warmup + i))
            ops.append(Op(OpKind.BACKWARD, minibatch, i))
        ops.extend(Op(OpKind.BACKWARD, minibatch, j) for j in range(n - warmup, n))
        stage_ops.append(tuple(ops))
    return validate(Schedule("1f1b", num_stages, n, tuple(stage_ops), synchronous=True))


SYNCHRONOUS_SCHEDULES: dict[str, Callable[[int, int], Schedule]] = {"gpipe": gpipe, "1f1b": one_f_one_b}
#: The asynchronous policies (weight-version rules); ``pipedream`` runs PipeDream's 1F1B, the others nF1B.
ASYNCHRONOUS_SCHEDULES: tuple[str, ...] = ("timeprest_v", "timeprest", "timeprest_i", "pipedream")
#: Every schedule name the strategy accepts.
SCHEDULES: tuple[str, ...] = (*SYNCHRONOUS_SCHEDULES, *ASYNCHRONOUS_SCHEDULES)
#: :func:`choose_order` takes the smallest cap whose simulated steady state is within this fraction of the fastest.
#: The simulation leaves out what holding more mini-batches costs (their activations in memory, a longer drain).
#: On the pinned MLP at W = 2, N = 4, max_inflight=2 ran 8-11% faster than 3 in three same-session pairs, and on
#: GPT as fast (2 of 3 pairs ahead), with half the drain, where the simulation on the measured op costs put 3
#: ahead by 3-12%; with 1% the choice flipped between the two on noise in those costs.
CAP_TOLERANCE = 0.03


def build_schedule(
    name: str, num_stages: int, num_microbatches: int, num_minibatches: int = 1, order: NF1BOrder | None = None
) -> Schedule:
    """Build the schedule called ``name`` (one of :data:`SCHEDULES`).

    Synchronous schedules cover one mini-batch; asynchronous ones ``num_minibatches``, drained at the end (nF1B in
    ``order``, the unit-slot grid by default).
    """
    if name in SYNCHRONOUS_SCHEDULES:
        return SYNCHRONOUS_SCHEDULES[name](num_stages, num_microbatches)
    if name == "pipedream":
        return pipedream_1f1b(num_stages, num_minibatches)
    if name in ASYNCHRONOUS_SCHEDULES:
        return nf1b(num_stages, num_microbatches, num_minibatches, order)
    raise ScheduleError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


# -- asynchronous schedules: several mini-batches in flight, one optimizer step per mini-batch per stage -------

#: An op as a generator emits it: (stage, op), in an order in which every op comes after the ops it needs.
Event = tuple[int, Op]


def _unit_stream(
    num_stages: int, num_microbatches: int, num_minibatches: int | None, cap: Callable[[int], int] | None
) -> Iterator[Event]:
    """The ops of a greedy asynchronous schedule in the unit-slot model, slot by slot.

    The rules, on every stage and in every slot: a ready backward runs first (backward priority); otherwise the
    next forward, in mini-batch and micro-batch order, if its input is ready and, with ``cap``, the stage holds
    fewer than ``cap(stage)`` mini-batches in flight. The last stage's backward of mini-batch ``m`` is ready once
    all ``N`` forwards of ``m`` ran there; an earlier stage's once the next stage ran it. Backwards carry the
    whole mini-batch (``microbatch=None``). An op may use only results of earlier slots.

    ``num_minibatches=None`` streams forever; otherwise the schedule ends when stage 0 ran the last backward.
    """
    w, n = num_stages, num_microbatches
    last = w - 1
    fwd_slot: dict[tuple[int, int, int], int] = {}
    bwd_slot: dict[tuple[int, int], int] = {}
    next_fwd = [0] * w  # flat forward index m * n + j
    next_bwd = [0] * w
    slot = 0
    while num_minibatches is None or next_bwd[0] < num_minibatches:
        row: list[Op | None] = [None] * w
        for s in range(w):
            m = next_bwd[s]
            if m < next_fwd[s] // n and (
                bwd_slot.get((s + 1, m), slot) < slot
                if s < last
                else all(fwd_slot.get((s, m, j), slot) < slot for j in range(n))
            ):
                row[s] = Op(OpKind.BACKWARD, m, None)
                continue
            mb, j = divmod(next_fwd[s], n)
            if num_minibatches is not None and mb >= num_minibatches:
                continue
            if s > 0 and fwd_slot.get((s - 1, mb, j), slot) >= slot:
                continue
            if cap is not None and j == 0 and mb - next_bwd[s] >= cap(s):
                continue
            row[s] = Op(OpKind.FORWARD, mb, j)
        if all(op is None for op in row):
            raise ScheduleError(f"asynchronous schedule deadlocks at slot {slot}")  # cannot happen with cap >= 1
        for s, op in enumerate(row):
            if op is None:
                continue
            if op.kind is OpKind.BACKWARD:
                bwd_slot[(s, op.minibatch)] = slot
                next_bwd[s] += 1
                if s == 0:  # every stage is done with this mini-batch: forget it
                    for t in range(w):
                        bwd_slot.pop((t, op.minibatch), None)
                        for j in range(n):
                            fwd_slot.pop((t, op.minibatch, j), None)
            else:
                assert op.microbatch is not None
                fwd_slot[(s, op.minibatch, op.microbatch)] = slot
                next_fwd[s] += 1
            yield s, op
        slot += 1


def _cost_stream(
    num_microbatches: int, num_minibatches: int | None, costs: OpCosts, cap: Callable[[int], int] | None
) -> Iterator[tuple[int, Op, float, float]]:
    """The nF1B ops in list-scheduling order, as ``(stage, op, start, end)``: of every op whose inputs exist (or
    will, once an op already placed ends), the one that can start earliest is placed next, a backward before a
    forward on ties, then the lower stage. The same rules as :func:`_unit_stream`; only the timing model differs.

    Placing ops in order of their start times is exact: an op not placed yet starts no earlier than the one being
    placed, and ends later (every op takes time), so nothing it enables could have started earlier.
    """
    w, n = costs.num_stages, num_microbatches
    last = w - 1
    fwd_end: dict[tuple[int, int, int], float] = {}
    bwd_sent: dict[tuple[int, int], list[float]] = {}  # when each micro-batch's gradient leaves a stage's backward
    free = [0.0] * w
    next_fwd = [0] * w
    next_bwd = [0] * w
    while num_minibatches is None or next_bwd[0] < num_minibatches:
        best: tuple[float, int, int] | None = None  # (start, 0 for a backward / 1 for a forward, stage)
        for s in range(w):
            m = next_bwd[s]
            if m < next_fwd[s] // n:  # every forward of m was placed here
                ready: float | None = fwd_end[(s, m, n - 1)]  # (a stage's forwards end in order)
                if s < last:  # from the first gradient's arrival on
                    sent = bwd_sent.get((s + 1, m))
                    ready = None if sent is None else max(fwd_end[(s, m, n - 1)], sent[0] + costs.transfer)
                if ready is not None:
                    best = min(best or (math.inf, 0, 0), (max(free[s], ready), 0, s))
            mb, j = divmod(next_fwd[s], n)
            if num_minibatches is not None and mb >= num_minibatches:
                continue
            if cap is not None and j == 0 and mb - next_bwd[s] >= cap(s):
                continue
            if s == 0:
                best = min(best or (math.inf, 0, 0), (free[s], 1, s))
            elif (s - 1, mb, j) in fwd_end:
                best = min(best or (math.inf, 0, 0), (max(free[s], fwd_end[(s - 1, mb, j)] + costs.transfer), 1, s))
        if best is None:
            raise ScheduleError("asynchronous schedule deadlocks")  # cannot happen with a cap >= 1
        start, kind, s = best
        if kind == 0:
            m = next_bwd[s]
            grads = None if s == last else [t + costs.transfer for t in bwd_sent[(s + 1, m)]]
            free[s], bwd_sent[(s, m)] = costs.backward_times(s, n, start, grads)
            next_bwd[s] += 1
            if s == 0:  # every stage is done with this mini-batch: forget it
                for t in range(w):
                    bwd_sent.pop((t, m), None)
                    for j in range(n):
                        fwd_end.pop((t, m, j), None)
            yield s, Op(OpKind.BACKWARD, m, None), start, free[s]
        else:
            mb, j = divmod(next_fwd[s], n)
            free[s] = fwd_end[(s, mb, j)] = start + costs.forward[s]
            next_fwd[s] += 1
            yield s, Op(OpKind.FORWARD, mb, j), start, free[s]


def _pipedream_cap(num_stages: int) -> Callable[[int], int]:
    return lambda stage: num_stages - stage


def _events(
    name: str, num_stages: int, num_microbatches: int, num_minibatches: int | None, order: NF1BOrder | None
) -> Iterator[Event]:
    """The ops of the asynchronous schedule ``name`` (pipedream, or nF1B generated as ``order`` says)."""
    if name == "pipedream":
        return _unit_stream(num_stages, 1, num_minibatches, _pipedream_cap(num_stages))
    order = order or NF1BOrder()
    if order.costs is None:
        return _unit_stream(num_stages, num_microbatches, num_minibatches, order.cap())
    if order.costs.num_stages != num_stages:
        raise ScheduleError(f"op costs for {order.costs.num_stages} stages given for {num_stages} stages")
    return ((s, op) for s, op, _, _ in _cost_stream(num_microbatches, num_minibatches, order.costs, order.cap()))


def _finite(
    name: str, num_stages: int, num_microbatches: int, num_minibatches: int, order: NF1BOrder | None
) -> Schedule:
    _check_shape(num_stages, num_microbatches)
    if num_minibatches < 1:
        raise ScheduleError(f"num_minibatches must be >= 1, got {num_minibatches}")
    ops: list[list[Op]] = [[] for _ in range(num_stages)]
    for s, op in _events(name, num_stages, num_microbatches, num_minibatches, order):
        ops[s].append(op)
    label = "pipedream" if name == "pipedream" else "nf1b"
    return validate(Schedule(label, num_stages, num_microbatches, tuple(map(tuple, ops)), synchronous=False))


def nf1b(num_stages: int, num_microbatches: int, num_minibatches: int, order: NF1BOrder | None = None) -> Schedule:
    """TiMePReSt's nF1B for ``num_minibatches`` mini-batches, drained at the end.

    Each mini-batch is split into ``N`` micro-batches that flow forward one by one; the last stage runs ONE
    backward op per mini-batch once its ``N`` forwards are done, and that op travels back stage by stage; every
    stage takes its optimizer step right after it. Backward has priority. ``order`` says how the order is generated
    (default: the paper's unit-slot grid, stage 0 admitting forwards without a cap).
    """
    return _finite("nf1b", num_stages, num_microbatches, num_minibatches, order)


def pipedream_1f1b(num_stages: int, num_minibatches: int) -> Schedule:
    """PipeDream's asynchronous 1F1B: one unit per mini-batch, stage ``s`` holds at most ``W - s`` in flight."""
    return _finite("pipedream", num_stages, 1, num_minibatches, None)


class StreamPlan:
    """The per-stage op order of an asynchronous schedule over an open-ended stream of mini-batches.

    Lightning hands the strategy one mini-batch per ``training_step`` without saying how many will follow, so
    the runtime asks, step by step, for the ops a stage runs while mini-batch ``k`` is the newest one:
    :meth:`step_ops` gives the ops from the first forward of ``k`` up to (not including) the first forward of
    ``k + 1``. Everything a stage needs in that window was produced by other stages in steps up to ``k``, so
    executing the windows step by step never waits on the future. :meth:`drain_ops` gives the backwards still
    owed when the stream stops (epoch end, validation, checkpoint). The concatenation equals the finite
    schedule (:func:`nf1b`, :func:`pipedream_1f1b`) for the same number of mini-batches and the same ``order``.
    """

    def __init__(
        self,
        name: str,
        num_stages: int,
        num_microbatches: int,
        track: Iterable[int] | None = None,
        order: NF1BOrder | None = None,
    ) -> None:
        _check_shape(num_stages, num_microbatches)
        if name not in ASYNCHRONOUS_SCHEDULES:
            raise ScheduleError(f"{name!r} is not an asynchronous schedule ({', '.join(ASYNCHRONOUS_SCHEDULES)})")
        self.name = name
        self.num_stages = num_stages
        self.num_microbatches = num_microbatches
        self._events = _events(name, num_stages, num_microbatches, None, order)
        # ops are kept only for the stages someone asks about (``track``; default all)
        self._queues: dict[int, list[Op]] = {s: [] for s in (range(num_stages) if track is None else track)}
        self._next_backward = dict.fromkeys(self._queues, 0)

    def _pull_until(self, stage: int, op: Op) -> None:
        queue = self._queues[stage]
        while op not in queue[-1:]:
            s, got = next(self._events)
            if s in self._queues:
                self._queues[s].append(got)

    def step_ops(self, stage: int, minibatch: int) -> list[Op]:
        """The ops ``stage`` runs while ``minibatch`` is the newest mini-batch (call once per step, in order)."""
        first_of_next = Op(OpKind.FORWARD, minibatch + 1, 0)
        self._pull_until(stage, first_of_next)
        queue = self._queues[stage]
        ops, self._queues[stage] = queue[:-1], queue[-1:]
        if ops and ops[0] != Op(OpKind.FORWARD, minibatch, 0):
            raise ScheduleError(f"stage {stage}: step {minibatch} was asked out of order")
        self._next_backward[stage] += sum(op.kind is OpKind.BACKWARD for op in ops)
        return ops

    def drain_ops(self, stage: int, last_minibatch: int) -> list[Op]:
        """The backwards ``stage`` still owes once ``last_minibatch`` was the final mini-batch of the stream."""
        start = self._next_backward[stage]
        self._next_backward[stage] = last_minibatch + 1
        return [Op(OpKind.BACKWARD, m, None) for m in range(start, last_minibatch + 1)]


def weight_versions(schedule: Schedule) -> dict[tuple[int, Op], int]:
    """For every forward op, the number of optimizer steps its stage had taken when it ran (its weight version).

    One optimizer step per backward op; the op order per stage fixes everything.
    """
    versions: dict[tuple[int, Op], int] = {}
    for s, ops in enumerate(schedule.stage_ops):
        steps = 0
        for op in ops:
            if op.kind is OpKind.FORWARD:
                versions[(s, op)] = steps
            else:
                steps += 1
    return versions


def staleness(schedule: Schedule) -> list[list[int]]:
    """``d`` of every micro-batch backward per stage under live forward weights: steps taken at the backward minus
    the version the forward used (V-TiMePReSt, I-TiMePReSt and PipeDream read the live weights forward)."""
    versions = weight_versions(schedule)
    out: list[list[int]] = []
    for s, ops in enumerate(schedule.stage_ops):
        steps, ds = 0, []
        for op in ops:
            if op.kind is OpKind.BACKWARD:
                micro = range(schedule.num_microbatches) if op.microbatch is None else (op.microbatch,)
                ds += [steps - versions[(s, Op(OpKind.FORWARD, op.minibatch, j))] for j in micro]
                steps += 1
        out.append(ds)
    return out


def version_difference(num_stages: int, num_microbatches: int, order: NF1BOrder | None = None) -> int:
    """The version difference ``v`` of nF1B in ``order`` (default: the paper's unit-slot grid), by simulation.

    Simulates enough mini-batches to reach the steady state and takes ``d0``, the largest number of optimizer
    steps stage 0 takes between the forward and the backward of one mini-batch (the deepest staleness of the
    pipeline). An update chain of TiMePReSt closes every ``ceil(d0 / 2)`` mini-batches, so ``v = ceil(d0 / 2)``:
    in the unit-slot grid ``v = 1`` exactly when ``W <= N + 1``. (This project's operationalisation; see the
    README.)
    """
    _check_shape(num_stages, num_microbatches)
    if num_stages == 1:
        return 1
    minibatches = 6 * num_stages + 12
    d0 = max(staleness(nf1b(num_stages, num_microbatches, minibatches, order))[0])
    return max(1, -(-d0 // 2))


@dataclass(frozen=True)
class OrderChoice:
    """The nF1B order :func:`choose_order` picked, and what it gives up.

    ``busy`` is each stage's ideal busy fraction in the steady state of the chosen order (its op costs, transfers
    free), ``fastest_busy`` that of the fastest order considered; they differ when the fastest one is refused
    (``v > 1`` for V-TiMePReSt). ``in_flight`` is the micro-batches whose activations each stage holds at most.
    """

    order: NF1BOrder
    busy: tuple[float, ...]
    version_difference: int
    fastest_busy: tuple[float, ...]
    fastest_max_inflight: int | None
    in_flight: tuple[int, ...]

    def describe(self) -> str:
        order = self.order
        what = "the unit-slot grid" if order.costs is None else "cost-aware"
        cap = "no cap" if order.max_inflight is None else f"max_inflight={order.max_inflight}"
        text = (
            f"nF1B order: {what}, {cap}, v={self.version_difference}, ideal busy "
            f"{', '.join(f'{b:.2f}' for b in self.busy)}, micro-batches in flight {list(self.in_flight)}"
        )
        if min(self.fastest_busy) > min(self.busy) + 0.005:
            text += (
                f" (the fastest order, max_inflight={self.fastest_max_inflight}, would reach "
                f"{', '.join(f'{b:.2f}' for b in self.fastest_busy)} with v > 1)"
            )
        return text


def steady_state(
    num_stages: int, num_microbatches: int, order: NF1BOrder, costs: OpCosts
) -> tuple[tuple[float, ...], int, tuple[int, ...]]:
    """Each stage's busy fraction in the steady state of ``order`` when ops take ``costs`` (its work per mini-batch
    over the time between two mini-batches completing on stage 0, so fill and drain do not count), ``v``, and the
    micro-batches each stage holds at most."""
    w, n = num_stages, num_microbatches
    first, last = 4 * w + 8, 8 * w + 16  # the steady state is measured between these completions on stage 0
    done: dict[int, float] = {}
    held = [0] * w
    peak = [0] * w
    steps, entered, d0 = 0, {}, 0
    if order.costs != costs:  # the order (the unit-slot grid, or generated from other costs) timed with these
        times = timeline(nf1b(w, n, last + 1, order), costs)
        events = sorted(((start, s, op, end) for s in range(w) for op, start, end in times[s]), key=lambda e: e[:2])
        stream: Iterable[tuple[int, Op, float, float]] = ((s, op, start, end) for start, s, op, end in events)
    else:
        stream = _cost_stream(n, None, order.costs, order.cap())
    for s, op, _, end in stream:
        if op.kind is OpKind.FORWARD:
            held[s] += 1
            peak[s] = max(peak[s], held[s])
            if s == 0:
                entered.setdefault(op.minibatch, steps)
            continue
        held[s] -= n
        if s == 0:
            d0 = max(d0, steps - entered.pop(op.minibatch))
            steps += 1
            done[op.minibatch] = end
            if op.minibatch == last:
                break
    period = (done[last] - done[first]) / (last - first)
    work = [n * costs.forward[s] + costs.backward_op(s, n) for s in range(w)]
    return tuple(min(1.0, x / period) for x in work), max(1, -(-d0 // 2)) if w > 1 else 1, tuple(peak)


def choose_order(
    num_stages: int,
    num_microbatches: int,
    costs: OpCosts,
    max_inflight: int | None = None,
    *,
    staleness_free: bool = False,
    unit_grid: bool = False,
) -> OrderChoice:
    """The nF1B order to run with these op costs.

    With ``max_inflight=None`` the order is chosen for speed among the paper's unit-slot grid and the cost-aware
    orders with caps 1 to 2W + 2: the first whose steady state is within :data:`CAP_TOLERANCE` (3%) of the
    fastest's (the grid, else the smallest cap: least memory and staleness). ``staleness_free`` (V-TiMePReSt)
    keeps only orders with ``v = 1`` (``max_inflight=1`` always has it) and reports what that costs against the
    fastest. ``unit_grid`` gives the
    paper's grid (with ``max_inflight``, capped); ``costs`` then only measure it.
    """
    _check_shape(num_stages, num_microbatches)
    w, n = num_stages, num_microbatches
    if unit_grid:
        candidates = [NF1BOrder(None, max_inflight)]
    elif max_inflight is not None:
        candidates = [NF1BOrder(costs, max_inflight)]
    else:  # the paper's grid is an nF1B order too, and the fastest one when a backward costs about N forwards
        candidates = [NF1BOrder(None), *(NF1BOrder(costs, cap) for cap in range(1, 2 * w + 3))]
    scored = []
    for order in candidates:
        scored.append((order, *steady_state(w, n, order, costs)))
        if order.costs is not None and min(scored[-1][1]) >= 0.9995:  # no larger cap can be faster
            break
    best = max(min(entry[1]) for entry in scored)
    fastest = next(entry for entry in scored if min(entry[1]) >= best * (1 - CAP_TOLERANCE))
    allowed = [entry for entry in scored if entry[2] == 1] if staleness_free else scored
    allowed = allowed or scored  # (an explicit max_inflight with v > 1: the caller refuses it)
    top = max(min(entry[1]) for entry in allowed)
    # the cost-aware orders come by growing cap: the first within the tolerance of the top holds the least
    order, busy, v, in_flight = next(entry for entry in allowed if min(entry[1]) >= top * (1 - CAP_TOLERANCE))
    return OrderChoice(order, busy, v, fastest[1], fastest[0].max_inflight, in_flight)


def render_grid(
    num_stages: int,
    num_microbatches: int,
    num_minibatches: int,
    *,
    drain: bool = False,
    order: NF1BOrder | None = None,
    costs: OpCosts | None = None,
) -> str:
    """The nF1B grid in the TiMePReSt paper's notation, one line per stage.

    ``1A`` is the forward of micro-batch A of mini-batch 1, ``1`` the backward of mini-batch 1, ``.`` an idle
    slot. The grid runs until stage 0 has started the last mini-batch's forwards (the paper's figures);
    ``drain=True`` runs it to the end, every backward done. ``order`` says which order (default: the paper's
    unit-slot grid). With op costs (``costs``, else a cost-aware order's own) the slots are weighted by cost: an op
    fills as many slots as its cost is multiples of the cheapest op's, its name in the first and ``-`` in the
    others.
    """
    order = order or NF1BOrder()
    schedule = nf1b(num_stages, num_microbatches, num_minibatches, order)
    weights = costs or order.costs
    grid = simulate(schedule) if weights is None else _weighted_grid(schedule, weights)
    end = len(grid[0])
    if not drain:
        last = Op(OpKind.FORWARD, num_minibatches - 1, num_microbatches - 1)
        end = grid[0].index(last) + 1

    def token(op: Op | str | None) -> str:
        if op is None or isinstance(op, str):
            return op or "."
        if op.kind is OpKind.BACKWARD:
            return str(op.minibatch + 1)
        assert op.microbatch is not None
        return f"{op.minibatch + 1}{_letters(op.microbatch)}"

    width = max(len(token(op)) for r in grid for op in r[:end])
    rows = []
    for s, row in enumerate(grid):
        cells = [token(op) for op in row[:end]]
        rows.append(f"S{s + 1}: " + " ".join(t if t != "-" else "-" * width for t in (c.ljust(width) for c in cells)))
    return "\n".join(r.rstrip() for r in rows)


def _weighted_grid(schedule: Schedule, costs: OpCosts) -> list[list[Op | str | None]]:
    """The schedule's timeline in slots of the cheapest op's cost: an op's first slot holds it, its others ``-``."""
    times = timeline(schedule, costs)
    unit = min(end - start for ops in times for _, start, end in ops)
    grid: list[list[Op | str | None]] = []
    for ops in times:
        row: list[Op | str | None] = []
        for op, start, end in ops:
            first = round(start / unit)
            row += [None] * (first - len(row))
            row += [op] + ["-"] * (max(1, round((end - start) / unit)) - 1)
        grid.append(row)
    length = max(len(r) for r in grid)
    return [r + [None] * (length - len(r)) for r in grid]


def _letters(index: int) -> str:
    """0 -> A, 25 -> Z, 26 -> AA (spreadsheet column names)."""
    out = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        out = chr(ord("A") + rem) + out
    return out


def _dependencies(op: Op, stage: int, schedule: Schedule) -> Iterable[tuple[int, Op]]:
    """The (stage, op) pairs whose results ``op`` on ``stage`` consumes."""
    last = schedule.num_stages - 1
    if op.kind is OpKind.FORWARD:
        if stage > 0:
            yield stage - 1, op
        return
    micro = range(schedule.num_microbatches) if op.microbatch is None else (op.microbatch,)
    for j in micro:
        yield stage, Op(OpKind.FORWARD, op.minibatch, j)
    if stage < last:
        yield stage + 1, op


def simulate(schedule: Schedule) -> list[list[Op | None]]:
    """Run ``schedule`` in the unit-slot timing model and return ``grid[stage][slot]`` (``None`` = idle).

    Raises :class:`ScheduleError` if the order deadlocks (an op waits on a result that can never come).
    """
    done: dict[tuple[int, Op], int] = {}
    cursor = [0] * schedule.num_stages
    grid: list[list[Op | None]] = [[] for _ in range(schedule.num_stages)]
    total = sum(len(ops) for ops in schedule.stage_ops)
    slot = 0
    while len(done) < total:
        ran = []
        for s, ops in enumerate(schedule.stage_ops):
            op = ops[cursor[s]] if cursor[s] < len(ops) else None
            if op is not None and all(done.get(dep, slot) < slot for dep in _dependencies(op, s, schedule)):
                ran.append((s, op))
                grid[s].append(op)
                cursor[s] += 1
            else:
                grid[s].append(None)
        if not ran:
            stuck = {s: str(ops[cursor[s]]) for s, ops in enumerate(schedule.stage_ops) if cursor[s] < len(ops)}
            raise ScheduleError(f"schedule {schedule.name!r} deadlocks at slot {slot}: waiting ops {stuck}")
        for s, op in ran:
            done[(s, op)] = slot
        slot += 1
    return grid


def bubble_fraction(schedule: Schedule) -> float:
    """Idle slots over all slots in the unit-slot model: the schedule's ideal pipeline bubble."""
    grid = simulate(schedule)
    slots = len(grid[0]) * len(grid)
    return sum(op is None for row in grid for op in row) / slots


def timeline(schedule: Schedule, costs: OpCosts) -> list[list[tuple[Op, float, float]]]:
    """When each op of ``schedule`` starts and ends, per stage, if every op starts as soon as its stage is free and
    its inputs exist: ``timeline[s]`` lists ``(op, start, end)`` in the stage's order.

    A synchronous backward covers one micro-batch; an asynchronous one the N micro-batches of its mini-batch and
    the optimizer step after it, and starts when the first gradient has arrived (:meth:`OpCosts.backward_times`:
    it may then wait for the others, ``end - start`` is not its compute). An input from another stage arrives
    ``costs.transfer`` after its op ended (a gradient, after the micro-batch's backward there).
    """
    if costs.num_stages != schedule.num_stages:
        raise ScheduleError(f"op costs for {costs.num_stages} stages given for a {schedule.num_stages}-stage schedule")
    end: dict[tuple[int, Op], float] = {}
    sent: dict[tuple[int, Op], list[float]] = {}  # asynchronous backwards: when each micro-batch's gradient left
    last, n = schedule.num_stages - 1, schedule.num_microbatches
    free = [0.0] * schedule.num_stages
    cursor = [0] * schedule.num_stages
    out: list[list[tuple[Op, float, float]]] = [[] for _ in range(schedule.num_stages)]
    remaining = sum(len(ops) for ops in schedule.stage_ops)
    while remaining:
        progressed = False
        for s, ops in enumerate(schedule.stage_ops):
            while cursor[s] < len(ops):
                op = ops[cursor[s]]
                deps = list(_dependencies(op, s, schedule))
                if any(dep not in end for dep in deps):
                    break
                if op.kind is OpKind.BACKWARD and op.microbatch is None:
                    grads = None if s == last else [t + costs.transfer for t in sent[(s + 1, op)]]
                    own = [end[dep] for dep in deps if dep[0] == s]
                    start = max([free[s], *own, *(grads or [])[:1]])
                    stop, sent[(s, op)] = costs.backward_times(s, n, start, grads)
                else:
                    start = max([free[s], *(end[dep] + (costs.transfer if dep[0] != s else 0.0) for dep in deps)])
                    stop = start + _compute(op, s, costs, n)
                end[(s, op)] = free[s] = stop
                out[s].append((op, start, stop))
                cursor[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise ScheduleError(f"schedule {schedule.name!r} deadlocks")
    return out


def _compute(op: Op, stage: int, costs: OpCosts, num_microbatches: int) -> float:
    """What ``op`` computes on ``stage`` (an asynchronous backward may also wait inside, for gradients)."""
    if op.kind is OpKind.FORWARD:
        return costs.forward[stage]
    return costs.backward[stage] if op.microbatch is not None else costs.backward_op(stage, num_microbatches)


def _span(times: list[list[tuple[Op, float, float]]]) -> float:
    return max(end for ops in times for _, _, end in ops)


def busy_fractions(
    schedule: Schedule, forward_cost: float = 1.0, backward_cost: float = 2.0, *, costs: OpCosts | None = None
) -> list[float]:
    """Each stage's compute time over the schedule's span when ops take the given times: the ideal a stage's
    measured busy time over wall time is compared with.

    Every op starts as soon as its stage is free and its inputs exist (:func:`timeline`). ``costs`` gives each
    stage its own costs; otherwise every forward costs ``forward_cost`` and every backward of one micro-batch
    ``backward_cost`` (an asynchronous backward covers N of them). The default 1:2 is the usual forward:backward
    ratio of dense layers; with ``backward_cost=1`` (an asynchronous one ``1/N``) this is the unit-slot model of
    :func:`simulate` and :func:`bubble_fraction`. A synchronous schedule's optimizer step (``costs.step``) follows
    the flush on every stage.
    """
    costs = costs or OpCosts.uniform(schedule.num_stages, forward_cost, backward_cost)
    times = timeline(schedule, costs)
    busy = [sum(_compute(op, s, costs, schedule.num_microbatches) for op, _, _ in ops) for s, ops in enumerate(times)]
    span = _span(times)
    if schedule.synchronous:
        busy = [b + step for b, step in zip(busy, costs.step, strict=True)]
        span += max(costs.step)
    return [b / span for b in busy]


def validate(schedule: Schedule) -> Schedule:
    """Check that every stage runs every op exactly once and that the order can run; return ``schedule``.

    Raises :class:`ScheduleError` naming the first problem found.
    """
    if len(schedule.stage_ops) != schedule.num_stages:
        raise ScheduleError(f"{schedule.name}: {len(schedule.stage_ops)} op lists for {schedule.num_stages} stages")
    for s, ops in enumerate(schedule.stage_ops):
        if len(set(ops)) != len(ops):
            raise ScheduleError(f"{schedule.name}: stage {s} repeats an op")
        forwards = sorted(op for op in ops if op.kind is OpKind.FORWARD)
        wanted = sorted(
            Op(OpKind.FORWARD, m, j) for m in {op.minibatch for op in ops} for j in range(schedule.num_microbatches)
        )
        if forwards != wanted:
            raise ScheduleError(f"{schedule.name}: stage {s} does not run every forward exactly once")
        for op in ops:
            if op.kind is OpKind.BACKWARD and op.microbatch is not None:
                if Op(OpKind.FORWARD, op.minibatch, op.microbatch) not in forwards:
                    raise ScheduleError(f"{schedule.name}: stage {s} runs {op} without its forward")
        backwards = sorted(op for op in ops if op.kind is OpKind.BACKWARD)
        if schedule.synchronous:
            wanted_bwd = sorted(Op(OpKind.BACKWARD, f.minibatch, f.microbatch) for f in forwards)
        else:  # one backward op per mini-batch, in mini-batch order (each is followed by an optimizer step)
            wanted_bwd = [Op(OpKind.BACKWARD, m, None) for m in sorted({f.minibatch for f in forwards})]
            if [op for op in ops if op.kind is OpKind.BACKWARD] != wanted_bwd:
                raise ScheduleError(f"{schedule.name}: stage {s} must run one backward per mini-batch, in order")
        if backwards != wanted_bwd:
            raise ScheduleError(f"{schedule.name}: stage {s} does not run every backward exactly once")
    simulate(schedule)
    return schedule
