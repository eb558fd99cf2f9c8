"""Choosing the pipelined submodule and cutting it into stages.

The pipelined submodule is an ``nn.Sequential`` of the LightningModule; its top-level children are the
*layers* that stages receive in contiguous runs. Everything outside it (a stem, a head, tied weights) is not
partitioned: it is replicated on every stage (see :mod:`lightning_timeprest.strategy`).

Balancing follows torchgpipe's idea: a *balance* is a list of layer counts, one per stage, summing to the
number of layers. ``"parameters"`` picks the contiguous split that minimises the largest stage's parameter
count (the exact optimum, by dynamic programming).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "PartitionError",
    "Replicated",
    "StagePlan",
    "balance_by_cost",
    "find_pipelined_module",
    "layer_parameter_counts",
    "parameter_aliases",
    "plan_stages",
    "replicated_parameters",
]

BalanceSpec = Sequence[int] | str


class PartitionError(ValueError):
    """The model cannot be partitioned as requested."""


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_pipelined_module(root: nn.Module, module_name: str | None = None) -> tuple[str, nn.Sequential]:
    """Return ``(qualified_name, module)`` of the submodule to pipeline.

    With ``module_name`` given, that submodule (dotted path) must exist and be an ``nn.Sequential``. Otherwise
    the ``nn.Sequential`` holding the most parameters is chosen (the first one found on a tie).
    """
    if module_name is not None:
        try:
            module = root.get_submodule(module_name)
        except AttributeError:
            names = [n for n, m in root.named_modules() if isinstance(m, nn.Sequential) and n]
            raise PartitionError(
                f"module_name={module_name!r} names no submodule of {type(root).__name__}; nn.Sequential "
                f"submodules found: {names or 'none'}"
            ) from None
        if not isinstance(module, nn.Sequential):
            raise PartitionError(
                f"module_name={module_name!r} is a {type(module).__name__}, not an nn.Sequential; the pipelined "
                "submodule must be an nn.Sequential whose children are the layers to split into stages"
            )
        return module_name, module
    best: tuple[str, nn.Sequential] | None = None
    for name, module in root.named_modules():
        if name and isinstance(module, nn.Sequential) and (best is None or _numel(module) > _numel(best[1])):
            best = (name, module)
    if best is None:
        raise PartitionError(
            f"{type(root).__name__} has no nn.Sequential submodule to pipeline. Put the layers to split into "
            "stages in an nn.Sequential attribute (e.g. self.layers = nn.Sequential(...)) and call it from your "
            "forward, or name one with TiMePReStStrategy(module_name=...)"
        )
    return best


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


def plan_stages(module_name: str, sequential: nn.Sequential, num_stages: int, balance: BalanceSpec | None) -> StagePlan:
    """Validate or compute the balance of ``sequential`` over ``num_stages`` stages."""
    layer_names = tuple(name for name, _ in sequential.named_children())
    n = len(layer_names)
    if num_stages > n:
        raise PartitionError(
            f"the pipelined module {module_name!r} has {n} layers, too few for {num_stages} stages (each stage "
            f"needs at least one layer); use at most {n} devices, or pipeline a deeper nn.Sequential"
        )
    if balance is None or balance == "parameters":
        counts = balance_by_cost(layer_parameter_counts(sequential), num_stages)
    elif isinstance(balance, str):
        raise PartitionError(f"unknown balance {balance!r}; give 'parameters' or a list of layer counts per stage")
    else:
        counts = [int(c) for c in balance]
        if len(counts) != num_stages or any(c < 1 for c in counts) or sum(counts) != n:
            raise PartitionError(
                f"balance={list(balance)} does not fit: it needs {num_stages} positive layer counts (one per stage) "
                f"that add up to the {n} layers of {module_name!r}"
            )
    return StagePlan(module_name, tuple(counts), layer_names)


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


def replicated_parameters(module: nn.Module, plan: StagePlan) -> list[Replicated]:
    """The parameters of ``module`` (the full model) that more than one stage holds, in model order."""
    prefix = plan.module_name + "."
    stage_of = {layer: s for s in range(plan.num_stages) for layer in plan.layers_of(s)}
    holders: dict[int, set[int]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        stages = {stage_of[name[len(prefix) :].split(".")[0]]} if name.startswith(prefix) else set(stage_of.values())
        holders.setdefault(id(p), set()).update(stages)
    return [
        Replicated(name, p.shape, p.dtype, min(holders[id(p)]))
        for name, p in module.named_parameters()
        if len(holders[id(p)]) > 1
    ]
