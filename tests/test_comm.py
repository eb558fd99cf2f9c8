"""Sending batches, activations and objects between two stages over gloo (two real processes): tensors as tensors,
the rest pickled; each kind a stream of its own whose next receives are posted ahead, laid out as the last message."""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._pytree import tree_flatten

from lightning_timeprest.comm import StageComm, new_pipeline_groups


def batches() -> list:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(4, 3, generator=g), torch.arange(4)),  # a tuple of tensors
        {"x": torch.randn(2, 5, generator=g).double(), "mask": torch.rand(2, 5, generator=g) > 0.5, "n": 7, "s": "a"},
        [torch.zeros(0, 3), None, {"nested": (torch.tensor(1.5, dtype=torch.bfloat16), 3)}],
        torch.randn(2, 2, dtype=torch.complex128, generator=g),  # a dtype the tensor path lacks: sent pickled
        [torch.full((1,), float(i)) for i in range(200)],  # more tensors than a header describes: sent pickled
    ]


def activations() -> list:
    """Stage outputs whose layout changes now and then (a short micro-batch, a tuple, a tree), as the receives the
    receiver posted ahead expect the last one's."""
    g = torch.Generator().manual_seed(1)
    return [
        torch.randn(4, 3, generator=g),
        torch.randn(4, 3, generator=g),
        torch.randn(2, 3, generator=g),  # shorter: the receives posted for (4, 3) get zeros, then this
        (torch.randn(4, 3, generator=g), torch.arange(4)),
        {"h": torch.randn(4, 3, generator=g), "n": 3},
        {"h": torch.randn(4, 3, generator=g), "n": 3},
        torch.randn(4, 3, generator=g),
    ]


def objects() -> list:
    return ["a", "a" * 1000, {"x": 1.5}, {"x": 2.5}, None, list(range(300))]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    groups = new_pipeline_groups([[0, 1]], rank, "gloo", timedelta(seconds=30))
    comm = StageComm(rank, groups, torch.device("cpu"), timedelta(seconds=30), "gloo")
    if rank == 0:  # every kind interleaved, never waiting for the receiver
        for i, (batch, value) in enumerate(zip(batches(), activations(), strict=False)):
            comm.isend_value(batch, 1)
            comm.send_activation(value, tag=i, note=10 + i)
        for value in activations()[len(batches()) :]:
            comm.send_activation(value, tag=-1, note=-1)
        for obj in objects():
            comm.isend_object(obj, 1)
        comm.wait_sends()
    else:  # one kind after the other: the streams do not cross
        received = {"objects": [comm.recv_object_from(0) for _ in objects()]}
        received["activations"] = []
        for _ in activations():
            value, tag = comm.recv_tagged_activation(requires_grad=False)
            received["activations"].append((value, tag, comm.note))
        received["batches"] = [comm.recv_value(0) for _ in batches()]
        # the next activation's receives are posted already, laid out as the last one's
        inbox = comm._inboxes["activations", 0]
        received["posted ahead"] = [tuple(p.buffer.shape) for p in inbox.parts]
        torch.save(received, out)
    dist.destroy_process_group()


def _same(got: object, sent: object) -> None:
    flat_got, spec_got = tree_flatten(got)
    flat_sent, spec_sent = tree_flatten(sent)
    assert spec_got == spec_sent  # the same containers, keys and order
    for a, b in zip(flat_got, flat_sent, strict=True):
        if isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b)
        else:
            assert a == b


def test_batches_activations_and_objects_arrive_whole(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "received.pt")
    mp.spawn(_worker, args=(port, out), nprocs=2, join=True)
    received = torch.load(out, weights_only=False)
    assert len(received["batches"]) == len(batches())
    for got, sent in zip(received["batches"], batches(), strict=True):
        _same(got, sent)
    assert received["objects"] == objects()
    for i, ((value, tag, note), sent) in enumerate(zip(received["activations"], activations(), strict=True)):
        _same(value, sent)
        assert (tag, note) == ((i, 10 + i) if i < len(batches()) else (-1, -1))
    assert received["posted ahead"] == [(4, 3)]
