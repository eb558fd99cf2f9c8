"""Data-parallel replicas of the pipeline (world = D x W) and multi-node runs through Lightning's cluster
environment: each replica trains on its own shard, each stage's gradients are averaged over the replicas, so a
D x W run equals Lightning's own DDP on D processes."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import torch
from conftest import SCRIPT, assert_same_params, clean_env, train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory):
    """Lightning's DDPStrategy on 2 processes, one whole model each: the reference of 2 replicas."""
    tmp = tmp_path_factory.mktemp("ddp")
    return train(tmp, "ddp", "--ddp", "--devices", "2", "--epochs", "2", "--optimizer", "adam")


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_two_replicas_of_a_two_stage_pipeline_equal_ddp(tmp_path, ddp_reference, schedule):
    got = train(tmp_path, "dpxpp", "--devices", "4", "--stages", "2", "--schedule", schedule, "--epochs", "2",
                "--optimizer", "adam")  # fmt: skip
    assert_same_params(got["state_dict"], ddp_reference["state_dict"])
    assert got["global_step"] == ddp_reference["global_step"] == 6  # 100 samples: 50 per replica, batches of 18


def test_two_nodes_on_loopback(tmp_path, ddp_reference):
    """2 nodes x 2 processes (D = 2, W = 2), started as a cluster would start them: one launch per node, with
    NODE_RANK and the master's address in the environment (Lightning's LightningEnvironment reads them)."""
    out = tmp_path / "nodes.pt"
    env = {**clean_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    args = [sys.executable, str(SCRIPT), "--devices", "2", "--num-nodes", "2", "--stages", "2", "--epochs", "2",
            "--optimizer", "adam", "--out", str(out)]  # fmt: skip
    nodes = [
        subprocess.Popen(
            args,
            cwd=tmp_path,
            env={**env, "NODE_RANK": str(n)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(2)
    ]
    results = [node.communicate(timeout=300) for node in nodes]
    for node, (_, stderr) in zip(nodes, results, strict=True):
        assert node.returncode == 0, stderr[-4000:]
    got = torch.load(out, weights_only=False)
    assert_same_params(got["state_dict"], ddp_reference["state_dict"])
    # ranks 2 and 3 (node 1) held the two stages of replica 1
    placements = [torch.load(f"{out}.rank{r}", weights_only=False)["params"] for r in range(4)]
    assert set(placements[0]) == set(placements[2]) and set(placements[1]) == set(placements[3])
    assert set(placements[0]) != set(placements[1])


def test_replicas_of_an_asynchronous_pipeline_stay_identical(tmp_path):
    """Under timeprest_v each stage averages its gradients with its copy in the other replica before every update:
    the two replicas, fed different shards, end with the same weights."""
    train(tmp_path, "async", "--devices", "4", "--stages", "2", "--schedule", "timeprest_v", "--n", "2",
          "--epochs", "2")  # fmt: skip
    out = tmp_path / "async.pt"
    values = [torch.load(f"{out}.rank{r}", weights_only=False)["values"] for r in range(4)]
    # (after fit each rank holds its replica's whole model); ranks 0 and 2 lead the two replicas
    for a, b in ((0, 2), (1, 3)):
        assert values[a].keys() == values[b].keys()
        for name in values[a]:
            assert torch.equal(values[a][name], values[b][name]), name
