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
backward. :class:`VersionStore` keeps the live parameters plus copy-on-write snapshots: a version is kept only
at the moment an optimizer step would overwrite it while a pending op still needs it, and dropped as soon as none
does. So V-TiMePReSt never copies anything, and a stage whose ``d`` is always 0 (the last stage) neither. Where
pending backwards will read the stale version itself (PipeDream, I-TiMePReSt), the storage their graphs saved is
kept as the snapshot and the step updates a copy moved into the parameters: the backward then finds the stale
weights where its graph reads them, instead of having them copied in and the live ones put back.

Forwards never read the ``nn.Parameter`` objects themselves: they read *leaves*, tensors that share the
storage of the parameters (or of a snapshot) but have their own autograd version counter. The optimizer can
then update the parameters in place while graphs that saved them are pending (modern autograd would reject an
in-place change of a saved tensor), and a pending graph can be made to read other weights by giving that storage
their data for the duration of its backward (the ``graph`` rule): by trading storage pointers where the storage
holds weights still needed, by writing over it where not.
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

from lightning_timeprest import compat
from lightning_timeprest.errors import PipelineConfigError

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
    """The tensors one or more forwards ran with: leaves that share a storage (live weights or a snapshot).

    The leaves stand in for ``params`` (the parameters, in the same order) in the forwards' graphs, so autograd
    never reaches the parameters themselves: the hooks registered on a parameter (``register_hook``) are called
    from its leaf instead, with each backward's gradient of it, as autograd would call them on one device.
    """

    def __init__(self, version: int, storage: list[Tensor], params: list[nn.Parameter]) -> None:
        self.version = version
        self.storage = storage
        # a separate autograd version counter: in-place updates of the storage never invalidate pending graphs
        self.leaves = [_alias(t) for t in storage]
        for leaf, param in zip(self.leaves, params, strict=True):
            if compat.has_grad_hooks(param):
                if compat.has_post_accumulate_hooks(param):
                    raise PipelineConfigError(
                        "a parameter has a hook registered with register_post_accumulate_grad_hook; under the "
                        "asynchronous policies a stage's backwards accumulate into weight versions, not into the "
                        "parameter, so it would never be called. Use register_hook (its gradient), "
                        "on_after_backward or on_before_optimizer_step, or schedule='gpipe' or '1f1b'"
                    )
                leaf.register_hook(partial(_parameter_hooks, param))


def _parameter_hooks(param: Tensor, grad: Tensor) -> Tensor:
    """Call ``param``'s own gradient hooks, in order, on the gradient of the leaf standing in for it."""
    for hook in compat.grad_hooks(param):
        changed = hook(grad)
        if changed is not None:
            grad = changed
    return grad


def _same_storage(a: list[Tensor], b: list[Tensor]) -> bool:
    return all(x.data_ptr() == y.data_ptr() for x, y in zip(a, b, strict=True))


def _alias(t: Tensor) -> Tensor:
    leaf = t.data  # shares the storage, not the version counter
    return leaf.requires_grad_(True)


# (a private method of torch's storages, used by CUDA graph trees and FSDP; without it the store copies instead)
_CAN_TRADE = hasattr(torch.UntypedStorage, "_swap_data_ptr_")


def _own_storages(ts: list[Tensor]) -> bool:
    """Whether each tensor owns its whole storage, shared with none of the others (not tied, not a view of a flat
    buffer): its storage can then be kept, moved or traded on its own."""
    storages = [t.untyped_storage() for t in ts]
    return len({st.data_ptr() for st in storages}) == len(ts) and all(
        t.storage_offset() == 0 and st.nbytes() == t.numel() * t.element_size()
        for t, st in zip(ts, storages, strict=True)
    )


def _tradable(a: list[Tensor], b: list[Tensor]) -> bool:
    """Whether each tensor of ``a`` and its partner in ``b`` can trade their data by trading storage pointers: each
    owns its whole storage, with the same layout."""
    if not _CAN_TRADE:
        return False
    same = all(
        (x.shape, x.stride(), x.dtype, x.device) == (y.shape, y.stride(), y.dtype, y.device)
        for x, y in zip(a, b, strict=True)
    )
    return same and _own_storages(a) and _own_storages(b)


