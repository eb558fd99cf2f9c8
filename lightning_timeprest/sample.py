"""Taking a sample of the pipelined module's input at setup, without leaving a trace on training.

Tracing a module and timing its blocks need a real input. The strategy takes it the way training will produce it:
it builds one batch like the first one of the current stage's dataloader (the first samples of a map-style
dataset through the loader's ``collate_fn``, so the sampler's random state is untouched), runs the user's own step
on it until the step calls the pipelined module, and keeps that call's arguments (:func:`sample_call`). When the
module to pipeline is not known yet (a LightningModule without ``forward`` that calls ``self.model(...)`` in its
step), :func:`step_calls` records which modules the step calls itself. :func:`sandbox` restores every random
state, buffer and metric state afterwards, so a run with the sample equals a run without it.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset
from torchmetrics import Metric

from lightning_timeprest import compat
from lightning_timeprest.runtime import StageBoundary

__all__ = ["Call", "first_batch", "first_loader", "sample_call", "sandbox", "step_calls"]

Call = tuple[tuple[Any, ...], dict[str, Any]]

SOURCES = {
    "fit": ("fit_loop", "training_step"),
    "validate": ("validate_loop", "validation_step"),
    "test": ("test_loop", "test_step"),
    "predict": ("predict_loop", "predict_step"),
}


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


def first_loader(loaders: Any) -> Any:
    """The first dataloader of what a ``*_dataloader`` hook returned (one, a list, a dict, a CombinedLoader)."""
    flattened = getattr(loaders, "flattened", None)
    if flattened is not None:
        loaders = flattened
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return first_loader(loaders[0]) if loaders else None
    return loaders


def first_batch(loader: Any) -> Any:
    """A batch like the loader's first, built without touching its sampler (whose random state must stay as is):
    the first ``batch_size`` samples of a map-style dataset through the loader's ``collate_fn``."""
    if loader is None:
        return None
    dataset, size = getattr(loader, "dataset", None), getattr(loader, "batch_size", None)
    if isinstance(dataset, Dataset) and not isinstance(dataset, IterableDataset) and size:
        count = min(size, len(dataset))  # type: ignore[arg-type]
        return loader.collate_fn([dataset[i] for i in range(count)]) if count else None
    generators = [getattr(loader, "generator", None), getattr(getattr(loader, "sampler", None), "generator", None)]
    states = [(g, g.get_state()) for g in generators if isinstance(g, torch.Generator)]
    try:
        return next(iter(loader), None)
    finally:
        for g, state in states:
            g.set_state(state)


@contextmanager
def sandbox(module: nn.Module) -> Iterator[None]:
    """Run setup-time samples and profiles without a trace: random states, buffers and the states of torchmetrics
    ``Metric`` modules (which a step may update) are restored after."""
    buffers = [(b, b.detach().clone()) for b in module.buffers() if not b.is_meta]
    metrics = [
        (m, copy.deepcopy(m.metric_state), *compat.metric_bookkeeping(m))
        for m in module.modules()
        if isinstance(m, Metric)
    ]
    py_state = random.getstate()
    np_state = None
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:  # pragma: no cover
        np = None  # type: ignore[assignment]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for b, value in buffers:
                    b.copy_(value)
            for metric, state, count, cache, computed in metrics:
                for key, value in state.items():
                    setattr(metric, key, value)
                compat.set_metric_bookkeeping(metric, count, cache, computed)
            random.setstate(py_state)
            if np is not None and np_state is not None:
                np.random.set_state(np_state)


def _step_batch(module: Any, to_device: Callable[[Any], Any]) -> tuple[Any, str, str]:
    """A first batch of the Trainer's current stage on the device, the step hook to run it through, and why not."""
    trainer = module.trainer
    fn = getattr(trainer.state.fn, "value", "fit")
    loop_name, hook = SOURCES.get(fn, SOURCES["fit"])
    source = compat.data_source(trainer, loop_name)
    if source is None or not source.is_defined():
        return None, hook, f"no {fn} dataloader"
    try:
        batch = first_batch(first_loader(source.dataloader()))
    except Exception as err:
        return None, hook, f"taking a batch from the {fn} dataloader failed: {err!r}"
    if batch is None:
        return None, hook, f"the {fn} dataloader is empty"
    return to_device(batch), hook, ""


@contextmanager
def _logging_off(module: Any) -> Iterator[None]:
    saved = {k: module.__dict__[k] for k in ("log", "log_dict") if k in module.__dict__}
    module.log = module.log_dict = _ignore
    try:
        yield
    finally:
        for k in ("log", "log_dict"):
            module.__dict__.pop(k, None)
        module.__dict__.update(saved)


def sample_call(module: Any, target: nn.Module, to_device: Callable[[Any], Any]) -> tuple[Call | None, str]:
    """The arguments of ``target``'s call in the user's step on a first batch, or ``None`` and why not.

    Runs the step of the Trainer's current stage (``training_step`` when fitting) with logging disabled and no
    gradients, until it calls ``target``; run it inside :func:`sandbox`.
    """
    batch, hook, problem = _step_batch(module, to_device)
    if batch is None:
        return None, problem
    captured: list[Call] = []

    def capture(*args: Any, **kwargs: Any) -> Any:
        captured.append((args, kwargs))
        raise StageBoundary

    target.forward = capture
    try:
        with torch.no_grad(), _logging_off(module):
            getattr(module, hook)(batch, 0)
    except StageBoundary:
        pass
    except Exception as err:
        problem = f"{hook} failed on the sample batch before calling the module: {err!r}"
    finally:
        target.__dict__.pop("forward", None)
    if captured:
        return captured[0], ""
    return None, problem or (
        f"{hook} did not call it (a step must call the pipelined module, e.g. self(x) whose forward calls it; or "
        "name the module your step calls with module_name=...)"
    )


def step_calls(module: Any, to_device: Callable[[Any], Any]) -> tuple[list[tuple[str, Call]], str]:
    """The modules the user's step calls itself (not from inside another module's forward), each with the
    arguments of its first call, in call order; ``("", ...)`` is the LightningModule's own forward.

    Runs the step of the Trainer's current stage on a first batch, without gradients or logging, and stops it at
    the first call of a module that holds at least half of the parameters (nothing larger can follow; the rest of
    the step, which may append to a list or update a metric, does not run); run it inside :func:`sandbox`. The
    second value says why nothing was seen.
    """
    batch, hook, problem = _step_batch(module, to_device)
    if batch is None:
        return [], problem
    names = {id(m): n for n, m in module.named_modules()}
    total = sum(p.numel() for p in module.parameters())
    calls: dict[str, Call] = {}
    depth = [0]

    def pre(sub: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if depth[0] == 0 and names.get(id(sub)) is not None:
            calls.setdefault(names[id(sub)], (args, dict(kwargs)))
            if 2 * sum(p.numel() for p in sub.parameters()) >= total:
                raise StageBoundary
        depth[0] += 1

    def post(_sub: nn.Module, _args: Any, _out: Any) -> None:
        depth[0] -= 1

    handles = []
    for sub in {id(m): m for m in module.modules()}.values():
        handles.append(sub.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(sub.register_forward_hook(post, always_call=True))
    try:
        with torch.no_grad(), _logging_off(module):
            getattr(module, hook)(batch, 0)
    except StageBoundary:
        pass
    except Exception as err:  # what was called before the failure still tells which module the step uses
        problem = f"{hook} failed on the sample batch: {err!r}"
    finally:
        for h in handles:
            h.remove()
    if calls:
        return list(calls.items()), ""
    return [], problem or f"{hook} calls no module on a sample batch"
