"""Agreeing on SIGTERM without a per-step barrier: every rank stops at the same step, a few steps after the first
SIGTERM on any rank.

Lightning 2.6 agrees on SIGTERM with a blocking broadcast from rank 0 at the start of every training step: a barrier
that would stop stage 0 from running ahead of the later stages, which the asynchronous policies need (measured: a
third of the step on an MLP at N = 4). :class:`SigtermAgreement` makes the same agreement without blocking: each
step every rank sends rank 0 its own flag and rank 0 sends every rank the flag it has (its own, or one it heard),
and each rank reads the flags sent a few steps earlier, which have arrived by then. (Point-to-point, not a
collective: a collective left pending by a dead peer would hang the group's teardown.)

Lightning's SIGTERM handler broadcasts over all ranks too, from inside the signal handler: with a stage blocked
waiting for rank 0's activations that broadcast never completes. The handler installed here only takes note.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor

from lightning_timeprest import compat
from lightning_timeprest.errors import peer_lost

__all__ = ["SigtermAgreement"]


class SigtermAgreement:
    """One rank's side of the SIGTERM agreement (see the module doc).

    Args:
        group: a gloo group of all ranks, used for the flags only.
        lag: how many steps rank 0 may run ahead of the others: reading the flags that many steps late never blocks.
        timeout: how long to wait for a flag that is due.
        barrier_group: a group to meet on before raising (every rank stops at the same step).
        where: this rank's name in an error (its stage and rank).
    """

    def __init__(
        self, group: Any, rank: int, world_size: int, lag: int, timeout: timedelta, barrier_group: Any, where: str
    ) -> None:
        self.group, self.rank, self.world_size, self.lag, self.where = group, rank, world_size, lag, where
        self.timeout, self.barrier_group = timeout, barrier_group
        self.noted = False  # this rank got SIGTERM (rank 0: or heard of one from another rank)
        self._posts: deque[tuple[list[Any], Tensor, list[Tensor]]] = deque()
        self._loop: Any = None
        self._signals: Any = None
        self._trainer: Any = None
        self._kill: Callable[[Any], None] | None = None

    def install(self, trainer: Any, kill: Callable[[Any], None] | None) -> None:
        """Replace Lightning's per-step broadcast and signal notifier; ``kill`` passes the signal on to the ranks
        this process launched, as Lightning does."""
        self._trainer, self._kill = trainer, kill
        self._loop, self._signals = compat.take_over_sigterm_handling(trainer, self.check, self.on_signal)

    def on_signal(self, signum: Any, frame: Any) -> None:
        """SIGTERM on this rank: note it for :meth:`check`. Lightning's own ``received_sigterm`` is set only when every
        rank stops: set here, each rank would stop at its own next step end, and its neighbours would wait for it."""
        rank_zero_info(f"Received SIGTERM: {signum}; every rank stops within a few steps")
        if not self.noted and self._kill is not None:
            self._kill(signum)
        self.noted = True

    def check(self) -> None:
        """Post this step's flags; read those posted ``lag`` steps ago and stop (every rank alike) if one was set."""
        received = bool(getattr(self._trainer, "received_sigterm", False))
        own = torch.tensor([int(self.noted or received)])
        if self.rank == 0:
            flag, heard = own, [torch.zeros(1, dtype=torch.int64) for _ in range(1, self.world_size)]
            works = [dist.isend(flag, r, group=self.group) for r in range(1, self.world_size)]
            works += [dist.irecv(h, r, group=self.group) for r, h in enumerate(heard, start=1)]
        else:
            flag, heard = torch.zeros(1, dtype=torch.int64), []
            works = [dist.isend(own, 0, group=self.group), dist.irecv(flag, 0, group=self.group)]
        self._posts.append((works, flag, heard))
        while len(self._posts) > self.lag:
            posted, value, others = self._posts.popleft()
            with peer_lost(self.where, "exchanging the SIGTERM flags of a step"):
                for work in posted:
                    work.wait(timeout=self.timeout)
            if any(h.item() for h in others):
                self.noted = True  # another rank got SIGTERM: rank 0 passes it on from the next step
            if value.item():
                if self._signals is not None:
                    self._signals.received_sigterm = True
                with contextlib.suppress(Exception):
                    dist.barrier(group=self.barrier_group)
                raise SIGTERMException()

    def finish(self, failed: bool) -> None:
        """Complete the flags in flight (before the groups are destroyed) and give Lightning its check back."""
        compat.restore_sigterm_handling(self._loop, self._signals)
        self._loop = self._signals = self._trainer = None
        posts, self._posts = self._posts, deque()
        self.noted = False
        if not failed:
            for works, _, _ in posts:
                for work in works:
                    work.wait(timeout=self.timeout)