@contextmanager
def _traded(storage: list[Tensor], values: list[Tensor]) -> Iterator[None]:
    """Until the block ends, ``storage`` (and every tensor viewing it, such as what pending graphs saved) holds
    ``values`` and ``values`` hold what ``storage`` held: the storages trade their data pointers, nothing is copied."""
    pairs = [(s.untyped_storage(), v.untyped_storage()) for s, v in zip(storage, values, strict=True)]
    for x, y in pairs:
        x._swap_data_ptr_(y)
    try:
        yield
    finally:
        for x, y in pairs:
            x._swap_data_ptr_(y)


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
        self._kept: dict[int, LeafSet] = {}  # the leaves reading each snapshot, shared by the forwards that read it
        self._pins: dict[int, int] = {}  # version -> number of pending ops that need its values later
        self._keep_from: int | None = None  # vertical sync: versions >= this may still be read by a forward
        self.param_bytes = sum(p.numel() * p.element_size() for p in params)
        self.peak_versions = 1
        self._temporaries = 0  # copies alive only during backwards: W~ and the graph rule's saved weights
        # the step may move the parameters to new storage (keeping the old one as a snapshot) only where each
        # owns its storage: parameters sharing one must stay together
        self._movable = _own_storages([p.data for p in params])

    # -- what forwards read ----------------------------------------------------------------------------------

    def live_leaves(self) -> LeafSet:
        if self._live is None:
            self._live = LeafSet(self.version, [p.data for p in self.params], self.params)
        return self._live

    def leaves_for(self, version: int) -> LeafSet:
        """Leaves holding ``version`` (the live weights, or a snapshot kept for vertical sync)."""
        if version == self.version:
            return self.live_leaves()
        if version not in self.snapshots:
            raise RuntimeError(f"weight version {version} is no longer held (live version {self.version})")
        leaves = self._kept.get(version)
        if leaves is None:
            leaves = self._kept[version] = LeafSet(version, self.snapshots[version], self.params)
        return leaves

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
            self._drop(v)

    def _drop(self, version: int) -> None:
        del self.snapshots[version]
        self._kept.pop(version, None)

    @property
    def versions_held(self) -> int:
        return 1 + len(self.snapshots)

    @property
    def bytes_held(self) -> int:
        return self.versions_held * self.param_bytes

    # -- the optimizer step ------------------------------------------------------------------------------------

    @contextmanager
    def stepping(self) -> Iterator[None]:
        """Wrap the optimizer step: snapshot the live version first if a pending op still needs its values.

        If pending backwards will read this version (they pinned it), the parameters' storage, which their graphs
        saved, becomes the snapshot and the parameters move to a copy that the step updates: one pass over the
        weights, as a copy would take, and the backwards then read the stale weights in place."""
        if self._needed(self.version) and self.version not in self.snapshots:
            if self.version in self._pins and self._movable:
                kept = [p.data for p in self.params]
                for p, t in zip(self.params, kept, strict=True):
                    p.data = t.clone()
                self.snapshots[self.version] = kept
                if self._live is not None:  # the forwards that read the live leaves read the snapshot now
                    self._kept[self.version] = self._live
            else:
                self.snapshots[self.version] = [p.detach().clone() for p in self.params]
            self.peak_versions = max(self.peak_versions, self.versions_held)
        yield
        self.version += 1
        self._live = None
        self._collect()

    def reset(self) -> None:
        """Forget every version (the pipeline is drained: nothing pending); the live weights become version 0."""
        self.snapshots.clear()
        self._kept.clear()
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
    def reading_backward(
        self,
        leaves: LeafSet,
        policy: Policy,
        forward_version: int,
        alpha: Callable[[int], float],
        readers: int = 0,
        alone: bool = True,
    ) -> Iterator[int]:
        """The graph rule: make ``leaves`` (and every graph that saved them) read the backward weights of a
        micro-batch whose forward read ``forward_version`` (:meth:`backward_values`) until the block ends; yields
        ``d``. ``readers``: how many of the version's pins (:meth:`pin`) belong to this backward; ``alone``: no
        other such block opens inside this one (it may then lend the live weights' storage to the leaves).

        Where what the leaves' storage holds is needed after this backward (the live weights, or a snapshot another
        pending op reads), the storage trades its data with the backward weights' for the block, without a copy:
        with the live weights' own storage when the backward reads those, else with a new tensor (I-TiMePReSt's W~,
        one ``lerp``). Where it is not needed (a snapshot read here for the last time) the backward weights are
        written over it. Stashed weights need nothing done: the leaves' storage is the version's snapshot
        (:meth:`stepping`). Parameters sharing one storage cannot trade it: theirs is copied aside and put back."""
        d = self.version - forward_version
        a = float(alpha(d)) if policy.backward == "intermediate" and d > 0 else None
        write: Callable[[Tensor, int], object]
        if a is not None and a not in (0.0, 1.0):
            stale, latest = self.snapshots[forward_version], [p.data for p in self.params]
            values = None

            def write(s: Tensor, i: int) -> object:  # W~ = lerp(latest, stale, a), possibly over stale itself
                return torch.lerp(latest[i], stale[i], a, out=s)

        else:
            values, d = self.backward_values(policy, forward_version, alpha)
            if _same_storage(values, leaves.storage):
                yield d
                return

            def write(s: Tensor, i: int) -> object:
                return s.copy_(values[i])

        holder = self._holder(leaves.storage)
        needed = holder == self.version or (holder is not None and self._read_later(holder, readers))
        if values is not None and alone and _tradable(leaves.storage, values):
            if not needed and holder is not None:
                self._drop(holder)
            with _traded(leaves.storage, values):  # the backward weights are a version held: lend its storage
                yield d
            return
        if needed:
            if _CAN_TRADE and _own_storages(leaves.storage):  # (a new tensor from empty_like has the same layout)
                self._temporaries += 1
                self.peak_versions = max(self.peak_versions, self.versions_held + self._temporaries)
                with torch.no_grad():
                    made = [torch.empty_like(s) for s in leaves.storage]
                    for i, t in enumerate(made):
                        write(t, i)
                try:
                    with _traded(leaves.storage, made):
                        yield d
                finally:
                    self._temporaries -= 1
                return
            with self._overwritten(leaves, write):
                yield d
            return
        # no pending op needs what the storage holds after this backward (a snapshot read here for the last time,
        # or one let go already): the backward weights replace it
        self.peak_versions = max(self.peak_versions, self.versions_held + self._temporaries)
        if holder is not None:
            self._drop(holder)
        with torch.no_grad():
            for i, s in enumerate(leaves.storage):
                write(s, i)
        yield d

    def _holder(self, storage: list[Tensor]) -> int | None:
        """The version ``storage`` holds: the live one, a snapshot's, or ``None`` (a snapshot let go)."""
        if _same_storage(storage, [p.data for p in self.params]):
            return self.version
        return next((v for v, snapshot in self.snapshots.items() if _same_storage(storage, snapshot)), None)

    def _read_later(self, version: int, readers: int) -> bool:
        """Whether a pending op other than a backward holding ``readers`` of its pins still needs ``version``."""
        return self._pins.get(version, 0) > readers or (self._keep_from is not None and version >= self._keep_from)

    @contextmanager
    def _overwritten(self, leaves: LeafSet, write: Callable[[Tensor, int], object]) -> Iterator[None]:
        """Copy what ``leaves`` hold aside, ``write(storage, i)`` the backward weights into each of their tensors,
        and put the copy back when the block ends; the copy is one more weight version meanwhile."""
        saved = [s.clone() for s in leaves.storage]
        self._temporaries += 1
        self.peak_versions = max(self.peak_versions, self.versions_held + self._temporaries)
        with torch.no_grad():
            for i, s in enumerate(leaves.storage):
                write(s, i)
        try:
            yield
        finally:
            self._temporaries -= 1
            with torch.no_grad():
                for s, v in zip(leaves.storage, saved, strict=True):
                    s.copy_(v)

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
