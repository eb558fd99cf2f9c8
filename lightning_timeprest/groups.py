"""Every process group the strategy uses, created in one place at setup and destroyed in one place at teardown.

With ``devices x num_nodes = D x W`` processes, ranks ``r W .. r W + W - 1`` form pipeline replica ``r``.
``torch.distributed.new_group`` is collective (every rank creates every group, and keeps its own), so
:func:`create_groups` runs on every rank in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from lightning_timeprest.comm import PipelineGroups, destroy_pipeline_groups, new_pipeline_groups

__all__ = ["ProcessGroups", "create_groups", "destroy_groups"]


@dataclass
class ProcessGroups:
    """One rank's process groups."""

    pipeline: PipelineGroups  # activations, gradients and control within this rank's pipeline
    replica: Any  # this stage with its copies in the other replicas (the gradient average; torchmetrics' syncs)
    world: Any  # gloo, every rank: agreements at setup, rank 0's broadcasts of logged values
    sigterm: Any  # gloo, every rank: the SIGTERM flags
    num_replicas: int

    @property
    def replicas(self) -> Any:
        """The replica group where there are replicas to average over, else ``None``."""
        return self.replica if self.num_replicas > 1 else None


def create_groups(world_size: int, rank: int, num_stages: int, backend: str, timeout: timedelta) -> ProcessGroups:
    """Create the groups of every rank (collective) and return this rank's."""
    ranks = list(range(world_size))
    w, replicas = num_stages, world_size // num_stages
    pipelines = [ranks[r * w : (r + 1) * w] for r in range(replicas)]
    pipeline = new_pipeline_groups(pipelines, rank, backend, timeout)
    replica = [dist.new_group(ranks[s::w], backend=backend, timeout=timeout) for s in range(w)][rank % w]
    world = dist.new_group(ranks, backend="gloo", timeout=timeout)
    sigterm = dist.new_group(ranks, backend="gloo", timeout=timeout)
    return ProcessGroups(pipeline, replica, world, sigterm, replicas)


def destroy_groups(groups: ProcessGroups) -> None:
    destroy_pipeline_groups(groups.pipeline)
    for group in (groups.replica, groups.world, groups.sigterm):
        dist.destroy_process_group(group)
