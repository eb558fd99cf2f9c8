"""Making what the user logs in a pipelined step reach Lightning with the true mini-batch values.

Only the last stage runs the user's step to its end, once per micro-batch. Its ``self.log`` calls are therefore
recorded instead of logged (:class:`LogCapture`), reduced over the micro-batches the way Lightning would have
reduced them over one whole batch (:func:`reduce_logged`), sent to every stage, and logged there once per
mini-batch (:func:`replay`). Every rank logs the same values, so rank 0's progress bar and loggers show them
and callbacks that compare metrics across ranks (checkpointing, early stopping) agree.

torchmetrics ``Metric`` objects logged in a step are updated on the last stage; their state is copied to the
other stages with the logged records. While a step runs, each metric accumulates that mini-batch alone and is
merged into its running state afterwards (:func:`metric_step_scope`), so the step value Lightning shows is the
metric over the whole mini-batch, as on one device.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torchmetrics import Metric

from lightning_timeprest import compat

__all__ = [
    "LogCapture",
    "LoggedValue",
    "metric_paths",
    "metric_states",
    "metric_step_scope",
    "reduce_logged",
    "replay",
    "restore_process_groups",
    "restore_states",
    "set_process_groups",
    "silence_sync_dist_advice",
    "states_of",
]

_LOG_SIGNATURE = inspect.signature(LightningModule.log)
_PIPELINE_SYNC_ADVICE = r"It is recommended to use `self\.log\('pipeline/"
_SYNC_DIST_ADVICE = r"It is recommended to use `self\.log\(.*sync_dist=True\)` when logging on epoch level"
_REDUCTIONS = {"mean": "mean", "avg": "mean", "sum": "sum", "max": "max", "min": "min"}
_TORCH_REDUCTIONS = {torch.mean: "mean", torch.sum: "sum", torch.max: "max", torch.min: "min"}


@dataclass
class LoggedValue:
    """One reduced ``self.log`` call: a tensor on CPU, or the attribute path of a logged ``Metric``."""

    name: str
    value: Tensor | None
    metric_path: str | None
    kwargs: dict[str, Any]

    # sent to every stage each step: a Python number unpickles far faster than a tensor
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if isinstance(self.value, Tensor) and self.value.device.type == "cpu":
            state["value"] = (self.value.item(), self.value.dtype)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["value"], tuple):
            number, dtype = state["value"]
            state["value"] = torch.tensor(number, dtype=dtype)
        self.__dict__.update(state)


class LogCapture:
    """Records the ``self.log`` calls of a module, one list per micro-batch."""

    def __init__(self, module: LightningModule) -> None:
        self.module = module
        self.calls: list[list[tuple[str, Any, dict[str, Any]]]] = []

    @contextmanager
    def microbatch(self) -> Iterator[None]:
        calls: list[tuple[str, Any, dict[str, Any]]] = []
        self.calls.append(calls)

        def log(*args: Any, **kwargs: Any) -> None:
            bound = _LOG_SIGNATURE.bind(self.module, *args, **kwargs)
            arguments = dict(bound.arguments)
            arguments.pop("self")
            calls.append((arguments.pop("name"), arguments.pop("value"), arguments))

        # an instance attribute shadows LightningModule.log (log_dict calls it too); an enclosing capture's comes back
        previous = self.module.__dict__.get("log")
        self.module.log = log
        try:
            yield
        finally:
            if previous is None:
                del self.module.log
            else:
                self.module.log = previous


def _reduction(reduce_fx: Any) -> str:
    key = _REDUCTIONS.get(reduce_fx) if isinstance(reduce_fx, str) else _TORCH_REDUCTIONS.get(reduce_fx)
    if key is None:
        raise ValueError(f"self.log(reduce_fx={reduce_fx!r}) is not supported; use 'mean', 'sum', 'max' or 'min'")
    return key


def _as_tensor(value: Any) -> Tensor:
    tensor = value.detach() if isinstance(value, Tensor) else torch.tensor(value, dtype=torch.get_default_dtype())
    if tensor.numel() != 1:
        raise ValueError(f"self.log expects a scalar, got a tensor of shape {tuple(tensor.shape)}")
    return tensor.reshape(())


def reduce_logged(
    module: LightningModule,
    calls: Sequence[Sequence[tuple[str, Any, dict[str, Any]]]],
    sizes: Sequence[int],
    summed_losses: Sequence[Any] = (),
) -> list[LoggedValue]:
    """Reduce per-micro-batch log calls to one value per name, as one call on the whole mini-batch would be.

    ``mean`` is the mean weighted by micro-batch size (or by the ``batch_size`` given to ``self.log``); ``sum``,
    ``max`` and ``min`` reduce plainly. The ``batch_size`` passed on is the mini-batch's. ``summed_losses``: the
    micro-batches' losses of a loss that sums over the samples (``loss_reduction="sum"``); a name logged as those
    very tensors is their sum, as the mini-batch's loss is.
    """
    by_name: dict[str, list[tuple[Any, dict[str, Any], int]]] = {}
    summed: dict[str, bool] = {}
    for j, (mb_calls, size) in enumerate(zip(calls, sizes, strict=True)):
        for name, value, kwargs in mb_calls:
            by_name.setdefault(name, []).append((value, kwargs, size))
            is_loss = j < len(summed_losses) and value is summed_losses[j]
            summed[name] = summed.get(name, True) and is_loss
    paths = {id(m): name for name, m in module.named_modules() if isinstance(m, Metric)}
    out = []
    for name, entries in by_name.items():
        value, kwargs, _ = entries[-1]
        kwargs = dict(kwargs)
        weights = [kw.get("batch_size") or size for _, kw, size in entries]
        kwargs["batch_size"] = int(sum(weights))
        if isinstance(value, Metric):
            if id(value) not in paths:
                raise ValueError(f"self.log({name!r}, metric): the Metric must be an attribute of the LightningModule")
            out.append(LoggedValue(name, None, paths[id(value)], kwargs))
            continue
        tensors = [_as_tensor(v) for v, _, _ in entries]
        dtype = tensors[-1].dtype if tensors[-1].is_floating_point() else torch.get_default_dtype()
        stacked = torch.stack([t.to(torch.float64).cpu() for t in tensors])
        how = _reduction(kwargs.get("reduce_fx", "mean"))
        if how == "mean" and summed[name]:
            reduced = stacked.sum()
        elif how == "mean":
            w = torch.tensor(weights, dtype=torch.float64)
            reduced = (stacked * w).sum() / w.sum()
        else:
            reduced = getattr(stacked, how)()
        out.append(LoggedValue(name, reduced.to(dtype), None, kwargs))
    return out


def metric_states(module: LightningModule, logged: Sequence[LoggedValue]) -> dict[str, dict[str, Any]]:
    """The state of every ``Metric`` in ``logged``, on CPU, ready to be sent to other stages."""
    return states_of(module, dict.fromkeys(item.metric_path for item in logged if item.metric_path is not None))


def metric_paths(module: torch.nn.Module) -> list[str]:
    """The submodule path of every ``Metric`` the module holds."""
    return [name for name, sub in module.named_modules() if isinstance(sub, Metric)]


def states_of(module: torch.nn.Module, paths: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The state of the ``Metric`` at each of ``paths``, on CPU (for :func:`restore_states` on another stage)."""
    states = {}
    for path in paths:
        metric = module.get_submodule(path)
        state = {k: apply_to_collection(v, Tensor, lambda t: t.detach().cpu()) for k, v in metric.metric_state.items()}
        count, cache, _ = compat.metric_bookkeeping(metric)
        extra = {"_update_count": count, "_forward_cache": cache}
        states[path] = {"state": state, **apply_to_collection(extra, Tensor, lambda t: t.detach().cpu())}
    return states


