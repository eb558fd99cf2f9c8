"""The strategy for the standalone ``pytorch_lightning`` package.

``pytorch_lightning.Trainer`` accepts only subclasses of its own ``Strategy``; this class has the same behaviour
as :class:`lightning_timeprest.TiMePReStStrategy`, built on ``pytorch_lightning``'s ``DDPStrategy``.
"""

from __future__ import annotations

from pytorch_lightning.strategies import DDPStrategy

from lightning_timeprest.strategy import PipelineStrategyMixin

__all__ = ["TiMePReStStrategy"]


class TiMePReStStrategy(PipelineStrategyMixin, DDPStrategy):
    """Pipeline-parallel strategy for ``pytorch_lightning.Trainer``; see :class:`PipelineStrategyMixin`."""

    strategy_name = "timeprest"
