"""Linear layers' weight gradients taken once per mini-batch, over all its micro-batches, instead of once per
micro-batch.

A stage back-propagates a mini-batch as N micro-batches. Autograd then computes each ``nn.Linear`` weight's
gradient N times, each a matrix product over a micro-batch's rows that writes a whole weight-sized matrix, and adds
each into the gradient: N passes over the weight where one device makes one. On a CPU core that is most of what a
micro-batched backward costs beyond a whole batch's (4 Linear layers of 1024, 256 rows as 4 micro-batches of 64:
the backward took 1.6x the whole batch's; with the weight gradient taken once, 1.3x). The input's gradient, which
the stage before waits for, is still computed per micro-batch.

So, under gpipe and the asynchronous engine with more than one micro-batch, a stage's ``nn.Linear`` modules with
weights of at least :data:`LARGE_WEIGHT` elements run as :class:`_DeferredLinear`: its backward returns the input's
gradient and, while the runtime back-propagates a mini-batch (:meth:`WeightGradients.deferring`), keeps the layer's
input and output gradient; when the micro-batches are done, :meth:`WeightGradients.flush` takes each weight's gradient
(and its bias's) in one product over all of them and adds it to the gradient of the weight the forward read, as
autograd would have. (The products run after the micro-batches' backwards, on inputs no longer in the cache: about
15% slower each than inside autograd's backward, which the fewer passes more than make up for from two micro-batches
on.) Not under 1f1b, which frees each micro-batch's activations at its backward: keeping the layers' inputs to the
end of the mini-batch would undo that. Anywhere else (a backward the user's own code runs, ``create_graph``) the
layer back-propagates as ``F.linear`` does. Under autocast the layers run as ``F.linear`` (autocast casts inside it).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_timeprest import compat
from lightning_timeprest.precision import autocasting

__all__ = ["WeightGradients"]


@dataclass
class _Kept:
    """What one weight's deferred gradient is made from: every input and output gradient of its layer calls."""

    weight: Tensor
    bias: Tensor | None
    inputs: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)


class WeightGradients:
    """The deferred weight gradients of one stage's ``nn.Linear`` modules (see the module docstring)."""

    def __init__(self) -> None:
        self._collecting = False
        self._kept: dict[tuple[int, int], _Kept] = {}  # by (weight, bias): layers may share a weight, not a bias
        self._installed: list[nn.Linear] = []

    def install(self, module: nn.Module, min_weight: int | None = None) -> int:
        """Run every ``nn.Linear`` in ``module`` (the class itself, not a subclass with its own ``forward``) whose
        weight has at least ``min_weight`` elements (default :data:`LARGE_WEIGHT`) as a deferred layer; return how
        many. :meth:`uninstall` gives them their own ``forward`` back."""
        for layer in eligible(module, min_weight):
            layer.forward = partial(_forward, layer, self)  # type: ignore[method-assign]
            self._installed.append(layer)
        return len(self._installed)

    @property
    def layers(self) -> int:
        """How many layers run as deferred layers now."""
        return len(self._installed)

    def uninstall(self) -> None:
        for layer in self._installed:
            vars(layer).pop("forward", None)
        self._installed = []

    @contextmanager
    def deferring(self) -> Iterator[None]:
        """The engine back-propagates micro-batches: keep their Linear layers' weight gradients for :meth:`flush`."""
        self._collecting = True
        try:
            yield
        finally:
            self._collecting = False

    def keep(self, weight: Tensor, bias: Tensor | None, x: Tensor, grad: Tensor) -> bool:
        """Keep one layer call's input and output gradient for :meth:`flush`. ``False`` outside the engine's
        backward, under ``create_graph`` (the gradient must then be differentiable), or where the user registered
        hooks on the weight or bias (autograd calls them with each call's gradient): the caller takes it at once,
        as autograd does."""
        if not self._collecting or torch.is_grad_enabled():
            return False
        if compat.has_grad_hooks(weight) or (bias is not None and compat.has_grad_hooks(bias)):
            return False
        key = (id(weight), id(bias))
        kept = self._kept.get(key)
        if kept is None:
            kept = self._kept[key] = _Kept(weight, bias)
        kept.inputs.append(x)
        kept.grads.append(grad)
        return True

    def retarget(self, pairs: Iterable[tuple[Tensor, Tensor]]) -> None:
        """For each ``(old, new)``: what is kept for weight or bias ``old`` goes to ``new``'s ``.grad`` at the flush,
        in one product with what is kept for ``new`` already. The asynchronous engine's forwards read version leaves
        that stand in for the parameters; a mini-batch whose micro-batches read different versions (an optimizer
        step fell between its forwards) back-propagates through several leaf sets, and their weight gradients all go
        to the same parameter: so they still take one product per weight, not one per version."""
        to = {id(old): new for old, new in pairs}
        kept, self._kept = self._kept, {}
        for k in kept.values():
            weight = to.get(id(k.weight), k.weight)
            bias = to.get(id(k.bias), k.bias) if k.bias is not None else None
            into = self._kept.get((id(weight), id(bias)))
            if into is None:
                self._kept[(id(weight), id(bias))] = _Kept(weight, bias, k.inputs, k.grads)
            else:
                into.inputs += k.inputs
                into.grads += k.grads

    def discard(self) -> None:
        """Forget what was kept (a mini-batch that failed before its :meth:`flush`)."""
        self._kept = {}

    def flush(self) -> None:
        """Add each kept weight's gradient, one product over all its calls, to the ``.grad`` of the weight (and bias)
        the forwards read; forget them."""
        kept, self._kept = self._kept, {}
        with torch.no_grad():
            for k in kept.values():
                g = _rows(k.grads)
                _accumulate(k.weight, g.t().matmul(_rows(k.inputs)))
                if k.bias is not None:
                    _accumulate(k.bias, g.sum(0))