def restore_states(module: torch.nn.Module, states: dict[str, dict[str, Any]], device: torch.device) -> None:
    """Set the ``Metric`` states saved by :func:`states_of` (onto ``device``)."""
    for path, saved in states.items():
        metric = module.get_submodule(path)
        for key, value in saved["state"].items():
            setattr(metric, key, apply_to_collection(value, Tensor, lambda t: t.to(device)))
        cache = apply_to_collection(saved["_forward_cache"], Tensor, lambda t: t.to(device))
        compat.set_metric_bookkeeping(metric, saved["_update_count"], cache)


def replay(module: LightningModule, logged: Sequence[LoggedValue], states: dict[str, dict[str, Any]]) -> None:
    """Log the reduced values with Lightning's own ``self.log`` on this rank (outside any capture)."""
    device = module.device
    restore_states(module, states, device)
    log = type(module).log  # the class's: a capture around this call (an instance attribute) does not apply
    for item in logged:
        if item.metric_path is not None:
            log(module, item.name, module.get_submodule(item.metric_path), **item.kwargs)
        else:
            assert item.value is not None
            log(module, item.name, item.value.to(device), **item.kwargs)


@contextmanager
def metric_step_scope(module: LightningModule) -> Iterator[None]:
    """Let every ``Metric`` of ``module`` accumulate one mini-batch alone, then merge it into its running state.

    Afterwards ``metric._forward_cache`` (what Lightning logs on step) is the metric over the whole mini-batch,
    not over its last micro-batch. Metrics with ``full_state_update=True`` cannot be merged (torchmetrics
    forbids it) and are left alone: their step value is that of the last micro-batch.
    """
    saved = []
    for metric in module.modules():
        if isinstance(metric, Metric) and not metric.full_state_update and not metric.dist_sync_on_step:
            state = {k: apply_to_collection(v, Tensor, torch.clone) for k, v in metric.metric_state.items()}
            count, cache, _ = compat.metric_bookkeeping(metric)
            saved.append((metric, state, count, cache))
            metric.reset()
    try:
        yield
    finally:
        for metric, state, count, forward_cache in saved:
            # (the mini-batch's own value, as a step's forward gives it: not synced over the replicas)
            cache = compat.compute_locally(metric) if compat.metric_bookkeeping(metric)[0] > 0 else forward_cache
            metric.merge_state(state)
            compat.set_metric_bookkeeping(metric, compat.metric_bookkeeping(metric)[0] + count, cache)


