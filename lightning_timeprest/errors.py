"""The errors this package raises, all under one base class.

``except TiMePReStError`` catches any of them. Each also derives from the built-in error a caller would expect
(``ValueError`` for a configuration or input that cannot work, ``RuntimeError`` for a failure while running), so
code written against those keeps working.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = [
    "CheckpointError",
    "MicroBatchError",
    "PartitionError",
    "PipelineCommError",
    "PipelineConfigError",
    "ScheduleError",
    "TiMePReStError",
    "peer_lost",
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


@contextmanager
def peer_lost(where: str, what: str) -> Iterator[None]:
    """Turn the ``RuntimeError`` a collective or transfer raises when a peer is gone (gloo: "Connection closed by
    peer"; a timeout) into a :class:`PipelineCommError` that says who was doing what."""
    try:
        yield
    except RuntimeError as err:
        if isinstance(err, TiMePReStError):
            raise
        raise PipelineCommError(
            f"{where} failed while {what}; another stage of the pipeline crashed, was killed or stopped answering: "
            f"{err}"
        ) from err


class CheckpointError(TiMePReStError, RuntimeError):
    """A checkpoint does not fit the model or the optimizer it is loaded into."""
