"""Lightning's weight-averaging callbacks on a pipeline: each stage averages its own weights.

``WeightAveraging`` and ``EMAWeightAveraging`` copy the whole LightningModule into an ``AveragedModel`` when ``fit``
sets up, and later average it parameter by parameter against the module, swap the two for validation, copy the
average in at the end of training and write it as the checkpoint's ``state_dict``. On a pipeline a rank's module
holds one stage, so, as the strategy places the stages:

- the callback's ``setup`` makes no copy of the whole model (:func:`defer_copies`; it would hold every stage on
  every rank, and a model made on the meta device cannot be copied to a device at all);
- each callback's ``AveragedModel`` is cut to the placed module: every stage averages the weights it trains, at
  the steps the callback chooses (under the asynchronous policies, the stage's latest weights at that step, and a
  replicated parameter's average is copied from the stage that trains it whenever the pipeline drains, as the
  parameter is); when the stages go, the averages of every stage are gathered into a whole averaged model again;
- a checkpoint's averaged ``state_dict`` is gathered from every stage, as the model's own state is (sharded
  checkpoints: each stage writes its own, ``current_model_state`` too);
- on resume, the checkpoint's averaged and current states are cut to the stage before the callback loads them.

``StochasticWeightAveraging`` also replaces the learning-rate scheduler and runs an extra epoch without backward
passes to recompute batch-norm statistics, which a pipeline that runs its own backward passes cannot honour: it is
refused (``PipelineConfig.check_trainer``), as Lightning refuses it for its sharded strategies.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from lightning_timeprest import compat
from lightning_timeprest.checkpoint import CURRENT_STATE, gather_every_stage, gather_state_dict

if TYPE_CHECKING:
    from lightning_timeprest.placement import Placement
    from lightning_timeprest.stage import Stage

__all__ = [
    "average_stages",
    "average_whole",
    "averaged_every_stage",
    "defer_copies",
    "gather_averaged",
    "replicated_averages",
    "restore_setups",
    "stage_averaged_states",
    "tensor_copy",
]


def _averaging(trainer: Any) -> list[Any]:
    """The trainer's ``WeightAveraging`` callbacks (``EMAWeightAveraging`` is one) that hold an averaged model."""
    cls = compat.lightning_callbacks(trainer).WeightAveraging
    return [cb for cb in trainer.callbacks if isinstance(cb, cls) and compat.average_model(cb) is not None]


def defer_copies(trainer: Any) -> list[Any]:
    """Have each weight-averaging callback's ``setup`` (which runs before the stages are placed) leave out its copy
    of the whole model: an empty stand-in instead, remade from the placed stage by :func:`average_stages`. The
    whole copy would hold every stage's weights on every rank, and of a model made on the meta device it cannot
    even be made (``.to()`` of meta tensors). Returns the callbacks changed (for :func:`restore_setups`)."""
    cls = compat.lightning_callbacks(trainer).WeightAveraging
    callbacks = [cb for cb in trainer.callbacks if isinstance(cb, cls)]
    for callback in callbacks:
        callback.setup = functools.partial(_setup_without_copy, callback, callback.setup)
    return callbacks


def restore_setups(callbacks: list[Any]) -> None:
    for callback in callbacks:
        vars(callback).pop("setup", None)


def _setup_without_copy(callback: Any, setup: Callable[..., None], trainer: Any, module: Any, stage: str) -> None:
    if stage != "fit":
        setup(trainer, module, stage)
        return
    compat.rebuild_average_model(callback, nn.Module(), module.device)  # (nothing in it: average_stages fills it)


def average_stages(trainer: Any, module: nn.Module) -> None:
    """Cut every weight-averaging callback's averaged model to ``module`` as placed (this rank's stage), keeping
    the averages of the entries the stage holds."""
    for callback in _averaging(trainer):
        _remake(callback, module, compat.average_model(callback).module.state_dict())


def averaged_every_stage(trainer: Any, placement: Placement, stage: Stage) -> list[dict[str, Tensor]]:
    """Every stage's averaged entries, per callback, on every rank of the pipeline (a collective call)."""
    return [gather_every_stage(compat.average_model(cb).module, placement, stage) for cb in _averaging(trainer)]


