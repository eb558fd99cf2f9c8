"""The Lightning glue: :class:`TiMePReStStrategy` trains an unchanged LightningModule pipeline-parallel.

One process per stage, started by Lightning's own launchers (it is a ``DDPStrategy`` underneath: popen, spawn
and fork launchers, cluster environments, gloo on CPU and nccl on GPU). At setup each rank keeps only its
stage's layers of the pipelined ``nn.Sequential`` (the rest is released to the meta device); everything
outside that submodule is replicated on every stage and its gradients are summed across stages, so stems,
heads and tied weights train as on one device.

Lightning still drives the loop. Each ``training_step`` call runs one whole mini-batch through this stage's
part of the schedule; the gradients it produced are set aside until Lightning's closure asks for the backward
(Lightning zeroes gradients between the two), and then the optimizer steps on every stage at once.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor, nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_parameter_registration_hook,
)
from torch.optim import Optimizer
from torchmetrics import Metric
from typing_extensions import override

from lightning_timeprest import checkpoint as ckpt
from lightning_timeprest import compat, metrics
from lightning_timeprest.async_runtime import AsyncRuntime, TraceEntry
from lightning_timeprest.comm import (
    PipelineCommError,
    PipelineGroups,
    StageComm,
    destroy_pipeline_groups,
    new_pipeline_groups,
)
from lightning_timeprest.costs import OpClock, agreed_costs, stage_costs, time_optimizer_step
from lightning_timeprest.errors import PipelineConfigError
from lightning_timeprest.metrics import LoggedValue
from lightning_timeprest.microbatch import batch_size, join, split, split_at_most
from lightning_timeprest.partition import (
    BALANCE_MODES,
    BlockCosts,
    PartitionError,
    Replicated,
    StagePlan,
    dominant_sequential,
    find_pipelined_module,
    format_table,
    layer_parameter_counts,
    parameter_aliases,
    plan_stages,
    profile_blocks,
    replicated_parameters,
    tensor_holders,
)
from lightning_timeprest.precision import PipelineLink, PipelinePrecision, uses_gradient_hooks
from lightning_timeprest.runtime import PipelineRuntime, StageModule, StageRunner
from lightning_timeprest.sample import sample_call, sandbox, step_calls
from lightning_timeprest.schedules import (
    ASYNCHRONOUS_SCHEDULES,
    SCHEDULES,
    OpCosts,
    OrderChoice,
    Schedule,
    ScheduleError,
    build_schedule,
    choose_order,
    version_difference,
)
from lightning_timeprest.sigterm import SigtermAgreement
from lightning_timeprest.stage_stats import (
    StageStatistics,
    StepStats,
    cuda_peak_bytes,
    last_step_of_epoch,
)
from lightning_timeprest.tracing import (
    CallRecord,
    TracedModel,
    TracedStage,
    call_tree,
    candidate_boundaries,
    trace,
    walk_calls,
)
from lightning_timeprest.versions import POLICIES, significance_function

__all__ = ["CALIBRATION_STEPS", "PipelineConfigError", "PipelineStrategyMixin", "TiMePReStStrategy"]

CPU = torch.device("cpu")
#: With measured op costs, the nF1B order is re-derived from the op times measured in the steps since the previous
#: drain, at every drain; at the start of training the pipeline drains for it twice, after this many steps each
#: (the second measures the ops in the order the first chose, which changes what they cost a little).
CALIBRATION_STEPS = 10
_CALIBRATION_DRAINS = 2
_PIPELINE_SYNC_ADVICE = r"It is recommended to use `self\.log\('pipeline/"
_SYNC_DIST_ADVICE = r"It is recommended to use `self\.log\(.*sync_dist=True\)` when logging on epoch level"
#: the checkpoint entry holding the op costs the nF1B order was generated from
ORDER_KEY = "timeprest_order"


def _loss_of(output: Any) -> Tensor:
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


def _weighted_loss(outputs: Sequence[Any], sizes: Sequence[int]) -> float:
    """A mini-batch's loss: the mean of its micro-batch losses weighted by micro-batch size (SPEC)."""
    losses = torch.stack([_loss_of(o).detach().double().cpu() for o in outputs])
    return float(((losses * torch.tensor(sizes, dtype=torch.float64)).sum() / sum(sizes)).float())


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create modules whose parameters and buffers live on the meta device (no storage).

    Unlike ``with torch.device("meta")`` this leaves other tensors real, so torchmetrics states and constants
    built in ``__init__`` keep their values. Each parameter is allocated uninitialised (``_EmptyInit`` skips the
    init kernels) and replaced by its meta twin as soon as it is registered, so at most one parameter exists at a
    time. Ranks materialise (``reset_parameters``) the parameters of their own stage at setup.
    """

    def on_parameter(module: nn.Module, name: str, param: Tensor | None) -> Tensor | None:
        if param is not None and not param.is_meta:
            return nn.Parameter(torch.empty_like(param, device="meta"), param.requires_grad)
        return None

    def on_buffer(module: nn.Module, name: str, buffer: Tensor | None) -> Tensor | None:
        return torch.empty_like(buffer, device="meta") if buffer is not None and not buffer.is_meta else None

    handles = [
        register_module_parameter_registration_hook(on_parameter),
        register_module_buffer_registration_hook(on_buffer),
    ]
    try:
        with compat.EmptyInit(enabled=True):
            yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _ties_kept(module: nn.Module) -> Iterator[None]:
    """Keep tied parameters tied through materialisation (``to_empty`` gives each module its own new tensor)."""
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is not None:
                places.setdefault(id(p), []).append((sub, name))
    yield
    for group in places.values():
        first_module, first_name = group[0]
        for sub, name in group[1:]:
            sub._parameters[name] = first_module._parameters[first_name]


def _release(module: nn.Module, keep: set[int]) -> None:
    """Replace ``module``'s parameters and buffers by meta tensors, except the tensors whose id is in ``keep``."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and id(p) not in keep and not p.is_meta:
                sub._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
        for name, b in list(sub._buffers.items()):
            if b is not None and id(b) not in keep and not b.is_meta:
                sub._buffers[name] = torch.empty_like(b, device="meta")


def _first_block(stage: TracedStage) -> Callable[[Any], Any]:
    def run(call: tuple[tuple[Any, ...], dict[str, Any]]) -> Any:
        return stage.run_layers(stage.entry(*call))

    return run


def _materialize_held(module: nn.Module, device: torch.device, keep: set[int]) -> None:
    """Materialise (``to_empty`` + ``reset_parameters``) the modules that hold meta tensors this stage keeps."""
    for sub in module.modules():
        direct = [*sub._parameters.values(), *sub._buffers.values()]
        if any(t is not None and t.is_meta and id(t) in keep for t in direct):
            sub.to_empty(device=device, recurse=False)
            reset = getattr(sub, "reset_parameters", None)
            if callable(reset):
                reset()


def _detach(module: nn.Module, keep: set[int]) -> list[tuple[nn.Module, str, str, Tensor]]:
    """Remove from ``module`` the parameters and buffers not in ``keep`` (other stages' tensors), so that this
    rank's ``parameters()``, ``state_dict()`` and optimizer see only its own; return meta placeholders to put back
    afterwards, as ``(submodule, "_parameters" or "_buffers", name, placeholder)``."""
    removed = []
    for sub in module.modules():
        for kind in ("_parameters", "_buffers"):
            table = getattr(sub, kind)
            for name, t in list(table.items()):
                if t is not None and id(t) not in keep:
                    placeholder = torch.empty_like(t, device="meta")
                    if isinstance(t, nn.Parameter):
                        placeholder = nn.Parameter(placeholder, t.requires_grad)
                    removed.append((sub, kind, name, placeholder))
                    del table[name]
    return removed


def _install(root: nn.Module, name: str, submodule: nn.Module) -> None:
    """Put ``submodule`` at the dotted path ``name`` of ``root``."""
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, submodule)


def _fill(module: nn.Module, prefix: str, tensors: Mapping[str, Tensor]) -> None:
    """Put back the tensors of a released ``module`` from ``tensors`` (keyed by full name)."""
    for sub_name, sub in module.named_modules(prefix=prefix):
        for name, p in list(sub._parameters.items()):
            key = f"{sub_name}.{name}" if sub_name else name
            if p is not None and p.is_meta and key in tensors:
                sub._parameters[name] = nn.Parameter(tensors[key], p.requires_grad)
        for name, b in list(sub._buffers.items()):
            key = f"{sub_name}.{name}" if sub_name else name
            if b is not None and b.is_meta and key in tensors:
                sub._buffers[name] = tensors[key]


