"""Placing a stage: cut the pipelined module into stages, keep this rank's part, release the rest.

:func:`place` finds the module to pipeline (:func:`~lightning_timeprest.partition.find_pipelined_module`), cuts it
into blocks (an ``nn.Sequential``'s children, or a traced forward split by ``torch.distributed.pipelining``),
balances the blocks over the stages, decides which stage holds which tensor, releases other stages' tensors to the
meta device and materialises this stage's, and returns the frozen :class:`Placement`. Every rank decides alike: the
sample batch and the measured block costs are agreed over all ranks first. :func:`unplace` gives the module back.
Everything outside the pipelined module is replicated on every stage (stems, heads, tied weights).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_parameter_registration_hook,
)

from lightning_timeprest import compat
from lightning_timeprest.errors import PipelineConfigError
from lightning_timeprest.microbatch import batch_size, split
from lightning_timeprest.partition import (
    BlockCosts,
    PartitionError,
    Replicated,
    StagePlan,
    dominant_sequential,
    find_pipelined_module,
    layer_parameter_counts,
    parameter_aliases,
    plan_stages,
    profile_blocks,
    replicated_parameters,
    tensor_holders,
)
from lightning_timeprest.runtime import StageModule, StageRunner
from lightning_timeprest.sample import sample_call, sandbox, step_calls
from lightning_timeprest.streams import StageStreams
from lightning_timeprest.tracing import (
    CallRecord,
    TracedModel,
    TracedStage,
    call_tree,
    candidate_boundaries,
    trace,
    walk_calls,
)

__all__ = ["Placement", "PlacementSpec", "parameters_on_meta", "place", "unplace"]

Call = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass(frozen=True)
class PlacementSpec:
    """What :func:`place` needs to know about the pipeline and this rank."""

    stage: int
    num_stages: int
    world_size: int
    module_name: str | None
    split_points: list[str] | None
    balance: list[int] | str | None
    num_microbatches: int
    device: torch.device
    devices: Sequence[torch.device]  # every stage's device, for the partition table
    batch_to_cpu: Callable[[Any], Any]
    world_group: Any  # every rank (gloo): the agreements on the sample and the costs
    is_global_zero: bool


@dataclass(frozen=True)
class Placement:
    """Where every part of the model lives, decided at setup and fixed for the fit."""

    plan: StagePlan
    runner: StageRunner  # this stage's part, as the runtime runs it
    description: str  # "the pipelined X (why; traced, 8 blocks)", for the line printed at fit start
    block_costs: BlockCosts
    table: list[list[str]]  # the partition table: a header row, then one row per stage
    holders: dict[str, set[int]]  # state-dict key -> the stages holding it
    state_keys: list[str]  # the whole model's state-dict keys, in order
    param_order: list[str]  # the whole model's parameter names, in order
    aliases: dict[str, str]  # tied parameters: name -> the canonical name
    replicated: list[Replicated]  # parameters held by several stages
    tied: list[str]  # replicated parameters read inside the pipelined module by several stages
    replicated_buffers: list[tuple[str, int, torch.Size, torch.dtype]]  # (name, source stage, shape, dtype)
    sequential: nn.Sequential | None  # the user's pipelined nn.Sequential, put back by unplace()
    traced_module: nn.Module | None  # the user's traced module, whose forward was replaced by the stage's
    detached: list[tuple[nn.Module, str, str, Tensor]]  # other stages' tensors removed from the traced module
    recompile: list[Callable[[], None]]  # put back the compiled calls of the modules holding the pipelined one


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create modules whose parameters and buffers live on the meta device (no storage).

    Unlike ``with torch.device("meta")`` this leaves other tensors real, so torchmetrics states and constants
    built in ``__init__`` keep their values. Each parameter is allocated uninitialised (``EmptyInit`` skips the
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


# -- choosing and cutting the pipelined module ------------------------------------------------------------------


@dataclass
class _Cut:
    name: str
    target: nn.Module
    what: str
    reason: str
    names: list[str]  # the blocks' names (relative to the target)
    display: list[str]  # the blocks' names as the user knows them
    costs: BlockCosts
    traced: TracedModel | None


def _agreed(sample: Any, spec: PlacementSpec) -> Any:
    """The sample, if every rank has one (each rank takes its own; the stages must decide alike)."""
    if spec.num_stages == 1:
        return sample
    have = torch.tensor([int(sample is not None)])
    dist.all_reduce(have, op=dist.ReduceOp.MIN, group=spec.world_group)
    return sample if have.item() else None


def _agree_on_costs(costs: BlockCosts, spec: PlacementSpec) -> None:
    """Every rank must cut alike: use the mean over the ranks of each block's measured cost."""
    if spec.num_stages == 1 or costs.seconds is None or costs.bytes is None or costs.forward_seconds is None:
        return
    mine = torch.tensor([costs.seconds, costs.forward_seconds, costs.bytes], dtype=torch.float64)
    dist.all_reduce(mine, group=spec.world_group)  # every replica, too: they must cut alike
    mine /= spec.world_size
    costs.seconds, costs.forward_seconds = mine[0].tolist(), mine[1].tolist()
    costs.bytes = [int(b) for b in mine[2].tolist()]


