"""Whole-model checkpoints from a model that lives in pieces.

A pipeline checkpoint is an ordinary Lightning checkpoint: rank 0 gathers every stage's tensors into one
``state_dict`` under the original keys (so ``LightningModule.load_from_checkpoint`` works in one process), and
every stage's optimizer state into one optimizer state dict. For models too large to gather on one rank, a
*sharded* checkpoint is a directory with one file per stage (each stage writes its own states) and a meta file;
:func:`consolidate` turns it into the ordinary checkpoint, and the strategy resumes from either form with any
number of stages.

The optimizer state is consolidated as one single-process optimizer would have saved it: parameter groups in
the order ``configure_optimizers`` made them, parameters inside a group in the model's parameter order,
integer ids in that order; each group also carries ``param_names`` (torch's own key for it). Loading picks a
stage's entries by name, so nothing depends on how the model was cut into stages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_timeprest.errors import CheckpointError
from lightning_timeprest.schedules import OpCosts

if TYPE_CHECKING:
    from lightning_timeprest.placement import Placement
    from lightning_timeprest.stage import Stage

__all__ = [
    "CURRENT_STATE",
    "META_FILE",
    "ORDER_KEY",
    "CheckpointError",
    "canonical_param_names",
    "check_state_dict",
    "consolidate",
    "consolidate_optimizer_states",
    "gather_every_stage",
    "gather_optimizer_state",
    "gather_state_dict",
    "is_sharded",
    "load_stage_optimizer_states",
    "load_stage_state",
    "local_optimizer_state",
    "merge_state_dicts",
    "named_optimizer_state",
    "own_state",
    "save_order",
    "saved_order",
    "shard_file",
    "write_shard",
]

#: in a sharded checkpoint (a directory): Lightning's checkpoint without the model and optimizer states, plus what
#: consolidating needs; each stage's states are in :func:`shard_file`
META_FILE = "meta.pt"
#: where Lightning's ``WeightAveraging`` keeps the model's own state (its ``state_dict`` is then the averaged one)
CURRENT_STATE = "current_model_state"
#: the checkpoint entry holding the op costs the nF1B order was generated from
ORDER_KEY = "timeprest_order"


def own_state(module: nn.Module, holders: Mapping[str, set[int]], stage: int, num_stages: int) -> dict[str, Tensor]:
    """The state-dict entries ``stage`` contributes: those it is the last holder of (a replicated entry comes from
    the latest stage that holds it: the last stage ran every user step to its end, so its replicated buffers, e.g. a
    head's batch-norm statistics, are the up-to-date ones)."""
    everyone = set(range(num_stages))
    return {k: v.detach().cpu() for k, v in module.state_dict().items() if max(holders.get(k, everyone)) == stage}


def gather_every_stage(module: nn.Module, placement: Placement, stage: Stage) -> dict[str, Tensor]:
    """Every stage's tensors, on every rank of the pipeline (each stage sends what it holds)."""
    own = own_state(module, placement.holders, stage.index, stage.num_stages)
    return {k: v for part in stage.comm.all_gather_objects(own) for k, v in part.items()}


def gather_state_dict(module: nn.Module, stage: Stage, sharded: bool) -> dict[str, Tensor]:
    """The whole model's state dict on rank 0 of the pipeline (gathered from all stages), empty elsewhere; with
    ``sharded``, this stage's own entries on every rank."""
    placement = stage.placement
    own = own_state(module, placement.holders, stage.index, stage.num_stages)
    if sharded:
        return own
    parts = stage.comm.gather_objects(own)
    return merge_state_dicts(parts, placement.state_keys) if parts is not None else {}


def gather_optimizer_state(
    optimizer: Optimizer, module: nn.Module, stage: Stage, owners: Sequence[int] | None, sharded: bool
) -> dict[str, Any]:
    """The whole-model optimizer state on rank 0 (gathered from all stages), empty elsewhere; with ``sharded``,
    this stage's. ``owners``: the stage that trains each replicated parameter (asynchronous policies), whose state
    is the one kept."""
    placement = stage.placement
    named = named_optimizer_state(optimizer, canonical_param_names(module, placement.aliases))
    for r, owner in zip(placement.replicated, owners or [], strict=False):
        if owner != stage.index:
            named["state"].pop(r.name, None)
    if sharded:
        return named
    parts = stage.comm.gather_objects(named)
    return consolidate_optimizer_states(parts, placement.param_order) if parts is not None else {}


def load_stage_state(module: nn.Module, state: Mapping[str, Tensor], known: Sequence[str], strict: bool) -> None:
    """Load this stage's entries of a whole-model ``state`` (checked against the model's keys, ``known``)."""
    own = list(module.state_dict().keys())
    if strict:
        check_state_dict(state, own, known)
    module.load_state_dict({k: v for k, v in state.items() if k in set(own)}, strict=strict)


def load_stage_optimizer_states(
    optimizers: Sequence[Optimizer], saved: Sequence[Mapping[str, Any]], module: nn.Module, aliases: Mapping[str, str]
) -> None:
    """Load each optimizer's entries for this stage's parameters from whole-model optimizer states."""
    names = canonical_param_names(module, aliases)
    for optimizer, state in zip(optimizers, saved, strict=True):
        optimizer.load_state_dict(local_optimizer_state(optimizer, state, names))


def check_state_dict(state: Mapping[str, Any], own: Sequence[str], known: Sequence[str]) -> None:
    """A strict load: every key this stage holds (``own``) is there, and nothing the model lacks (``known``)."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in set(known)]
    if missing or unexpected:
        raise CheckpointError(
            f"the checkpoint does not match the model: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        )


def write_shard(checkpoint: dict[str, Any], directory: Path, stage: int, placement: Placement, meta: bool) -> None:
    """Write one stage's model and optimizer states of a sharded checkpoint into ``directory``, and with ``meta``
    (rank 0) the rest of the checkpoint and what consolidating needs."""
    num_stages = placement.plan.num_stages
    shard = {"state_dict": checkpoint.pop("state_dict"), "optimizer_states": checkpoint.pop("optimizer_states")}
    if CURRENT_STATE in checkpoint:  # (a weight-averaging callback's: the stage's entries, as the averaged ones)
        shard[CURRENT_STATE] = checkpoint.pop(CURRENT_STATE)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(shard, directory / shard_file(stage, num_stages))
    if meta:
        layout = {"num_stages": num_stages, "state_keys": placement.state_keys, "param_order": placement.param_order}
        torch.save({**checkpoint, "timeprest_shards": layout}, directory / META_FILE)


def save_order(checkpoint: dict[str, Any], costs: OpCosts) -> None:
    """Keep the op costs the nF1B order was generated from, so that a resumed run continues in the same order."""
    checkpoint[ORDER_KEY] = {"op_costs": [list(costs.forward), list(costs.backward), list(costs.step)]}


def saved_order(checkpoint: Mapping[str, Any]) -> OpCosts | None:
    saved = checkpoint.get(ORDER_KEY)
    return None if saved is None else OpCosts(*(tuple(c) for c in saved["op_costs"]))


def canonical_param_names(module: nn.Module, aliases: Mapping[str, str]) -> dict[int, str]:
    """Map ``id(param)`` to the canonical name of each parameter of ``module`` (``aliases``: see
    :func:`lightning_timeprest.partition.parameter_aliases`), so that all stages name a tied parameter alike."""
    return {id(p): aliases[name] for name, p in module.named_parameters(remove_duplicate=False)}


def merge_state_dicts(parts: Sequence[Mapping[str, Tensor]], key_order: Sequence[str]) -> dict[str, Tensor]:
    """Merge per-stage state-dict parts; every key of ``key_order`` must be in exactly one part."""
    merged: dict[str, Tensor] = {}
    for part in parts:
        merged.update(part)
    missing = [k for k in key_order if k not in merged]
    if missing:
        raise CheckpointError(f"no stage holds the state-dict entries {missing[:5]}")
    return {k: merged[k] for k in key_order}


def named_optimizer_state(optimizer: Optimizer, names: Mapping[int, str]) -> dict[str, Any]:
    """``optimizer.state_dict()`` keyed by parameter name instead of position (tensors on CPU)."""
    state_dict = optimizer.state_dict()
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    index_to_name = {i: names[id(p)] for i, p in enumerate(ordered)}
    groups = []
    for group in state_dict["param_groups"]:
        hyper = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        groups.append({**hyper, "params": [index_to_name[i] for i in group["params"]]})
    state = {
        index_to_name[i]: apply_to_collection(s, Tensor, lambda t: t.detach().cpu())
        for i, s in state_dict["state"].items()
    }
    return {"state": state, "param_groups": groups}


def consolidate_optimizer_states(parts: Sequence[Mapping[str, Any]], param_order: Sequence[str]) -> dict[str, Any]:
    """Merge the per-stage named optimizer states into the state dict of one whole-model optimizer."""
    num_groups = {len(p["param_groups"]) for p in parts}
    if len(num_groups) != 1:
        raise CheckpointError(
            f"the stages' optimizers have different numbers of parameter groups ({sorted(num_groups)}); "
            "configure_optimizers must build the same groups on every stage (empty groups are fine)"
        )
    position = {name: i for i, name in enumerate(param_order)}
    state: dict[str, Any] = {}
    for part in parts:
        for name, s in part["state"].items():
            state.setdefault(name, s)
    groups = []
    next_id = 0
    ids: dict[str, int] = {}
    for g in range(num_groups.pop()):
        names = sorted({n for part in parts for n in part["param_groups"][g]["params"]}, key=position.__getitem__)
        hyper = {k: v for k, v in parts[0]["param_groups"][g].items() if k != "params"}
        for n in names:
            ids[n] = next_id
            next_id += 1
        groups.append({**hyper, "params": [ids[n] for n in names], "param_names": names})
    return {"state": {ids[n]: s for n, s in state.items()}, "param_groups": groups}


def local_optimizer_state(optimizer: Optimizer, saved: Mapping[str, Any], names: Mapping[int, str]) -> dict[str, Any]:
    """The part of a consolidated optimizer state that belongs to ``optimizer`` (this stage's parameters).

    Tensors stay where they are: ``optimizer.load_state_dict`` moves them to their parameters' devices.
    """
    saved_groups = saved["param_groups"]
    if any("param_names" not in g for g in saved_groups):
        raise CheckpointError(
            "the checkpoint's optimizer state has no parameter names, so it cannot be matched to pipeline stages; "
            "it was not written by a lightning-timeprest strategy"
        )
    if len(saved_groups) != len(optimizer.param_groups):
        raise CheckpointError(
            f"the checkpoint's optimizer has {len(saved_groups)} parameter groups, configure_optimizers made "
            f"{len(optimizer.param_groups)}"
        )
    saved_state_by_name = {}
    for g in saved_groups:
        for i, n in zip(g["params"], g["param_names"], strict=True):
            if i in saved["state"]:
                saved_state_by_name[n] = saved["state"][i]
    state = {}
    groups = []
    index = 0
    for group, saved_group in zip(optimizer.param_groups, saved_groups, strict=True):
        local_ids = []
        for p in group["params"]:
            name = names[id(p)]
            if name not in saved_group["param_names"]:
                raise CheckpointError(f"parameter {name!r} is not in the same optimizer group in the checkpoint")
            if name in saved_state_by_name:
                state[index] = saved_state_by_name[name]
            local_ids.append(index)
            index += 1
        hyper = {k: v for k, v in saved_group.items() if k not in ("params", "param_names")}
        groups.append({**hyper, "params": local_ids})
    return {"state": state, "param_groups": groups}


def shard_file(stage: int, num_stages: int) -> str:
    return f"stage-{stage}-of-{num_stages}.pt"


def is_sharded(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def consolidate(path: str | Path) -> dict[str, Any]:
    """The ordinary whole-model Lightning checkpoint of a sharded checkpoint directory.

    ``torch.save(consolidate("epoch=3-step=400.ckpt"), "model.ckpt")`` gives a file that
    ``LightningModule.load_from_checkpoint`` and a plain ``Trainer(ckpt_path=...)`` read. Stage files are memory-mapped,
    so consolidating needs little more memory than the result.
    """
    path = Path(path)
    if not is_sharded(path):
        raise CheckpointError(f"{path} is not a sharded pipeline checkpoint (no {META_FILE} in it)")
    checkpoint = torch.load(path / META_FILE, map_location="cpu", weights_only=False)
    layout = checkpoint.pop("timeprest_shards")
    shards = []
    for s in range(layout["num_stages"]):
        file = path / shard_file(s, layout["num_stages"])
        if not file.is_file():
            raise CheckpointError(f"the sharded checkpoint {path} lacks {file.name}: a stage did not finish writing it")
        shards.append(torch.load(file, map_location="cpu", mmap=True, weights_only=False))
    checkpoint["state_dict"] = merge_state_dicts([s["state_dict"] for s in shards], layout["state_keys"])
    if CURRENT_STATE in shards[0]:
        checkpoint[CURRENT_STATE] = merge_state_dicts([s[CURRENT_STATE] for s in shards], layout["state_keys"])
    checkpoint["optimizer_states"] = [
        consolidate_optimizer_states([s["optimizer_states"][i] for s in shards], layout["param_order"])
        for i in range(len(shards[0]["optimizer_states"]))
    ]
    return checkpoint