class PipelineStrategyMixin:
    """The strategy's behaviour, on top of a ``DDPStrategy`` of either ``lightning`` or ``pytorch_lightning``.

    Use :class:`TiMePReStStrategy`; the mixin exists so that the ``pytorch_lightning`` twin shares every line.

    Args:
        schedule: synchronous ``"gpipe"`` (all forwards, then all backwards) or ``"1f1b"`` (PipeDream-Flush:
            fewer activations held), whose result equals single-device training; or an asynchronous policy with
            several mini-batches in flight: ``"timeprest_v"`` (V-TiMePReSt: live weights, no stash),
            ``"timeprest"`` (vertical sync), ``"timeprest_i"`` (I-TiMePReSt: backward on an intermediate weight)
            or ``"pipedream"`` (weight stashing, N = 1).
        num_microbatches: N, the micro-batches each batch is split into along dim 0 (default: 2 x stages for the
            synchronous schedules, ``max(2, stages - 1)`` for nF1B so that ``W <= N + 1``, 1 for pipedream).
        balance: blocks per stage (a list summing to the number of blocks), or how to balance them:
            ``"parameters"``, ``"time"`` (each block timed forward and backward on the device with a sample
            micro-batch) or ``"memory"`` (weights, gradients and saved activations of each block). By default
            ``"time"`` for a traced module (its blocks differ in cost per parameter: convolutions, attention; the
            profile runs anyway, a few forward and backward passes per block at setup) and ``"parameters"`` for an
            ``nn.Sequential``.
        module_name: the submodule to pipeline (dotted path; ``""`` for the LightningModule's own forward). By
            default the largest ``nn.Sequential`` if it holds at least half of the parameters, else the
            LightningModule's forward. An ``nn.Sequential`` is cut between its children; any other module's
            forward is traced (``torch.export``) and split by ``torch.distributed.pipelining``.
        split_points: names of submodules (as in ``named_modules()`` of the LightningModule) at whose beginning
            to cut, ``stages - 1`` of them, instead of the automatic choice; always traced.
        stages: W, the stages of one pipeline (default: every process). With ``devices x num_nodes = D x W``
            processes, D data-parallel replicas of the pipeline each train on their own shard of the data, and
            each stage's gradients are averaged over the replicas (as DDP does).
        sharded_checkpoint: write checkpoints as a directory with one file per stage (nothing is gathered on one
            rank); :func:`lightning_timeprest.checkpoint.consolidate` makes an ordinary checkpoint of it. Resuming
            reads either form, with any number of stages.
        processes_per_device: stages (processes) that share each device, e.g. ``Trainer(accelerator="gpu",
            devices=1)`` with ``processes_per_device=4`` runs 4 stages on one GPU. Shared devices talk over gloo,
            through CPU memory (NCCL refuses two ranks on one GPU).
        p2p_timeout: seconds a stage waits for a neighbour's activation or gradient before failing.
        significance: I-TiMePReSt's ``alpha(d)``: ``"exp"`` (``exp(-decay_lambda d)``), ``"inverse"``
            (``1 / (1 + d)``), ``"power"`` (``power_beta ** d``) or a callable ``d -> alpha``.
        decay_lambda: lambda of ``"exp"``.
        power_beta: beta of ``"power"``.
        backward_rule: how an asynchronous backward reads weights that differ from its forward's: ``"graph"``
            (keep the forward graph, its saved weights read the backward weights) or ``"recompute"`` (rerun the
            stage forward with the backward weights).
        dynamic: asynchronous policies only: order ops by what has actually arrived (backward priority) instead
            of replaying the static schedule; the versions each op used are recorded.
        order: how the nF1B op order (timeprest_v, timeprest, timeprest_i) is generated: ``"cost"`` (default) picks
            the fastest order for the measured op costs (list scheduling under nF1B's rules, or the paper's grid
            when that is faster); ``"unit"`` replays the paper's unit-slot grid.
        max_inflight: the most mini-batches an nF1B stage holds at once (forwarded, backward not yet run), which
            bounds activation memory and staleness. Default: chosen for speed (the smallest cap within 1% of the
            fastest; for timeprest_v the fastest with version difference v = 1).
        op_costs: per stage ``[forward, backward, step]`` (one micro-batch's forward and backward, the optimizer
            step; any unit) to generate the nF1B order from, instead of measuring them at setup. Measured costs
            vary a little between runs and so may the order; give them to replay an order exactly.
        The remaining arguments are those of Lightning's ``DDPStrategy``.
    """

    def __init__(
        self,
        schedule: str = "gpipe",
        num_microbatches: int | None = None,
        balance: list[int] | str | None = None,
        module_name: str | None = None,
        split_points: list[str] | None = None,
        stages: int | None = None,
        sharded_checkpoint: bool = False,
        processes_per_device: int = 1,
        p2p_timeout: float = 600.0,
        significance: str | Callable[[int], float] = "exp",
        decay_lambda: float = 1.0,
        power_beta: float = 0.5,
        backward_rule: str = "graph",
        dynamic: bool = False,
        order: str = "cost",
        max_inflight: int | None = None,
        op_costs: list[list[float]] | None = None,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    ) -> None:
        if isinstance(processes_per_device, bool) or int(processes_per_device) < 1:
            raise PipelineConfigError(f"processes_per_device must be a positive integer, got {processes_per_device!r}")
        self._processes_per_device = int(processes_per_device)  # before the base class sets parallel_devices
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        schedule = str(schedule).lower()
        if schedule not in SCHEDULES:
            raise PipelineConfigError(f"unknown schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
        if num_microbatches is not None and (isinstance(num_microbatches, bool) or int(num_microbatches) < 1):
            raise PipelineConfigError(f"num_microbatches must be a positive integer, got {num_microbatches!r}")
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
        if stages is not None and (isinstance(stages, bool) or int(stages) < 1):
            raise PipelineConfigError(f"stages must be a positive integer, got {stages!r}")
        if split_points and balance is not None and not isinstance(balance, str):
            raise PipelineConfigError("give either split_points or a balance list, not both: each fixes the stages")
        if p2p_timeout <= 0:
            raise PipelineConfigError(f"p2p_timeout must be positive, got {p2p_timeout}")
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
        if max_inflight is not None and (isinstance(max_inflight, bool) or int(max_inflight) < 1):
            raise PipelineConfigError(f"max_inflight must be a positive integer, got {max_inflight!r}")
        if op_costs is not None:
            try:
                rows = [tuple(float(c) for c in row) for row in op_costs]
                if any(len(row) != 3 for row in rows):
                    raise ValueError("each stage needs [forward, backward, step]")
                self._given_costs: OpCosts | None = OpCosts(*(tuple(col) for col in zip(*rows, strict=True)))
            except (TypeError, ValueError, ScheduleError) as err:
                raise PipelineConfigError(
                    f"op_costs must list [forward, backward, step] per stage, positive forward and backward costs "
                    f"(e.g. [[1, 2, 0.5], [1, 2, 0.5]]), got {op_costs!r}: {err}"
                ) from None
        else:
            self._given_costs = None
        try:
            self.alpha = significance_function(significance, decay_lambda, power_beta)
        except ValueError as err:
            raise PipelineConfigError(str(err)) from None
        self.significance = significance
        self.backward_rule = backward_rule
        self.dynamic = bool(dynamic)
        self.order = order
        self.max_inflight = None if max_inflight is None else int(max_inflight)
        #: the op costs the order was generated from and the ideal is computed with (set at fit start)
        self.op_costs: OpCosts | None = None
        #: the nF1B order in use and what it gives up (set at fit start; ``None`` for the other schedules)
        self.order_choice: OrderChoice | None = None
        self._block_costs: Any = None
        self._measuring = False  # the op costs are measured: the order follows them at every drain
        self._calibrations_left = 0  # drains still to make at the start of training, to measure them
        self._sigterm: SigtermAgreement | None = None
        self._sigterm_group: Any = None
        self._step_s = 0.0  # synchronous: the optimizer steps not yet counted in a stage record
        self.schedule_name = schedule
        self._num_microbatches = None if num_microbatches is None else int(num_microbatches)
        self.balance = balance
        self.module_name = module_name
        self.split_points = list(split_points) if split_points else None
        self._stages = None if stages is None else int(stages)
        self.sharded_checkpoint = bool(sharded_checkpoint)
        self._replica_group: Any = None
        self._own_replica_group: Any = None
        self._world_gloo: Any = None
        self.p2p_timeout = timedelta(seconds=p2p_timeout)
        self._groups: PipelineGroups | None = None
        self._plan: StagePlan | None = None
        self._runtime: PipelineRuntime | None = None
        self._sequential: nn.Sequential | None = None
        self._traced_module: nn.Module | None = None
        self._holders: dict[str, set[int]] = {}
        self._tied: list[str] = []
        self._replicated_buffers: list[tuple[str, int, torch.Size, torch.dtype]] = []
        self._detached: list[tuple[nn.Module, str, str, Tensor]] = []
        self._sample_problem = ""
        #: the partition table printed at fit start: a header row, then one row per stage
        self.partition_table: list[list[str]] = []
        self._state_keys: list[str] = []
        self._param_order: list[str] = []
        self._aliases: dict[str, str] = {}
        self._replicated: list[Replicated] = []
        self._replicated_local: list[nn.Parameter | None] = []
        self._new_grads: dict[nn.Parameter, Tensor | None] | None = None
        self._schedules: dict[tuple[str, int], Schedule] = {}
        self._metric_group: Any = None
        self._metric_groups_before: dict[Metric, Any] = {}
        self._final_optimizer_states: dict[int, dict[str, Any]] = {}
        self._failed = False
        self._engine: AsyncRuntime | None = None
        self._payloads: dict[int, Any] = {}  # last stage: what each finished mini-batch logged, for every stage
        self._reported = -1  # the newest mini-batch whose results this rank has replayed (per stream)
        self._stats_received: dict[int, int] = {}
        self._stats_sent = 0
        self._queued: list[Callable[[], None]] = []  # logging owed by drains that ran outside a training step
        self._last_loss = float("nan")
        self._step_clock = time.perf_counter()
        self._next_version_difference: int | None = None  # v of the order the next stream runs in
        self._stage_stats = StageStatistics()
        self._sync_clock: float | None = None  # synchronous: when the previous training step's record was taken
        self._weight_bytes: int | None = None  # synchronous: the bytes of this stage's parameters (set per fit)
        self._owners: list[int] = []
        self._skipping_backward = False  # asynchronous: Lightning's closure runs training_step only
        self._hook_logs_shared = False  # the user's gradient hooks log: their values go to every rank

    # -- topology -------------------------------------------------------------------------------------------

    @property
    @override
    def parallel_devices(self) -> list[torch.device] | None:
        return self._parallel_devices

    @parallel_devices.setter
    def parallel_devices(self, devices: list[torch.device] | None) -> None:
        # each device once per process that shares it: Lightning's launcher starts one process per entry
        k = self._processes_per_device
        self._parallel_devices = None if devices is None else [d for d in devices for _ in range(k)]

    @override
    def _get_process_group_backend(self) -> str:
        if self._processes_per_device > 1 and self._process_group_backend is None:
            return "gloo"
        return super()._get_process_group_backend()

    @property
    def num_stages(self) -> int:
        return self._stages or self.world_size

    @property
    def stage(self) -> int:
        return self.global_rank % self.num_stages

    @property
    def num_replicas(self) -> int:
        """D, the data-parallel copies of the pipeline (ranks ``r W .. r W + W - 1`` form replica ``r``)."""
        return self.world_size // self.num_stages

    @property
    def replica(self) -> int:
        return self.global_rank // self.num_stages

    @property
    def last_stage(self) -> int:
        return self.num_stages - 1

    @property
    def is_asynchronous(self) -> bool:
        return self.schedule_name in ASYNCHRONOUS_SCHEDULES

    @property
    def num_microbatches(self) -> int:
        if self._num_microbatches is not None:
            return self._num_microbatches
        if self.schedule_name == "pipedream":
            return 1
        if self.is_asynchronous:
            return max(2, self.num_stages - 1)
        return 2 * self.num_stages

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # the stages of one pipeline see the same data; the replicas see their own shards
        return {"num_replicas": self.num_replicas, "rank": self.replica}

    @override
    def setup_distributed(self) -> None:
        super().setup_distributed()
        backend = self._get_process_group_backend()
        w = self.num_stages
        if self.world_size % w:
            raise PipelineConfigError(
                f"stages={w} does not divide the {self.world_size} processes (devices x num_nodes); use a number of "
                "processes that is a multiple of the stages, each multiple a data-parallel replica of the pipeline"
            )
        ranks = list(range(self.world_size))
        pipelines = [ranks[r * w : (r + 1) * w] for r in range(self.num_replicas)]
        timeout = self._timeout or default_pg_timeout
        self._groups = new_pipeline_groups(pipelines, self.global_rank, backend, timeout)
        # each stage with its copies in the other replicas, for the gradient average (new_group is collective:
        # every rank creates every group, and keeps its own)
        replicas = [dist.new_group(ranks[s::w], backend=backend, timeout=timeout) for s in range(w)]
        self._own_replica_group = replicas[self.stage]
        self._replica_group = self._own_replica_group if self.num_replicas > 1 else None
        self._world_gloo = dist.new_group(ranks, backend="gloo", timeout=timeout)  # agreements at setup
        self._sigterm_group = dist.new_group(ranks, backend="gloo", timeout=timeout)  # rank 0's SIGTERM flag
        # torchmetrics syncs over its process_group on compute(); each stage computes its metrics on its own
        self._metric_group = [dist.new_group([r], backend="gloo") for r in ranks][self.global_rank]

    # -- precision ------------------------------------------------------------------------------------------

    @property
    @override
    def precision_plugin(self) -> PipelinePrecision:
        if self._precision_plugin is None:
            self._precision_plugin = PipelinePrecision(Precision())
        return self._precision_plugin

    @precision_plugin.setter
    def precision_plugin(self, plugin: Precision | None) -> None:
        # every stage update goes through the project's hook, around whatever precision the user chose
        if plugin is not None and not isinstance(plugin, PipelinePrecision):
            plugin = PipelinePrecision(plugin)
        self._precision_plugin = plugin

    def _link_precision(self, trainer: Any) -> None:
        """Connect the precision hook to this pipeline (see :mod:`lightning_timeprest.precision`)."""
        module = self.lightning_module
        copies = {
            id(p) for r, p in zip(self._replicated, self._replicated_local, strict=True) if r.source != self.stage
        }
        self.precision_plugin.link = PipelineLink(
            stage=self.stage,
            num_stages=self.num_stages,
            asynchronous=self.is_asynchronous,
            install_gradients=self._install_gradients,
            all_reduce=self._all_reduce_stages,
            counted_elsewhere=lambda: copies,
            average_over_replicas=self._average_over_replicas,
        )
        self._hook_logs_shared = self.num_stages > 1 and uses_gradient_hooks(trainer, module)

    def _all_reduce_stages(self, tensor: Tensor, op: str) -> None:
        assert self._groups is not None
        reduce_op = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM
        dist.all_reduce(tensor, op=reduce_op, group=self._groups.control)

    # -- model placement ------------------------------------------------------------------------------------

    @contextmanager
    @override
    def tensor_init_context(self, empty_init: bool | None = None) -> Iterator[None]:
        # empty_init: parameters and buffers go to the meta device; each rank materialises its own stage at setup
        with (
            _parameters_on_meta() if empty_init else nullcontext(),
            self.root_device,
            self.precision_plugin.tensor_init_context(),
        ):
            yield

    @contextmanager
    @override
    def model_sharded_context(self) -> Iterator[None]:
        # configure_model builds its parameters on the meta device, so the full model never exists on any rank
        with _parameters_on_meta():
            yield

    @override
    def model_to_device(self) -> None:
        # released tensors (other stages' parts) stay on the meta device
        assert self.model is not None
        if not any(t.is_meta for t in [*self.model.parameters(), *self.model.buffers()]):
            super().model_to_device()
            return
        device = self.root_device
        self.model._apply(lambda t: t if t.is_meta else t.to(device))
        compat.update_properties(self.model, device=device)

    @override
    def setup(self, trainer: Any) -> None:
        assert self.accelerator is not None and self.lightning_module is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        fitting = trainer.state.fn == "fit"
        self._check_supported(trainer, module, fitting)
        self._sync_clock = self._weight_bytes = None
        self._stage_stats.clear()
        # One pipeline, one data stream: every rank keeps the user's own DataLoader (no DistributedSampler, so the
        # order is that of single-device training) and the batch that trains is stage 0's (see _stage0_batch).
        if self.num_replicas == 1:
            compat.disable_distributed_sampler(trainer)
            # every rank logs the last stage's values (replayed), so Lightning's advice to sync them across ranks
            # for epoch-level logging does not apply to one pipeline (with replicas it does, and stays)
            warnings.filterwarnings("ignore", message=_SYNC_DIST_ADVICE, category=PossibleUserWarning)
        # the strategy's own pipeline/ values are rank 0's, sent to every rank (see StageStatistics.emit)
        warnings.filterwarnings("ignore", message=_PIPELINE_SYNC_ADVICE, category=PossibleUserWarning)
        self._partition(module)
        self.precision_plugin.convert_module(module)
        self.model_to_device()
        if self._runtime is not None and isinstance(self._runtime.module, TracedStage):
            self._runtime.module.rebind()  # device moves and conversions may have replaced buffers
        self._replicated_local = self._replicated_here()
        self._sync_replicated()
        self._sync_replicas()
        self._metric_groups_before = {}
        for m in module.modules():
            if isinstance(m, Metric):
                self._metric_groups_before[m] = m.process_group
                m.process_group = self._metric_group
        if fitting:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        self._link_precision(trainer)
        if fitting:
            compat.optimizers_to_device(self.optimizers, self.root_device)
            self._measure_costs()
            self._replace_sigterm_barrier(trainer)
        self._failed = False
        self._engine = None
        if fitting and self.is_asynchronous:
            self._start_engine(module)

    @override
    def setup_optimizers(self, trainer: Any) -> None:
        try:
            super().setup_optimizers(trainer)
        except RuntimeError as err:
            # Lightning's own advice here (manual optimization) does not apply to a pipeline
            if "multiple optimizers" not in str(err):
                raise
            self.optimizers = []
        if len(self.optimizers) != 1:
            raise PipelineConfigError(
                "configure_optimizers must return exactly one optimizer for a pipeline strategy (with as many "
                "parameter groups as you like); several optimizers or none are not supported"
            )

    def _check_supported(self, trainer: Any, module: Any, fitting: bool) -> None:
        if fitting and not module.automatic_optimization:
            raise PipelineConfigError(
                "manual optimization (automatic_optimization = False) is not supported by pipeline strategies: the "
                "pipeline runs the forward and backward passes itself; use automatic optimization"
            )

    def _check_asynchronous(self, trainer: Any) -> None:
        if trainer.accumulate_grad_batches != 1:
            raise PipelineConfigError(
                f"accumulate_grad_batches={trainer.accumulate_grad_batches} does not apply to {self.schedule_name!r}: "
                "an asynchronous policy steps every stage once per mini-batch inside the pipeline; remove it (or use "
                "a larger batch)"
            )
        tied = self._tied
        if tied:
            raise PipelineConfigError(
                f"parameters {tied[:3]} are read by blocks on several stages (tied weights); the asynchronous policies "
                "update each stage at its own time and cannot keep such copies equal. Ways out: a balance or "
                "split_points that puts every block reading them on one stage (for an encoder-decoder's shared "
                "embedding, the decoder's embedding on the encoder's stage); untying them (a Hugging Face model: "
                "tie_word_embeddings=False in its config gives the output layer its own weight); or schedule='gpipe' "
                "or '1f1b', which keep the copies equal"
            )

    def _measure_costs(self) -> None:
        """Each stage's op costs (given, or from the block profile and a timed optimizer step), agreed by all
        ranks, and for an nF1B policy the order they give."""
        assert self._plan is not None
        costs = self._given_costs
        if costs is None:
            step = torch.zeros(self.num_stages, dtype=torch.float64)
            step[self.stage] = time_optimizer_step(self.optimizers[0], self._local_params(), self.root_device)
            if self.num_stages > 1:  # every replica's copy of a stage measured it: take their mean
                dist.all_reduce(step, group=self._world_gloo)
                step /= self.num_replicas
            measured = stage_costs(self._block_costs, self._plan.balance, step.tolist())
            costs = measured.rounded() if measured is not None else OpCosts.uniform(self.num_stages)
        if costs.num_stages != self.num_stages:
            raise PipelineConfigError(
                f"op_costs lists {costs.num_stages} stages for a {self.num_stages}-stage pipeline; give one "
                "[forward, backward, step] per stage"
            )
        self.op_costs = costs
        self.order_choice = None
        if self.schedule_name in ASYNCHRONOUS_SCHEDULES and self.schedule_name != "pipedream":
            self.order_choice = self._choose_order(costs)
            # measured costs: re-derive the order from the op times as they run (see _recalibrate)
            self._measuring = self._given_costs is None and self.order == "cost"
            self._calibrations_left = _CALIBRATION_DRAINS if self._measuring else 0
            rank_zero_info(f"{type(self).__name__}: {self.order_choice.describe()}")

    def _recalibrate(self) -> None:
        """Re-derive the nF1B order from how long each stage's ops took in the stream that just drained (a
        collective, called by every rank right after a drain)."""
        engine = self._engine
        assert engine is not None
        self._calibrations_left = max(0, self._calibrations_left - 1)
        rows = torch.zeros(self.num_stages, 4, dtype=torch.float64)
        medians = engine.clock.medians()
        if medians is not None:
            rows[self.stage] = torch.tensor([*medians, len(engine.clock.backward)], dtype=torch.float64)
        dist.all_reduce(rows, group=self._world_gloo)
        if bool((rows[:, 3] < 2 * self.num_replicas).any()):  # a stage ran too few backwards to tell: keep it
            return
        costs = agreed_costs(rows[:, :3], self.num_replicas)
        try:
            choice = self._choose_order(costs)
        except PipelineConfigError as err:  # an explicit max_inflight that now gives v > 1: keep the order
            rank_zero_warn(f"kept the nF1B order chosen at start: {err}")
            return
        changed = choice.order != engine.order
        self.op_costs, self.order_choice = costs, choice
        engine.replan(choice.order)
        self._next_version_difference = choice.version_difference  # logged from the next stream's first step on
        if changed:
            rank_zero_info(f"{type(self).__name__}: from the op times measured, {choice.describe()}")

    def _choose_order(self, costs: OpCosts) -> OrderChoice:
        w, n, cap = self.num_stages, self.num_microbatches, self.max_inflight
        v_one = self.schedule_name == "timeprest_v"
        choice = choose_order(w, n, costs, cap, staleness_free=v_one, unit_grid=self.order == "unit")
        if v_one and choice.version_difference > 1:
            if self.order == "unit" and cap is None:
                smallest = next(k for k in range(1, w + 1) if version_difference(w, k) == 1)
                raise PipelineConfigError(
                    f"timeprest_v is staleness-free only when the version difference v is 1; in the paper's grid "
                    f"(order='unit') that needs W <= N + 1, and with W={w} stages and N={n} micro-batches "
                    f"v={choice.version_difference}. Use num_microbatches >= {smallest}, order='cost' (it keeps v = 1 "
                    "at any W), fewer stages, or schedule='timeprest_i'"
                )
            unit = self.order == "unit"
            fine = [k for k in range(1, cap) if choose_order(w, n, costs, k, unit_grid=unit).version_difference == 1]
            largest = max(fine, default=1)
            raise PipelineConfigError(
                f"timeprest_v is staleness-free only when the version difference v is 1; with W={w} stages, N={n} "
                f"micro-batches and max_inflight={cap} v={choice.version_difference}. Use max_inflight <= {largest}, "
                "leave it unset (the fastest order with v = 1 is chosen), or schedule='timeprest_i'"
            )
        return choice

    def _replace_sigterm_barrier(self, trainer: Any) -> None:
        """Agree on SIGTERM without Lightning's per-step barrier (see :mod:`lightning_timeprest.sigterm`)."""
        if self.world_size == 1:
            return
        # how many steps rank 0 may run ahead of the others (it waits for their backwards); a synchronous step ends
        # on every rank before the next one starts
        lag = 2 * self.num_stages + 4 + (self.max_inflight or 0) if self.is_asynchronous else 2
        self._sigterm = SigtermAgreement(
            self._sigterm_group, self.global_rank, self.world_size, lag, self.p2p_timeout, self._world_gloo
        )
        self._sigterm.install(trainer, self.launcher.kill if self.launcher is not None else None)

    @property
    def stats(self) -> Sequence[StepStats]:
        """This stage's record of each training step of the current fit, and under the asynchronous policies of
        each drain (the backwards it finished), the last ``STATS_HISTORY`` of them: the
        staleness d of every backward it ran, weight versions held, weight bytes, busy and transfer-wait seconds,
        samples, peak CUDA bytes. Rank 0 sums every stage's records into the ``pipeline/stage{s}/...`` metrics."""
        return self._stage_stats.history

    @property
    def trace(self) -> list[list[TraceEntry]]:
        """The ops this stage ran under an asynchronous policy, in order, one list per stream of mini-batches
        (between drains), each with the weight version it read; empty under the synchronous schedules, which run
        their schedule as built."""
        return [list(stream) for stream in self._engine.trace] if self._engine is not None else []

    @property
    def op_clock(self) -> OpClock | None:
        """How long this stage's training ops took so far (compute only), while fitting; the asynchronous policies
        restart it with each stream of mini-batches (at every drain)."""
        if self._engine is not None:
            return self._engine.clock
        return self._runtime.clock if self._runtime is not None else None

    def _local_params(self) -> list[Tensor]:
        module = self.lightning_module
        assert module is not None
        return [p for p in module.parameters() if not p.is_meta]

    def _start_engine(self, module: Any) -> None:
        assert self._runtime is not None and self._plan is not None
        self._check_asynchronous(module.trainer)
        self._engine = AsyncRuntime(
            stage=self.stage,
            num_stages=self.num_stages,
            stage_module=self._runtime.module,
            root=module,
            comm=self._runtime.comm,
            optimizer=self.optimizers[0],
            schedule=self.schedule_name,
            num_microbatches=self.num_microbatches,
            policy=POLICIES[self.schedule_name],
            alpha=self.alpha,
            rule=self.backward_rule,  # type: ignore[arg-type]
            dynamic=self.dynamic,
            loss_of=_loss_of,
            update=self._stage_update,
            loss_scale=self.precision_plugin.loss_scale,
            order=self.order_choice.order if self.order_choice is not None else None,
        )
        self._stage_stats.version_difference = (
            self.order_choice.version_difference if self.order_choice is not None else 0
        )
        self._next_version_difference = None
        self._payloads, self._reported, self._queued = {}, -1, []
        self._stats_received = dict.fromkeys(range(1, self.num_stages), 0)
        self._stats_sent = 0
        self._step_clock = time.perf_counter()
        store_index = {id(p): i for i, p in enumerate(self._engine.store.params)}
        self._replicated_index = [store_index.get(id(p)) if p is not None else None for p in self._replicated_local]
        self._owners = [r.source for r in self._replicated]
        # each stage update runs Lightning's backward and step hooks itself (the precision hook's stage_update)
        compat.skip_closure_backward(module.trainer, True)
        self._skipping_backward = True

    def _stage_update(self, loss: Tensor, backward: Callable[[Tensor], None], **kwargs: Any) -> bool:
        module = self.lightning_module
        assert module is not None and self._engine is not None
        params = self._engine.store.params
        return self.precision_plugin.stage_update(module, self.optimizers[0], params, loss, backward, **kwargs)

    def _partition(self, module: nn.Module) -> None:
        """Cut the pipelined module into stages, keep this stage's part and release the rest (meta device)."""
        w = self.num_stages
        meta = any(t.is_meta for t in [*module.parameters(), *module.buffers()])
        with sandbox(module):
            calls: dict[str, Any] = {}
            if self.module_name is None and not dominant_sequential(module, self.split_points) and not meta:
                seen, self._sample_problem = step_calls(module, lambda batch: self.batch_to_device(batch, CPU))
                calls = dict(self._agreed(seen or None) or [])
            name, target, traced, reason = find_pipelined_module(
                module, self.module_name, self.split_points, list(calls) or None
            )
            what = f"{type(target).__name__} ({name!r})" if name else f"the forward of {type(target).__name__}"
            prefix = f"{name}." if name else ""
            sample = self._agreed(calls[name] if name in calls else self._sample_call(module, target))
            tm: TracedModel | None = None
            if traced:
                if sample is None:
                    raise PartitionError(
                        f"splitting {what} needs a sample of its input, taken by running your step on one batch: "
                        f"{self._sample_problem}"
                    )
                if meta:
                    raise PartitionError(
                        f"{what} is traced to be split, which needs real parameters: empty_init=True and parameters "
                        "built in configure_model (meta device) work only with an nn.Sequential pipelined module"
                    )
                if self.split_points:
                    tree = call_tree(target, *sample)
                    boundaries = self._relative_split_points(name, target, tree)
                    first = tree.children[0]  # the block before the first cut starts with the forward's first call
                    while first.children and boundaries[0].startswith(first.name + "."):
                        first = first.children[0]
                    names = [first.name, *boundaries]
                else:
                    names = candidate_boundaries(target, call_tree(target, *sample), 4 * w)
                    boundaries = names[1:]
                tm = trace(target, sample[0], sample[1], boundaries, what)
                blocks: list[Any] = [tm.stage(k, k + 1) for k in range(tm.num_blocks)]
                runs = [_first_block(blocks[0])] + [b.run_layers for b in blocks[1:]]
                costs = BlockCosts([tm.block_parameters(k) for k in range(tm.num_blocks)])
                display = [prefix + n for n in names]
            else:
                assert isinstance(target, nn.Sequential)
                blocks = list(target)
                runs = list(blocks)
                costs = BlockCosts(layer_parameter_counts(target))
                names = [n for n, _ in target.named_children()]
                display = [prefix + n for n in names]
            if sample is not None and not meta:
                micro = self._sample_microbatch(sample, traced)
                costs.seconds, costs.forward_seconds, costs.bytes = profile_blocks(
                    runs, blocks, micro, self.root_device, self.num_microbatches
                )
                self._agree_on_costs(costs)
        balance = [1] * w if self.split_points else self.balance
        if balance is None:
            balance = "time" if tm is not None and costs.seconds else "parameters"
        plan = plan_stages(name, names, w, balance, costs)
        self._block_costs = costs
        if tm is not None and len(plan.layer_names) != tm.num_blocks:
            raise PartitionError(f"tracing {what} gave {tm.num_blocks} blocks for {len(names)} names")

        # which stages hold which tensor
        everyone = set(range(w))
        readers: dict[str, set[int]] = {}
        stage_of_block = [s for s in range(w) for _ in range(plan.balance[s])]
        if tm is not None:
            for s in range(w):
                start = sum(plan.balance[:s])
                for rel in tm.stage(start, start + plan.balance[s]).rebind():
                    readers.setdefault(prefix + rel, set()).add(s)
        else:
            index = {n: k for k, n in enumerate(names)}
            for n, _ in [*target.named_parameters(remove_duplicate=False), *target.named_buffers()]:
                readers[prefix + n] = {stage_of_block[index[n.split(".")[0]]]}

        def stages_of(tensor_name: str) -> set[int]:
            return readers.get(tensor_name, everyone) if tensor_name.startswith(prefix) else everyone

        holders = tensor_holders(module, stages_of)
        by_name = {n: id(t) for n, t in [*module.named_parameters(), *module.named_buffers()]}
        self._holders = {k: holders.get(by_name.get(k, -1), everyone) for k in module.state_dict()}
        self._state_keys = list(module.state_dict().keys())
        self._param_order = [n for n, _ in module.named_parameters()]
        self._aliases = parameter_aliases(module)
        self._replicated = replicated_parameters(module, holders)
        # tied across stages: replicated, and read inside the pipelined module (by a stage's blocks)
        read_inside = tensor_holders(module, lambda n: readers.get(n, set()) if n.startswith(prefix) else set())
        self._tied = [r.name for r in self._replicated if read_inside[by_name[r.name]]]
        self._replicated_buffers = [  # (non-persistent buffers, such as a rotary inv_freq, are in no state_dict)
            (n, min(holders.get(id(b), everyone)), b.shape, b.dtype)
            for n, b in module.named_buffers()
            if len(holders.get(id(b), everyone)) > 1
        ]
        keep = {i for i, stages in holders.items() if self.stage in stages}
        if not any(self.stage in readers.get(n, ()) for n, _ in module.named_parameters(remove_duplicate=False)):
            raise PipelineConfigError(
                f"stage {self.stage} holds blocks {list(plan.layers_of(self.stage))} of {what}, which have no "
                "parameters; choose a balance that gives every stage a block with parameters"
            )

        start = sum(plan.balance[: self.stage])
        runner: StageRunner
        if tm is not None:
            self._detached = _detach(target, keep)
            runner = tm.stage(start, start + plan.balance[self.stage])
            runner.module_name = name
            target.forward = runner.forward  # the user's calls of the module reach the stage
            self._traced_module = target
            if self.is_global_zero and (odd := runner.mode_dependent_ops()):
                rank_zero_warn(
                    f"{what} calls {odd[:4]} in its own code (not through an nn.Module such as nn.Dropout or "
                    "nn.BatchNorm2d): the trace recorded them in the mode of the trace (training), so they behave so "
                    "in validation too. Use the nn layers to have them follow train()/eval()"
                )
        else:
            assert isinstance(target, nn.Sequential)
            local = plan.layers_of(self.stage)
            for layer_name, layer in target.named_children():
                if layer_name not in local:
                    _release(layer, keep=keep)
            runner = StageModule(name, [(n, target._modules[n]) for n in local])
            _install(module, name, runner)
            self._sequential = target
        with _ties_kept(module):
            _materialize_held(module, self.root_device, keep)
        if isinstance(runner, TracedStage):
            runner.rebind()
        self._plan = plan
        assert self._groups is not None
        comm = StageComm(
            self.stage, self._groups, self.root_device, self.p2p_timeout, self._get_process_group_backend()
        )
        self._runtime = PipelineRuntime(self.stage, self.num_stages, runner, comm)
        self.partition_table = self._table(plan, display, costs)
        rank_zero_info(
            f"{type(self).__name__}: schedule={self.schedule_name}, stages={w}, micro-batches={self.num_microbatches}, "
            f"pipelined {what} ({reason}; {'traced, ' if tm is not None else ''}{len(names)} blocks), "
            f"{len(self._replicated)} replicated parameters\n" + format_table(self.partition_table)
        )

    def _agreed(self, sample: Any) -> Any:
        """The sample, if every rank has one (each rank takes its own; the stages must decide alike)."""
        if self.num_stages == 1:
            return sample
        assert self._groups is not None
        have = torch.tensor([int(sample is not None)])
        dist.all_reduce(have, op=dist.ReduceOp.MIN, group=self._world_gloo)
        if sample is not None and not have.item():
            self._sample_problem = "another stage could not take a sample batch"
            return None
        return sample

    def _agree_on_costs(self, costs: BlockCosts) -> None:
        """Every rank must cut alike: use the mean over the ranks of each block's measured cost."""
        if self.num_stages == 1 or costs.seconds is None or costs.bytes is None or costs.forward_seconds is None:
            return
        assert self._groups is not None
        mine = torch.tensor([costs.seconds, costs.forward_seconds, costs.bytes], dtype=torch.float64)
        dist.all_reduce(mine, group=self._world_gloo)  # every replica, too: they must cut alike
        mine /= self.world_size
        costs.seconds, costs.forward_seconds = mine[0].tolist(), mine[1].tolist()
        costs.bytes = [int(b) for b in mine[2].tolist()]

    def _relative_split_points(self, name: str, target: nn.Module, tree: CallRecord) -> list[str]:
        assert self.split_points is not None
        prefix = f"{name}." if name else ""
        relative = [p[len(prefix) :] if prefix and p.startswith(prefix) else p for p in self.split_points]
        if len(relative) != self.num_stages - 1:
            raise PartitionError(
                f"split_points={self.split_points} gives {len(relative) + 1} stages, but there are {self.num_stages} "
                f"devices; give {self.num_stages - 1} split points"
            )
        known = {n for n, _ in target.named_modules() if n}
        unknown = [p for p in relative if p not in known]
        if unknown:
            raise PartitionError(
                f"split_points {unknown} name no submodule of {type(target).__name__}"
                + (f" (names are relative to {name!r} or start with it)" if name else "")
                + f"; some of its submodules: {sorted(known)[:12]}"
            )
        calls = {r.name: r.calls for r in walk_calls(tree)}
        for point in relative:
            if calls.get(point) != 1:
                children = [f"{point}.{c}" for c, _ in target.get_submodule(point).named_children()]
                hint = f" (e.g. its first block {children[0]!r})" if children and calls.get(children[0]) == 1 else ""
                raise PartitionError(
                    f"split point {point!r} is called {calls.get(point, 0)} times per forward; a split point must be "
                    f"a submodule the forward calls exactly once{hint}"
                )
        order = [r.name for r in walk_calls(tree)]
        if [order.index(p) for p in relative] != sorted(order.index(p) for p in relative):
            raise PartitionError(f"split_points {self.split_points} must be given in the order the forward calls them")
        return relative

    def _table(self, plan: StagePlan, display: Sequence[str], costs: BlockCosts) -> list[list[str]]:
        rows = [["stage", "layers", "parameters", "est. time", "device"]]
        total = sum(costs.seconds) if costs.seconds else 0.0
        for s in range(plan.num_stages):
            start, count = sum(plan.balance[:s]), plan.balance[s]
            shown = display[start] if count == 1 else f"{display[start]} .. {display[start + count - 1]} ({count})"
            params = sum(costs.parameters[start : start + count])
            share = f"{sum(costs.seconds[start : start + count]) / total:.0%}" if costs.seconds and total else "-"
            devices = self.parallel_devices or []
            device = devices[s] if s < len(devices) else self.root_device
            rows.append([str(s), shown, f"{params:,}", share, str(device)])
        return rows

    def _sample_call(self, module: Any, target: nn.Module) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        call, self._sample_problem = sample_call(module, target, lambda batch: self.batch_to_device(batch, CPU))
        return call

    def _sample_microbatch(self, sample: tuple[tuple[Any, ...], dict[str, Any]], traced: bool) -> Any:
        try:
            n = min(self.num_microbatches, batch_size(sample))
        except ValueError:
            n = 1
        micro = split(sample, n)[0][0] if n > 1 else sample
        return micro if traced else micro[0][0]

    def _replicated_here(self) -> list[nn.Parameter | None]:
        """This rank's copy of each replicated parameter (``None`` where its stage does not hold it).

        Computed once per setup, after the model is on its device (the parameters do not change after that).
        """
        module = self.lightning_module
        assert module is not None
        names = ckpt.canonical_param_names(module, self._aliases)
        by_name = {names[id(p)]: p for p in module.parameters()}
        return [by_name.get(r.name) for r in self._replicated]

    def _sync_replicated(self) -> None:
        """Make every replicated tensor identical on all stages that hold it (the lowest holder's values win)."""
        module = self.lightning_module
        assert module is not None and self._plan is not None and self._groups is not None
        if self.num_stages == 1:
            return
        assert self._runtime is not None
        pairs: list[tuple[Tensor | None, int, torch.Size, torch.dtype]] = [
            (p, r.source, r.shape, r.dtype) for r, p in zip(self._replicated, self._replicated_local, strict=True)
        ]
        buffers = dict(module.named_buffers())
        pairs += [(buffers.get(n), source, shape, dtype) for n, source, shape, dtype in self._replicated_buffers]
        with torch.no_grad():
            for tensor, source, shape, dtype in pairs:
                wire = tensor.detach().cpu() if tensor is not None else torch.empty(shape, dtype=dtype)
                self._runtime.comm.broadcast_tensor(wire, source)
                if tensor is not None:
                    tensor.copy_(wire)

    def _sync_replicas(self) -> None:
        """Start every replica of a stage from replica 0's tensors (as DDP broadcasts rank 0's model)."""
        if self._replica_group is None:
            return
        module = self.lightning_module
        assert module is not None
        with torch.no_grad():
            for tensor in module.state_dict().values():
                if isinstance(tensor, Tensor) and not tensor.is_meta:
                    dist.broadcast(tensor, src=self.stage, group=self._replica_group)

    def _average_over_replicas(self, params: list[Tensor]) -> None:
        """Average this stage's gradients over the data-parallel replicas (one flat all-reduce)."""
        if self._replica_group is None:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self._replica_group)
        flat /= self.num_replicas
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def _unpartition(self, gather: bool) -> None:
        """Give the module back its own forward and layers; with ``gather``, every rank gets every stage's tensors
        (so that the whole trained model is there after ``fit``, on rank 0 for the launcher to return, and on the
        others for a later ``validate``/``test``/``predict`` in the same processes)."""
        module, plan, runtime = self.lightning_module, self._plan, self._runtime
        if module is None or plan is None or runtime is None:
            return
        merged: dict[str, Tensor] = {}
        if gather and self.num_stages > 1:
            parts = runtime.comm.all_gather_objects(self._own_state())
            merged = {k: v for part in parts for k, v in part.items()}
        if self._sequential is not None:
            _install(module, plan.module_name, self._sequential)
        if self._traced_module is not None:
            self._traced_module.__dict__.pop("forward", None)
            for sub, kind, attr, placeholder in self._detached:
                getattr(sub, kind)[attr] = placeholder
            self._detached = []
        if merged:
            _fill(module, "", merged)
        self._plan = self._sequential = self._traced_module = self._runtime = None

    @override
    def on_exception(self, exception: BaseException) -> None:
        self._failed = True
        if isinstance(exception, PipelineCommError):
            # said at once, before the teardown: when a rank dies, Lightning's launcher kills every rank within 5 s,
            # which can be before the traceback of this rank's error is printed
            print(f"[rank {self.global_rank}] {type(exception).__name__}: {exception}", file=sys.stderr, flush=True)
        super().on_exception(exception)

    @override
    def teardown(self) -> None:
        if not self._failed and self._runtime is not None:
            self._drain()
            self._final_optimizer_states = {id(o): self.optimizer_state(o) for o in self.optimizers}
        self.precision_plugin.link = None
        if self._skipping_backward:
            compat.skip_closure_backward(self.lightning_module.trainer, False)
            self._skipping_backward = False
        if self._sigterm is not None:
            self._sigterm.finish(self._failed)
            self._sigterm = None
        self._unpartition(gather=not self._failed)
        for metric, group in self._metric_groups_before.items():
            metric.process_group = group
        self._metric_groups_before = {}
        if self._groups is not None:
            destroy_pipeline_groups(self._groups)
            for group in (self._metric_group, self._own_replica_group, self._world_gloo, self._sigterm_group):
                dist.destroy_process_group(group)
            self._groups = self._metric_group = self._own_replica_group = self._world_gloo = None
            self._sigterm_group = None
            self._replica_group = None
        module = self.lightning_module
        compat.optimizers_to_device(self.optimizers, torch.device("cpu"))
        if module is not None:
            # released layers stay on the meta device on ranks other than 0
            module._apply(lambda t: t if t.is_meta else t.cpu())
        self.precision_plugin.teardown()
        assert self.accelerator is not None
        self.accelerator.teardown()
        self.checkpoint_io.teardown()

    # -- steps ----------------------------------------------------------------------------------------------

    def _schedule(self, name: str, num_microbatches: int) -> Schedule:
        key = (name, num_microbatches)
        if key not in self._schedules:
            self._schedules[key] = build_schedule(name, self.num_stages, num_microbatches)
        return self._schedules[key]

    def _stage0_batch(self, batch: Any) -> Any:
        """Give the last stage stage 0's batch: the labels that train must be those of the inputs that entered.

        Every rank iterates its own DataLoader (Lightning drives the loop everywhere), but random samplers or
        augmentations would draw differently per rank; stage 0's copy is the one that counts.
        """
        runtime = self._runtime
        assert runtime is not None
        if runtime.is_first and not runtime.is_last:  # never waits: the last stage may be behind
            runtime.comm.isend_value(move_data_to_device(batch, "cpu"), self.last_stage)
        elif runtime.is_last and not runtime.is_first:
            batch = move_data_to_device(runtime.comm.recv_value(0), self.root_device)
        return batch

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Tensor:
        """Run one mini-batch forward and backward through the pipeline; return its loss on every rank.

        Asynchronous policies return the loss of the most recent mini-batch that completed on every stage (it
        lags the mini-batch just taken in by a few steps; NaN before the first one completes).
        """
        module = self.lightning_module
        assert module is not None
        if self._engine is not None:
            return self._async_step(args, kwargs)
        # Lightning calls zero_grad between this step and backward(): keep this step's gradients aside until then
        params = list(module.parameters())
        earlier = [p.grad for p in params]
        for p in params:
            p.grad = None
        loss = self._pipelined_step("training_step", self.precision_plugin.train_step_context, args, kwargs, True)
        self._new_grads = {p: p.grad for p in params}
        for p, g in zip(params, earlier, strict=True):
            p.grad = g
        return loss.to(self.root_device)

    def _install_gradients(self) -> None:
        """The synchronous backward (called by the precision hook inside Lightning's closure, after its
        ``zero_grad``): put the gradients the pipeline computed in ``training_step`` on the parameters, summed over
        the stages for replicated parameters and averaged over the data-parallel replicas."""
        new = self._new_grads or {}
        self._new_grads = None
        self._sum_shared_gradients(new)
        for p, g in new.items():
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)
        self._average_over_replicas(list(new))

    def _sum_shared_gradients(self, grads: dict[nn.Parameter, Tensor | None]) -> None:
        """Sum over stages the gradients of the replicated parameters (stems, heads, tied weights).

        A parameter no stage computed a gradient for keeps ``grad=None``, as on one device (so momentum or weight
        decay do not move it).
        """
        if not self._replicated or self.num_stages == 1:
            return
        assert self._groups is not None
        here = self._replicated_local
        local = [grads.get(p) if p is not None else None for p in here]
        flat = torch.cat(
            [torch.tensor([g is not None for g in local], dtype=torch.float32)]
            + [
                (g.detach().reshape(-1).float().cpu() if g is not None else torch.zeros(r.shape.numel()))
                for r, g in zip(self._replicated, local, strict=True)
            ]
        )
        assert self._runtime is not None
        self._runtime.comm.all_reduce_sum(flat)
        offset = len(here)
        for i, (r, p) in enumerate(zip(self._replicated, here, strict=True)):
            n = r.shape.numel()
            if p is not None and flat[i] > 0:
                grads[p] = flat[offset : offset + n].view(r.shape).to(device=p.device, dtype=p.dtype)
            offset += n

    @override
    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        if self._engine is not None:
            # asynchronous: each stage stepped its optimizer inside the pipeline, once per finished mini-batch
            return closure()
        # synchronous: the step (clipping and the optimizer's own) is the time the closure does not take; it counts
        # as this stage's compute in the next step's record
        closure_s = 0.0

        def timed() -> Any:
            nonlocal closure_s
            begin = time.perf_counter()
            try:
                return closure()
            finally:
                closure_s = time.perf_counter() - begin

        start = time.perf_counter()
        result = super().optimizer_step(optimizer, timed, model, **kwargs)
        step_s = time.perf_counter() - start - closure_s
        self._step_s += step_s
        if self._runtime is not None:
            self._runtime.clock.add("step", step_s)
            if self._hook_logs_shared:  # every stage's gradient hooks logged: the same values on every rank
                module = self.lightning_module
                assert module is not None
                for hook_logs in self._runtime.comm.all_gather_objects(self.precision_plugin.take_hook_logs()):
                    metrics.replay(module, hook_logs, {})
        return result

    # -- the asynchronous engine ----------------------------------------------------------------------------

    def _async_step(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        module, runtime, engine = self.lightning_module, self._runtime, self._engine
        assert module is not None and runtime is not None and engine is not None
        if self._next_version_difference is not None:
            self._stage_stats.version_difference, self._next_version_difference = self._next_version_difference, None
        for owed in self._queued:
            owed()
        self._queued = []
        trainer = module.trainer
        batch, rest = self._stage0_batch(args[0]), args[1:]
        # a mini-batch smaller than N (a short last batch) runs in fewer micro-batches, the others' slots idle
        microbatches, sizes = split_at_most(batch, self.num_microbatches)
        total = sum(sizes)
        weights = [size / total for size in sizes]
        capture = metrics.LogCapture(module)

        def call_user(j: int) -> Any:
            with capture.microbatch():
                return module.training_step(microbatches[j], *rest, **kwargs)

        k = engine.newest + 1
        scope = metrics.metric_step_scope(module) if runtime.is_last else nullcontext()
        with self.precision_plugin.train_step_context(), scope:
            engine.run_step(call_user if runtime.runs_user_code else None, sizes, weights)
        if runtime.is_last:
            outputs = engine.finished.pop(k)
            loss = _weighted_loss(outputs, sizes)  # a Python float: it pickles and unpickles much faster than a tensor
            logged = metrics.reduce_logged(module, capture.calls[-len(sizes) :], sizes)
            payload = (loss, logged, metrics.metric_states(module, logged), self._stats_record())
            self._payloads[k] = payload
            for s in range(self.num_stages - 1):
                runtime.comm.isend_object(payload, s)
        elif not runtime.is_first:
            runtime.comm.isend_object(self._stats_record(), 0)
        else:
            self._stage_stats.add(0, *self._stats_record())
        self._stats_sent += 1
        if k == 0:  # the first step's ops include allocations and other warm-up: not a cost to plan with
            engine.clock = OpClock()
        final = last_step_of_epoch(trainer)
        if final or (self._calibrations_left and k + 1 >= CALIBRATION_STEPS):
            self._drain(in_step=True)
        else:
            self._report(engine.completed_on_stage0, in_step=True)
        for hook_logs in self._stage_stats.take_hook_logs():  # stage 0 gathers every stage's
            metrics.replay(module, hook_logs, {})
        self._stage_stats.emit(module, final, self.global_rank == 0, self._share)
        return torch.tensor(self._last_loss, dtype=torch.float32, device=self.root_device)

    def _stats_record(self) -> tuple[list[float], list[LoggedValue]]:
        """This stage's record since the last one, and what the user's gradient hooks logged in its updates."""
        engine = self._engine
        assert engine is not None and self._runtime is not None
        now = time.perf_counter()
        stats = engine.take_stats()
        stats.wait_s = self._runtime.comm.wait_seconds
        stats.cuda_peak_bytes = cuda_peak_bytes(self.root_device)
        self._stage_stats.history.append(stats)
        self._runtime.comm.wait_seconds = 0.0
        record = stats.as_tensor(now - self._step_clock).tolist()
        self._step_clock = now
        return record, self.precision_plugin.take_hook_logs()

    def _report(self, completed: int, in_step: bool) -> None:
        """Replay what the mini-batches up to ``completed`` logged, and (rank 0) the stage statistics owed."""
        runtime = self._runtime
        assert runtime is not None
        for m in range(self._reported + 1, completed + 1):
            if runtime.is_last:
                payload = self._payloads.pop(m)
            else:
                payload = runtime.comm.recv_object_from(self.last_stage)
            loss, logged, states, last_stats = payload
            self._last_loss = loss
            self._replay(logged, states, in_step)
            if runtime.is_first and not runtime.is_last:
                self._stage_stats.add(self.last_stage, *last_stats)
        self._reported = max(self._reported, completed)
        if runtime.is_first:
            # middle stages' records of the steps before ``completed`` were sent before that mini-batch's
            # backward reached stage 0, so receiving them never waits on the pipeline
            for s in range(1, self.num_stages - 1):
                while self._stats_received[s] < min(completed, self._stats_sent):
                    self._stage_stats.add(s, *runtime.comm.recv_object_from(s))
                    self._stats_received[s] += 1

    def _replay(self, logged: Any, states: Any, in_step: bool) -> None:
        module, runtime = self.lightning_module, self._runtime
        assert module is not None and runtime is not None

        def replay() -> None:
            if runtime.is_last:  # keep the running metric state of the mini-batches after this one
                current = metrics.metric_states(module, logged)
                metrics.replay(module, logged, states)
                metrics.restore_states(module, current)
            else:
                metrics.replay(module, logged, states)

        if in_step:
            replay()
        else:
            self._queued.append(replay)

    @property
    def _share(self) -> Callable[[Any], Any] | None:
        """A broadcast of a Python value from rank 0 to every rank (``None`` with one process)."""
        return self._share_from_rank_zero if self.world_size > 1 else None

    def _share_from_rank_zero(self, value: Any) -> Any:
        shared = [value]
        dist.broadcast_object_list(shared, src=0, group=self._world_gloo)
        return shared[0]

    def _drain(self, in_step: bool = False) -> None:
        """Finish every mini-batch in flight on every stage (a collective: all ranks call it at the same point)."""
        engine, runtime = self._engine, self._runtime
        if engine is None or runtime is None or engine.newest < 0:
            return
        newest = engine.newest
        module = self.lightning_module
        assert module is not None
        with self.precision_plugin.train_step_context():
            engine.drain()
        record = self._stats_record()
        if runtime.is_first:
            self._stage_stats.add(0, *record)
        elif not runtime.is_last:
            runtime.comm.isend_object(record, 0)
        self._stats_sent += 1 if not runtime.is_last else 0
        self._report(newest, in_step)
        if runtime.is_first:
            for s in range(1, self.num_stages - 1):
                while self._stats_received[s] < self._stats_sent:
                    self._stage_stats.add(s, *runtime.comm.recv_object_from(s))
                    self._stats_received[s] += 1
        runtime.comm.wait_sends()
        self._payloads, self._reported = {}, -1
        self._stats_received = dict.fromkeys(range(1, self.num_stages), 0)
        self._stats_sent = 0
        self._sync_replicated_after_async()
        if self._measuring:
            self._recalibrate()

    def _sync_replicated_after_async(self) -> None:
        """Copy each replicated parameter from the stage that trained it to every stage that holds it."""
        engine, runtime = self._engine, self._runtime
        if not self._replicated or engine is None or runtime is None or self.num_stages == 1:
            return
        flags = torch.zeros(len(self._replicated), self.num_stages)
        for i, index in enumerate(self._replicated_index):
            if index is not None and index in engine.trained:
                flags[i, self.stage] = 1.0
        runtime.comm.all_reduce_sum(flags)
        for i, r in enumerate(self._replicated):
            trainers = [s for s in range(self.num_stages) if flags[i, s] > 0]
            if len(trainers) > 1:
                raise PipelineConfigError(
                    f"parameter {r.name!r} received gradients on stages {trainers}; an asynchronous policy updates "
                    "each stage at its own time, so a parameter used on several stages (e.g. an embedding tied to the "
                    "output layer) cannot stay consistent. Untie it, or use schedule='gpipe' or '1f1b'"
                )
            if trainers:
                self._owners[i] = trainers[0]
        with torch.no_grad():
            for r, p, owner in zip(self._replicated, self._replicated_local, self._owners, strict=True):
                wire = p.detach().cpu() if p is not None else torch.empty(r.shape, dtype=r.dtype)
                runtime.comm.broadcast_tensor(wire, owner)
                if p is not None:
                    p.copy_(wire)

    @override
    def on_validation_start(self) -> None:
        self._drain()
        super().on_validation_start()

    @override
    def on_train_end(self) -> None:
        self._drain()
        super().on_train_end()

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        self._pipelined_step("validation_step", self.precision_plugin.val_step_context, args, kwargs, False)
        return None

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        self._pipelined_step("test_step", self.precision_plugin.test_step_context, args, kwargs, False)
        return None

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._pipelined_step("predict_step", self.precision_plugin.predict_step_context, args, kwargs, False)

    def _pipelined_step(
        self, hook: str, context: Callable[[], Any], args: tuple[Any, ...], kwargs: dict[str, Any], train: bool
    ) -> Any:
        """Run the user's ``hook`` on one mini-batch through the pipeline and log what it logged, on every rank.

        Returns, on every rank: the mini-batch loss when training, the joined outputs of ``predict_step``,
        otherwise ``None``.
        """
        module, runtime = self.lightning_module, self._runtime
        assert module is not None and runtime is not None
        batch, rest = self._stage0_batch(args[0]), args[1:]
        # a batch smaller than N runs in fewer micro-batches: the size-weighted mean of their losses is still the
        # batch's mean, so the gradient equals one device's
        microbatches, sizes = split_at_most(batch, self.num_microbatches)
        total = sum(sizes)
        scaler = getattr(self.precision_plugin, "scaler", None)
        scale = float(scaler.get_scale()) if train and scaler is not None else 1.0  # 16-mixed: the scaled loss
        weights = [size / total / module.trainer.accumulate_grad_batches * scale for size in sizes]
        capture = metrics.LogCapture(module)
        step = getattr(module, hook)

        def call_user(j: int) -> Any:
            with capture.microbatch():
                return step(microbatches[j], *rest, **kwargs)

        # evaluation is forward-only, for which every synchronous schedule is gpipe's forward order
        schedule = self._schedule(self.schedule_name if train else "gpipe", len(sizes))
        scope = metrics.metric_step_scope(module) if runtime.is_last else nullcontext()
        start, waited = time.perf_counter(), runtime.comm.wait_seconds
        with context(), scope:
            result = runtime.run(schedule, call_user, train=train, loss_of=_loss_of, loss_weights=weights)
        record = self._sync_stats_record(start, runtime.comm.wait_seconds - waited, total) if train else None

        payload = None
        if runtime.is_last:
            if train:  # a Python float: it pickles and unpickles much faster than a tensor
                value = _weighted_loss(result.outputs, sizes)
            else:
                value = move_data_to_device(join(result.outputs), "cpu") if hook == "predict_step" else None
            logged = metrics.reduce_logged(module, capture.calls, sizes)
            payload = (value, logged, metrics.metric_states(module, logged))
        if record is None:
            value, logged, states = runtime.comm.broadcast_object(payload, self.last_stage)
        else:  # one exchange carries the last stage's results to every stage and every stage's record to stage 0
            gathered = runtime.comm.all_gather_objects((payload, record))
            value, logged, states = gathered[self.last_stage][0]
            if runtime.is_first:
                for s, (_, stage_record) in enumerate(gathered):
                    self._stage_stats.add(s, stage_record)
            self._stage_stats.emit(module, last_step_of_epoch(module.trainer), self.global_rank == 0, self._share)
        metrics.replay(module, logged, states)
        return torch.tensor(value, dtype=torch.float32) if train else value

    def _sync_stats_record(self, start: float, wait_s: float, samples: int) -> list[float]:
        """This stage's record of one synchronous training step (the same fields as the asynchronous engine's).

        Busy time is the schedule's run less the time blocked on transfers, plus the optimizer step taken since the
        previous record; wall time runs from the previous step's record, so Lightning's loop between steps counts as
        idle, as it does for the asynchronous policies.
        """
        module = self.lightning_module
        assert module is not None
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
            cuda_peak_bytes=cuda_peak_bytes(self.root_device),
        )
        wall = now - (self._sync_clock if self._sync_clock is not None else start)
        self._sync_clock = now
        self._stage_stats.history.append(stats)
        return stats.as_tensor(wall).tolist()

    # -- checkpoints ----------------------------------------------------------------------------------------

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        # restore after partitioning: each stage loads its own entries, and a meta-initialised model never
        # needs the full checkpoint in its tensors
        return True

    def _own_state(self) -> dict[str, Tensor]:
        """The state-dict entries this stage contributes: those it is the last holder of (a replicated entry comes
        from the latest stage that holds it: the last stage ran every user step to its end, so its replicated
        buffers, e.g. a head's batch-norm statistics, are the up-to-date ones)."""
        module = self.lightning_module
        assert module is not None
        everyone = set(range(self.num_stages))
        return {
            k: v.detach().cpu()
            for k, v in module.state_dict().items()
            if max(self._holders.get(k, everyone)) == self.stage
        }

    @property
    def _sharding(self) -> bool:
        return self.sharded_checkpoint and self._runtime is not None

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The full model's state dict on rank 0 (gathered from all stages), empty on the other ranks; with
        ``sharded_checkpoint``, this stage's entries on every rank."""
        if self._runtime is None:
            return super().lightning_module_state_dict()
        self._drain()
        if self.sharded_checkpoint:
            return self._own_state()
        parts = self._runtime.comm.gather_objects(self._own_state())
        return ckpt.merge_state_dicts(parts, self._state_keys) if parts is not None else {}

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """The whole-model optimizer state on rank 0 (gathered from all stages), empty on the other ranks.

        After ``fit`` (``trainer.save_checkpoint`` in the user's script) the stages are gone: the state gathered
        at teardown is returned.
        """
        module, runtime = self.lightning_module, self._runtime
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        if runtime is None:
            return self._final_optimizer_states.get(id(optimizer), {})
        assert module is not None
        self._drain()
        names = ckpt.canonical_param_names(module, self._aliases)
        named = ckpt.named_optimizer_state(optimizer, names)
        if self._engine is not None:  # a replicated parameter's state is that of the stage that trains it
            for r, owner in zip(self._replicated, self._owners, strict=True):
                if owner != self.stage:
                    named["state"].pop(r.name, None)
        if self.sharded_checkpoint:
            return named
        parts = runtime.comm.gather_objects(named)
        return ckpt.consolidate_optimizer_states(parts, self._param_order) if parts is not None else {}

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """An ordinary checkpoint file written by rank 0; with ``sharded_checkpoint``, a directory ``filepath``
        in which each stage of replica 0 writes its own states and rank 0 the rest. The op costs the nF1B order was
        generated from are saved too, so that a resumed run continues in the same order."""
        if self.op_costs is not None and self.order_choice is not None:
            costs = self.op_costs
            checkpoint[ORDER_KEY] = {"op_costs": [list(costs.forward), list(costs.backward), list(costs.step)]}
        self._save_precision_state(checkpoint)
        if not self._sharding:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        directory = Path(filepath)
        shard = {"state_dict": checkpoint.pop("state_dict"), "optimizer_states": checkpoint.pop("optimizer_states")}
        if self.replica == 0:
            directory.mkdir(parents=True, exist_ok=True)
            torch.save(shard, directory / ckpt.shard_file(self.stage, self.num_stages))
            if self.is_global_zero:
                layout = {
                    "num_stages": self.num_stages,
                    "state_keys": self._state_keys,
                    "param_order": self._param_order,
                }
                torch.save({**checkpoint, "timeprest_shards": layout}, directory / ckpt.META_FILE)
        self.barrier("sharded checkpoint written")

    def _save_precision_state(self, checkpoint: dict[str, Any]) -> None:
        """Save the precision plugin's state under the name of the plugin the user chose (a checkpoint that one
        device, or plain DDP, resumes from as its own). Under the asynchronous policies the loss scale is the last
        stage's (it scales every loss; the other stages unscale by what it sent)."""
        plugin = self.precision_plugin
        state = checkpoint.pop(type(plugin).__qualname__, None)
        scaler = plugin.scaler
        if self._engine is not None and scaler is not None and scaler.is_enabled() and self._runtime is not None:
            state = self._runtime.comm.broadcast_object(plugin.state_dict(), self.last_stage)
        if state:
            checkpoint[type(plugin.wrapped).__qualname__] = state

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        if ckpt.is_sharded(checkpoint_path):
            checkpoint = ckpt.consolidate(checkpoint_path)
        else:
            checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        plugin = self.precision_plugin  # Lightning restores the plugin's state from its class's entry
        if type(plugin.wrapped).__qualname__ in checkpoint:
            checkpoint[type(plugin).__qualname__] = checkpoint.pop(type(plugin.wrapped).__qualname__)
        return checkpoint

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        module = self.lightning_module
        assert module is not None
        state = checkpoint["state_dict"]
        own = module.state_dict().keys()
        if strict:
            missing = [k for k in own if k not in state]
            unexpected = [k for k in state if k not in self._state_keys]
            if missing or unexpected:
                raise ckpt.CheckpointError(
                    f"the checkpoint does not match the model: missing keys {missing[:5]}, unexpected keys "
                    f"{unexpected[:5]}"
                )
        module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=strict)
        self._restore_order(checkpoint.get(ORDER_KEY))

    def _restore_order(self, saved: Mapping[str, Any] | None) -> None:
        """Continue in the nF1B order of the run that wrote the checkpoint (unless op costs were given)."""
        engine = self._engine
        if saved is None or engine is None or self.order_choice is None or self._given_costs is not None:
            return
        costs = OpCosts(*(tuple(c) for c in saved["op_costs"]))
        if costs.num_stages != self.num_stages:  # resumed with another number of stages: calibrate anew
            return
        choice = self._choose_order(costs)
        self.op_costs, self.order_choice, self._calibrations_left = costs, choice, 0
        engine.replan(choice.order)
        self._stage_stats.version_difference = choice.version_difference

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        module = self.lightning_module
        assert module is not None
        names = ckpt.canonical_param_names(module, self._aliases)
        for optimizer, saved in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            optimizer.load_state_dict(ckpt.local_optimizer_state(optimizer, saved, names))
        compat.optimizers_to_device(self.optimizers, self.root_device)

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        for name in SCHEDULES:
            if name not in strategy_registry:
                strategy_registry.register(
                    name,
                    cls,
                    description=f"Pipeline-parallel training with the {name} schedule",
                    schedule=name,
                )


class TiMePReStStrategy(PipelineStrategyMixin, DDPStrategy):
    """Pipeline-parallel training of an unchanged LightningModule, one stage per process.

    ``Trainer(strategy="gpipe", devices=4)`` or ``Trainer(strategy=TiMePReStStrategy(schedule="1f1b",
    num_microbatches=8, balance=[3, 3, 2, 2]))``. Arguments: see :class:`PipelineStrategyMixin`.
    """

    strategy_name = "timeprest"
