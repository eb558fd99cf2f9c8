"""Choosing the pipelined submodule, cutting it into stages and balancing the stages.

The pipelined submodule is cut into *blocks* that stages receive in contiguous runs: the children of an
``nn.Sequential``, or, for any other module, the blocks that :mod:`lightning_timeprest.tracing` cuts its traced
forward into. Everything outside it (a stem, a head, tied weights) is replicated on the stages that use it (see
:mod:`lightning_timeprest.strategy`).

Balancing follows torchgpipe's idea: a *balance* is a list of block counts, one per stage, summing to the
number of blocks. ``"parameters"``, ``"time"`` and ``"memory"`` pick the contiguous split that minimises the
largest stage's cost (the exact optimum, by dynamic programming); the costs of ``"time"`` and ``"memory"`` come
from :func:`profile_blocks`, which runs each block forward and backward on a sample micro-batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lightning_timeprest import compat
from lightning_timeprest.compat import pytree
from lightning_timeprest.errors import PartitionError

__all__ = [
    "BALANCE_MODES",
    "BlockCosts",
    "PartitionError",
    "Pipelined",
    "Replicated",
    "StagePlan",
    "balance_by_cost",
    "dominant_sequential",
    "find_pipelined_module",
    "format_table",
    "layer_parameter_counts",
    "parameter_aliases",
    "plan_sequential",
    "plan_stages",
    "profile_blocks",
    "replicated_parameters",
    "tensor_holders",
]

BalanceSpec = Sequence[int] | str
BALANCE_MODES = ("parameters", "time", "memory")


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _overrides_forward(module: nn.Module) -> bool:
    owner = next(c for c in type(module).__mro__ if "forward" in c.__dict__)
    return owner.__name__ not in ("LightningModule", "Module")


def dominant_sequential(root: nn.Module, split_points: Sequence[str] | None = None) -> bool:
    """Whether :func:`find_pipelined_module` takes the largest ``nn.Sequential`` without looking at the step."""
    sizes = [_numel(m) for n, m in root.named_modules() if n and isinstance(m, nn.Sequential)]
    return not split_points and bool(sizes) and 2 * max(sizes) >= _numel(root)


class Pipelined(NamedTuple):
    """The module chosen to be cut into stages, and why it was chosen (shown at start)."""

    name: str  # qualified name in the LightningModule; "" for its own forward
    module: nn.Module
    traced: bool  # split by tracing, otherwise an nn.Sequential cut between its children
    reason: str


def find_pipelined_module(
    root: nn.Module,
    module_name: str | None = None,
    split_points: Sequence[str] | None = None,
    called: Sequence[str] | None = None,
) -> Pipelined:
    """The submodule to pipeline ("" for the LightningModule's own forward) and whether it is split by tracing.

    With ``module_name``, that submodule (dotted path; "" for the forward itself). Without it: the largest
    ``nn.Sequential`` when it holds at least half of the parameters (no tracing needed); else, of the modules the
    step calls itself (``called``, names in call order, as :func:`~lightning_timeprest.sample.step_calls` sees
    them), the one that holds the most parameters; else the LightningModule's own forward, traced; else the
    largest ``nn.Sequential``. ``split_points`` always means tracing.
    """
    total = max(_numel(root), 1)

    def share(module: nn.Module) -> str:
        return f"{_numel(module) / total:.0%} of the parameters"

    sequentials = [(n, m) for n, m in root.named_modules() if n and isinstance(m, nn.Sequential)]
    if module_name is not None:
        try:
            module = root.get_submodule(module_name)
        except AttributeError:
            names = [n for n, m in root.named_children()]
            raise PartitionError(
                f"module_name={module_name!r} names no submodule of {type(root).__name__}; its children are "
                f"{names or 'none'} (use '' for its own forward)"
            ) from None
        module_name, module = compat.unwrap_compiled(module_name, module)
        traced = bool(split_points) or not isinstance(module, nn.Sequential)
        return Pipelined(module_name, module, traced, "named by module_name")
    best = max(sequentials, key=lambda item: _numel(item[1]), default=None)
    if best is not None and dominant_sequential(root, split_points):
        return Pipelined(best[0], best[1], False, f"the largest nn.Sequential, {share(best[1])}")
    if called:
        name = max(called, key=lambda n: _numel(root.get_submodule(n)))  # the first of equals
        name, module = compat.unwrap_compiled(name, root.get_submodule(name))
        traced = bool(split_points) or not isinstance(module, nn.Sequential) or module is root
        why = "your step calls self(...)" if module is root else "of the modules your step calls, the largest"
        return Pipelined(name, module, traced, f"{why}, {share(module)}")
    if _overrides_forward(root):
        return Pipelined("", root, True, "the LightningModule's forward")
    if best is not None and not split_points:
        return Pipelined(best[0], best[1], False, f"the largest nn.Sequential, {share(best[1])}")
    raise PartitionError(
        f"{type(root).__name__} defines no forward to pipeline and holds no nn.Sequential, and its step was not seen "
        "calling a module: define forward (and call self(x) in your steps), or name the submodule your steps call "
        "with TiMePReStStrategy(module_name=...)"
    )


def layer_parameter_counts(sequential: nn.Sequential) -> list[int]:
    return [_numel(layer) for layer in sequential]


def balance_by_cost(costs: Sequence[float], num_stages: int) -> list[int]:
    """Contiguous split of ``costs`` into ``num_stages`` non-empty runs minimising the largest run's sum.

    Ties are broken towards earlier stages holding fewer layers. Returns layer counts per stage.
    """
    n = len(costs)
    if not 1 <= num_stages <= n:
        raise PartitionError(f"cannot split {n} layers into {num_stages} non-empty stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[k][i]: minimal max-stage cost splitting the first i layers into k stages; cut[k][i]: start of the k-th
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    counts = []
    i = n
    for k in range(num_stages, 0, -1):
        j = cut[k][i]
        counts.append(i - j)
        i = j
    return counts[::-1]


@dataclass(frozen=True)
class StagePlan:
    """Which layers of the pipelined ``nn.Sequential`` each stage holds."""

    module_name: str
    balance: tuple[int, ...]
    layer_names: tuple[str, ...]

    @property
    def num_stages(self) -> int:
        return len(self.balance)

    def layers_of(self, stage: int) -> tuple[str, ...]:
        start = sum(self.balance[:stage])
        return self.layer_names[start : start + self.balance[stage]]


def plan_stages(
    module_name: str,
    layer_names: Sequence[str],
    num_stages: int,
    balance: BalanceSpec | None,
    costs: BlockCosts,
) -> StagePlan:
    """Validate or compute the balance of the blocks ``layer_names`` over ``num_stages`` stages."""
    n = len(layer_names)
    what = repr(module_name) if module_name else "the forward"
    if num_stages > n:
        raise PartitionError(
            f"the pipelined module {what} has {n} blocks, too few for {num_stages} stages (each stage needs at "
            f"least one block); use at most {n} devices, or pipeline a deeper module"
        )
    if balance is None or isinstance(balance, str):
        mode = balance or "parameters"
        if mode not in BALANCE_MODES:
            raise PartitionError(f"unknown balance {mode!r}; give one of {BALANCE_MODES} or a list of block counts")
        values = costs.of(mode)
        if values is None:
            raise PartitionError(
                f"balance={mode!r} needs a profile of each block on a sample batch, and none could be taken (no "
                "sample batch: the dataloader is missing, or the step did not call the pipelined module; or the "
                "parameters are on the meta device); use balance='parameters' or a list of block counts"
            )
        counts = balance_by_cost(values, num_stages)
    else:
        counts = [int(c) for c in balance]
        if len(counts) != num_stages or any(c < 1 for c in counts) or sum(counts) != n:
            raise PartitionError(
                f"balance={list(balance)} does not fit: it needs {num_stages} positive block counts (one per stage) "
                f"that add up to the {n} blocks of {what}: {list(layer_names)}"
            )
    return StagePlan(module_name, tuple(counts), tuple(layer_names))


def plan_sequential(
    module_name: str, sequential: nn.Sequential, num_stages: int, balance: BalanceSpec | None = None
) -> StagePlan:
    """:func:`plan_stages` for the children of an ``nn.Sequential``, balanced by parameters or a list."""
    names = [n for n, _ in sequential.named_children()]
    return plan_stages(module_name, names, num_stages, balance, BlockCosts(layer_parameter_counts(sequential)))


@dataclass
class BlockCosts:
    """What each block costs: parameters, and, when it was profiled, seconds (forward plus backward of one
    micro-batch; ``forward_seconds`` the forward alone) and bytes (weights, their gradients and the activations it
    keeps for backward, for the micro-batches a stage may hold)."""

    parameters: list[int]
    seconds: list[float] | None = None
    bytes: list[int] | None = None
    forward_seconds: list[float] | None = None

    def of(self, mode: str) -> Sequence[float] | None:
        return {"parameters": self.parameters, "time": self.seconds, "memory": self.bytes}[mode]


def _float_tensors(value: Any) -> list[Tensor]:
    return [t for t in pytree.tree_leaves(value) if isinstance(t, Tensor) and t.is_floating_point()]


def _detached(value: Any) -> Any:
    def leaf(t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        t = t.detach()
        return t.requires_grad_(True) if t.is_floating_point() else t

    return pytree.tree_map(leaf, value)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_blocks(
    blocks: Sequence[Callable[[Any], Any]],
    modules: Sequence[nn.Module],
    sample: Any,
    device: torch.device,
    num_microbatches: int,
    repeats: int = 3,
) -> tuple[list[float], list[float], list[int]]:
    """Time each block forward and backward on ``device`` with the sample micro-batch, in order, block ``k``
    receiving block ``k - 1``'s output; measure the bytes it saves for backward.

    Each block's module is moved to ``device`` only while it runs, so the whole model never has to fit there.
    Returns per-block median seconds (forward plus backward, and the forward alone) and estimated bytes (weights
    and gradients, plus the saved activations of ``num_microbatches`` micro-batches: what a GPipe stage holds at
    its peak).
    """
    seconds: list[float] = []
    forward_seconds: list[float] = []
    nbytes: list[int] = []
    x = pytree.tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, sample)
    for block, module in zip(blocks, modules, strict=True):
        home = next((t.device for t in [*module.parameters(), *module.buffers()]), device)
        module.to(device)
        times, forward_times = [], []
        saved = 0
        # autograd saves the weights too (a Linear keeps its weight for the input's gradient): they are counted
        # once below, not once per micro-batch in flight
        weight_storages = {p.untyped_storage().data_ptr() for p in module.parameters()}
        for r in range(repeats + 1):
            inputs = _detached(x)
            seen: dict[int, int] = {}

            def pack(t: Tensor, seen: dict[int, int] = seen, weights: set[int] = weight_storages) -> Tensor:
                if t.untyped_storage().data_ptr() not in weights:
                    seen.setdefault(id(t), t.numel() * t.element_size())
                return t

            _sync(device)
            start = time.perf_counter()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = block(inputs)
            outs = [t for t in _float_tensors(out) if t.requires_grad]
            _sync(device)
            forward = time.perf_counter() - start
            if outs:
                torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])
            _sync(device)
            if r:  # the first run warms up
                times.append(time.perf_counter() - start)
                forward_times.append(forward)
            saved = sum(seen.values())
        x = pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, out)
        for p in module.parameters():
            p.grad = None
        module.to(home)
        weights = sum(p.numel() * p.element_size() for p in module.parameters())
        seconds.append(sorted(times)[len(times) // 2])
        forward_seconds.append(sorted(forward_times)[len(forward_times) // 2])
        nbytes.append(2 * weights + num_microbatches * saved)
    return seconds, forward_seconds, nbytes


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parameter_aliases(module: nn.Module) -> dict[str, str]:
    """Map every name of every parameter to its canonical name: the first one ``named_parameters()`` gives.

    Tied parameters have several names; every rank resolves them to the same canonical name from this map, made
    on the full model, whichever of the names its own stage can still reach.
    """
    canonical = {id(p): name for name, p in module.named_parameters()}
    return {name: canonical[id(p)] for name, p in module.named_parameters(remove_duplicate=False)}


@dataclass(frozen=True)
class Replicated:
    """A parameter that several stages hold: it lives outside the pipelined module, or is tied across stages.

    Every stage that holds it keeps a full copy; the copies start from ``source``'s values and their gradients
    are summed over the stages, so they stay identical, as the one tensor of single-device training.
    """

    name: str
    shape: torch.Size
    dtype: torch.dtype
    source: int


def tensor_holders(module: nn.Module, stages_of: Callable[[str], set[int]]) -> dict[int, set[int]]:
    """For every parameter and buffer of ``module`` (by ``id``), the stages that hold it.

    ``stages_of(name)`` gives the stages that hold the tensor of that name; a tensor with several names (tied
    weights) is held by every stage any of its names puts it on.
    """
    holders: dict[int, set[int]] = {}
    for name, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        holders.setdefault(id(t), set()).update(stages_of(name))
    return holders


def replicated_parameters(module: nn.Module, holders: dict[int, set[int]]) -> list[Replicated]:
    """The parameters of ``module`` (the full model) that more than one stage holds, in model order."""
    return [
        Replicated(name, p.shape, p.dtype, min(holders[id(p)]))
        for name, p in module.named_parameters()
        if len(holders[id(p)]) > 1
    ]
