"""The random stream a stage's layers draw from, apart from the one the user's step draws from.

On one device the code of a step (a mixup's mixing weight and permutation, noise added to the inputs) and the
model's layers (dropout, stochastic depth) draw in turn from one global stream. On a pipeline the step's code runs
on stage 0 and again on the last stage, and each must draw what the other drew: a mixup mixes the labels on the
last stage with the permutation stage 0 mixed the inputs with. The layers, though, run on their own stage only:
drawing from the global stream they would move it on one rank and not on the others, and from the first dropout
on, the last stage's step would draw other numbers than stage 0's (its labels mixed by another permutation than
the inputs they belong to, silently).

So each stage's layers draw from a stream of their own (:class:`LayerStream`), swapped in for the global one while
they run, and the global stream moves alike on every rank: by the step's own draws. The layers' draws cannot be
one device's anyway (they are split across processes); each stage's stream is seeded from the global seed
(``seed_everything``) and the stage, so a run is reproducible. Replicas of one stage (data parallelism) draw alike,
as Lightning's DDP ranks do from one seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = ["LayerStream"]

State = tuple[Tensor, Tensor | None]


class LayerStream:
    """Stage ``stage``'s own random stream (the CPU generator's, and the device's where it is a GPU)."""

    def __init__(self, stage: int, device: torch.device) -> None:
        seed = (torch.initial_seed() + 1 + stage) % 2**63
        self._cuda = torch.cuda.default_generators[_index(device)] if device.type == "cuda" else None
        self.cpu: Tensor = torch.Generator().manual_seed(seed).get_state()
        self.cuda: Tensor | None = None
        if self._cuda is not None:
            self.cuda = torch.Generator(device=device).manual_seed(seed).get_state()

    def state(self) -> State:
        """Where the stream stands (to draw the same again: :meth:`replaying`)."""
        return self.cpu, self.cuda

    @contextmanager
    def drawing(self) -> Iterator[None]:
        """Within the block, the global generators are this stream (which moves on); after it, as they were."""
        outer_cpu = torch.get_rng_state()
        outer_cuda = self._cuda.get_state() if self._cuda is not None else None
        torch.set_rng_state(self.cpu)
        if self._cuda is not None and self.cuda is not None:
            self._cuda.set_state(self.cuda)
        try:
            yield
        finally:
            self.cpu = torch.get_rng_state()
            torch.set_rng_state(outer_cpu)
            if self._cuda is not None and outer_cuda is not None:
                self.cuda = self._cuda.get_state()
                self._cuda.set_state(outer_cuda)

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


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()
