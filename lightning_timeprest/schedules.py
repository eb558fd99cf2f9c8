"""Pipeline schedules as data.

A schedule says, for every stage, the order in which that stage runs its operations. It is pure data: no
process, tensor or device is involved, so a schedule can be built, validated and simulated in a unit test.
The runtime (:mod:`lightning_timeprest.runtime`) executes one stage's list of ops and owns all side effects.

Timing model used by :func:`simulate`: every op takes one slot, a stage runs at most one op per slot, and an op
may only use results produced in earlier slots. This is the idealised model the TiMePReSt paper draws its
grids in; real runs differ in op durations, not in order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

__all__ = [
    "ASYNCHRONOUS_SCHEDULES",
    "SCHEDULES",
    "SYNCHRONOUS_SCHEDULES",
    "Op",
    "OpKind",
    "Schedule",
    "ScheduleError",
    "StreamPlan",
    "build_schedule",
    "busy_fractions",
    "gpipe",
    "nf1b",
    "one_f_one_b",
    "pipedream_1f1b",
    "render_grid",
    "simulate",
    "staleness",
    "validate",
    "version_difference",
    "weight_versions",
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
#: The asynchronous policies (weight-version rules); ``pipedream`` runs PipeDream's 1F1B, the others nF1B.
ASYNCHRONOUS_SCHEDULES: tuple[str, ...] = ("timeprest_v", "timeprest", "timeprest_i", "pipedream")
#: Every schedule name the strategy accepts.
SCHEDULES: tuple[str, ...] = (*SYNCHRONOUS_SCHEDULES, *ASYNCHRONOUS_SCHEDULES)


def build_schedule(name: str, num_stages: int, num_microbatches: int, num_minibatches: int = 1) -> Schedule:
    """Build the schedule called ``name`` (one of :data:`SCHEDULES`).

    Synchronous schedules cover one mini-batch; asynchronous ones ``num_minibatches``, drained at the end.
    """
    if name in SYNCHRONOUS_SCHEDULES:
        return SYNCHRONOUS_SCHEDULES[name](num_stages, num_microbatches)
    if name == "pipedream":
        return pipedream_1f1b(num_stages, num_minibatches)
    if name in ASYNCHRONOUS_SCHEDULES:
        return nf1b(num_stages, num_microbatches, num_minibatches)
    raise ScheduleError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


# -- asynchronous schedules: several mini-batches in flight, one optimizer step per mini-batch per stage -------


def _stream(
    num_stages: int, num_microbatches: int, num_minibatches: int | None, cap: Callable[[int], int] | None
) -> Iterator[list[Op | None]]:
    """Yield the slots of a greedy asynchronous schedule, one row (an op or ``None`` per stage) per slot.

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
        yield row
        slot += 1


def _pipedream_cap(num_stages: int) -> Callable[[int], int]:
    return lambda stage: num_stages - stage


def _finite(name: str, num_stages: int, num_microbatches: int, num_minibatches: int, cap: Any) -> Schedule:
    _check_shape(num_stages, num_microbatches)
    if num_minibatches < 1:
        raise ScheduleError(f"num_minibatches must be >= 1, got {num_minibatches}")
    ops: list[list[Op]] = [[] for _ in range(num_stages)]
    for row in _stream(num_stages, num_microbatches, num_minibatches, cap):
        for s, op in enumerate(row):
            if op is not None:
                ops[s].append(op)
    return validate(Schedule(name, num_stages, num_microbatches, tuple(map(tuple, ops)), synchronous=False))


def nf1b(num_stages: int, num_microbatches: int, num_minibatches: int) -> Schedule:
    """TiMePReSt's nF1B for ``num_minibatches`` mini-batches, drained at the end.

    Each mini-batch is split into ``N`` micro-batches that flow forward one by one; the last stage runs ONE
    backward op per mini-batch once its ``N`` forwards are done, and that op travels back stage by stage; every
    stage takes its optimizer step right after it. Backward has priority; stage 0 admits forwards without a cap.
    """
    return _finite("nf1b", num_stages, num_microbatches, num_minibatches, None)


def pipedream_1f1b(num_stages: int, num_minibatches: int) -> Schedule:
    """PipeDream's asynchronous 1F1B: one unit per mini-batch, stage ``s`` holds at most ``W - s`` in flight."""
    return _finite("pipedream", num_stages, 1, num_minibatches, _pipedream_cap(num_stages))