def average_whole(trainer: Any, module: nn.Module, states: list[dict[str, Tensor]]) -> None:
    """After the stages are gone: every callback's averaged model is the whole ``module`` again, holding the
    averages gathered by :func:`averaged_every_stage` (so that a later checkpoint or ``validate`` sees them)."""
    for callback, state in zip(_averaging(trainer), states, strict=True):
        _remake(callback, module, state)


def _remake(callback: Any, module: nn.Module, averages: dict[str, Tensor]) -> None:
    """A new averaged copy of ``module`` for ``callback``, with ``averages`` for the entries ``module`` holds (a
    stage's released entries are on the meta device) and the old copy's count of averaged models."""
    old = compat.average_model(callback)
    device = next((t.device for t in module.parameters() if not t.is_meta), old.n_averaged.device)
    compat.rebuild_average_model(callback, tensor_copy(module), device)
    new = compat.average_model(callback)
    held = {k for k, v in new.module.state_dict().items() if not v.is_meta}
    new.module.load_state_dict({k: v for k, v in averages.items() if k in held and not v.is_meta}, strict=False)
    new.n_averaged.copy_(old.n_averaged)


def tensor_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s parameters and buffers under the same names, in the same order and with the same ties,
    held by plain modules: all an averaged model reads (``parameters()``, ``buffers()``, ``state_dict()``), without
    a deep copy of the rest of a stage, which may not copy (a traced stage's graph holds fake tensors)."""
    copies: dict[int, nn.Module] = {}
    tensors: dict[int, Tensor] = {}

    def copy(sub: nn.Module) -> nn.Module:
        if id(sub) in copies:
            return copies[id(sub)]
        new = copies[id(sub)] = nn.Module()
        for name, p in compat.parameter_table(sub).items():
            if p is not None and id(p) not in tensors:
                tensors[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            new.register_parameter(name, None if p is None else tensors[id(p)])  # type: ignore[arg-type]
        dropped = compat.non_persistent_buffers(sub)
        for name, b in compat.buffer_table(sub).items():
            if b is not None and id(b) not in tensors:
                tensors[id(b)] = b.detach().clone()
            new.register_buffer(name, None if b is None else tensors[id(b)], persistent=name not in dropped)
        for name, child in compat.submodule_table(sub).items():
            new.add_module(name, None if child is None else copy(child))
        return new

    return copy(module)


def replicated_averages(trainer: Any, names: list[str]) -> list[list[Tensor | None]]:
    """Per weight-averaging callback, its averages of the replicated parameters ``names`` on this rank (``None``
    where the stage does not hold one). The asynchronous policies copy them from the stage that trains each one,
    with the parameters themselves: another stage's copy is updated only then, so its own average is not one."""
    out = []
    for callback in _averaging(trainer):
        held = dict(compat.average_model(callback).module.named_parameters())
        out.append([held[n] if n in held and not held[n].is_meta else None for n in names])
    return out


def gather_averaged(trainer: Any, checkpoint: dict[str, Any], stage: Stage, sharded: bool) -> None:
    """Replace the stage's averaged ``state_dict`` a callback wrote into ``checkpoint`` by the whole averaged model's
    (rank 0; the others' is empty), or with ``sharded`` by this stage's own entries. Called on every rank.

    Entries the averaged copy does not hold (a torchmetrics ``Metric``'s persistent state) are the model's own, so
    that ``state_dict`` has every key of the model, as a one-device checkpoint has."""
    callbacks = _averaging(trainer)
    if CURRENT_STATE not in checkpoint or not callbacks:
        return
    averaged = gather_state_dict(compat.average_model(callbacks[-1]).module, stage, sharded)  # (the last one wrote)
    current = checkpoint[CURRENT_STATE]
    checkpoint["state_dict"] = {k: averaged.get(k, v) for k, v in current.items()}


def stage_averaged_states(trainer: Any, checkpoint: dict[str, Any], module: nn.Module) -> None:
    """Cut a loaded checkpoint's averaged and current states to this stage's entries (those of ``module`` and of
    its averaged copy), so that a weight-averaging callback loads them into the placed module and that copy."""
    callbacks = _averaging(trainer)
    if CURRENT_STATE not in checkpoint or not callbacks:
        return
    own = set(module.state_dict())
    averaged = set(compat.average_model(callbacks[-1]).module.state_dict())
    checkpoint[CURRENT_STATE] = {k: v for k, v in checkpoint[CURRENT_STATE].items() if k in own}
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in averaged}
