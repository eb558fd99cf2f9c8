"""Checkpoints of a pipelined model are ordinary whole-model Lightning checkpoints."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_params, train
from models import StemNetHead

from lightning_timeprest.checkpoint import consolidate

pytestmark = pytest.mark.slow  # multi-process training runs (the fast subset: -m 'not slow')

ARGS = ("--epochs", "3", "--optimizer", "adam", "--schedule", "1f1b", "--val")


@pytest.fixture(scope="module")
def pipelined_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    result = train(
        tmp, "full", *ARGS, "--devices", "2", "--ckpt-dir", str(tmp / "ckpts"), "--save-final", str(tmp / "final.ckpt")
    )
    return tmp, result


def test_checkpoint_loads_in_one_process(pipelined_run):
    tmp, result = pipelined_run
    path = tmp / "ckpts" / "epoch=2-step=18.ckpt"
    model = StemNetHead.load_from_checkpoint(path)
    assert_same_params(model.state_dict(), result["state_dict"], atol=0)
    checkpoint = torch.load(path, weights_only=False)
    assert list(checkpoint["state_dict"]) == list(StemNetHead().state_dict())


def test_optimizer_state_is_that_of_one_whole_model_optimizer(pipelined_run, tmp_path):
    tmp, _ = pipelined_run
    train(tmp_path, "reference", *ARGS, "--devices", "0", "--ckpt-dir", str(tmp_path / "ckpts"))
    ours = torch.load(tmp / "ckpts" / "epoch=2-step=18.ckpt", weights_only=False)["optimizer_states"]
    ref = torch.load(tmp_path / "ckpts" / "epoch=2-step=18.ckpt", weights_only=False)["optimizer_states"]
    assert len(ours) == len(ref) == 1
    ours, ref = ours[0], ref[0]
    assert ours["param_groups"][0]["param_names"] == [n for n, _ in StemNetHead().named_parameters()]
    assert ours["param_groups"][0]["params"] == ref["param_groups"][0]["params"]
    assert ours["param_groups"][0]["lr"] == ref["param_groups"][0]["lr"]
    assert sorted(ours["state"]) == sorted(ref["state"])
    for i, state in ref["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(ours["state"][i][key], value, rtol=1e-4, atol=1e-6)
    # a plain torch optimizer of the whole model accepts it
    model = StemNetHead()
    torch.optim.Adam(model.parameters()).load_state_dict(ours)


@pytest.mark.parametrize("empty_init", [False, True])
def test_resume_continues_exactly(pipelined_run, tmp_path, empty_init):
    tmp, full = pipelined_run
    extra = ("--empty-init",) if empty_init else ()
    resumed = train(
        tmp_path, "resumed", *ARGS, "--devices", "2", "--resume", str(tmp / "ckpts" / "epoch=0-step=6.ckpt"), *extra
    )
    assert resumed["global_step"] == full["global_step"] == 18
    if empty_init:
        # the model was built without storage, and each rank materialised only its own stage
        assert resumed["created_on_meta"] is True
        outside = {"stem.weight", "stem.bias", "head.weight", "head.bias"}
        for rank, layers in enumerate([("net.0", "net.2"), ("net.4", "net.6")]):
            held = set(torch.load(tmp_path / f"resumed.pt.rank{rank}")["params"])
            assert held == outside | {f"{layer}.{p}" for layer in layers for p in ("weight", "bias")}
    assert_same_params(full["state_dict"], resumed["state_dict"], atol=1e-6)
    # the two remaining epochs log what the uninterrupted run logged
    for a, b in zip(full["epochs"][1:], resumed["epochs"], strict=True):
        assert b["train_loss_epoch"] == pytest.approx(a["train_loss_epoch"], rel=1e-6)


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_launchers_hand_back_the_trained_model(tmp_path, reference, start_method):
    ref = reference("--epochs", "1")
    """Lightning's spawn and fork launchers (a fresh interpreter, which starts the second rank itself)."""
    args = ("--epochs", "1", "--devices", "2", "--start-method", start_method)
    got = train(tmp_path, "pp", *args, launcher="lightning")
    assert_same_params(ref["state_dict"], got["state_dict"])


