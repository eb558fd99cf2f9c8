"""lightning-timeprest: pipeline-parallel training of unchanged LightningModules.

Importing the package registers the strategy names with Lightning, so ``Trainer(strategy="gpipe")`` works.
"""

from lightning_timeprest.errors import (
    CheckpointError,
    MicroBatchError,
    PartitionError,
    PipelineCommError,
    PipelineConfigError,
    ScheduleError,
    TiMePReStError,
)
from lightning_timeprest.registry import register
from lightning_timeprest.schedules import SCHEDULES
from lightning_timeprest.strategy import TiMePReStStrategy

__all__ = [
    "SCHEDULES",
    "CheckpointError",
    "MicroBatchError",
    "PartitionError",
    "PipelineCommError",
    "PipelineConfigError",
    "ScheduleError",
    "TiMePReStError",
    "TiMePReStStrategy",
]
__version__ = "0.1.0"

register()
