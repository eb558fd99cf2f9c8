"""The random stream a stage's layers draw from, apart from the one the user's step draws from.

On one device the code of a step (a mixup's mixing weight and permutation, noise added to the inputs) and the
model's layers (dropout, stochastic depth) draw in turn from one global stream. On a pipeline the step's code runs
on stage 0 and again on the last stage, and each must draw what the other drew: a mixup mixes the labels on the
last stage with the permutation stage 0 mixed the inputs with. The layers, though, run on their own stage only:
drawing from the global stream they would move it on one rank and not on the others, and from the first dropout
on, the last stage's step would draw other numbers than stage 0's (its labels mixed by another permutation than
the inputs they belong to, silently).

So each stage's layers draw from a stream of their own, swapped in for the global one while they run; and the
part of the step after the pipelined call, which runs on the last stage only (a loss that samples, noise on the
logits), draws from another one of the last stage's. The global stream then moves alike on every rank: by the
draws of the step's code before the pipelined call. These draws cannot be one device's anyway (the layers are
split across processes); each stream is seeded from the global seed (``seed_everything``) and the stage, so a run
is reproducible. Replicas of one stage (data parallelism) draw alike, as Lightning's DDP ranks do from one seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = ["RandomStream", "StageStreams"]

State = tuple[Tensor, Tensor | None]


class RandomStream:
    """A random stream of its own (the CPU generator's, and the device's where it is a GPU), swapped in for the
    global generators where it draws."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self._outer: State | None = None  # the global generators' states while this stream draws
        self._cuda = torch.cuda.default_generators[_index(device)] if device.type == "cuda" else None
        self.cpu: Tensor = torch.Generator().manual_seed(seed).get_state()
        self.cuda: Tensor | None = None
        if self._cuda is not None:
            self.cuda = torch.Generator(device=device).manual_seed(seed).get_state()

    def state(self) -> State:
        """Where the stream stands (to draw the same again: :meth:`replaying`)."""
        return self.cpu, self.cuda

    def enter(self) -> None:
        """From now on the global generators are this stream (which moves on) until :meth:`leave`."""
        assert self._outer is None, "the stream is drawing already"
        self._outer = torch.get_rng_state(), self._cuda.get_state() if self._cuda is not None else None
        torch.set_rng_state(self.cpu)
        if self._cuda is not None and self.cuda is not None:
            self._cuda.set_state(self.cuda)

    def leave(self) -> None:
        """The global generators as they were at :meth:`enter` (nothing if the stream is not drawing)."""
        if self._outer is None:
            return
        outer_cpu, outer_cuda = self._outer
        self._outer = None
        self.cpu = torch.get_rng_state()
        torch.set_rng_state(outer_cpu)
        if self._cuda is not None and outer_cuda is not None:
            self.cuda = self._cuda.get_state()
            self._cuda.set_state(outer_cuda)

    @contextmanager
    def drawing(self) -> Iterator[None]:
        """Within the block, the global generators are this stream (which moves on); after it, as they were."""
        self.enter()
        try:
            yield
        finally:
            self.leave()

    @contextmanager
    def replaying(self, state: State) -> Iterator[None]:
        """Within the block the stream stands at ``state`` (a recomputed forward draws its dropout masks again);
        after it, where it stood before."""
        kept = self.cpu, self.cuda
        self.cpu, self.cuda = state
        try:
            yield
        finally:
            self.cpu, self.cuda = kept


class StageStreams:
    """The streams of stage ``stage``: its layers', and (last stage) that of the step's code after the call."""

    def __init__(self, stage: int, device: torch.device) -> None:
        seed = torch.initial_seed()
        self.layers = RandomStream(_mixed(seed, 1, stage), device)
        self.after_call = RandomStream(_mixed(seed, 2, stage), device)


def _mixed(*values: int) -> int:
    """A seed from ``values``; the same in every process (Python hashes a tuple of ints alike everywhere)."""
    return hash(values) % 2**63


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()
