"""Each stage's layers draw from a random stream of their own; the global one moves only by the step's draws."""

from __future__ import annotations

import torch

from lightning_timeprest.streams import LayerStream

CPU = torch.device("cpu")


def test_the_layers_draws_leave_the_global_stream_alone():
    torch.manual_seed(3)
    stream = LayerStream(0, CPU)
    before = torch.get_rng_state()
    with stream.drawing():
        first = torch.rand(4)
    with stream.drawing():
        second = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    assert not torch.equal(first, second)  # the stream moved on between the blocks
    again = LayerStream(0, CPU)  # seeded from the global seed and the stage: a run is reproducible
    with again.drawing():
        assert torch.equal(torch.rand(8), torch.cat([first, second]))
    with LayerStream(1, CPU).drawing():
        assert not torch.equal(torch.rand(4), first)  # another stage, another stream


def test_replaying_draws_the_same_again_and_leaves_the_stream_where_it_stood():
    torch.manual_seed(3)
    stream = LayerStream(0, CPU)
    at_forward = stream.state()
    with stream.drawing():
        mask = torch.rand(5) > 0.5
    with stream.drawing():
        following = torch.rand(3)
    with stream.replaying(at_forward), stream.drawing():
        assert torch.equal(torch.rand(5) > 0.5, mask)
    with stream.drawing():
        after = torch.rand(3)
    with LayerStream(0, CPU).drawing():  # the replay left the stream where it stood: past `following`
        drawn = torch.rand(11)
    assert torch.equal(drawn[:5] > 0.5, mask) and torch.equal(drawn[5:8], following) and torch.equal(drawn[8:], after)
