"""Taking a sample of the pipelined module's input at setup, without leaving a trace on training.

Tracing a module and timing its blocks need a real input. The strategy takes it the way training will produce it:
it builds one batch like the first one of the current stage's dataloader (the first samples of a map-style
dataset through the loader's ``collate_fn``, so the sampler's random state is untouched), runs the user's own step
on it until the step calls the pipelined module, and keeps that call's arguments. :func:`sandbox` restores every
random state and buffer afterwards, so a run with the sample equals a run without it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from lightning_timeprest.runtime import StageBoundary

__all__ = ["Call", "first_batch", "first_loader", "sample_call", "sandbox"]

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
    """Run setup-time samples and profiles without a trace: random states and buffers are restored after."""
    buffers = [(b, b.detach().clone()) for b in module.buffers() if not b.is_meta]
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
            random.setstate(py_state)
            if np is not None and np_state is not None:
                np.random.set_state(np_state)


def sample_call(module: Any, target: nn.Module, to_device: Callable[[Any], Any]) -> tuple[Call | None, str]:
    """The arguments of ``target``'s call in the user's step on a first batch, or ``None`` and why not.

    Runs the step of the Trainer's current stage (``training_step`` when fitting) with logging disabled and no
    gradients, until it calls ``target``; run it inside :func:`sandbox`.
    """
    trainer = module.trainer
    fn = getattr(trainer.state.fn, "value", "fit")
    loop_name, hook = SOURCES.get(fn, SOURCES["fit"])
    source = getattr(getattr(trainer, loop_name, None), "_data_source", None)
    if source is None or not source.is_defined():
        return None, f"no {fn} dataloader"
    try:
        batch = first_batch(first_loader(source.dataloader()))
    except Exception as err:
        return None, f"taking a batch from the {fn} dataloader failed: {err!r}"
    if batch is None:
        return None, f"the {fn} dataloader is empty"
    batch = to_device(batch)
    captured: list[Call] = []

    def capture(*args: Any, **kwargs: Any) -> Any:
        captured.append((args, kwargs))
        raise StageBoundary

    saved = {k: module.__dict__[k] for k in ("log", "log_dict") if k in module.__dict__}
    module.log = module.log_dict = _ignore
    target.forward = capture
    problem = ""
    try:
        with torch.no_grad():
            getattr(module, hook)(batch, 0)
    except StageBoundary:
        pass
    except Exception as err:
        problem = f"{hook} failed on the sample batch before calling the module: {err!r}"
    finally:
        target.__dict__.pop("forward", None)
        for k in ("log", "log_dict"):
            module.__dict__.pop(k, None)
        module.__dict__.update(saved)
    if captured:
        return captured[0], ""
    return None, problem or (
        f"{hook} did not call it (a step must call the pipelined module, e.g. self(x) whose forward calls it; or "
        "name the module your step calls with module_name=...)"
    )
