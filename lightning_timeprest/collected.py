"""What your steps collect, on every rank before the epoch-end hooks.

Lightning's way to aggregate over an epoch without a torchmetrics ``Metric`` is to collect in a step and reduce in
the epoch-end hook::

    def validation_step(self, batch, batch_idx):
        self.validation_step_outputs.append(self(batch[0]).argmax(1) == batch[1])

    def on_validation_epoch_end(self):
        self.log("val_acc", torch.cat(self.validation_step_outputs).float().mean())
        self.validation_step_outputs.clear()

On a pipeline the code of a step after the pipelined call runs on the last stage only (it needs the pipeline's
output), so only the last stage's list fills, and the hook, which Lightning calls on every rank, met an empty list
elsewhere. Before each epoch-end hook the LightningModule defines (``on_train_epoch_end``,
``on_validation_epoch_end``, ``on_test_epoch_end``, ``on_predict_epoch_end``), the lists and dicts it holds as
attributes are made the last stage's on every rank of the pipeline (tensors onto each rank's device), so the hook
runs everywhere, as on one device, on what the steps collected. A step runs once per micro-batch, so a list
collects one entry per micro-batch. The same holds for torchmetrics: a ``Metric`` updated in a step and computed in
the epoch-end hook (``self.acc.update(preds, y)`` in the step, ``self.log("acc", self.acc.compute())`` in the
hook: torchmetrics' own pattern) had its state on the last stage only, and rank 0's loggers got the metric of
nothing; every ``Metric`` the module holds gets the last stage's state with the lists.

Only plain data travels: a list or dict holding anything else (a module, a function) is left as each rank has
it, since a copy would not be the object the list refers to.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from lightning_timeprest import metrics

if TYPE_CHECKING:
    from lightning_timeprest.stage import Stage

__all__ = ["EPOCH_END_HOOKS", "give_collected", "install", "uninstall"]

EPOCH_END_HOOKS = ("on_train_epoch_end", "on_validation_epoch_end", "on_test_epoch_end", "on_predict_epoch_end")

_DATA = (Tensor, int, float, bool, str, bytes, type(None))


def _is_data(value: Any) -> bool:
    if isinstance(value, _DATA):
        return not isinstance(value, torch.nn.Parameter)
    if isinstance(value, (list, tuple)):
        return all(_is_data(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, _DATA) and _is_data(v) for k, v in value.items())
    return False


def _collectors(module: Any, baseline: set[str]) -> dict[str, Any]:
    """The module's own list and dict attributes that hold plain data (not Lightning's or torch's)."""
    return {
        name: value
        for name, value in vars(module).items()
        if name not in baseline and isinstance(value, (list, dict)) and _is_data(value)
    }


def _lightning_base(module: Any) -> type:
    """``LightningModule`` of the module's own Lightning package (``lightning`` or ``pytorch_lightning``)."""
    return next(c for c in type(module).__mro__ if c.__name__ == "LightningModule")


def give_collected(module: Any, stage: Stage, baseline: set[str]) -> None:
    """Make the module's collected lists and dicts, and its metrics' states, the last stage's on every rank of the
    pipeline (a collective)."""
    is_last = stage.index == stage.last_stage
    payload = None
    if is_last:  # (detached: a tensor still in a graph does not travel, and the other ranks have no graph for it)
        collected = apply_to_collection(_collectors(module, baseline), Tensor, lambda t: t.detach().cpu())
        payload = collected, metrics.states_of(module, metrics.metric_paths(module))
    received = stage.comm.broadcast_object(payload, stage.last_stage)
    if is_last:
        return
    collected, states = received
    metrics.restore_states(module, states, stage.device)
    for name, value in move_data_to_device(collected, stage.device).items():
        current = vars(module).get(name)
        if isinstance(current, list) and isinstance(value, list):
            current[:] = value  # in place: the user may hold the list elsewhere too
        elif isinstance(current, dict) and isinstance(value, dict) and _is_data(current):
            current.clear()
            current.update(value)
        else:
            setattr(module, name, value)


def install(module: Any, stage: Stage) -> list[str]:
    """Have each epoch-end hook the module defines first take the last stage's collected values (see the module's
    docstring); nothing for a one-stage pipeline or a module that defines none. Returns the hooks wrapped."""
    if stage.num_stages == 1:
        return []
    base = _lightning_base(module)
    hooks = [h for h in EPOCH_END_HOOKS if h not in vars(module) and getattr(type(module), h) is not getattr(base, h)]
    baseline = set(vars(base())) if hooks else set()  # the attributes every LightningModule has
    for hook in hooks:
        setattr(module, hook, _with_collected(getattr(module, hook), module, stage, baseline))
    return hooks


def uninstall(module: Any, hooks: list[str]) -> None:
    for hook in hooks:
        vars(module).pop(hook, None)


def _with_collected(hook: Callable[..., Any], module: Any, stage: Stage, baseline: set[str]) -> Callable[..., Any]:
    @functools.wraps(hook)
    def run(*args: Any, **kwargs: Any) -> Any:
        give_collected(module, stage, baseline)
        return hook(*args, **kwargs)

    return run
