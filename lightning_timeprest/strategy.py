"""The Lightning glue: :class:`TiMePReStStrategy` trains an unchanged LightningModule pipeline-parallel.

One process per stage, started by Lightning's own launchers (it is a ``DDPStrategy`` underneath: popen, spawn
and fork launchers, cluster environments, gloo on CPU and nccl on GPU). The strategy only connects Lightning's
hooks to the pieces that do the work, each in its own module:

* :mod:`~lightning_timeprest.config`: the arguments, checked at construction;
* :mod:`~lightning_timeprest.groups`: the process groups, created at setup and destroyed at teardown;
* :mod:`~lightning_timeprest.placement`: which stage holds what; this rank keeps its stage, releases the rest;
* :mod:`~lightning_timeprest.sync_driver` and :mod:`~lightning_timeprest.async_driver`: the training steps of the
  synchronous schedules and of the asynchronous policies (and their lag/replay protocol);
* :mod:`~lightning_timeprest.precision`: the precision/optimizer hook every stage update goes through;
* :mod:`~lightning_timeprest.stage_stats`: what each stage did, logged as ``pipeline/...``;
* :mod:`~lightning_timeprest.checkpoint` and :mod:`~lightning_timeprest.sigterm`: checkpoints, and stopping on
  SIGTERM without a per-step barrier.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from torch.optim import Optimizer
from torchmetrics import Metric
from typing_extensions import override

from lightning_timeprest import averaging, collected, compat, metrics
from lightning_timeprest import checkpoint as ckpt
from lightning_timeprest.async_driver import (
    CALIBRATION_STEPS,
    AsyncDriver,
    OrderState,
    check_untied,
)
from lightning_timeprest.async_runtime import AsyncRuntime, TraceEntry
from lightning_timeprest.comm import PipelineCommError, StageComm
from lightning_timeprest.config import PIPELINE_ARGUMENTS, PipelineConfig, pipeline_config
from lightning_timeprest.costs import OpClock, measure_op_costs
from lightning_timeprest.errors import PipelineConfigError
from lightning_timeprest.groups import ProcessGroups, create_groups, destroy_groups
from lightning_timeprest.partition import format_table
from lightning_timeprest.placement import (
    Placement,
    PlacementSpec,
    parameters_on_meta,
    place,
    sync_batch_norms,
    unplace,
    unsync_batch_norms,
)
from lightning_timeprest.precision import PipelinePrecision, uses_gradient_hooks
from lightning_timeprest.runtime import PipelineRuntime, StageRunner
from lightning_timeprest.schedules import SCHEDULES, OpCosts, OrderChoice
from lightning_timeprest.sigterm import SigtermAgreement
from lightning_timeprest.stage import Stage
from lightning_timeprest.stage_stats import StageStatistics, StepStats
from lightning_timeprest.sync_driver import SyncDriver
from lightning_timeprest.weight_gradients import eligible

__all__ = ["CALIBRATION_STEPS", "PipelineConfigError", "PipelineStrategyMixin", "TiMePReStStrategy"]

CPU = torch.device("cpu")


#: the name of the parameter that stands in while ``configure_optimizers`` runs on a stage that trains nothing
STAND_IN = "_timeprest_stand_in"


@contextmanager
def _stand_in_parameter(module: Any) -> Iterator[Tensor | None]:
    """While ``configure_optimizers`` runs on a stage that holds no trainable parameter (its layers frozen, or
    none with parameters), a zero-size trainable parameter stands in, so that ``SGD(self.parameters())`` or a
    ``requires_grad`` filter, which train on one device, do not fail on an empty list here. The caller takes it
    out of the optimizer afterwards: the stage's groups are then empty, as the checkpoint's merge expects."""
    if module is None or any(p.requires_grad for p in module.parameters()):
        yield None
        return
    stand_in = torch.nn.Parameter(torch.zeros(0, device=module.device))
    module.register_parameter(STAND_IN, stand_in)
    try:
        yield stand_in
    finally:
        compat.parameter_table(module).pop(STAND_IN)


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
            bounds activation memory and staleness. Default: chosen for speed (the smallest cap within 3% of the
            fastest; for timeprest_v the fastest with version difference v = 1).
        op_costs: per stage ``[forward, backward, step]`` (one micro-batch's forward and backward, the optimizer
            step; any unit) to generate the nF1B order from, instead of measuring them at setup. Measured costs
            vary a little between runs and so may the order; give them to replay an order exactly.
        defer_weight_grads: gpipe and the asynchronous policies: a stage's ``nn.Linear`` layers take their weight
            gradients once per mini-batch, over all its micro-batches, instead of once per micro-batch (the same
            gradients, in fewer passes over the weights; see :mod:`~lightning_timeprest.weight_gradients`).
            ``False`` leaves them to autograd, as 1f1b always does (keeping every micro-batch's layer inputs to the
            end of the mini-batch would undo what 1f1b saves in memory).
        loss_reduction: how your training step's loss reduces over the batch's samples, and so how a mini-batch's
            loss is made from its micro-batches' losses: ``"mean"`` (the default; their mean weighted by
            micro-batch size) or ``"sum"`` (their sum, for a loss with ``reduction="sum"``, such as a VAE's
            ELBO). A value you log as the very tensor the step returns is reduced the same way.
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
        defer_weight_grads: bool = True,
        loss_reduction: Literal["mean", "sum"] = "mean",
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    ) -> None:
        # checked first, and set before the base class sets parallel_devices (which reads processes_per_device);
        # the arguments before `accelerator` are the pipeline's own
        given = locals()
        self.config: PipelineConfig = pipeline_config(**{name: given[name] for name in PIPELINE_ARGUMENTS})
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
        self._order = OrderState()
        self._groups: ProcessGroups | None = None
        self._placement: Placement | None = None
        self._stage: Stage | None = None
        self._sync: SyncDriver | None = None
        self._async: AsyncDriver | None = None
        self._sigterm: SigtermAgreement | None = None
        self._collecting: list[str] = []  # the epoch-end hooks wrapped by lightning_timeprest.collected
        self._example_input: Any = None  # the module's example_input_array, set aside while placed
        self._deferred_averaging: list[Any] = []  # weight-averaging callbacks whose setup makes no whole copy
        self._stage_stats = StageStatistics()
        self._metric_groups_before: dict[Metric, Any] = {}
        self._synced_norms: list[tuple[Any, str, Any]] = []  # (sync_batchnorm=True with replicas)
        self._final_optimizer_states: dict[int, dict[str, Any]] = {}
        self._failed = False
        #: the partition table printed at fit start: a header row, then one row per stage
        self.partition_table: list[list[str]] = []

    # -- the arguments, as attributes -------------------------------------------------------------------------

    @property
    def schedule_name(self) -> str:
        return self.config.schedule

    @property
    def op_costs(self) -> OpCosts | None:
        """The op costs the nF1B order was generated from and the ideal is computed with (set at fit start)."""
        return self._order.op_costs

    @property
    def order_choice(self) -> OrderChoice | None:
        """The nF1B order in use and what it gives up (set at fit start; ``None`` for the other schedules)."""
        return self._order.choice

    # -- topology -------------------------------------------------------------------------------------------

    @property
    @override
    def parallel_devices(self) -> list[torch.device] | None:
        return self._parallel_devices

    @parallel_devices.setter
    def parallel_devices(self, devices: list[torch.device] | None) -> None:
        # each device once per process that shares it: Lightning's launcher starts one process per entry
        k = self.config.processes_per_device
        self._parallel_devices = None if devices is None else [d for d in devices for _ in range(k)]

    @override
    def _get_process_group_backend(self) -> str:
        if self.config.processes_per_device > 1 and self._process_group_backend is None:
            return "gloo"
        return super()._get_process_group_backend()

    @property
    def num_stages(self) -> int:
        return self.config.stages or self.world_size

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
        return self.config.is_asynchronous

    @property
    def num_microbatches(self) -> int:
        return self.config.microbatches(self.num_stages)

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # the stages of one pipeline see the same data; the replicas see their own shards
        return {"num_replicas": self.num_replicas, "rank": self.replica}

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        if self.lightning_module is not None:  # (this runs before the callbacks' setup)
            self._deferred_averaging = averaging.defer_copies(self.lightning_module.trainer)

    @override
    def setup_distributed(self) -> None:
        with compat.keep_random_state():  # as one device: the seed's state after the model was built
            super().setup_distributed()
        if self.world_size % self.num_stages:
            raise PipelineConfigError(
                f"stages={self.num_stages} does not divide the {self.world_size} processes (devices x num_nodes); use "
                "a number of processes that is a multiple of the stages, each multiple a data-parallel replica of "
                "the pipeline"
            )
        backend, timeout = self._get_process_group_backend(), self._timeout or default_pg_timeout
        self._groups = create_groups(self.world_size, self.global_rank, self.num_stages, backend, timeout)

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

    # -- model placement ------------------------------------------------------------------------------------

    @contextmanager
    @override
    def tensor_init_context(self, empty_init: bool | None = None) -> Iterator[None]:
        # empty_init: parameters and buffers go to the meta device; each rank materialises its own stage at setup
        with (
            parameters_on_meta() if empty_init else nullcontext(),
            self.root_device,
            self.precision_plugin.tensor_init_context(),
        ):
            yield

    @contextmanager
    @override
    def model_sharded_context(self) -> Iterator[None]:
        # configure_model builds its parameters on the meta device, so the full model never exists on any rank
        with parameters_on_meta():
            yield

    @override
    def model_to_device(self) -> None:
        # released tensors (other stages' parts) stay on the meta device
        assert self.model is not None
        if not any(t.is_meta for t in [*self.model.parameters(), *self.model.buffers()]):
            super().model_to_device()
            return
        device = self.root_device
        compat.apply_to_tensors(self.model, lambda t: t if t.is_meta else t.to(device))
        compat.update_properties(self.model, device=device)

    @override
    def setup(self, trainer: Any) -> None:
        assert self.accelerator is not None and self.lightning_module is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        fitting = trainer.state.fn == "fit"
        self.config.check_trainer(trainer, module, fitting)
        self._stage_stats.clear()
        # One pipeline, one data stream: every rank keeps the user's own DataLoader (no DistributedSampler, so the
        # order is that of single-device training) and the batch that trains is stage 0's (see Stage.stage0_batch).
        if self.num_replicas == 1:
            compat.disable_distributed_sampler(trainer)
        metrics.silence_sync_dist_advice(one_pipeline=self.num_replicas == 1)
        self._place(module)
        assert self._stage is not None and self._groups is not None
        if fitting and self._layer_sync is not None and self.num_replicas > 1:
            self._synced_norms = self._sync_layers(module)
        self._collecting = collected.install(module, self._stage)
        averaging.average_stages(trainer, module)  # (also in a validate after fit: the callback swaps then too)
        self._hide_example_input(module)
        self._metric_groups_before = metrics.set_process_groups(module, self._groups.replica)
        if fitting:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        self._link_precision(trainer)
        self._failed = False
        if fitting:
            compat.optimizers_to_device(self.optimizers, self.root_device)
            self._measure_costs()
            self._replace_sigterm_barrier(trainer)
            if self.is_asynchronous:
                self._start_async(module)

    def _sync_layers(self, module: Any) -> list[tuple[Any, str, Any]]:
        """``Trainer(sync_batchnorm=True)``: batch norm synced over the stage's replicas (placement.py)."""
        assert self._groups is not None
        if type(self._layer_sync).__name__ != "TorchSyncBatchNorm":
            raise PipelineConfigError(
                f"{type(self._layer_sync).__name__} is not supported by pipeline strategies: only Lightning's own "
                "TorchSyncBatchNorm (Trainer(sync_batchnorm=True)), which syncs over the stage's replicas"
            )
        if self.root_device.type == "cpu":
            raise PipelineConfigError(
                "sync_batchnorm=True needs GPUs: SyncBatchNorm syncs accelerator tensors only (Lightning's DDP refuses "
                "it on the CPU too); remove it, or train on GPUs"
            )
        return sync_batch_norms(module, self._groups.replica)

    def _hide_example_input(self, module: Any) -> None:
        """Set ``example_input_array`` aside while the stages are placed (given back at teardown). Lightning's model
        summary and TensorBoard's ``log_graph`` call the model on it outside any step, which a rank holding one
        stage cannot do; without it they do what they do for a model that has none (no sizes, no graph)."""
        self._example_input = module.example_input_array
        if self._example_input is not None:
            module.example_input_array = None
            rank_zero_info(
                f"{type(self).__name__}: example_input_array is set aside during the run (each rank holds one stage, "
                "so the model cannot be called on it outside a step): the model summary shows no input/output "
                "sizes and TensorBoard's log_graph draws no graph; it is back after the run"
            )

    def _place(self, module: Any) -> None:
        """Place this rank's stage (see :mod:`lightning_timeprest.placement`) and build what runs it."""
        assert self._groups is not None
        spec = PlacementSpec(
            stage=self.stage,
            num_stages=self.num_stages,
            world_size=self.world_size,
            module_name=self.config.module_name,
            split_points=self.config.split_points,
            balance=self.config.balance,
            num_microbatches=self.num_microbatches,
            device=self.root_device,
            devices=self.parallel_devices or [],
            batch_to_cpu=lambda batch: self.batch_to_device(batch, CPU),
            world_group=self._groups.world,
            is_global_zero=self.is_global_zero,
        )
        placement = self._placement = place(module, spec)
        self.partition_table = placement.table
        backend = self._get_process_group_backend()
        comm = StageComm(self.stage, self._groups.pipeline, self.root_device, self.config.p2p_timeout, backend)
        runtime = PipelineRuntime(self.stage, self.num_stages, placement.runner, comm)
        defers = self.config.defers_weight_grads(self.num_stages)
        deferred = len(eligible(placement.runner)) if defers else 0  # (the asynchronous engine installs its own)
        if defers and not self.is_asynchronous:
            runtime.weight_grads.install(placement.runner)
        once = f", stage 0: {deferred} nn.Linear layers take weight gradients once per mini-batch" if deferred else ""
        rank_zero_info(
            f"{type(self).__name__}: schedule={self.schedule_name}, stages={self.num_stages}, micro-batches="
            f"{self.num_microbatches}, {placement.description}, {len(placement.replicated)} replicated parameters"
            f"{once}\n" + format_table(placement.table)
        )
        self.precision_plugin.convert_module(module)
        self.model_to_device()
        if hasattr(placement.runner, "rebind"):
            placement.runner.rebind()  # device moves and conversions may have replaced buffers
        self._stage = Stage.on(
            module, placement, runtime, self._groups, self.precision_plugin, self._stage_stats, self.num_replicas,
            self.global_rank, self.num_microbatches,
        )  # fmt: skip
        self._sync = SyncDriver(self._stage, self.schedule_name, self.config.loss_reduction)

    def _link_precision(self, trainer: Any) -> None:
        """Connect the precision hook to this pipeline (see :mod:`lightning_timeprest.precision`)."""
        assert self._stage is not None and self._sync is not None
        hook_logs = self.num_stages > 1 and uses_gradient_hooks(trainer, self.lightning_module)
        link = self._stage.precision_link(self.is_asynchronous, self._sync.install_gradients, hook_logs)
        self.precision_plugin.link = link

    @override
    def setup_optimizers(self, trainer: Any) -> None:
        try:
            with _stand_in_parameter(self.lightning_module) as stand_in:
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
        if stand_in is not None:
            optimizer = self.optimizers[0]
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if p is not stand_in]
            optimizer.state.pop(stand_in, None)

    def _start_async(self, module: Any) -> None:
        placement = self._placement
        assert placement is not None and self._stage is not None
        check_untied(placement.tied)
        self._async = AsyncDriver(self._stage, self.config, module, self.optimizers[0], self._order)
        # each stage update runs Lightning's backward and step hooks itself (the precision hook's stage_update)
        compat.skip_closure_backward(module.trainer, True)

    def _measure_costs(self) -> None:
        """Each stage's op costs, agreed by all ranks, and for an nF1B policy the order they give."""
        module, placement, groups = self.lightning_module, self._placement, self._groups
        assert module is not None and placement is not None and groups is not None
        params = [p for p in module.parameters() if not p.is_meta]
        costs = self.config.op_costs or measure_op_costs(
            placement.block_costs, placement.plan.balance, self.optimizers[0], params, self.root_device,
            self.stage, self.num_replicas, groups.world if self.num_stages > 1 else None,
        )  # fmt: skip
        self._order.settle(self.config, costs, self.num_stages, self.num_microbatches)
        if self._order.choice is not None:
            rank_zero_info(f"{type(self).__name__}: {self._order.choice.describe()}")

    def _replace_sigterm_barrier(self, trainer: Any) -> None:
        """Agree on SIGTERM without Lightning's per-step barrier (see :mod:`lightning_timeprest.sigterm`)."""
        if self.world_size == 1:
            return
        assert self._groups is not None
        # how many steps rank 0 may run ahead of the others (it waits for their backwards); a synchronous step ends
        # on every rank before the next one starts
        lag = 2 * self.num_stages + 4 + (self.config.max_inflight or 0) if self.is_asynchronous else 2
        groups, timeout, stage = self._groups, self.config.p2p_timeout, self._stage
        assert stage is not None
        self._sigterm = SigtermAgreement(
            groups.sigterm, self.global_rank, self.world_size, lag, timeout, groups.world, stage.where
        )
        self._sigterm.install(trainer, self.launcher.kill if self.launcher is not None else None)

    # -- what the strategy can tell ------------------------------------------------------------------------

    @property
    def stats(self) -> Sequence[StepStats]:
        """This stage's record of each training step of the current fit, and under the asynchronous policies of
        each drain (the backwards it finished), the last ``STATS_HISTORY`` of them: the staleness d of every
        backward it ran, weight versions held, weight bytes, busy and transfer-wait seconds, samples, peak CUDA
        bytes. Rank 0 sums every stage's records into the ``pipeline/stage{s}/...`` metrics."""
        return self._stage_stats.history

    @property
    def trace(self) -> list[list[TraceEntry]]:
        """The ops this stage ran under an asynchronous policy, in order, one list per stream of mini-batches
        (between drains), each with the weight version it read; empty under the synchronous schedules, which run
        their schedule as built."""
        return [list(stream) for stream in self._async.engine.trace] if self._async is not None else []

    @property
    def op_clock(self) -> OpClock | None:
        """How long this stage's training ops took so far (compute only), while fitting; the asynchronous policies
        restart it with each stream of mini-batches (at every drain)."""
        if self._async is not None:
            return self._async.engine.clock
        return self._stage.runtime.clock if self._stage is not None else None

    @property
    def deferred_layers(self) -> int:
        """How many of this stage's ``nn.Linear`` layers take their weight gradients once per mini-batch
        (``defer_weight_grads``), while fitting; 0 otherwise."""
        if self._async is not None:
            return self._async.engine.weight_grads.layers
        return self._stage.runtime.weight_grads.layers if self._stage is not None else 0

    @property
    def async_runtime(self) -> AsyncRuntime | None:
        """This stage's asynchronous engine while fitting under an asynchronous policy (``None`` otherwise), for
        inspection: the learning rates of each update (``learning_rates``), the order of each stream
        (``stream_orders``), the updates a float16 overflow skipped (``skipped``)."""
        return self._async.engine if self._async is not None else None

    @property
    def stage_runner(self) -> StageRunner | None:
        """The module that runs this stage's blocks (``run_layers``), while the stage is placed."""
        return self._placement.runner if self._placement is not None else None

    def held_weights(self) -> list[Tensor]:
        """Every weight tensor this stage holds now: its parameters and, under the asynchronous policies, the weight
        versions it keeps for backwards still to come (stashed, or the version a vertical-sync forward read)."""
        module = self.lightning_module
        live = [p for p in module.parameters() if not p.is_meta] if module is not None else []
        if self._async is None:
            return live
        return live + [t for snapshot in self._async.engine.store.snapshots.values() for t in snapshot]

    # -- steps ----------------------------------------------------------------------------------------------

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Tensor | dict[str, Any]:
        """Run one mini-batch forward and backward through the pipeline; return its loss on every rank (with what
        else your ``training_step`` returned in a dict, joined over the micro-batches: see ``stage.step_extras``).

        Asynchronous policies return the loss of the most recent mini-batch that completed on every stage (it
        lags the mini-batch just taken in by a few steps; NaN before the first one completes).
        """
        if self._async is not None:
            return self._async.train_step(args, kwargs)
        assert self._sync is not None
        return self._sync.train_step(self.lightning_module, args, kwargs)

    @override
    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        if self._async is not None:
            # asynchronous: each stage stepped its optimizer inside the pipeline, once per finished mini-batch
            return closure()
        if self._sync is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)

        def step(timed: Callable[[], Any]) -> Any:
            return super(PipelineStrategyMixin, self).optimizer_step(optimizer, timed, model, **kwargs)

        return self._sync.optimizer_step(self.lightning_module, step, closure)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        self._evaluate("validation_step", self.precision_plugin.val_step_context, args, kwargs)
        return None

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        self._evaluate("test_step", self.precision_plugin.test_step_context, args, kwargs)
        return None

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._evaluate("predict_step", self.precision_plugin.predict_step_context, args, kwargs)

    def _evaluate(self, hook: str, context: Callable[[], Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        assert self._sync is not None
        return self._sync.step(self.lightning_module, hook, context, args, kwargs, train=False)

    def _drain(self) -> None:
        if self._async is not None:
            self._async.drain()

    @override
    def on_validation_start(self) -> None:
        self._drain()
        super().on_validation_start()

    @override
    def on_train_end(self) -> None:
        self._drain()
        super().on_train_end()

    # -- collectives your code calls ------------------------------------------------------------------------

    @override
    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: Any = "mean") -> Any:
        """Reduce over the data-parallel replicas (the ranks that see other data), as DDP reduces over its ranks:
        the stages of one pipeline hold the same logged values, so a reduction over every rank would count each
        value once per stage (a ``self.log(..., sync_dist=True, reduce_fx="sum")`` W-fold). ``group`` as given."""
        if group is None and self._groups is not None:
            if self._groups.replicas is None:
                return tensor
            group = self._groups.replicas
        return super().reduce(tensor, group=group, reduce_op=reduce_op)

    @override
    def all_gather(self, tensor: Tensor, group: Any | None = None, sync_grads: bool = False) -> Tensor:
        """Gather over the data-parallel replicas, stacked as DDP stacks its ranks' (one replica: ``(1, ...)``);
        ``self.all_gather`` in your hooks gets each replica's value once, not once per stage. (``LightningModule``
        passes the world group when you give none: it means the default here.)"""
        if (group is None or group is torch.distributed.group.WORLD) and self._groups is not None:
            if self._groups.replicas is None:
                return tensor.unsqueeze(0)
            group = self._groups.replicas
        return super().all_gather(tensor, group=group, sync_grads=sync_grads)

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        """Every rank's decision (early stopping, checkpointing), as Lightning's: over every rank, stages too."""
        flag = torch.tensor(int(decision), device=self.root_device)
        flag = super().reduce(flag, group=torch.distributed.group.WORLD, reduce_op="sum")
        return bool(flag == self.world_size) if all else bool(flag)

    # -- the end --------------------------------------------------------------------------------------------

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
        if not self._failed and self._stage is not None:
            self._drain()
            self._final_optimizer_states = {id(o): self.optimizer_state(o) for o in self.optimizers}
        self.precision_plugin.link = None
        module = self.lightning_module
        if self._async is not None and module is not None:
            compat.skip_closure_backward(module.trainer, False)
        if self._sigterm is not None:
            self._sigterm.finish(self._failed)
            self._sigterm = None
        averaging.restore_setups(self._deferred_averaging)
        self._deferred_averaging = []
        if module is not None:
            collected.uninstall(module, self._collecting)
            if self._example_input is not None:
                module.example_input_array = self._example_input
        self._collecting, self._example_input = [], None
        unsync_batch_norms(self._synced_norms)  # (before the stages' tensors are put back by name)
        self._synced_norms = []
        averaged = self._unplace(gather=not self._failed)
        metrics.restore_process_groups(self._metric_groups_before)
        self._metric_groups_before = {}
        if averaged is not None and module is not None:  # (a copy of the module: after its metrics' groups are gone)
            averaging.average_whole(module.trainer, module, averaged)
        if self._groups is not None:
            destroy_groups(self._groups)
            self._groups = None
        compat.optimizers_to_device(self.optimizers, CPU)
        if module is not None:  # released layers stay on the meta device on ranks other than 0
            compat.apply_to_tensors(module, lambda t: t if t.is_meta else t.cpu())
        self.precision_plugin.teardown()
        assert self.accelerator is not None
        self.accelerator.teardown()
        self.checkpoint_io.teardown()

    def _unplace(self, gather: bool) -> list[dict[str, Tensor]] | None:
        """Give the module back its own forward and layers; with ``gather``, every rank gets every stage's tensors
        (so that the whole trained model is there after ``fit``, on rank 0 for the launcher to return, and on the
        others for a later ``validate``/``test``/``predict`` in the same processes), and the weight-averaging
        callbacks' averages of every stage are returned (:func:`averaging.average_whole` takes them)."""
        module, placement, stage = self.lightning_module, self._placement, self._stage
        if module is None or placement is None or stage is None:
            return None
        stage.runtime.weight_grads.uninstall()
        if self._async is not None:
            self._async.engine.weight_grads.uninstall()
        merged = ckpt.gather_every_stage(module, placement, stage) if gather and self.num_stages > 1 else {}
        averaged = averaging.averaged_every_stage(module.trainer, placement, stage) if gather else None
        unplace(placement, module, merged)
        self._placement = self._stage = self._sync = self._async = None
        return averaged

    # -- checkpoints ----------------------------------------------------------------------------------------

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        # restore after partitioning: each stage loads its own entries, and a meta-initialised model never
        # needs the full checkpoint in its tensors
        return True

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The full model's state dict on rank 0 (gathered from all stages), empty on the other ranks; with
        ``sharded_checkpoint``, this stage's entries on every rank."""
        if self._stage is None:
            return super().lightning_module_state_dict()
        self._drain()
        return ckpt.gather_state_dict(self.lightning_module, self._stage, self.config.sharded_checkpoint)

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """The whole-model optimizer state on rank 0 (gathered from all stages), empty on the other ranks.

        After ``fit`` (``trainer.save_checkpoint`` in the user's script) the stages are gone: the state gathered
        at teardown is returned.
        """
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        if self._stage is None:
            return self._final_optimizer_states.get(id(optimizer), {})
        self._drain()
        owners = self._async.owners if self._async is not None else None
        sharded = self.config.sharded_checkpoint
        return ckpt.gather_optimizer_state(optimizer, self.lightning_module, self._stage, owners, sharded)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """An ordinary checkpoint file written by rank 0; with ``sharded_checkpoint``, a directory ``filepath``
        in which each stage of replica 0 writes its own states and rank 0 the rest. The op costs the nF1B order was
        generated from are saved too, so that a resumed run continues in the same order."""
        if self.op_costs is not None and self.order_choice is not None:
            ckpt.save_order(checkpoint, self.op_costs)
        if self._stage is not None and self.lightning_module is not None:
            averaging.gather_averaged(
                self.lightning_module.trainer, checkpoint, self._stage, self.config.sharded_checkpoint
            )
        plugin, scaler, state = self.precision_plugin, self.precision_plugin.scaler, None
        if self._async is not None and self._stage is not None and scaler is not None and scaler.is_enabled():
            # the loss scale under the asynchronous policies is the last stage's (it scales every loss)
            state = self._stage.comm.broadcast_object(plugin.state_dict(), self.last_stage)
        plugin.save_state(checkpoint, state)
        if not (self.config.sharded_checkpoint and self._placement is not None):
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        if self.replica == 0:
            ckpt.write_shard(checkpoint, Path(filepath), self.stage, self._placement, meta=self.is_global_zero)
        self.barrier("sharded checkpoint written")

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        if ckpt.is_sharded(checkpoint_path):
            checkpoint = ckpt.consolidate(checkpoint_path)
        else:
            checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        self.precision_plugin.rename_loaded_state(checkpoint)
        return checkpoint

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        assert self._placement is not None
        module = self.lightning_module
        ckpt.load_stage_state(module, checkpoint["state_dict"], self._placement.state_keys, strict)
        averaging.stage_averaged_states(module.trainer, checkpoint, module)  # type: ignore[arg-type]
        saved = ckpt.saved_order(checkpoint)
        if saved is not None and self._async is not None:  # continue in the order of the run that wrote it
            self._async.restore_order(saved)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        assert self._placement is not None
        saved = checkpoint["optimizer_states"]
        ckpt.load_stage_optimizer_states(self.optimizers, saved, self.lightning_module, self._placement.aliases)
        compat.optimizers_to_device(self.optimizers, self.root_device)

    @classmethod
    @override
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
