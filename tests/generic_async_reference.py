"""A single-process reference for the asynchronous policies on any LightningModule: what tests/async_reference.py
does by hand for StemNetHead, for every model the strategy traces (tests/scripts/train_zoo.py's models).

It shares nothing with the strategy's runtime: only the micro-batch split (``lightning_timeprest.microbatch``) and
what a run recorded (its split points, each rank's op order). It runs the user's own ``training_step`` in eager mode
(no trace, no export), with the user's ``configure_optimizers``.

* **Stages.** A stage is the set of parameters it trains. The forward of one micro-batch runs the user's step once,
  with every parameter's first differentiable use watched (a ``TorchFunctionMode``) and the stage counted up at the
  beginning of each split-point submodule (a forward pre-hook): what is used before the first split point is stage
  0's (the code of the step before the pipelined call included), what is used after the last one stage W - 1's (the
  loss code included). A parameter used on two stages is refused, as the asynchronous policies refuse it.
* **Versions.** Each stage has its own copy of the module and of the optimizer; version ``k`` of stage ``s`` is its
  weights after ``k`` optimizer steps. The version a forward of (mini-batch, micro-batch) reads follows from the
  order the stage ran its ops in (the steps it took before it; under vertical sync, the steps stage 0 took before
  the micro-batch entered); the recorded traces give that order.
* **Backward.** A stage runs the backward of mini-batch ``m`` after exactly ``m`` steps (backwards run in order,
  each followed by one step), so its backward weights are: ``timeprest_v``/``timeprest``: version ``m`` (latest);
  ``pipedream``: the forward's version (stashed); ``timeprest_i``: ``latest + alpha(d) (stashed - latest)``,
  ``d = m - forward's version``. The graph rule: the forward's graph is kept and the weights it saved read the
  backward weights when it runs (each forward reads its own leaf tensors; their values are overwritten before the
  backward). That reaches what the graph saved of a weight itself or of a view of it; a tensor computed from a
  weight in the forward (a cast, a copy) would keep the forward's values, here as in the strategy: the models
  compared run in float64, where their layers save the weights themselves (under autocast they would not: see
  tests/async_reference.py and test_precision). The last stage runs the user's loss code on its output; a
  mini-batch's loss is the size-weighted mean of its micro-batch losses. Each stage takes one step of its own
  optimizer per mini-batch, after its backward.

Since the weights every op reads are fixed by the per-stage op order, the reference can run mini-batch by
mini-batch, each as one forward and one backward of the whole model with every parameter's leaf holding its own
stage's version: no op of mini-batch ``m`` needs a version newer than ``m``. Batch-norm statistics (live buffers,
not versioned) are updated by the forwards in the order each stage runs them: micro-batch by micro-batch.

Not covered: the ``recompute`` rule (it would rerun each stage separately; tests/async_reference.py covers it),
learning-rate schedulers, gradient clipping, dropout (each stage draws from its own random stream).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from lightning_timeprest.microbatch import split_at_most

POLICIES = ("timeprest_v", "timeprest", "timeprest_i", "pipedream")


class _Body(nn.Module):
    """Runs any code (the user's step) under :func:`torch.func.functional_call`'s replaced parameters."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.m = module

    def forward(self, body: Callable[[], Any]) -> Any:
        return body()


class _Uses(TorchFunctionMode):
    """Records, for each parameter, the stages at which a differentiable result was computed from it."""

    def __init__(self, names: Mapping[int, str]) -> None:
        super().__init__()
        self.names = names
        self.stage = 0
        self.used: dict[str, set[int]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if any(isinstance(t, Tensor) and t.requires_grad for t in tree_leaves(out)):
            for t in tree_leaves((args, kwargs)):
                name = self.names.get(id(t)) if isinstance(t, Tensor) else None
                if name is not None:
                    self.used.setdefault(name, set()).add(self.stage)
        return out


def _loss_of(output: Any) -> Tensor:
    return output["loss"] if isinstance(output, Mapping) else output


def _step(module: Any, batch: Any, index: int) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer
        return _loss_of(module.training_step(batch, index))


def stage_of_parameters(module: nn.Module, batch: Any, split_points: Sequence[str]) -> dict[str, int]:
    """The stage whose weights each parameter is (``split_points``: names of submodules, relative to ``module``, at
    whose beginning the stages 1..W-1 begin), found by running the step once on ``batch``."""
    uses = _Uses({id(p): n for n, p in module.named_parameters()})
    handles = []
    for k, name in enumerate(split_points):

        def enter(_module, _args, k=k):
            assert uses.stage == k, f"split point {split_points[k]!r} entered at stage {uses.stage}, not {k}"
            uses.stage = k + 1

        handles.append(module.get_submodule(name).register_forward_pre_hook(enter))
    try:
        with uses:
            _step(module, batch, 0)
    finally:
        for h in handles:
            h.remove()
    assert uses.stage == len(split_points), f"the step entered {uses.stage} of the {len(split_points)} split points"
    shared = {n: sorted(s) for n, s in uses.used.items() if len(s) > 1}
    if shared:
        raise ValueError(f"parameters used on several stages (an asynchronous policy refuses them): {shared}")
    return {n: next(iter(s)) for n, s in uses.used.items()}


def forward_versions(
    traces: Sequence[Sequence[Sequence[tuple]]], vertical: bool, check_recorded: bool = True
) -> tuple[dict[tuple[int, int, int], int], int]:
    """The weight version the forward of each ``(stage, mini-batch, micro-batch)`` reads, and the mini-batch count.

    ``traces[stage][stream]`` is each rank's record of the ops it ran: ``(kind, minibatch, microbatch, version)``,
    mini-batches numbered anew in each stream. Versions count the optimizer steps since training began, mini-batches
    are numbered from there too. With ``check_recorded``, checks that the strategy recorded that version for every
    forward.
    """
    w = len(traces)
    count = sum(kind == "B" for stream in traces[0] for kind, *_ in stream)
    assert all(sum(kind == "B" for stream in t for kind, *_ in stream) == count for t in traces), "stages disagree"
    own: dict[tuple[int, int, int], int] = {}
    recorded: dict[tuple[int, int, int], int] = {}
    for s in range(w):
        steps = first = 0  # steps taken by this stage so far; the mini-batches of earlier streams
        for stream in traces[s]:
            start = steps
            for kind, m, j, version in stream:
                if kind == "F":
                    own[(s, first + m, j)] = steps
                    recorded[(s, first + m, j)] = start + version
                else:
                    assert first + m == steps, f"stage {s}: backward of mini-batch {first + m} after {steps} steps"
                    steps += 1
            first = steps
    versions = {key: own[(0, key[1], key[2])] if vertical else v for key, v in own.items()}
    wrong = {key: (recorded[key], v) for key, v in versions.items() if recorded[key] != v}
    assert not (check_recorded and wrong), f"the strategy read other versions than its rule (recorded, rule): {wrong}"
    return versions, count


def _optimizer(module: Any) -> torch.optim.Optimizer:
    config = module.configure_optimizers()
    if isinstance(config, torch.optim.Optimizer):
        return config
    if isinstance(config, Mapping) and set(config) == {"optimizer"}:
        return config["optimizer"]
    raise NotImplementedError(f"the reference takes one optimizer without a scheduler, got {config!r}")


def reference(
    module: Any,
    batches: Sequence[Any],
    split_points: Sequence[str],
    traces: Sequence[Sequence[Sequence[tuple]]],
    policy: str,
    num_microbatches: int,
    alpha: Callable[[int], float] = lambda d: math.exp(-d),
    check_recorded: bool = True,
) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Train ``module`` on ``batches`` under ``policy`` in the op order of ``traces`` (one entry per stage).

    Returns the state dict after training and the stage of each trained parameter. ``module`` is changed in place
    (its buffers; its parameters keep their initial values). ``check_recorded``: check that each forward of the run
    read the version ``policy`` says (off to replay a run under another policy's rule).
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these models are small: one thread is 10x faster than two on a busy 2-core machine
    try:
        return _reference(module, batches, split_points, traces, policy, num_microbatches, alpha, check_recorded)
    finally:
        torch.set_num_threads(threads)


def _reference(module, batches, split_points, traces, policy, num_microbatches, alpha, check_recorded):
    w = len(traces)
    assert len(split_points) == w - 1
    owner = stage_of_parameters(copy.deepcopy(module), split_at_most(batches[0], num_microbatches)[0][0], split_points)
    versions, count = forward_versions(traces, policy == "timeprest", check_recorded)
    assert count == len(batches), f"{count} mini-batches ran backward, {len(batches)} batches trained"
    copies = [copy.deepcopy(module) for _ in range(w)]  # each stage's live weights and optimizer
    optimizers = [_optimizer(c) for c in copies]
    live = [dict(c.named_parameters()) for c in copies]
    mine = [[n for n, s in owner.items() if s == stage] for stage in range(w)]
    history = [{0: {n: live[s][n].detach().clone() for n in mine[s]}} for s in range(w)]
    body = _Body(module)

    def backward_weight(s: int, name: str, v: int, m: int) -> Tensor:
        latest, stale = history[s][m][name], history[s][v][name]
        if policy in ("timeprest_v", "timeprest") or v == m:
            return latest
        if policy == "pipedream":
            return stale
        return torch.lerp(latest, stale, float(alpha(m - v)))

    for m, batch in enumerate(batches):
        micro, sizes = split_at_most(batch, num_microbatches)
        total, leaves = None, []
        for j, size in enumerate(sizes):
            read = {n: history[s][versions[(s, m, j)]][n].clone().requires_grad_(True) for n, s in owner.items()}
            step = partial(_step, module, micro[j], m)
            loss = functional_call(body, {f"m.{n}": t for n, t in read.items()}, (step,))
            term = loss * (size / sum(sizes))
            total = term if total is None else total + term
            leaves.append(read)
        for j, read in enumerate(leaves):  # the graph rule: what the graphs saved reads the backward weights
            for n, t in read.items():
                s = owner[n]
                t.data.copy_(backward_weight(s, n, versions[(s, m, j)], m))
        assert total is not None
        total.backward()
        for s in range(w):
            for n in mine[s]:
                grads = [read[n].grad for read in leaves if read[n].grad is not None]
                live[s][n].grad = torch.stack(grads).sum(0) if grads else None
            optimizers[s].step()
            optimizers[s].zero_grad(set_to_none=True)
            history[s][m + 1] = {n: live[s][n].detach().clone() for n in mine[s]}
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    for n, s in owner.items():
        state[n] = live[s][n].detach().clone()
    return state, owner
