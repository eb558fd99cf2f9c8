"""A single-process reference for the asynchronous policies: tests/models.py's StemNetHead trained by applying
each policy's weight rule, op by op, in the global slot order of the same static schedule.

It shares nothing with the strategy but the pure schedule (which ops, in which order) and the micro-batch split.
Each stage keeps every version of its weights; a forward reads its version, a backward the policy's weights:

* timeprest_v: the latest; timeprest: forward reads the version stage 0 had at entry, backward the latest;
* pipedream: the forward's version; timeprest_i: latest + alpha(d) * (forward's version - latest).

``graph`` back-propagates through the forward's graph with its weight leaves overwritten by the backward
weights; ``recompute`` reruns the stage on its input with the backward weights. The last stage always keeps its
graph.

``precision="bf16-mixed"`` runs every stage forward (the last stage's loss included, and the forward a
``recompute`` backward reruns) under ``torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)``, the
context Lightning's ``MixedPrecision("bf16-mixed", "cpu")`` plugin wraps a training step in; the backward and the
optimizer step run outside it, as on one device. (The strategy runs its whole asynchronous step, backwards and
steps included, inside the plugin's context: autocast changes only the forward ops, so both give the same.)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import models
import torch
import torch.nn.functional as F
from lightning.pytorch import seed_everything
from torch.func import functional_call

from lightning_timeprest.microbatch import split_at_most
from lightning_timeprest.partition import plan_sequential
from lightning_timeprest.schedules import NF1BOrder, Op, OpKind, Schedule, nf1b, pipedream_1f1b, simulate

FORWARD_RULE = {"timeprest_v": "live", "timeprest": "vertical", "timeprest_i": "live", "pipedream": "live"}
BACKWARD_RULE = {"timeprest_v": "latest", "timeprest": "latest", "timeprest_i": "intermediate", "pipedream": "stashed"}


def reference(
    policy: str,
    num_stages: int,
    num_microbatches: int,
    *,
    optimizer: str = "sgd",
    epochs: int = 2,
    batch_size: int = 18,
    alpha: Callable[[int], float] = lambda d: math.exp(-d),
    rule: str = "graph",
    schedules: Sequence[Schedule] | None = None,
    order: NF1BOrder | None = None,
    clip_value: float | None = None,
    precision: str = "32-true",
    max_steps: int | None = None,
    losses: list[float] | None = None,
) -> dict[str, torch.Tensor]:
    """The state dict after ``epochs`` epochs, or after ``max_steps`` mini-batches if that comes first.

    Each epoch is one stream of mini-batches in the static schedule (nF1B generated as ``order`` says), unless
    ``schedules`` gives the streams as run: one schedule per stream, in order, each covering as many mini-batches
    as it has backwards (a stream ends at an epoch end, or earlier where the pipeline drained mid-epoch). ``losses``,
    if given, receives each mini-batch's loss (the size-weighted mean of its micro-batch losses), in order.
    """
    if precision not in ("32-true", "bf16-mixed"):
        raise ValueError(f"precision {precision!r}: the reference runs '32-true' or 'bf16-mixed'")
    seed_everything(0)
    model = models.StemNetHead(optimizer=optimizer)
    w = num_stages
    plan = plan_sequential("net", model.net, w, "parameters")
    owned: list[list[str]] = []
    for s in range(w):
        names = [
            f"net.{layer}.{p}"
            for layer in plan.layers_of(s)
            for p in ("weight", "bias")
            if layer in model.net._modules and hasattr(model.net._modules[layer], p)
        ]
        if s == 0:
            names = ["stem.weight", "stem.bias", *names]
        if s == w - 1:
            names += ["head.weight", "head.bias"]
        owned.append(names)
    full = dict(model.named_parameters())
    live = [{n: torch.nn.Parameter(full[n].detach().clone()) for n in owned[s]} for s in range(w)]
    lr = model.hparams.lr
    opts = [
        torch.optim.Adam(live[s].values(), lr=lr * 0.1)
        if optimizer == "adam"
        else torch.optim.SGD(live[s].values(), lr=lr, momentum=0.9)
        for s in range(w)
    ]

    def run_stage(s: int, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        with _forward_context(precision):
            return _run_stage(s, params, x)

    def _run_stage(s: int, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if s == 0:
            x = torch.tanh(
                functional_call(model.stem, {k[5:]: v for k, v in params.items() if k.startswith("stem.")}, (x,))
            )
        for layer in plan.layers_of(s):
            sub = model.net._modules[layer]
            x = functional_call(
                sub, {k.split(".", 2)[2]: v for k, v in params.items() if k.startswith(f"net.{layer}.")}, (x,)
            )
        if s == w - 1:
            x = functional_call(
                model.head, {k[5:]: v for k, v in params.items() if k.startswith("head.")}, (torch.tanh(x),)
            )
        return x

    data = list(models.loader(batch_size))
    streams = iter(schedules) if schedules is not None else None
    left = epochs * len(data) if max_steps is None else max_steps
    for _ in range(epochs):
        done = 0
        while done < min(len(data), left):
            if streams is not None:
                schedule = next(streams)
            elif policy == "pipedream":
                schedule = pipedream_1f1b(w, min(len(data), left))
            else:
                schedule = nf1b(w, num_microbatches, min(len(data), left), order)
            count = sum(op.kind is OpKind.BACKWARD for op in schedule.ops(0))
            assert done + count <= left, f"a stream of {count} mini-batches goes past max_steps={max_steps}"
            _run_stream(
                schedule, data[done : done + count], w, policy, rule, alpha, live, opts, run_stage, clip_value,
                precision, losses,
            )  # fmt: skip
            done += count
        left -= done
    out = {}
    for s in range(w):
        out.update({k: v.detach().clone() for k, v in live[s].items()})
    return out


def _forward_context(precision: str) -> contextlib.AbstractContextManager:
    """What Lightning's precision plugin wraps the training step in: ``MixedPrecision("bf16-mixed", "cpu")`` uses
    ``torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)``."""
    if precision == "bf16-mixed":
        return torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _weights_read_at_backward(leaves: dict[str, torch.Tensor], precision: str):
    """The weights a kept forward graph runs with, such that its backward reads what ``leaves`` hold then.

    In float32 the graph saves the leaves themselves (or views of them), so writing the backward weights into the
    leaves is enough. Under autocast it saves bfloat16 copies of them instead: here the forward runs on bfloat16
    copies made in advance (the same rounding autocast would apply: every StemNetHead parameter feeds a linear
    layer), and a saved-tensor hook gives the backward a bfloat16 copy of the leaf as it is at backward time, in
    place of the copy made at forward time."""
    if precision != "bf16-mixed":
        yield leaves
        return
    casts = {k: t.to(torch.bfloat16) for k, t in leaves.items()}
    source = {c.untyped_storage().data_ptr(): leaves[k] for k, c in casts.items()}

    def pack(t: torch.Tensor):
        leaf = source.get(t.untyped_storage().data_ptr()) if t.dtype == torch.bfloat16 else None
        if leaf is None:
            return t
        return (leaf, t.size(), t.stride(), t.storage_offset())  # a view of the copy (a linear saves W.t())

    def unpack(saved):
        if isinstance(saved, torch.Tensor):
            return saved
        leaf, size, stride, offset = saved
        return leaf.detach().to(torch.bfloat16).as_strided(size, stride, offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield casts


def _run_stream(schedule, data, w, policy, rule, alpha, live, opts, run_stage, clip_value, precision, losses) -> None:
    """One stream: every stage starts at version 0 (the pipeline was drained), runs the schedule op by op in the
    global slot order of its unit-slot simulation (any order that respects every dependency gives the same result)."""
    n = schedule.num_microbatches
    # a mini-batch smaller than N runs in fewer micro-batches; its other forward slots idle
    splits = [split_at_most(batch, n) for batch in data]
    version = [0] * w
    history: list[dict[int, dict[str, torch.Tensor]]] = [
        {0: {k: v.detach().clone() for k, v in live[s].items()}} for s in range(w)
    ]
    entry: dict[tuple[int, int], int] = {}
    fwd: dict[tuple[int, int, int], dict] = {}  # (stage, m, j) -> record
    grad_in: dict[tuple[int, int, int], torch.Tensor] = {}  # gradient for stage s's output of (m, j)
    grid = simulate(schedule)
    for slot in range(len(grid[0])):
        for s in range(w):
            op = grid[s][slot]
            if op is None:
                continue
            if op.kind is OpKind.FORWARD:
                _forward(s, op, w, version, history, entry, fwd, splits, run_stage, rule, policy, precision)
            else:
                _backward(
                    s, op, w, n, version, history, fwd, grad_in, splits, run_stage, rule, policy, alpha, live, opts,
                    clip_value, losses,
                )  # fmt: skip


def _forward(s, op: Op, w, version, history, entry, fwd, splits, run_stage, rule, policy, precision) -> None:
    m, j = op.minibatch, op.microbatch
    if j >= len(splits[m][1]):
        return
    if s == 0:
        entry[(m, j)] = version[0]
        x = splits[m][0][j][0]
    else:
        x = fwd[(s - 1, m, j)]["out"].detach().requires_grad_(True)
    v = entry[(m, j)] if FORWARD_RULE[policy] == "vertical" else version[s]
    leaves = {k: t.detach().clone().requires_grad_(True) for k, t in history[s][v].items()}
    if rule == "graph" or s == w - 1:
        with _weights_read_at_backward(leaves, precision) as weights:
            out = run_stage(s, weights, x)
    else:
        with torch.no_grad():
            out = run_stage(s, leaves, x)
    rec = {"v": v, "x": x, "out": out, "leaves": leaves}
    if s == w - 1:  # the user's loss, in the training step: under the same autocast as the forward
        with _forward_context(precision):
            rec["loss"] = F.cross_entropy(out, splits[m][0][j][1])
    fwd[(s, m, j)] = rec


def _backward_weights(s, v, version, history, policy, alpha) -> dict[str, torch.Tensor]:
    d = version[s] - v
    latest = history[s][version[s]]
    rule = BACKWARD_RULE[policy]
    if d == 0 or rule == "latest":
        return latest
    stale = history[s][v]
    if rule == "stashed":
        return stale
    a = float(alpha(d))
    return {k: torch.lerp(latest[k], stale[k], a) for k in latest}


def _backward(
    s, op, w, n, version, history, fwd, grad_in, splits, run_stage, rule, policy, alpha, live, opts, clip_value, losses
) -> None:
    m = op.minibatch
    grads: dict[str, torch.Tensor] = {}

    def collect(leaves: dict[str, torch.Tensor]) -> None:
        for k, t in leaves.items():
            if t.grad is not None:
                grads[k] = grads[k] + t.grad if k in grads else t.grad

    sizes = splits[m][1]
    n = len(sizes)
    if s == w - 1:
        total = None
        for j in range(n):
            rec = fwd[(s, m, j)]
            wb = _backward_weights(s, rec["v"], version, history, policy, alpha)
            with torch.no_grad():
                for k, t in rec["leaves"].items():
                    t.data.copy_(wb[k])
            term = rec["loss"] * (sizes[j] / sum(sizes))
            total = term if total is None else total + term
        total.backward()
        if losses is not None:  # (the last stage's backwards run in mini-batch order)
            losses.append(total.item())
        for j in range(n):
            collect(fwd[(s, m, j)]["leaves"])
    else:
        for j in range(n):
            rec = fwd[(s, m, j)]
            wb = _backward_weights(s, rec["v"], version, history, policy, alpha)
            if rule == "graph":
                leaves, out = rec["leaves"], rec["out"]
                with torch.no_grad():
                    for k, t in leaves.items():
                        t.data.copy_(wb[k])
            else:
                leaves = {k: t.detach().clone().requires_grad_(True) for k, t in wb.items()}
                out = run_stage(s, leaves, rec["x"])
            out.backward(grad_in.pop((s, m, j)))
            collect(leaves)
    if s > 0:
        for j in range(n):
            grad_in[(s - 1, m, j)] = fwd[(s, m, j)]["x"].grad
    for j in range(n):
        del fwd[(s, m, j)]
    for k, p in live[s].items():
        p.grad = grads.get(k)
    if clip_value is not None:
        torch.nn.utils.clip_grad_value_([p for p in live[s].values() if p.grad is not None], clip_value)
    opts[s].step()
    opts[s].zero_grad(set_to_none=True)
    version[s] += 1
    history[s][version[s]] = {k: v.detach().clone() for k, v in live[s].items()}


def recorded_schedules(
    traces: Sequence[Sequence[Sequence[tuple]]], num_stages: int, num_microbatches: int
) -> list[Schedule]:
    """Per epoch, the op order each rank recorded (``traces[rank][stream]``) as a validated Schedule."""
    out = []
    for stream in range(len(traces[0])):
        stage_ops = []
        for rank in range(num_stages):
            ops = [Op(OpKind(kind), m, j) for kind, m, j, _ in traces[rank][stream]]
            stage_ops.append(tuple(ops))
        if any(stage_ops):
            out.append(Schedule("recorded", num_stages, num_microbatches, tuple(stage_ops), synchronous=False))
    return out