def set_process_groups(module: torch.nn.Module, group: Any) -> dict[Metric, Any]:
    """Point every torchmetrics ``Metric`` in ``module`` at ``group`` (the replicas of the stage: every stage holds
    the last stage's metric states, so ``compute()`` syncs over the processes that saw other data, as under DDP);
    return their groups before, for :func:`restore_process_groups`."""
    before = {m: m.process_group for m in module.modules() if isinstance(m, Metric)}
    for m in before:
        m.process_group = group
    return before


def restore_process_groups(before: dict[Metric, Any]) -> None:
    for metric, group in before.items():
        metric.process_group = group


def silence_sync_dist_advice(one_pipeline: bool) -> None:
    """Filter Lightning's advice to log with ``sync_dist=True`` where it does not apply: for the strategy's own
    ``pipeline/`` values (rank 0's, sent to every rank, see ``StageStatistics.emit``) and, with one pipeline, for
    the user's epoch-level values (every rank logs the last stage's, replayed). With data-parallel replicas the
    advice applies to the user's values and stays."""
    warnings.filterwarnings("ignore", message=_PIPELINE_SYNC_ADVICE, category=PossibleUserWarning)
    if one_pipeline:
        warnings.filterwarnings("ignore", message=_SYNC_DIST_ADVICE, category=PossibleUserWarning)
