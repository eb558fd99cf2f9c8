"""Weight versions: which weights a stage's forward and backward ops use, and what it keeps to make that possible.

A stage's weights after ``k`` optimizer steps are its version ``k``. The policies of the TiMePReSt family differ
only in which version each op reads (SPEC's table):

=============  =======================================  ==========================================
policy         forward reads                             backward reads
=============  =======================================  ==========================================
timeprest_v    the live weights                          the latest weights
timeprest      the version stage 0 had when the          the latest weights
               micro-batch entered (vertical sync)
timeprest_i    the live weights                          W~ = W_latest + alpha(d) (W_stale - W_latest)
pipedream      the live weights                          the forward's weights (stashed)
=============  =======================================  ==========================================

``d`` (degree of staleness) is the number of steps the stage took between a micro-batch's forward and its
backward. :class:`VersionStore` keeps the live parameters plus copy-on-write snapshots: a version is copied
only at the moment an optimizer step would overwrite it while a pending op still needs it, and dropped as soon
as none does. So V-TiMePReSt never copies anything, and a stage whose ``d`` is always 0 (the last stage) neither.

Forwards never read the ``nn.Parameter`` objects themselves: they read *leaves*, tensors that share the
storage of the parameters (or of a snapshot) but have their own autograd version counter. The optimizer can
then update the parameters in place while graphs that saved them are pending (modern autograd would reject an
in-place change of a saved tensor), and a pending graph can be made to read other weights by writing them into
that storage for the duration of its backward (the ``graph`` rule).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["POLICIES", "LeafSet", "Policy", "VersionStore", "significance_function"]


@dataclass(frozen=True)
class Policy:
    """A weight-version rule: what the forward and the backward read."""

    name: str
    forward: Literal["live", "vertical"]
    backward: Literal["latest", "stashed", "intermediate"]


POLICIES: dict[str, Policy] = {
    "timeprest_v": Policy("timeprest_v", "live", "latest"),
    "timeprest": Policy("timeprest", "vertical", "latest"),
    "timeprest_i": Policy("timeprest_i", "live", "intermediate"),
    "pipedream": Policy("pipedream", "live", "stashed"),
}


def significance_function(
    kind: str | Callable[[int], float], decay_lambda: float = 1.0, power_beta: float = 0.5
) -> Callable[[int], float]:
    """The weight ``alpha(d)`` of the stale weights in I-TiMePReSt's intermediate weight.

    ``"exp"``: ``exp(-lambda d)``; ``"inverse"``: ``1 / (1 + d)``; ``"power"``: ``beta ** d``; or any callable
    ``d -> alpha``. Every built-in gives ``alpha(0) = 1``.
    """
    if callable(kind):
        return kind
    # module-level functions under partial: the strategy stays picklable (the spawn launcher pickles it)
    if kind == "exp":
        if decay_lambda < 0:
            raise ValueError(f"decay_lambda must be >= 0, got {decay_lambda}")
        return partial(_exp, decay_lambda)
    if kind == "inverse":
        return _inverse
    if kind == "power":
        if not 0 <= power_beta <= 1:
            raise ValueError(f"power_beta must be in [0, 1], got {power_beta}")
        return partial(_power, power_beta)
    raise ValueError(f"unknown significance {kind!r}; choose 'exp', 'inverse', 'power' or pass a callable d -> alpha")


def _exp(decay_lambda: float, d: int) -> float:
    return math.exp(-decay_lambda * d)


def _inverse(d: int) -> float:
    return 1.0 / (1.0 + d)


def _power(beta: float, d: int) -> float:
    return beta**d


class LeafSet:
    """The tensors one or more forwards ran with: leaves that share a storage (live weights or a snapshot)."""

    def __init__(self, version: int, storage: list[Tensor]) -> None:
        self.version = version
        self.storage = storage
        # a separate autograd version counter: in-place updates of the storage never invalidate pending graphs
        self.leaves = [_alias(t) for t in storage]


def _alias(t: Tensor) -> Tensor:
    leaf = t.data  # shares the storage, not the version counter
    return leaf.requires_grad_(True)


class VersionStore:
    """The weight versions one stage keeps.

    ``params`` are the stage's trainable parameters, in a fixed order; ``names`` their names in the root module
    (what :func:`torch.func.functional_call` replaces).
    """

    def __init__(self, names: list[str], params: list[nn.Parameter]) -> None:
        self.names = names
        self.params = params
        self.version = 0
        self.snapshots: dict[int, list[Tensor]] = {}
        self._live: LeafSet | None = None
        self._pins: dict[int, int] = {}  # version -> number of pending ops that need its values later
        self._keep_from: int | None = None  # vertical sync: versions >= this may still be read by a forward
        self.param_bytes = sum(p.numel() * p.element_size() for p in params)
        self.peak_versions = 1
        self._temporaries = 0  # copies alive only during backwards: W~ and the graph rule's saved live weights
        # a copy of the live weights left by a backward that overwrote them and put them back: the snapshot of
        # this version, should the optimizer step after it need one (every step, and reset, let it go)
        self._spare: list[Tensor] | None = None

    # -- what forwards read ----------------------------------------------------------------------------------

    def live_leaves(self) -> LeafSet:
        if self._live is None:
            self._live = LeafSet(self.version, [p.data for p in self.params])
        return self._live

    def leaves_for(self, version: int) -> LeafSet:
        """Leaves holding ``version`` (the live weights, or a snapshot kept for vertical sync)."""
        if version == self.version:
            return self.live_leaves()
        if version not in self.snapshots:
            raise RuntimeError(f"weight version {version} is no longer held (live version {self.version})")
        return LeafSet(version, self.snapshots[version])

    # -- bookkeeping of what pending ops need ------------------------------------------------------------------

    def pin(self, version: int) -> None:
        """A pending backward will need the values of ``version``."""
        self._pins[version] = self._pins.get(version, 0) + 1

    def unpin(self, version: int) -> None:
        count = self._pins.get(version, 0) - 1
        if count > 0:
            self._pins[version] = count
        else:
            self._pins.pop(version, None)
        self._collect()

    def keep_versions_from(self, version: int | None) -> None:
        """Vertical sync: forwards yet to arrive may read any version ``>= version`` (``None``: none)."""
        self._keep_from = version
        self._collect()

    def _needed(self, version: int) -> bool:
        return version in self._pins or (self._keep_from is not None and version >= self._keep_from)

    def _collect(self) -> None:
        for v in [v for v in self.snapshots if not self._needed(v)]:
            del self.snapshots[v]

    @property
    def versions_held(self) -> int:
        return 1 + len(self.snapshots)

    @property
    def bytes_held(self) -> int:
        return self.versions_held * self.param_bytes

    # -- the optimizer step ------------------------------------------------------------------------------------

    @contextmanager
    def stepping(self) -> Iterator[None]:
        """Wrap the optimizer step: snapshot the live version first if a pending op still needs its values."""
        spare, self._spare = self._spare, None
        if self._needed(self.version) and self.version not in self.snapshots:
            if spare is not None:
                self.snapshots[self.version] = spare
            else:
                self.snapshots[self.version] = [p.detach().clone() for p in self.params]
            self.peak_versions = max(self.peak_versions, self.versions_held)
        del spare
        yield
        self.version += 1
        self._live = None
        self._collect()

    def reset(self) -> None:
        """Forget every version (the pipeline is drained: nothing pending); the live weights become version 0."""
        self.snapshots.clear()
        self._spare = None
        self._pins.clear()
        self._keep_from = None
        self.version = 0
        self._live = None
        self.peak_versions = 1

    # -- the weights a backward reads --------------------------------------------------------------------------

    def backward_values(
        self, policy: Policy, forward_version: int, alpha: Callable[[int], float]
    ) -> tuple[list[Tensor], int]:
        """The weights a backward reads for a micro-batch whose forward read ``forward_version``, and ``d``."""
        d = self.version - forward_version
        latest = [p.data for p in self.params]
        if d == 0 or policy.backward == "latest":
            return latest, d
        stale = self.snapshots[forward_version]
        if policy.backward == "stashed":
            return stale, d
        a = float(alpha(d))
        if a == 1.0:
            return stale, d
        if a == 0.0:
            return latest, d
        self.peak_versions = max(self.peak_versions, self.versions_held + 1)  # W~ exists while the backward runs
        return [torch.lerp(w, s, a) for w, s in zip(latest, stale, strict=True)], d

    @contextmanager
    def reading(self, leaves: LeafSet, values: list[Tensor]) -> Iterator[None]:
        """Make ``leaves`` (and every graph that saved them) read ``values`` until the block ends."""
        if all(v is s or (v.data_ptr() == s.data_ptr()) for v, s in zip(values, leaves.storage, strict=True)):
            yield
            return
        held = [self.params[0].data, *(snapshot[0] for snapshot in self.snapshots.values())]
        # the copy of what the storage held, and W~ unless ``values`` is a version the store holds anyway
        extra = 1 + (0 if any(values[0].data_ptr() == h.data_ptr() for h in held) else 1)
        with self._overwritten(leaves, lambda s, i: s.copy_(values[i]), extra):
            yield

    @contextmanager
    def reading_backward(
        self, leaves: LeafSet, policy: Policy, forward_version: int, alpha: Callable[[int], float]
    ) -> Iterator[int]:
        """The graph rule: make ``leaves`` read the backward weights of a micro-batch whose forward read
        ``forward_version`` (:meth:`backward_values`) until the block ends; yields ``d``.

        When the leaves are the live weights and the backward reads I-TiMePReSt's W~, W~ is built in their
        storage (``lerp_``) and the live weights put back after: one pass over the weights less than building W~
        apart and copying it in, and no W~ beside the copy of the live weights."""
        d = self.version - forward_version
        a = float(alpha(d)) if policy.backward == "intermediate" and d > 0 else None
        live = all(s.data_ptr() == p.data_ptr() for s, p in zip(leaves.storage, self.params, strict=True))
        if a is None or a in (0.0, 1.0) or not live:
            values, d = self.backward_values(policy, forward_version, alpha)
            with self.reading(leaves, values):
                yield d
            return
        stale = self.snapshots[forward_version]
        with self._overwritten(leaves, lambda s, i: s.lerp_(stale[i], a), 1):
            yield d

    @contextmanager
    def _overwritten(self, leaves: LeafSet, write: Callable[[Tensor, int], object], extra: int) -> Iterator[None]:
        """Copy what ``leaves`` hold aside, ``write(storage, i)`` the backward weights into each of their tensors,
        and put the copy back when the block ends; ``extra`` weight versions exist meanwhile."""
        saved = [s.clone() for s in leaves.storage]
        self._temporaries += extra
        self.peak_versions = max(self.peak_versions, self.versions_held + self._temporaries)
        with torch.no_grad():
            for i, s in enumerate(leaves.storage):
                write(s, i)
        try:
            yield
        finally:
            self._temporaries -= extra
            with torch.no_grad():
                for s, v in zip(leaves.storage, saved, strict=True):
                    s.copy_(v)
            if all(s.data_ptr() == p.data_ptr() for s, p in zip(leaves.storage, self.params, strict=True)):
                self._spare = saved

    def lend_grads(self, leaves: LeafSet) -> None:
        """Let a backward through ``leaves`` accumulate into the parameters' ``.grad`` tensors in place (autograd
        adds into a leaf's existing ``.grad``), instead of into new tensors :meth:`harvest` adds up: a gradient
        buffer less per parameter and micro-batch, and no pass to add it."""
        for p, leaf in zip(self.params, leaves.leaves, strict=True):
            if p.grad is not None and leaf.grad is None:
                leaf.grad = p.grad

    def harvest(self, leaves: LeafSet) -> None:
        """Add the gradients collected in ``leaves`` to the parameters' ``.grad`` and clear them."""
        for p, leaf in zip(self.params, leaves.leaves, strict=True):
            grad = leaf.grad
            if grad is not None:
                if grad is not p.grad:
                    p.grad = grad if p.grad is None else p.grad.add_(grad)
                leaf.grad = None
