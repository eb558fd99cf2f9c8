"""Splitting a mini-batch into micro-batches and joining per-micro-batch outputs back.

Any batch structure Lightning accepts works: a tensor, or tuples, lists, dicts, namedtuples and dataclasses of
them, nested. Every tensor with at least one dimension is split along dim 0; all of them must agree on that
size (the batch size). A list or tuple of as many items as the batch has samples and holding no tensor is one
item per sample and is split too: the strings, ids or metadata dicts that ``default_collate`` leaves as lists
(a list of such lists, as ``default_collate`` makes of a per-sample sequence, is split list by list). A batch
without tensors takes its size from such lists of plain values. Scalars, 0-dim tensors and other leaves are
passed unchanged to every micro-batch.

Sizes follow :func:`torch.tensor_split`: N parts that differ by at most one sample, larger parts first. A
mean-reduced loss is then recovered exactly as the size-weighted mean of the micro-batch losses.

A training batch from several loaders (Lightning's ``CombinedLoader``: a dict or list of their batches, each of
its own size) is split loader by loader (:func:`split_at_most` with ``combined``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from lightning_timeprest.errors import MicroBatchError

__all__ = ["MicroBatchError", "batch_size", "join", "microbatch_sizes", "split", "split_at_most"]


def batch_size(batch: Any) -> int:
    """The common dim-0 size of every tensor in ``batch`` (with at least one dimension); for a batch without
    such tensors, the common length of its lists of plain values (strings, numbers)."""
    sizes: list[int] = []
    apply_to_collection(batch, Tensor, lambda t: sizes.append(t.shape[0]) if t.dim() > 0 else None)
    if not sizes:
        _plain_columns(batch, sizes)
    if not sizes:
        raise MicroBatchError("the batch holds no tensor with a batch dimension, so it cannot be micro-batched")
    if len(set(sizes)) != 1:
        raise MicroBatchError(
            f"the tensors of the batch disagree on their dim-0 (batch) size: {sorted(set(sizes))}; every tensor in "
            "a pipelined batch must have the samples along dim 0 (a list of per-sample tensors of different sizes, "
            "from a custom collate_fn, cannot be split: pad them into one tensor)"
        )
    return sizes[0]


def _is_sequence(data: Any) -> bool:
    return isinstance(data, (list, tuple)) and not hasattr(data, "_fields")


def _holds_tensor(data: Any) -> bool:
    found: list[bool] = []
    apply_to_collection(data, Tensor, lambda t: found.append(True))
    return bool(found)


def _plain_columns(data: Any, sizes: list[int]) -> None:
    """Append the length of every list or tuple of plain leaves (no container, no tensor) in ``data``."""
    if _is_sequence(data) and data and not any(isinstance(x, (Mapping, list, tuple)) for x in data):
        sizes.append(len(data))
    elif isinstance(data, Mapping):
        for value in data.values():
            _plain_columns(value, sizes)
    elif isinstance(data, (list, tuple)):
        for value in data:
            _plain_columns(value, sizes)
    elif dataclasses.is_dataclass(data) and not isinstance(data, type):
        for f in dataclasses.fields(data):
            _plain_columns(getattr(data, f.name), sizes)


def _per_sample(data: Any, size: int) -> bool:
    """Whether ``data`` is a sequence of one item per sample: ``size`` items and no tensor, and not a sequence of
    such sequences (``default_collate``'s transposed per-sample sequence: split each inner one instead)."""
    if not _is_sequence(data) or len(data) != size or _holds_tensor(data):
        return False
    return not all(_is_sequence(x) and len(x) == size for x in data)


def _slicer(size: int, start: int, end: int) -> Callable[[Any], Any]:
    def cut(data: Any) -> Any:
        if isinstance(data, Tensor):
            return data[start:end] if data.dim() > 0 else data
        if _per_sample(data, size):
            return type(data)(data[start:end])
        if hasattr(data, "_fields"):  # a namedtuple of fields
            return type(data)(*(apply_to_collection(x, (Tensor, list, tuple), cut) for x in data))
        return type(data)(apply_to_collection(x, (Tensor, list, tuple), cut) for x in data)

    return cut


def microbatch_sizes(total: int, num_microbatches: int) -> list[int]:
    """Sizes of ``num_microbatches`` near-equal parts of ``total`` samples (larger parts first)."""
    if num_microbatches < 1:
        raise MicroBatchError(f"num_microbatches must be >= 1, got {num_microbatches}")
    if total < num_microbatches:
        raise MicroBatchError(
            f"a batch of {total} samples cannot be split into {num_microbatches} micro-batches; lower "
            "num_microbatches, raise the batch size, or drop the short last batch (DataLoader(drop_last=True))"
        )
    base, extra = divmod(total, num_microbatches)
    return [base + 1 if i < extra else base for i in range(num_microbatches)]


def split(batch: Any, num_microbatches: int) -> tuple[list[Any], list[int]]:
    """Split ``batch`` into ``num_microbatches`` micro-batches; return them and their sizes."""
    total = batch_size(batch)
    sizes = microbatch_sizes(total, num_microbatches)
    parts = []
    start = 0
    for size in sizes:
        end = start + size
        parts.append(apply_to_collection(batch, (Tensor, list, tuple), _slicer(total, start, end)))
        start = end
    return parts, sizes


def split_at_most(batch: Any, num_microbatches: int, combined: bool = False) -> tuple[list[Any], list[int]]:
    """:func:`split` into ``num_microbatches`` micro-batches, or one per sample when the batch is smaller (a short
    last batch): the size-weighted mean of their losses is still the batch's mean.

    ``combined``: ``batch`` holds several loaders' batches (Lightning's ``CombinedLoader`` over a dict or list of
    them), each with its own size: each is split into the same number of micro-batches (at most the smallest's
    size), micro-batch j holds every loader's j-th part, and its size is theirs summed. A loader already exhausted
    (``None`` in ``max_size`` mode) stays ``None`` in every micro-batch."""
    if not combined:
        return split(batch, min(num_microbatches, batch_size(batch)))
    keys = list(batch) if isinstance(batch, Mapping) else list(range(len(batch)))
    present = [k for k in keys if batch[k] is not None]
    n = min(num_microbatches, *(batch_size(batch[k]) for k in present))
    pieces = {k: split(batch[k], n) for k in present}
    parts = [{k: pieces[k][0][j] if k in pieces else None for k in keys} for j in range(n)]
    sizes = [sum(pieces[k][1][j] for k in present) for j in range(n)]
    if isinstance(batch, Mapping):
        return [type(batch)(part) for part in parts], sizes  # type: ignore[call-arg]
    return [type(batch)(part[k] for k in keys) for part in parts], sizes


def join(outputs: Sequence[Any], sizes: Sequence[int] | None = None) -> Any:
    """Inverse of :func:`split` for outputs: concatenate per-micro-batch outputs into one mini-batch output.

    Tensors are concatenated along dim 0 (0-dim tensors are stacked); given the micro-batch ``sizes``, lists and
    tuples of one plain item per sample (as :func:`split` splits them: predicted strings, ids) are concatenated;
    other lists, tuples, dicts, namedtuples and dataclasses are joined element by element; other leaves that agree
    in every micro-batch are kept, and where they differ the list of the per-micro-batch values is returned.
    """
    first = outputs[0]
    if len(outputs) == 1:
        return first
    if isinstance(first, Tensor):
        return torch.stack(list(outputs)) if first.dim() == 0 else torch.cat(list(outputs))
    if sizes is not None and all(_per_sample(o, n) for o, n in zip(outputs, sizes, strict=True)):
        return type(first)(x for o in outputs for x in o)
    if isinstance(first, Mapping):
        return type(first)({k: join([o[k] for o in outputs], sizes) for k in first})  # type: ignore[call-arg]
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(join([o[i] for o in outputs], sizes) for i in range(len(first))))
    if isinstance(first, (tuple, list)) and all(len(o) == len(first) for o in outputs):
        return type(first)(join([o[i] for o in outputs], sizes) for i in range(len(first)))
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        fields = {f.name: join([getattr(o, f.name) for o in outputs], sizes) for f in dataclasses.fields(first)}
        return dataclasses.replace(first, **fields)
    if all(o == first for o in outputs):
        return first
    return list(outputs)
