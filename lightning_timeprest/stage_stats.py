"""What each stage did, step by step, and the ``pipeline/...`` values logged from it.

Every stage makes a :class:`StepStats` record of each training step (and, under the asynchronous policies, of each
drain): the staleness of the backwards it ran, weight versions and bytes held, busy and transfer-wait seconds,
samples, peak CUDA memory. Rank 0 gathers every stage's records (under the asynchronous policies a few steps late)
into a window and logs them every ``log_every_n_steps`` steps and at the end of an epoch
(:meth:`StageStatistics.emit`), with the same values on every rank.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_timeprest.metrics import LoggedValue

__all__ = ["STATS_HISTORY", "StageStatistics", "StepStats", "cuda_peak_bytes", "last_step_of_epoch"]

STATS_HISTORY = 100_000  # steps of per-stage records kept for `TiMePReStStrategy.stats`
#: positions in a stage record (``StepStats.as_tensor``) summed, and those maxed, over a logging window
_STAT_SUMS = (0, 1, 5, 6, 7, 8)
_STAT_MAXES = (2, 3, 4, 9)


@dataclass
class StepStats:
    """What one stage did in one step (or one drain)."""

    staleness: list[int] = field(default_factory=list)
    versions_held: int = 1
    weight_bytes: int = 0
    busy_s: float = 0.0
    wait_s: float = 0.0
    samples: int = 0
    cuda_peak_bytes: int = -1  # the step's peak CUDA allocation on this stage's GPU (-1: not on a GPU)
    wall_s: float = 0.0  # seconds since this stage's previous record (set by as_tensor)
    step: int = -1  # the trainer's global step when the record was taken

    def as_tensor(self, wall_s: float) -> Tensor:
        """The record as rank 0 sums it (see ``StageStatistics.add``), over ``wall_s`` seconds."""
        self.wall_s = wall_s
        d = self.staleness
        return torch.tensor(
            [
                float(sum(d)),
                float(len(d)),
                float(max(d)) if d else 0.0,
                float(self.versions_held),
                float(self.weight_bytes),
                self.busy_s,
                self.wait_s,
                wall_s,
                float(self.samples),
                float(self.cuda_peak_bytes),
            ],
            dtype=torch.float64,
        )


def cuda_peak_bytes(device: torch.device) -> int:
    """The peak CUDA allocation so far on ``device`` (-1 off GPU); the counter is the user's to reset."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else -1


def last_step_of_epoch(trainer: Any) -> bool:
    """Whether the training step running now is the epoch's last (its last batch, or ``max_steps`` reached)."""
    return trainer.fit_loop.epoch_loop.batch_progress.is_last_batch or (
        trainer.max_steps > 0 and trainer.global_step + 1 >= trainer.max_steps
    )


class StageStatistics:
    """This rank's history of its own records, and on rank 0 the window of every stage's records to log next."""

    def __init__(self) -> None:
        self.history: deque[StepStats] = deque(maxlen=STATS_HISTORY)  # this stage's (`TiMePReStStrategy.stats`)
        self.window: dict[int, list[float]] = {}  # rank 0: stage -> records summed since the last log
        self.steps = 0  # training steps since the window was last logged
        self.hook_logs: list[list[LoggedValue]] = []  # rank 0: what the stages' gradient hooks logged, to log next
        self.version_difference = 0  # v of the nF1B order in use (0 for the other schedules), logged as pipeline/v

    def clear(self) -> None:
        self.history.clear()
        self.window, self.steps, self.hook_logs = {}, 0, []

    def add(self, stage: int, record: Sequence[float], hook_logs: Sequence[LoggedValue] = ()) -> None:
        """Rank 0 adds one stage's record of one step to the window (and what the stage's gradient hooks logged, to
        log at the next step, see :meth:`take_hook_logs`)."""
        if hook_logs:
            self.hook_logs.append(list(hook_logs))
        acc = self.window.get(stage)
        if acc is None:
            self.window[stage] = list(record)
            return
        for i in _STAT_SUMS:
            acc[i] += record[i]
        for i in _STAT_MAXES:
            acc[i] = max(acc[i], record[i])

    def take_hook_logs(self) -> list[list[LoggedValue]]:
        pending, self.hook_logs = self.hook_logs, []
        return pending

    def emit(self, module: Any, final: bool, is_rank_zero: bool, share: Callable[[Any], Any] | None) -> None:
        """Log the records gathered since the last time, every ``log_every_n_steps`` steps and at the end of an epoch
        (``final``), under ``pipeline/stage{s}/...``, on every rank with the same values.

        Every rank calls this at the same steps; rank 0 computes the values and ``share`` (a broadcast from rank 0;
        ``None`` with one process) gives them to every rank: one small broadcast per window, at the end of a step,
        where no rank waits on another's later step, so it cannot deadlock. Each ``self.log`` costs about a tenth of
        a millisecond; a dozen per step showed on small models. A step value covers the steps since the previous
        one; an epoch's mean weights each window by its steps.
        """
        self.steps += 1
        if not (final or self.steps >= module.trainer.log_every_n_steps):
            return
        steps, self.steps = self.steps, 0
        window, self.window = self.window, {}
        values = self.values(window, steps) if is_rank_zero else []
        if share is not None:
            values = share(values)
        for name, value, reduce_fx, size in values:
            type(module).log(  # (the class's: never captured as the user's own logging)
                module,
                name,
                torch.tensor(value, dtype=torch.float32, device=module.device),
                on_step=True,
                on_epoch=True,
                reduce_fx=reduce_fx,
                batch_size=size,
            )

    def values(self, window: Mapping[int, Sequence[float]], steps: int) -> list[tuple[str, float, str, int]]:
        """The ``pipeline/...`` values of one window of stage records: (name, value, reduce_fx, weight)."""
        values: list[tuple[str, float, str, int]] = []
        for stage, record in sorted(window.items()):
            d_sum, d_count, d_max, versions, nbytes, busy, wait, wall, samples, cuda_peak = record
            prefix = f"pipeline/stage{stage}/"
            values += [
                (prefix + "versions_held", versions, "max", 1),
                (prefix + "weight_bytes", nbytes, "max", 1),
                (prefix + "idle_fraction", max(0.0, 1.0 - busy / wall) if wall > 0 else 0.0, "mean", steps),
                (prefix + "samples_per_sec", samples / wall if wall > 0 else 0.0, "mean", steps),
                (prefix + "comm_wait_s", wait, "sum", 1),
            ]
            if d_count > 0:
                values += [(prefix + "staleness_mean", d_sum / d_count, "mean", int(d_count))]
                values += [(prefix + "staleness_max", d_max, "max", 1)]
            if cuda_peak >= 0:
                values.append((prefix + "cuda_peak_bytes", cuda_peak, "max", 1))
        if 0 in window:
            values.append(("pipeline/v", float(self.version_difference), "max", 1))
        return values