def test_save_checkpoint_after_fit(pipelined_run):
    """trainer.save_checkpoint in the user's script after fit still writes the whole model and optimizer."""
    tmp, result = pipelined_run
    final = torch.load(tmp / "final.ckpt", weights_only=False)
    last = torch.load(tmp / "ckpts" / "epoch=2-step=18.ckpt", weights_only=False)
    assert_same_params(final["state_dict"], result["state_dict"], atol=0)
    assert final["optimizer_states"][0]["param_groups"] == last["optimizer_states"][0]["param_groups"]
    for i, state in last["optimizer_states"][0]["state"].items():
        for key, value in state.items():
            assert torch.equal(final["optimizer_states"][0]["state"][i][key], value)


@pytest.mark.parametrize("devices", ["3", "0"])
def test_checkpoint_resumes_with_another_number_of_stages(pipelined_run, tmp_path, devices):
    """Written by 2 stages, resumed by 3 stages, or by plain Lightning on one device (devices 0): the checkpoint is
    the whole model and one whole-model optimizer state, so any partition continues exactly."""
    tmp, full = pipelined_run
    resumed = train(
        tmp_path, "resharded", *ARGS, "--devices", devices, "--resume", str(tmp / "ckpts" / "epoch=0-step=6.ckpt")
    )
    assert resumed["global_step"] == full["global_step"] == 18
    assert_same_params(full["state_dict"], resumed["state_dict"], atol=1e-6)


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded")
    result = train(tmp, "full", *ARGS, "--devices", "3", "--sharded", "--ckpt-dir", str(tmp / "ckpts"))
    return tmp, result


def test_sharded_checkpoint_is_one_file_per_stage_and_consolidates(sharded_run, pipelined_run):
    tmp, result = sharded_run
    directory = tmp / "ckpts" / "epoch=2-step=18.ckpt"
    assert sorted(p.name for p in directory.iterdir()) == [
        "meta.pt", "stage-0-of-3.pt", "stage-1-of-3.pt", "stage-2-of-3.pt",
    ]  # fmt: skip
    # a stage file holds that stage's entries only: nothing was gathered on one rank
    stage1 = torch.load(directory / "stage-1-of-3.pt", weights_only=False)
    assert 0 < len(stage1["state_dict"]) < len(StemNetHead().state_dict())
    whole = consolidate(directory)
    assert_same_params(whole["state_dict"], result["state_dict"], atol=0)
    # the same content as the ordinary checkpoint of the same training (written by 2 stages)
    ordinary = torch.load(pipelined_run[0] / "ckpts" / "epoch=2-step=18.ckpt", weights_only=False)
    assert list(whole["state_dict"]) == list(ordinary["state_dict"])
    assert whole["optimizer_states"][0]["param_groups"] == ordinary["optimizer_states"][0]["param_groups"]
    assert whole["global_step"] == ordinary["global_step"] and whole["epoch"] == ordinary["epoch"]
    torch.save(whole, tmp / "whole.ckpt")
    model = StemNetHead.load_from_checkpoint(tmp / "whole.ckpt")
    assert_same_params(model.state_dict(), result["state_dict"], atol=0)


@pytest.mark.parametrize("devices", ["2", "0"])
def test_sharded_checkpoint_resumes_with_another_number_of_stages(sharded_run, tmp_path, devices):
    tmp, full = sharded_run
    directory = tmp / "ckpts" / "epoch=0-step=6.ckpt"
    if devices == "0":  # plain Lightning on one device reads the consolidated file
        torch.save(consolidate(directory), tmp_path / "whole.ckpt")
        directory = tmp_path / "whole.ckpt"
    resumed = train(tmp_path, "resumed", *ARGS, "--devices", devices, "--resume", str(directory))
    assert resumed["global_step"] == 18
    assert_same_params(full["state_dict"], resumed["state_dict"], atol=1e-6)
