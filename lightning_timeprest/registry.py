"""Registering the strategy names with Lightning.

Lightning resolves ``Trainer(strategy="gpipe")`` only through its registry, filled by code that ran in the same
process; there is no plugin discovery. Importing :mod:`lightning_timeprest` calls :func:`register` once.
``lightning`` and the standalone ``pytorch_lightning`` keep separate registries and separate ``Strategy``
classes, so each gets a strategy class built on its own ``DDPStrategy``.
"""

from __future__ import annotations

import importlib.util

__all__ = ["register"]


def register() -> None:
    """Register every schedule name in the ``lightning`` registry (and ``pytorch_lightning``'s, if installed).

    Idempotent: names already registered are left as they are.
    """
    from lightning.pytorch.strategies import StrategyRegistry

    from lightning_timeprest.strategy import TiMePReStStrategy

    TiMePReStStrategy.register_strategies(StrategyRegistry)
    if importlib.util.find_spec("pytorch_lightning") is not None:
        from pytorch_lightning.strategies import StrategyRegistry as PLStrategyRegistry

        from lightning_timeprest.pytorch_lightning import TiMePReStStrategy as PLTiMePReStStrategy

        PLTiMePReStStrategy.register_strategies(PLStrategyRegistry)
