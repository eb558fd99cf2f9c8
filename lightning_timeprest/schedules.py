"""Pipeline schedules as data.

A schedule says, for every stage, the order in which that stage runs its operations. It is pure data: no
process, tensor or device is involved, so a schedule can be built, validated and simulated in a unit test.
The runtime (:mod:`lightning_timeprest.runtime`) executes one stage's list of ops and owns all side effects.

Timing model used by :func:`simulate`: every op takes one slot, a stage runs at most one op per slot, and an op
may only use results produced in earlier slots. This is the idealised model the TiMePReSt paper draws its
grids in; real runs differ in op durations, not in order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum

__all__ = [
    "SCHEDULES",
    "SYNCHRONOUS_SCHEDULES",
    "Op",
    "OpKind",
    "Schedule",
    "ScheduleError",
    "build_schedule",
    "gpipe",
    "one_f_one_b",
    "simulate",
    "validate",
]


class ScheduleError(ValueError):
    """A schedule is malformed: an op is missing or repeated, or its order can never run."""


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
#: Every schedule name the strategy accepts.
SCHEDULES: tuple[str, ...] = tuple(SYNCHRONOUS_SCHEDULES)


def build_schedule(name: str, num_stages: int, num_microbatches: int) -> Schedule:
    """Build the schedule called ``name`` (one of :data:`SCHEDULES`)."""
    try:
        factory = SYNCHRONOUS_SCHEDULES[name]
    except KeyError:
        raise ScheduleError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}") from None
    return factory(num_stages, num_microbatches)


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
        if schedule.synchronous:
            backwards = sorted(op for op in ops if op.kind is OpKind.BACKWARD)
            if backwards != sorted(Op(OpKind.BACKWARD, f.minibatch, f.microbatch) for f in forwards):
                raise ScheduleError(f"{schedule.name}: stage {s} does not run every backward exactly once")
    simulate(schedule)
    return schedule
