from collections import namedtuple
from dataclasses import dataclass

import pytest
import torch

from lightning_timeprest.microbatch import MicroBatchError, batch_size, join, microbatch_sizes, split


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


def test_batch_size_errors():
    with pytest.raises(MicroBatchError, match="disagree"):
        batch_size((torch.zeros(4), torch.zeros(5)))
    with pytest.raises(MicroBatchError, match="no tensor"):
        batch_size({"a": 1})


def test_split_is_a_view_of_the_batch():
    x = torch.arange(8.0)
    (first, _), _ = split(x, 2)
    assert first.data_ptr() == x.data_ptr()