def _sample_microbatch(sample: Call, traced: bool, num_microbatches: int) -> Any:
    try:
        n = min(num_microbatches, batch_size(sample))
    except ValueError:
        n = 1
    micro = split(sample, n)[0][0] if n > 1 else sample
    return micro if traced else micro[0][0]


def _first_block(stage: TracedStage) -> Callable[[Any], Any]:
    def run(call: Call) -> Any:
        return stage.run_layers(stage.entry(*call))

    return run


def _cut(module: nn.Module, spec: PlacementSpec, meta: bool) -> _Cut:
    """Find the pipelined module, cut it into blocks and measure them (every rank alike)."""
    elsewhere = "another stage could not take a sample batch"
    problem = ""
    calls: dict[str, Any] = {}
    if spec.module_name is None and not dominant_sequential(module, spec.split_points) and not meta:
        seen, problem = step_calls(module, spec.batch_to_cpu)
        calls = dict(_agreed(seen or None, spec) or [])
        problem = elsewhere if seen and not calls else problem
    name, target, traced, reason = find_pipelined_module(
        module, spec.module_name, spec.split_points, list(calls) or None
    )
    what = f"{type(target).__name__} ({name!r})" if name else f"the forward of {type(target).__name__}"
    prefix = f"{name}." if name else ""
    own = calls[name] if name in calls else None
    if own is None:
        own, problem = sample_call(module, target, spec.batch_to_cpu)
    sample = _agreed(own, spec)
    problem = elsewhere if own is not None and sample is None else problem
    tm: TracedModel | None = None
    if traced:
        if sample is None:
            raise PartitionError(
                f"splitting {what} needs a sample of its input, taken by running your step on one batch: {problem}"
            )
        if meta:
            raise PartitionError(
                f"{what} is traced to be split, which needs real parameters: empty_init=True and parameters "
                "built in configure_model (meta device) work only with an nn.Sequential pipelined module"
            )
        names, boundaries = _boundaries(name, target, sample, spec)
        tm = trace(target, sample[0], sample[1], boundaries, what)
        blocks: list[Any] = [tm.stage(k, k + 1) for k in range(tm.num_blocks)]
        runs = [_first_block(blocks[0])] + [b.run_layers for b in blocks[1:]]
        costs = BlockCosts([tm.block_parameters(k) for k in range(tm.num_blocks)])
    else:
        assert isinstance(target, nn.Sequential)
        blocks = list(target)
        runs = list(blocks)
        costs = BlockCosts(layer_parameter_counts(target))
        names = [n for n, _ in target.named_children()]
    if sample is not None and not meta:
        micro = _sample_microbatch(sample, traced, spec.num_microbatches)
        costs.seconds, costs.forward_seconds, costs.bytes = profile_blocks(
            runs, blocks, micro, spec.device, spec.num_microbatches
        )
        _agree_on_costs(costs, spec)
    return _Cut(name, target, what, reason, names, [prefix + n for n in names], costs, tm)


def _boundaries(name: str, target: nn.Module, sample: Call, spec: PlacementSpec) -> tuple[list[str], list[str]]:
    """The blocks' first submodules and the cuts between them: at the split points, else at the candidates."""
    tree = call_tree(target, *sample)
    if spec.split_points:
        boundaries = _relative_split_points(name, target, tree, spec)
        first = tree.children[0]  # the block before the first cut starts with the forward's first call
        while first.children and boundaries[0].startswith(first.name + "."):
            first = first.children[0]
        return [first.name, *boundaries], boundaries
    names = candidate_boundaries(target, tree, 4 * spec.num_stages)
    return names, names[1:]


