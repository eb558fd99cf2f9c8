"""Sending a batch between two stages over gloo: tensors as tensors, the rest pickled (two real processes)."""

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


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    groups = new_pipeline_groups([[0, 1]], rank, "gloo", timedelta(seconds=30))
    comm = StageComm(rank, groups, torch.device("cpu"), timedelta(seconds=30), "gloo")
    if rank == 0:
        for batch in batches():
            comm.isend_value(batch, 1)  # never waits for the receiver
        comm.wait_sends()
    else:
        torch.save([comm.recv_value(0) for _ in batches()], out)
    dist.destroy_process_group()


def test_batches_arrive_whole(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "received.pt")
    mp.spawn(_worker, args=(port, out), nprocs=2, join=True)
    received = torch.load(out, weights_only=False)
    for got, sent in zip(received, batches(), strict=True):
        flat_got, spec_got = tree_flatten(got)
        flat_sent, spec_sent = tree_flatten(sent)
        assert spec_got == spec_sent  # the same containers, keys and order
        for a, b in zip(flat_got, flat_sent, strict=True):
            if isinstance(b, torch.Tensor):
                assert a.dtype == b.dtype and torch.equal(a, b)
            else:
                assert a == b
