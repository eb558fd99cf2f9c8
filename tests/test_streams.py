"""Each stage's layers draw from a random stream of their own; the global one moves only by the step's draws."""

from __future__ import annotations

import torch

from lightning_timeprest.streams import StageStreams

CPU = torch.device("cpu")


def test_the_layers_draws_leave_the_global_stream_alone():
    torch.manual_seed(3)
    stream = StageStreams(0, CPU).layers
    before = torch.get_rng_state()
    with stream.drawing():
        first = torch.rand(4)
    with stream.drawing():
        second = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    assert not torch.equal(first, second)  # the stream moved on between the blocks
    again = StageStreams(0, CPU).layers  # seeded from the global seed and the stage: a run is reproducible
    with again.drawing():
        assert torch.equal(torch.rand(8), torch.cat([first, second]))


def test_replaying_draws_the_same_again_and_leaves_the_stream_where_it_stood():
    torch.manual_seed(3)
    stream = StageStreams(0, CPU).layers
    at_forward = stream.state()
    with stream.drawing():
        mask = torch.rand(5) > 0.5
    with stream.drawing():
        following = torch.rand(3)
    with stream.replaying(at_forward), stream.drawing():
        assert torch.equal(torch.rand(5) > 0.5, mask)
    with stream.drawing():
        after = torch.rand(3)
    with StageStreams(0, CPU).layers.drawing():  # the replay left the stream where it stood: past `following`
        drawn = torch.rand(11)
    assert torch.equal(drawn[:5] > 0.5, mask) and torch.equal(drawn[5:8], following) and torch.equal(drawn[8:], after)


def test_every_stream_of_a_stage_draws_its_own_numbers():
    streams = [StageStreams(0, CPU).layers, StageStreams(0, CPU).after_call, StageStreams(1, CPU).after_call]
    drawn = []
    for stream in streams:
        with stream.drawing():
            drawn.append(torch.rand(4))
    assert len({tuple(d.tolist()) for d in drawn}) == 3