def _relative_split_points(name: str, target: nn.Module, tree: CallRecord, spec: PlacementSpec) -> list[str]:
    assert spec.split_points is not None
    prefix = f"{name}." if name else ""
    relative = [p[len(prefix) :] if prefix and p.startswith(prefix) else p for p in spec.split_points]
    if len(relative) != spec.num_stages - 1:
        raise PartitionError(
            f"split_points={spec.split_points} gives {len(relative) + 1} stages, but there are {spec.num_stages} "
            f"devices; give {spec.num_stages - 1} split points"
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
        raise PartitionError(f"split_points {spec.split_points} must be given in the order the forward calls them")
    return relative


# -- who holds what ------------------------------------------------------------------------------------------------


def _readers(cut: _Cut, plan: StagePlan) -> dict[str, set[int]]:
    """Tensor name -> the stages whose blocks read it (tensors of the pipelined module only)."""
    w, prefix = plan.num_stages, f"{cut.name}." if cut.name else ""
    readers: dict[str, set[int]] = {}
    if cut.traced is not None:
        for s in range(w):
            start = sum(plan.balance[:s])
            for rel in cut.traced.stage(start, start + plan.balance[s]).rebind():
                readers.setdefault(prefix + rel, set()).add(s)
        return readers
    stage_of_block = [s for s in range(w) for _ in range(plan.balance[s])]
    index = {n: k for k, n in enumerate(cut.names)}
    for n, _ in [*cut.target.named_parameters(remove_duplicate=False), *cut.target.named_buffers()]:
        readers[prefix + n] = {stage_of_block[index[n.split(".")[0]]]}
    return readers


def _table(plan: StagePlan, display: Sequence[str], costs: BlockCosts, spec: PlacementSpec) -> list[list[str]]:
    rows = [["stage", "layers", "parameters", "est. time", "device"]]
    total = sum(costs.seconds) if costs.seconds else 0.0
    for s in range(plan.num_stages):
        start, count = sum(plan.balance[:s]), plan.balance[s]
        shown = display[start] if count == 1 else f"{display[start]} .. {display[start + count - 1]} ({count})"
        params = sum(costs.parameters[start : start + count])
        share = f"{sum(costs.seconds[start : start + count]) / total:.0%}" if costs.seconds and total else "-"
        device = spec.devices[s] if s < len(spec.devices) else spec.device
        rows.append([str(s), shown, f"{params:,}", share, str(device)])
    return rows


def place(module: nn.Module, spec: PlacementSpec) -> Placement:
    """Cut ``module``'s pipelined module into stages, keep this stage's part and release the rest (meta device)."""
    w, stage = spec.num_stages, spec.stage
    meta = any(t.is_meta for t in [*module.parameters(), *module.buffers()])
    # compiled modules run eagerly while the cut is found (sample runs, profiles, traces: no compiling at setup);
    # those that hold the pipelined module stay so for the fit, since their compiled code would call the module
    # that was cut, not the stage
    eager = {name: compat.call_eagerly(sub) for name, sub in module.named_modules() if compat.compiled(sub)}
    try:
        with sandbox(module):
            cut = _cut(module, spec, meta)
    except BaseException:
        for restore in eager.values():
            restore()
        raise
    for name in [n for n in eager if not _encloses(n, cut.name)]:
        eager.pop(name)()
    if eager and spec.is_global_zero:
        rank_zero_warn(
            f"torch.compile of {[n or type(module).__name__ for n in eager]} is not applied on a pipeline: "
            f"{cut.what} runs as stages, each in its own process, which one compiled graph cannot hold; it runs "
            "uncompiled. Blocks of a pipelined nn.Sequential compiled in place (block.compile()) run compiled on "
            "their stages"
        )
    tm, prefix = cut.traced, f"{cut.name}." if cut.name else ""
    balance = [1] * w if spec.split_points else spec.balance
    if balance is None:
        balance = "time" if tm is not None and cut.costs.seconds else "parameters"
    plan = plan_stages(cut.name, cut.names, w, balance, cut.costs)
    if tm is not None and len(plan.layer_names) != tm.num_blocks:
        raise PartitionError(f"tracing {cut.what} gave {tm.num_blocks} blocks for {len(cut.names)} names")
    readers = _readers(cut, plan)
    everyone = set(range(w))
    holders = tensor_holders(module, lambda n: readers.get(n, everyone) if n.startswith(prefix) else everyone)
    by_name = {n: id(t) for n, t in [*module.named_parameters(), *module.named_buffers()]}
    replicated = replicated_parameters(module, holders)
    # tied across stages: replicated, and read inside the pipelined module (by a stage's blocks)
    read_inside = tensor_holders(module, lambda n: readers.get(n, set()) if n.startswith(prefix) else set())
    keep = {i for i, stages in holders.items() if stage in stages}
    if not any(stage in readers.get(n, ()) for n, _ in module.named_parameters(remove_duplicate=False)):
        raise PipelineConfigError(
            f"stage {stage} holds blocks {list(plan.layers_of(stage))} of {cut.what}, which have no "
            "parameters; choose a balance that gives every stage a block with parameters"
        )
    # (names before this rank releases other stages' tensors: the whole model's)
    state_keys, param_order = list(module.state_dict().keys()), [n for n, _ in module.named_parameters()]
    aliases = parameter_aliases(module)
    streams = StageStreams(stage, spec.device)
    with streams.layers.drawing():  # (a meta-initialised stage draws its initial values from it)
        runner, sequential, traced_module, detached = _keep_own(module, cut, plan, keep, spec)
    runner.streams = streams
    blocks = f"{'traced, ' if tm is not None else ''}{len(cut.names)} blocks"
    return Placement(
        plan=plan,
        runner=runner,
        description=f"pipelined {cut.what} ({cut.reason}; {blocks})",
        block_costs=cut.costs,
        table=_table(plan, cut.display, cut.costs, spec),
        holders={k: holders.get(by_name.get(k, -1), everyone) for k in state_keys},
        state_keys=state_keys,
        param_order=param_order,
        aliases=aliases,
        replicated=replicated,
        tied=[r.name for r in replicated if read_inside[by_name[r.name]]],
        replicated_buffers=[  # (non-persistent buffers, such as a rotary inv_freq, are in no state_dict)
            (n, min(holders.get(id(b), everyone)), b.shape, b.dtype)
            for n, b in module.named_buffers()
            if len(holders.get(id(b), everyone)) > 1
        ],
        sequential=sequential,
        traced_module=traced_module,
        detached=detached,
        recompile=list(eager.values()),
    )


def _encloses(name: str, inner: str) -> bool:
    """Whether the submodule called ``name`` is the one called ``inner`` or holds it ("" is the root)."""
    return name == "" or inner == name or inner.startswith(f"{name}.")


def _keep_own(
    module: nn.Module, cut: _Cut, plan: StagePlan, keep: set[int], spec: PlacementSpec
) -> tuple[StageRunner, nn.Sequential | None, nn.Module | None, list[tuple[nn.Module, str, str, Tensor]]]:
    """Give this rank its stage: the runner, the other stages' tensors released, its own materialised."""
    start = sum(plan.balance[: spec.stage])
    runner: StageRunner
    sequential = traced_module = None
    detached: list[tuple[nn.Module, str, str, Tensor]] = []
    if cut.traced is not None:
        detached = _detach(cut.target, keep)
        runner = cut.traced.stage(start, start + plan.balance[spec.stage])
        runner.module_name = cut.name
        cut.target.forward = runner.forward  # the user's calls of the module reach the stage
        traced_module = cut.target
        if spec.is_global_zero and (odd := runner.mode_dependent_ops()):
            rank_zero_warn(
                f"{cut.what} calls {odd[:4]} in its own code (not through an nn.Module such as nn.Dropout or "
                "nn.BatchNorm2d): the trace recorded them in the mode of the trace (training), so they behave so "
                "in validation too. Use the nn layers to have them follow train()/eval()"
            )
    else:
        assert isinstance(cut.target, nn.Sequential)
        local = plan.layers_of(spec.stage)
        for layer_name, layer in cut.target.named_children():
            if layer_name not in local:
                _release(layer, keep=keep)
        children = compat.submodule_table(cut.target)
        runner = StageModule(cut.name, [(n, children[n]) for n in local], list(children))
        _install(module, cut.name, runner)
        sequential = cut.target
    with _ties_kept(module):
        _materialize_held(module, spec.device, keep)
    if isinstance(runner, TracedStage):
        runner.rebind()
    return runner, sequential, traced_module, detached


def unplace(placement: Placement, module: nn.Module, tensors: Mapping[str, Tensor]) -> None:
    """Give ``module`` back its own forward and layers, and put ``tensors`` (every stage's, by full name; may be
    empty) where this rank had released them."""
    if placement.sequential is not None:
        _install(module, placement.plan.module_name, placement.sequential)
    for restore in placement.recompile:
        restore()
    if placement.traced_module is not None:
        placement.traced_module.__dict__.pop("forward", None)
        for sub, kind, attr, placeholder in placement.detached:
            table = compat.parameter_table(sub) if kind == "_parameters" else compat.buffer_table(sub)
            table[attr] = placeholder
    if tensors:
        _fill(module, "", tensors)


# -- module surgery ------------------------------------------------------------------------------------------------


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def sync_batch_norms(module: nn.Module, group: Any) -> list[tuple[nn.Module, str, nn.Module]]:
    """Lightning's ``sync_batchnorm=True`` on a pipeline: make each batch-norm layer this rank holds a
    ``SyncBatchNorm`` over ``group`` (the stage's replicas, the processes that see other data, as DDP syncs over
    its processes; never over the stages, whose layers differ), with the same parameters and buffers. Layers of
    other stages (on the meta device, or released) are left. Returns what :func:`unsync_batch_norms` puts back."""
    swapped = []
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _BATCH_NORMS) and _whole_norm(child):
                parent.add_module(name, nn.SyncBatchNorm.convert_sync_batchnorm(child, group))
                swapped.append((parent, name, child))
    return swapped