def eligible(module: nn.Module, min_weight: int | None = None) -> list[nn.Linear]:
    """The layers :meth:`WeightGradients.install` would defer in ``module``: every ``nn.Linear`` (the class itself,
    with no ``forward`` of its own set on it) whose weight has at least ``min_weight`` (default
    :data:`LARGE_WEIGHT`) elements."""
    smallest = LARGE_WEIGHT if min_weight is None else min_weight
    return [
        layer
        for layer in module.modules()
        if type(layer) is nn.Linear and "forward" not in vars(layer) and layer.weight.numel() >= smallest
    ]


#: Layers with smaller weights run as they are: a deferred layer's own calls cost about 0.1 ms a call and
#: micro-batch (forward and backward, in Python), about what a pass over a weight of this size costs on a CPU core,
#: so on smaller weights (the layers of a 256-wide GPT, 2^16 to 2^18 elements) it costs more than it saves.
LARGE_WEIGHT = 1 << 19


def _as_rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _rows(parts: list[Tensor]) -> Tensor:
    """The calls' tensors as one matrix of rows (the last dimension is the features)."""
    return _as_rows(parts[0]) if len(parts) == 1 else torch.cat([_as_rows(t) for t in parts])


def _accumulate(leaf: Tensor, grad: Tensor) -> None:
    """What autograd's gradient accumulation does for a leaf: set its ``.grad``, or add into it in place."""
    if leaf.grad is None:
        leaf.grad = grad
    else:
        leaf.grad.add_(grad)


def _forward(layer: nn.Linear, grads: WeightGradients, x: Tensor) -> Tensor:
    w, b = layer.weight, layer.bias
    if not (torch.is_grad_enabled() and w.requires_grad) or autocasting():
        return F.linear(x, w, b)
    return _DeferredLinear.apply(x, w, b, grads)


class _DeferredLinear(torch.autograd.Function):
    """``F.linear`` whose weight and bias gradients :class:`WeightGradients` may take later, over many calls."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None, grads: WeightGradients) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.weight, ctx.bias, ctx.grads = w, b, grads  # (the tensors whose .grad the deferred gradients go to)
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, w = ctx.saved_tensors
        b = ctx.bias
        grad_x = grad.matmul(w) if ctx.needs_input_grad[0] else None
        wants_w, wants_b = ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2]
        if wants_w and ctx.grads.keep(ctx.weight, b if wants_b else None, x, grad):
            return grad_x, None, None, None
        g = _as_rows(grad)
        grad_w = g.t().matmul(_as_rows(x)) if wants_w else None
        grad_b = g.sum(0) if wants_b else None
        return grad_x, grad_w, grad_b, None
