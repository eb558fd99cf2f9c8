from collections import namedtuple
from dataclasses import dataclass

import pytest
import torch

from lightning_timeprest.microbatch import (
    MicroBatchError,
    batch_size,
    join,
    microbatch_sizes,
    split,
    split_at_most,
)


def test_sizes_uneven_larger_first():
    assert microbatch_sizes(18, 4) == [5, 5, 4, 4]
    assert microbatch_sizes(4, 4) == [1, 1, 1, 1]
    with pytest.raises(MicroBatchError, match="3 samples cannot be split into 4 micro-batches"):
        microbatch_sizes(3, 4)


Pair = namedtuple("Pair", "a b")


@dataclass
class Box:
    x: torch.Tensor
    tag: str


def test_split_nested_structures_and_join_back():
    batch = {
        "x": torch.arange(10).reshape(5, 2),
        "pair": Pair(torch.arange(5), [torch.ones(5, 3), "text"]),
        "box": Box(torch.zeros(5), "t"),
        "scalar": torch.tensor(3.0),
        "n": 7,
    }
    parts, sizes = split(batch, 2)
    assert sizes == [3, 2]
    assert parts[1]["x"].tolist() == [[6, 7], [8, 9]]
    assert isinstance(parts[0]["pair"], Pair) and parts[0]["pair"].b[1] == "text"
    assert parts[0]["box"].x.shape == (3,) and parts[0]["box"].tag == "t"
    assert parts[0]["scalar"] is batch["scalar"] and parts[1]["n"] == 7
    joined = join(parts)
    assert torch.equal(joined["x"], batch["x"])
    assert torch.equal(joined["pair"].a, batch["pair"].a)
    assert joined["pair"].b[0].shape == (5, 3) and joined["pair"].b[1] == "text"
    assert torch.equal(joined["box"].x, batch["box"].x)


def test_lists_of_one_plain_item_per_sample_split_with_the_samples():
    """What ``default_collate`` leaves as lists (strings, metadata dicts; a per-sample sequence transposed into a
    list of lists) goes with its samples; lists holding tensors are structure, and other lists stay whole."""
    batch = {
        "x": torch.arange(5),
        "names": ["a", "b", "c", "d", "e"],
        "meta": tuple({"id": i} for i in range(5)),
        "tokens": [["a0", "b0", "c0", "d0", "e0"], ["a1", "b1", "c1", "d1", "e1"]],
        "square": [[0, 1, 2, 3, 4]] * 5,  # 5 per-sample sequences of 5: split list by list, as default_collate's
        "sizes": [224, 224],
    }
    (first, second), sizes = split(batch, 2)
    assert sizes == [3, 2]
    assert first["names"] == ["a", "b", "c"] and second["names"] == ["d", "e"]
    assert second["meta"] == ({"id": 3}, {"id": 4}) and isinstance(second["meta"], tuple)
    assert second["tokens"] == [["d0", "e0"], ["d1", "e1"]]
    assert second["square"] == [[3, 4]] * 5
    assert first["sizes"] == second["sizes"] == [224, 224]
    assert join([first, second], sizes)["names"] == batch["names"]
    assert join([first, second], sizes)["meta"] == batch["meta"]
    assert join([["a:", "b:", "c:"], ["d:", "e:"]], [3, 2]) == ["a:", "b:", "c:", "d:", "e:"]


def test_a_batch_of_plain_lists_only_is_split_by_their_length():
    parts, sizes = split({"text": ["x", "y", "z"], "label": [0, 1, 1]}, 2)
    assert sizes == [2, 1] and parts[1] == {"text": ["z"], "label": [1]}


def test_batch_size_errors():
    with pytest.raises(MicroBatchError, match="disagree"):
        batch_size((torch.zeros(4), torch.zeros(5)))
    with pytest.raises(MicroBatchError, match="pad them into one tensor"):
        batch_size([torch.zeros(3), torch.zeros(4)])  # per-sample tensors from a custom collate_fn
    with pytest.raises(MicroBatchError, match="no tensor"):
        batch_size({"a": 1})


def test_split_is_a_view_of_the_batch():
    x = torch.arange(8.0)
    (first, _), _ = split(x, 2)
    assert first.data_ptr() == x.data_ptr()


def test_a_batch_of_several_loaders_is_split_loader_by_loader():
    """Lightning's CombinedLoader over a dict or list of loaders gives each loader's batch, of its own size: each
    is split into the same number of micro-batches, at most the smallest's size; a micro-batch's size is the sum."""
    a, b = (torch.arange(12.0), torch.arange(12)), torch.arange(6.0).reshape(6, 1)
    parts, sizes = split_at_most({"a": a, "b": b}, 2, combined=True)
    assert sizes == [9, 9]
    assert torch.equal(parts[1]["a"][0], torch.arange(6.0, 12.0)) and torch.equal(parts[1]["a"][1], torch.arange(6, 12))
    assert torch.equal(parts[0]["b"], b[:3])
    parts, sizes = split_at_most([a, b[:2]], 4, combined=True)  # (b's short last batch: two micro-batches)
    assert sizes == [7, 7] and isinstance(parts[0], list) and torch.equal(parts[1][1], b[1:2])
    parts, sizes = split_at_most({"a": a, "b": None}, 3, combined=True)  # ("max_size" mode: b ran out)
    assert sizes == [4, 4, 4] and all(p["b"] is None for p in parts)
    with pytest.raises(MicroBatchError, match="disagree on their dim-0"):
        split_at_most({"a": a, "b": b}, 2)  # (not known to be several loaders' batches)