def unsync_batch_norms(swapped: Sequence[tuple[nn.Module, str, nn.Module]]) -> None:
    """Put the batch-norm layers :func:`sync_batch_norms` replaced back (they share their tensors)."""
    for parent, name, original in swapped:
        parent.add_module(name, original)


def _whole_norm(norm: nn.Module) -> bool:
    params, buffers = dict(norm.named_parameters(recurse=False)), dict(norm.named_buffers(recurse=False))
    tracked = not norm.track_running_stats or {"running_mean", "running_var"} <= buffers.keys()
    affine = not norm.affine or {"weight", "bias"} <= params.keys()
    return tracked and affine and not any(t.is_meta for t in [*params.values(), *buffers.values()])


@contextmanager
def _ties_kept(module: nn.Module) -> Iterator[None]:
    """Keep tied parameters tied through materialisation (``to_empty`` gives each module its own new tensor)."""
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    for sub in module.modules():
        for name, p in compat.parameter_table(sub).items():
            if p is not None:
                places.setdefault(id(p), []).append((sub, name))
    yield
    for group in places.values():
        first_module, first_name = group[0]
        for sub, name in group[1:]:
            compat.parameter_table(sub)[name] = compat.parameter_table(first_module)[first_name]


def _release(module: nn.Module, keep: set[int]) -> None:
    """Replace ``module``'s parameters and buffers by meta tensors, except the tensors whose id is in ``keep``."""
    for sub in module.modules():
        params, buffers = compat.parameter_table(sub), compat.buffer_table(sub)
        for name, p in list(params.items()):
            if p is not None and id(p) not in keep and not p.is_meta:
                params[name] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
        for name, b in list(buffers.items()):
            if b is not None and id(b) not in keep and not b.is_meta:
                buffers[name] = torch.empty_like(b, device="meta")


def _materialize_held(module: nn.Module, device: torch.device, keep: set[int]) -> None:
    """Materialise (``to_empty`` + ``reset_parameters``) the modules that hold meta tensors this stage keeps."""
    for sub in module.modules():
        direct = [*compat.parameter_table(sub).values(), *compat.buffer_table(sub).values()]
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
        for kind, table in (("_parameters", compat.parameter_table(sub)), ("_buffers", compat.buffer_table(sub))):
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
        params, buffers = compat.parameter_table(sub), compat.buffer_table(sub)
        for name, p in list(params.items()):
            key = f"{sub_name}.{name}" if sub_name else name
            if p is not None and p.is_meta and key in tensors:
                params[name] = nn.Parameter(tensors[key], p.requires_grad)
        for name, b in list(buffers.items()):
            key = f"{sub_name}.{name}" if sub_name else name
            if b is not None and b.is_meta and key in tensors:
                buffers[name] = tensors[key]
