"""What each stage's ops cost, measured at setup: the input of the cost-aware nF1B order and of the ideal busy
fractions a run is compared with.

A stage's forward and backward of one micro-batch come from the block profile the partitioner takes anyway
(:func:`~lightning_timeprest.partition.profile_blocks`, each block run forward and backward on the device with a
sample micro-batch, averaged over the ranks). An asynchronous backward is followed by the stage's optimizer step,
which on a CPU can cost as much as the backward itself (an element-wise pass over every weight and its state), so
it is timed too: one step of the same optimizer, with the same settings, over copies of part of the stage's
weights, scaled to all of them. Every rank must generate the same order, so the costs are agreed over all ranks
and rounded (:meth:`~lightning_timeprest.schedules.OpCosts.rounded`) before they are used.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from lightning_timeprest.partition import BlockCosts
from lightning_timeprest.schedules import OpCosts

__all__ = ["OpClock", "agreed_costs", "measure_op_costs", "stage_costs", "time_optimizer_step"]


@dataclass
class OpClock:
    """The durations of one stage's ops as they ran: compute only, the time blocked on transfers excluded. A
    backward is recorded per micro-batch it covers; the optimizer step apart. Medians, not means, are reported: the
    first ops of a run are slowed by allocations and other warm-up."""

    forward: list[float] = field(default_factory=list)
    backward: list[float] = field(default_factory=list)
    step: list[float] = field(default_factory=list)

    def add(self, kind: str, seconds: float) -> None:
        samples = getattr(self, kind)
        if len(samples) < _KEPT:
            samples.append(seconds)

    def medians(self) -> tuple[float, float, float] | None:
        """Median seconds of a forward and a backward of one micro-batch and of a step (``None`` before any)."""
        if not (self.forward and self.backward):
            return None
        return statistics.median(self.forward), statistics.median(self.backward), statistics.median(self.step or [0])


_KEPT = 1 << 14  # samples kept per kind (a clock restarts with every stream of mini-batches)


def stage_costs(blocks: BlockCosts, balance: Sequence[int], step_seconds: Sequence[float]) -> OpCosts | None:
    """Per-stage op costs from the block profile (``None`` when the blocks were not profiled)."""
    if blocks.seconds is None or blocks.forward_seconds is None:
        return None
    forward, backward, start = [], [], 0
    for count in balance:
        total = sum(blocks.seconds[start : start + count])
        f = sum(blocks.forward_seconds[start : start + count])
        forward.append(max(f, 1e-9))
        backward.append(max(total - f, 1e-9))
        start += count
    return OpCosts(tuple(forward), tuple(backward), tuple(step_seconds))


def agreed_costs(rows: torch.Tensor, replicas: int) -> OpCosts:
    """The stages' costs from a ``(W, 3)`` table summed over every rank (each contributed its stage's row), as
    every rank then sees it: the mean over replicas, rounded so that all ranks, and runs that differ by noise,
    generate the same order."""
    table = (rows / replicas).tolist()
    return OpCosts(*(tuple(col) for col in zip(*table, strict=True))).rounded()


def time_optimizer_step(
    optimizer: Optimizer, params: Sequence[Tensor], device: torch.device, budget: int = 1 << 22
) -> float:
    """Seconds one step of ``optimizer`` takes over ``params``, timed without touching them or the optimizer.

    A fresh optimizer of the same class and settings steps over copies of the first parameters (up to ``budget``
    elements) with random gradients; the median of three steps after a warm-up is scaled to all of ``params``.
    Returns 0 when the optimizer cannot be rebuilt that way (its constructor wants more than parameter groups).
    The gradients come from a generator of its own: drawing from the global one would move the random state
    the training then starts from (the data's shuffled order, dropout) by an amount that depends on the stage's
    size, and so on the cut.
    """
    params = [p for p in params if p.requires_grad and not p.is_meta]
    total = sum(p.numel() for p in params)
    if not total:
        return 0.0
    chosen, size = [], 0
    for p in params:
        if chosen and size + p.numel() > budget:
            break
        chosen.append(p)
        size += p.numel()
    copies = {id(p): torch.zeros_like(p, device=device, requires_grad=True) for p in chosen}
    groups = []
    for group in optimizer.param_groups:
        mine = [copies[id(p)] for p in group["params"] if id(p) in copies]
        if mine:
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": mine})
    try:
        probe = type(optimizer)(groups)
    except (TypeError, ValueError):
        return 0.0
    generator = torch.Generator(device=device).manual_seed(0)
    for copy in copies.values():
        copy.grad = torch.randn(copy.shape, generator=generator, device=device, dtype=copy.dtype) * 1e-3
    times = []
    with torch.no_grad():
        for r in range(4):
            _sync(device)
            start = time.perf_counter()
            probe.step()
            _sync(device)
            if r:
                times.append(time.perf_counter() - start)
    return sorted(times)[1] * total / size


def measure_op_costs(
    blocks: BlockCosts,
    balance: Sequence[int],
    optimizer: Optimizer,
    params: Sequence[Tensor],
    device: torch.device,
    stage: int,
    num_replicas: int,
    group: Any,
) -> OpCosts:
    """Every stage's op costs, from the block profile (agreed by all ranks at placement) and a timed optimizer step
    on each stage, agreed over ``group`` (all ranks; ``None`` for one stage): the same costs on every rank. Uniform
    costs where the blocks were not profiled."""
    num_stages = len(balance)
    step = torch.zeros(num_stages, dtype=torch.float64)
    step[stage] = time_optimizer_step(optimizer, list(params), device)
    if group is not None:  # every replica's copy of a stage measured it: take their mean
        dist.all_reduce(step, group=group)
        step /= num_replicas
    measured = stage_costs(blocks, balance, step.tolist())
    return measured.rounded() if measured is not None else OpCosts.uniform(num_stages)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
