"""One rank's stage of a running pipeline: what the synchronous and asynchronous drivers share.

Built by the strategy at setup, once the stage is placed and its process groups exist; dropped at teardown.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from lightning_timeprest.checkpoint import canonical_param_names
from lightning_timeprest.errors import peer_lost
from lightning_timeprest.groups import ProcessGroups
from lightning_timeprest.microbatch import join
from lightning_timeprest.placement import Placement
from lightning_timeprest.precision import PipelineLink, PipelinePrecision
from lightning_timeprest.runtime import PipelineRuntime
from lightning_timeprest.stage_stats import StageStatistics

__all__ = ["Stage", "loss_of", "loss_weights", "step_extras", "weighted_loss", "with_extras"]


def loss_of(output: Any) -> Tensor:
    """The loss in what ``training_step`` returned (the tensor, or a dict's ``"loss"``)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
        return output["loss"]
    if output is None:
        raise RuntimeError(
            "training_step returned None on the last stage; skipping a batch is not possible in a pipeline (the "
            "earlier stages have already run it): return the loss"
        )
    raise RuntimeError(f"training_step must return the loss tensor or a dict with a 'loss' key, got {type(output)}")


def loss_weights(sizes: Sequence[int], reduction: str = "mean") -> list[float]:
    """What each micro-batch's loss counts for in its mini-batch's: its share of the samples for a loss that
    averages over them (SPEC), 1 for one that sums over them (``loss_reduction="sum"``)."""
    return [size / sum(sizes) for size in sizes] if reduction == "mean" else [1.0] * len(sizes)


def weighted_loss(outputs: Sequence[Any], sizes: Sequence[int], reduction: str = "mean") -> float:
    """A mini-batch's loss: its micro-batch losses weighted by :func:`loss_weights` (by default their mean weighted
    by micro-batch size). A Python float: it pickles and unpickles much faster than a tensor."""
    losses = torch.stack([loss_of(o).detach().double().cpu() for o in outputs])
    return float((losses * torch.tensor(loss_weights(sizes, reduction), dtype=torch.float64)).sum().float())


def step_extras(outputs: Sequence[Any], sizes: Sequence[int]) -> dict[str, Any] | None:
    """What a ``training_step`` returned besides the loss (a dict's other keys), joined over a mini-batch's
    micro-batches as Lightning's ``on_train_batch_end`` would get it for the whole batch: a number or 0-dim tensor
    per micro-batch becomes their mean weighted by micro-batch size (as a mean-reduced loss, whatever
    ``loss_reduction``), tensors with a batch dimension and lists of one item per sample are concatenated
    (:func:`join`). Detached, on the CPU, to travel to every rank. ``None`` when there is none."""
    if not isinstance(outputs[0], Mapping) or set(outputs[0]) <= {"loss"}:
        return None
    weights = loss_weights(sizes)
    extras: dict[str, Any] = {}
    for key in outputs[0]:
        if key == "loss":
            continue
        values = [apply_to_collection(o[key], Tensor, lambda t: t.detach().cpu()) for o in outputs]
        scalar = all(
            (isinstance(v, Tensor) and v.dim() == 0 and v.is_floating_point()) or type(v) is float for v in values
        )
        extras[key] = sum(w * v for w, v in zip(weights, values, strict=True)) if scalar else join(values, sizes)
    return extras


def with_extras(loss: Tensor, extras: dict[str, Any] | None, device: torch.device) -> Tensor | dict[str, Any]:
    """What the strategy's ``training_step`` returns to Lightning: the loss, with the step's extras if any."""
    return loss if extras is None else {"loss": loss, **move_data_to_device(extras, device)}


@dataclass
class Stage:
    """This rank's stage: where it sits, what it holds, how it talks and what it records."""

    index: int  # s, this rank's stage
    num_stages: int  # W
    num_replicas: int  # D
    global_rank: int
    device: torch.device
    num_microbatches: int  # N
    runtime: PipelineRuntime
    groups: ProcessGroups
    placement: Placement
    replicated_local: list[nn.Parameter | None]  # this rank's copy of each replicated parameter (None: not held)
    precision: PipelinePrecision
    stats: StageStatistics

    @classmethod
    def on(
        cls,
        module: nn.Module,
        placement: Placement,
        runtime: PipelineRuntime,
        groups: ProcessGroups,
        precision: PipelinePrecision,
        stats: StageStatistics,
        num_replicas: int,
        global_rank: int,
        num_microbatches: int,
    ) -> Stage:
        """The stage of ``module`` once placed and on its device; its replicated tensors are made equal on every
        stage, and every replica starts from replica 0's."""
        names = canonical_param_names(module, placement.aliases)
        by_name = {names[id(p)]: p for p in module.parameters()}
        stage = cls(
            index=runtime.stage,
            num_stages=runtime.num_stages,
            num_replicas=num_replicas,
            global_rank=global_rank,
            device=runtime.comm.device,
            num_microbatches=num_microbatches,
            runtime=runtime,
            groups=groups,
            placement=placement,
            replicated_local=[by_name.get(r.name) for r in placement.replicated],
            precision=precision,
            stats=stats,
        )
        stage.sync_replicated(module)
        stage.sync_replicas(module)
        return stage

    @property
    def last_stage(self) -> int:
        return self.num_stages - 1

    @property
    def comm(self) -> Any:
        return self.runtime.comm

    @property
    def where(self) -> str:
        """This rank's name in an error."""
        return f"stage {self.index} (rank {self.global_rank})"

    def share_from_rank_zero(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a broadcast over all ranks)."""
        shared = [value]
        with peer_lost(self.where, "receiving the pipeline's logged values from rank 0"):
            dist.broadcast_object_list(shared, src=0, group=self.groups.world)
        return shared[0]

    @property
    def share(self) -> Any:
        """:meth:`share_from_rank_zero`, or ``None`` with one process (nothing to share)."""
        return self.share_from_rank_zero if self.num_stages * self.num_replicas > 1 else None

    def stage0_batch(self, batch: Any) -> Any:
        """Give the last stage stage 0's batch: the labels that train must be those of the inputs that entered.

        Every rank iterates its own DataLoader (Lightning drives the loop everywhere), but random samplers or
        augmentations would draw differently per rank; stage 0's copy is the one that counts.
        """
        runtime = self.runtime
        if runtime.is_first and not runtime.is_last:  # never waits: the last stage may be behind
            runtime.comm.isend_value(move_data_to_device(batch, "cpu"), self.last_stage)
        elif runtime.is_last and not runtime.is_first:
            batch = move_data_to_device(runtime.comm.recv_value(0), self.device)
        return batch

    def average_over_replicas(self, params: Sequence[Tensor]) -> None:
        """Average this stage's gradients over the data-parallel replicas (one flat all-reduce), as DDP does."""
        group = self.groups.replicas
        grads = [p.grad for p in params if p.grad is not None]
        if group is None or not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        with peer_lost(self.where, "averaging gradients with the other replicas"):
            dist.all_reduce(flat, group=group)
        flat /= self.num_replicas
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def sync_replicated(self, module: nn.Module) -> None:
        """Make every replicated tensor identical on all stages that hold it (the lowest holder's values win)."""
        if self.num_stages == 1:
            return
        replicated = self.placement.replicated
        pairs: list[tuple[Tensor | None, int, torch.Size, torch.dtype]] = [
            (p, r.source, r.shape, r.dtype) for r, p in zip(replicated, self.replicated_local, strict=True)
        ]
        buffers = dict(module.named_buffers())
        pairs += [(buffers.get(n), src, shape, dtype) for n, src, shape, dtype in self.placement.replicated_buffers]
        with torch.no_grad():
            for tensor, source, shape, dtype in pairs:
                wire = tensor.detach().cpu() if tensor is not None else torch.empty(shape, dtype=dtype)
                self.comm.broadcast_tensor(wire, source)
                if tensor is not None:
                    tensor.copy_(wire)

    def sync_replicas(self, module: nn.Module) -> None:
        """Start every replica of a stage from replica 0's tensors (as DDP broadcasts rank 0's model)."""
        group = self.groups.replicas
        if group is None:
            return
        with torch.no_grad():
            for tensor in module.state_dict().values():
                if isinstance(tensor, Tensor) and not tensor.is_meta:
                    dist.broadcast(tensor, src=self.index, group=group)

    def precision_link(
        self, asynchronous: bool, install_gradients: Callable[[], None], share_hook_logs: bool
    ) -> PipelineLink:
        """What the precision hook needs from this stage (see :mod:`lightning_timeprest.precision`)."""
        copies = self.counted_elsewhere()

        def all_reduce(tensor: Tensor, op: str) -> None:
            reduce_op = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM
            with peer_lost(self.where, "agreeing with the other stages on the gradients (overflow or norm)"):
                dist.all_reduce(tensor, op=reduce_op, group=self.groups.pipeline.control)

        return PipelineLink(
            stage=self.index,
            num_stages=self.num_stages,
            asynchronous=asynchronous,
            install_gradients=install_gradients,
            all_reduce=all_reduce,
            counted_elsewhere=lambda: copies,
            average_over_replicas=self.average_over_replicas,
            share_hook_logs=share_hook_logs,
        )

    def counted_elsewhere(self) -> set[int]:
        """Ids of this rank's replicated parameter copies whose gradient another stage counts in a global norm."""
        pairs = zip(self.placement.replicated, self.replicated_local, strict=True)
        return {id(p) for r, p in pairs if p is not None and r.source != self.index}
