"""Data-parallel replicas of the pipeline (world = D x W) and multi-node runs through Lightning's cluster
environments: each replica trains on its own shard, each stage's gradients are averaged over the replicas, so a
D x W run equals Lightning's own DDP on D processes. The nodes are processes on loopback, started as Lightning's
launcher, torchrun or SLURM would start them."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import SCRIPT, assert_same_params, clean_env, run_script, train
from processes import free_port

pytestmark = pytest.mark.slow  # multi-process training runs (the fast subset: -m 'not slow')

PIPELINE = ["--stages", "2", "--epochs", "2", "--optimizer", "adam"]


def _run_together(tmp_path, commands: list[tuple[list[str], dict[str, str]]], timeout: float = 300) -> None:
    """Start every ``(argv, env)`` at once (the processes of one job) and wait for all; each must succeed."""
    procs = [
        subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for argv, env in commands
    ]
    outputs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, stderr) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, stderr[-4000:]


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory):
    """Lightning's DDPStrategy on 2 processes, one whole model each: the reference of 2 replicas."""
    tmp = tmp_path_factory.mktemp("ddp")
    return train(tmp, "ddp", "--ddp", "--devices", "2", "--epochs", "2", "--optimizer", "adam")


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_two_replicas_of_a_two_stage_pipeline_equal_ddp(tmp_path, ddp_reference, schedule):
    got = train(tmp_path, "dpxpp", "--devices", "4", "--schedule", schedule, *PIPELINE)
    assert_same_params(got["state_dict"], ddp_reference["state_dict"])
    assert got["global_step"] == ddp_reference["global_step"] == 6  # 100 samples: 50 per replica, batches of 18


def test_weight_averaging_over_two_replicas_of_a_pipeline_equals_ddp(tmp_path):
    """EMAWeightAveraging: each stage of each replica averages its own weights; the whole average equals DDP's."""
    ema = ("--epochs", "2", "--optimizer", "adam", "--ema", "0.8", "--val")
    ref = train(tmp_path, "ddp_ema", "--ddp", "--devices", "2", *ema)
    got = train(tmp_path, "dpxpp_ema", "--devices", "4", "--schedule", "gpipe", *PIPELINE, *ema)
    assert_same_params(got["state_dict"], ref["state_dict"])
    for a, b in zip(ref["epochs"], got["epochs"], strict=True):  # validation on the averaged weights
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)


def test_the_collectives_of_a_hook_over_two_replicas_of_a_pipeline_equal_ddps(tmp_path):
    """``sync_dist`` sums and ``self.all_gather`` in an epoch-end hook reduce over the replicas (the processes that
    see other data), as over DDP's processes, and not over the stages as well."""
    args = ("--model", "EpochEndMetrics", "--epochs", "1", "--val")
    ref = train(tmp_path, "ddp_hooks", "--ddp", "--devices", "2", *args)
    got = train(tmp_path, "dpxpp_hooks", "--devices", "4", "--stages", "2", "--schedule", "gpipe", *args)
    for key in ("val_acc", "val_seen", "val_seen_summed", "val_gathered", "val_acc_computed"):
        assert got["epochs"][0][key] == pytest.approx(ref["epochs"][0][key], abs=1e-6), key
    assert ref["epochs"][0]["val_gathered"] == 2 and ref["epochs"][0]["val_seen"] == 100


def test_sync_batchnorm_syncs_over_the_replicas_as_ddp_does(tmp_path):
    """Trainer(sync_batchnorm=True) with replicas makes the batch norms SyncBatchNorm over the stage's replicas (the
    conversion: test_partition), as DDP makes them over its processes; SyncBatchNorm syncs accelerator tensors
    only, so on the CPU both refuse it at start. Before, the flag was ignored under a pipeline."""
    args = ("--model", "BatchNormNet", "--epochs", "1", "--sync-bn")
    ddp = run_script(tmp_path, *args, "--ddp", "--devices", "2", "--out", str(tmp_path / "ddp.pt"), check=False)
    assert ddp.returncode != 0 and "SyncBatchNorm layers only work with GPU modules" in ddp.stderr
    ours = run_script(tmp_path, *args, "--devices", "4", "--stages", "2", "--out", str(tmp_path / "pp.pt"), check=False)
    assert ours.returncode != 0 and "sync_batchnorm=True needs GPUs" in ours.stderr


def test_two_nodes_with_lightnings_launcher(tmp_path, ddp_reference):
    """One launch per node with NODE_RANK and the master's address (LightningEnvironment); each node's launcher
    starts its second process."""
    out = tmp_path / "nodes.pt"
    env = {**clean_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    argv = [sys.executable, str(SCRIPT), "--devices", "2", "--num-nodes", "2", *PIPELINE, "--out", str(out)]
    _run_together(tmp_path, [(argv, {**env, "NODE_RANK": str(n)}) for n in range(2)])
    assert_same_params(torch.load(out, weights_only=False)["state_dict"], ddp_reference["state_dict"])
    # ranks 2 and 3 (node 1) held the two stages of replica 1
    placements = [torch.load(f"{out}.rank{r}", weights_only=False)["params"] for r in range(4)]
    assert set(placements[0]) == set(placements[2]) and set(placements[1]) == set(placements[3])
    assert set(placements[0]) != set(placements[1])


def test_two_nodes_under_torchrun(tmp_path, ddp_reference):
    """torchrun starts every process itself (TorchElasticEnvironment)."""
    out = tmp_path / "torchrun.pt"
    run = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port())]  # fmt: skip
    script = [str(SCRIPT), "--devices", "2", "--num-nodes", "2", *PIPELINE, "--out", str(out)]
    _run_together(tmp_path, [([*run, "--node-rank", str(n), *script], clean_env()) for n in range(2)])
    assert_same_params(torch.load(out, weights_only=False)["state_dict"], ddp_reference["state_dict"])


def test_two_nodes_under_slurm(tmp_path, ddp_reference):
    """What srun gives each of 4 tasks on 2 nodes (SLURMEnvironment): one process per task."""
    out = tmp_path / "slurm.pt"
    job = {
        **clean_env(), "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "2",
        "SLURM_JOB_NAME": "pipeline-test", "SLURM_JOB_ID": "4242", "SLURM_NODELIST": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }  # fmt: skip
    tasks = [
        {**job, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i % 2), "SLURM_NODEID": str(i // 2)} for i in range(4)
    ]
    argv = [sys.executable, str(SCRIPT), "--devices", "2", "--num-nodes", "2", *PIPELINE, "--out", str(out)]
    _run_together(tmp_path, [(argv, env) for env in tasks])
    assert_same_params(torch.load(out, weights_only=False)["state_dict"], ddp_reference["state_dict"])


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