class StreamPlan:
    """The per-stage op order of an asynchronous schedule over an open-ended stream of mini-batches.

    Lightning hands the strategy one mini-batch per ``training_step`` without saying how many will follow, so
    the runtime asks, step by step, for the ops a stage runs while mini-batch ``k`` is the newest one:
    :meth:`step_ops` gives the ops from the first forward of ``k`` up to (not including) the first forward of
    ``k + 1``. Everything a stage needs in that window was produced by other stages in steps up to ``k``, so
    executing the windows step by step never waits on the future. :meth:`drain_ops` gives the backwards still
    owed when the stream stops (epoch end, validation, checkpoint). The concatenation equals the finite
    schedule (:func:`nf1b`, :func:`pipedream_1f1b`) for the same number of mini-batches.
    """

    def __init__(self, name: str, num_stages: int, num_microbatches: int, track: Iterable[int] | None = None) -> None:
        _check_shape(num_stages, num_microbatches)
        if name not in ASYNCHRONOUS_SCHEDULES:
            raise ScheduleError(f"{name!r} is not an asynchronous schedule ({', '.join(ASYNCHRONOUS_SCHEDULES)})")
        self.name = name
        self.num_stages = num_stages
        self.num_microbatches = num_microbatches
        cap = _pipedream_cap(num_stages) if name == "pipedream" else None
        self._slots = _stream(num_stages, num_microbatches, None, cap)
        # ops are kept only for the stages someone asks about (``track``; default all)
        self._queues: dict[int, list[Op]] = {s: [] for s in (range(num_stages) if track is None else track)}
        self._next_backward = dict.fromkeys(self._queues, 0)

    def _pull_until(self, stage: int, op: Op) -> None:
        queue = self._queues[stage]
        while op not in queue[-1:]:
            row = next(self._slots)
            for s, ops in self._queues.items():
                if row[s] is not None:
                    ops.append(row[s])

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


def version_difference(num_stages: int, num_microbatches: int) -> int:
    """The version difference ``v`` of nF1B, computed by simulating the steady state.

    Simulates enough mini-batches to reach the steady state and takes ``d0``, the largest number of optimizer
    steps stage 0 takes between the forward and the backward of one mini-batch (the deepest staleness of the
    pipeline). An update chain of TiMePReSt closes every ``ceil(d0 / 2)`` mini-batches, so ``v = ceil(d0 / 2)``:
    ``v = 1`` exactly when ``W <= N + 1``. (This project's operationalisation; see the README.)
    """
    _check_shape(num_stages, num_microbatches)
    if num_stages == 1:
        return 1
    minibatches = 4 * num_stages + 8
    d0 = max(staleness(nf1b(num_stages, num_microbatches, minibatches))[0])
    return max(1, -(-d0 // 2))


def render_grid(num_stages: int, num_microbatches: int, num_minibatches: int, *, drain: bool = False) -> str:
    """The nF1B grid in the TiMePReSt paper's notation, one line per stage.

    ``1A`` is the forward of micro-batch A of mini-batch 1, ``1`` the backward of mini-batch 1, ``.`` an idle
    slot. The grid runs until stage 0 has started the last mini-batch's forwards (the paper's figures);
    ``drain=True`` runs it to the end, every backward done.
    """
    schedule = nf1b(num_stages, num_microbatches, num_minibatches)
    grid = simulate(schedule)
    end = len(grid[0])
    if not drain:
        last = Op(OpKind.FORWARD, num_minibatches - 1, num_microbatches - 1)
        end = grid[0].index(last) + 1

    def token(op: Op | None) -> str:
        if op is None:
            return "."
        if op.kind is OpKind.BACKWARD:
            return str(op.minibatch + 1)
        assert op.microbatch is not None
        return f"{op.minibatch + 1}{_letters(op.microbatch)}"

    rows = []
    for s, row in enumerate(grid):
        tokens = [token(op) for op in row[:end]]
        width = max(len(t) for r in grid for t in map(token, r[:end]))
        rows.append(f"S{s + 1}: " + " ".join(t.ljust(width) for t in tokens).rstrip())
    return "\n".join(rows)


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


def busy_fractions(schedule: Schedule, forward_cost: float = 1.0, backward_cost: float = 2.0) -> list[float]:
    """Each stage's compute time over the schedule's span when ops take the given times: the ideal a stage's
    measured busy time over wall time is compared with.

    Every op starts as soon as its stage is free and its inputs exist (no transfer time). A synchronous backward
    covers one micro-batch and costs ``backward_cost``; an asynchronous one covers the mini-batch's N
    micro-batches and costs N times that. The default 1:2 is the usual forward:backward ratio of dense layers;
    with ``backward_cost=1`` this is the unit-slot model of :func:`simulate` and :func:`bubble_fraction`.
    """
    end: dict[tuple[int, Op], float] = {}
    free = [0.0] * schedule.num_stages
    busy = [0.0] * schedule.num_stages
    cursor = [0] * schedule.num_stages
    remaining = sum(len(ops) for ops in schedule.stage_ops)
    while remaining:
        progressed = False
        for s, ops in enumerate(schedule.stage_ops):
            while cursor[s] < len(ops):
                op = ops[cursor[s]]
                deps = list(_dependencies(op, s, schedule))
                if any(dep not in end for dep in deps):
                    break
                if op.kind is OpKind.FORWARD:
                    cost = forward_cost
                else:
                    cost = backward_cost * (1 if op.microbatch is not None else schedule.num_microbatches)
                start = max([free[s], *(end[dep] for dep in deps)])
                end[(s, op)] = free[s] = start + cost
                busy[s] += cost
                cursor[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise ScheduleError(f"schedule {schedule.name!r} deadlocks")
    span = max(free)
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
