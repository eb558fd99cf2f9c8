"""The errors this package raises, all under one base class.

``except TiMePReStError`` catches any of them. Each also derives from the built-in error a caller would expect
(``ValueError`` for a configuration or input that cannot work, ``RuntimeError`` for a failure while running), so
code written against those keeps working.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "MicroBatchError",
    "PartitionError",
    "PipelineCommError",
    "PipelineConfigError",
    "ScheduleError",
    "TiMePReStError",
]


class TiMePReStError(Exception):
    """Base class of every error lightning-timeprest raises."""


class PipelineConfigError(TiMePReStError, ValueError):
    """The strategy cannot run with this configuration; the message says what to change."""


class PartitionError(TiMePReStError, ValueError):
    """The model cannot be partitioned as requested."""


class MicroBatchError(TiMePReStError, ValueError):
    """A batch cannot be split into the requested micro-batches."""


class ScheduleError(TiMePReStError, ValueError):
    """A schedule is malformed: an op is missing or repeated, or its order can never run."""


class PipelineCommError(TiMePReStError, RuntimeError):
    """A transfer between stages failed or timed out (usually: a peer rank died or is stuck)."""


class CheckpointError(TiMePReStError, RuntimeError):
    """A checkpoint does not fit the model or the optimizer it is loaded into."""
