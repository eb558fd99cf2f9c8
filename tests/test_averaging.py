"""Lightning's weight-averaging callbacks (``EMAWeightAveraging``) under the pipeline strategies: each stage averages
its own weights; validation, the end of training and checkpoints see the whole averaged model, as on one device."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_params, train
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_timeprest import compat
from lightning_timeprest.averaging import stage_averaged_states, tensor_copy
from lightning_timeprest.checkpoint import consolidate

slow = pytest.mark.slow  # multi-process training runs (the fast subset: -m 'not slow')

DECAY = 0.8
ARGS = ("--epochs", "3", "--optimizer", "adam", "--val", "--ema", str(DECAY))
CKPT = "epoch={}-step={}.ckpt"


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ema_one")
    return tmp, train(tmp, "one", *ARGS, "--devices", "0", "--ckpt-dir", str(tmp / "ckpts"), "--validate-after")


@pytest.fixture(scope="module")
def gpipe_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ema_gpipe")
    args = ("--devices", "2", "--schedule", "gpipe", "--ckpt-dir", str(tmp / "ckpts"), "--validate-after")
    return tmp, train(tmp, "pp", *ARGS, *args)


def _load(path):
    return torch.load(path, weights_only=False)


@slow
def test_ema_under_gpipe_equals_one_device(one_device, gpipe_run):
    (one_tmp, one), (pp_tmp, pp) = one_device, gpipe_run
    # after fit the model holds the average (the callback copies it in at the end of training)
    assert_same_params(one["state_dict"], pp["state_dict"])
    # validation ran on the averaged weights
    for a, b in zip(one["epochs"], pp["epochs"], strict=True):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
    for epoch in range(3):
        name = CKPT.format(epoch, 6 * (epoch + 1))
        ref, ours = _load(one_tmp / "ckpts" / name), _load(pp_tmp / "ckpts" / name)
        assert_same_params(ref["state_dict"], ours["state_dict"])  # the whole averaged model
        assert_same_params(ref["current_model_state"], ours["current_model_state"])  # the trained one
        counts = [int(c["averaging_state"]["n_averaged"]) for c in (ours, ref)]
        assert counts == [6 * (epoch + 1)] * 2
    # a validate after fit (the stages placed again) swaps the averaged model in, as on one device
    assert pp["validate"][0]["val_loss"] == pytest.approx(one["validate"][0]["val_loss"], rel=1e-5)
    # the average is not the trained model
    first = _load(pp_tmp / "ckpts" / CKPT.format(0, 6))
    assert not torch.allclose(first["state_dict"]["net.0.weight"], first["current_model_state"]["net.0.weight"])


@slow
@pytest.mark.parametrize("devices, empty_init", [("2", False), ("2", True), ("0", False)])
def test_ema_checkpoint_resumes_exactly(gpipe_run, tmp_path, devices, empty_init):
    """Resumed by the pipeline (also with the model made on the meta device, of which the callback could not copy
    the whole), or by plain Lightning on one device: both the trained and the averaged model go on as in the
    uninterrupted run."""
    tmp, full = gpipe_run
    resumed = train(
        tmp_path, "resumed", *ARGS, "--devices", devices, "--schedule", "gpipe",
        "--resume", str(tmp / "ckpts" / CKPT.format(0, 6)), "--ckpt-dir", str(tmp_path / "ckpts"),
        *(["--empty-init"] if empty_init else []),
    )  # fmt: skip
    if empty_init:
        assert resumed["created_on_meta"] is True
    assert resumed["global_step"] == full["global_step"] == 18
    assert_same_params(full["state_dict"], resumed["state_dict"])
    last = CKPT.format(2, 18)
    ref, ours = _load(tmp / "ckpts" / last), _load(tmp_path / "ckpts" / last)
    assert_same_params(ref["current_model_state"], ours["current_model_state"])
    assert int(ours["averaging_state"]["n_averaged"]) == 18


@slow
def test_sharded_ema_checkpoint_consolidates_and_resumes(one_device, tmp_path):
    one_tmp, one = one_device
    args = (*ARGS, "--schedule", "gpipe", "--sharded")
    train(tmp_path, "sharded", *args, "--devices", "2", "--ckpt-dir", str(tmp_path / "ckpts"))
    first = tmp_path / "ckpts" / CKPT.format(0, 6)
    stage1 = _load(first / "stage-1-of-2.pt")
    assert set(stage1["current_model_state"]) == set(stage1["state_dict"])  # each stage writes both of its own
    whole, ref = consolidate(first), _load(one_tmp / "ckpts" / CKPT.format(0, 6))
    assert_same_params(ref["state_dict"], whole["state_dict"])
    assert_same_params(ref["current_model_state"], whole["current_model_state"])
    resumed = train(tmp_path, "resumed", *args, "--devices", "2", "--resume", str(first))
    assert_same_params(one["state_dict"], resumed["state_dict"])


@slow
@pytest.mark.parametrize("schedule", ["timeprest_v", "timeprest_i"])
def test_ema_under_an_asynchronous_policy_averages_each_stage_latest_weights(tmp_path, schedule):
    """Each stage averages the weights it holds after each step (its latest version); the whole averaged model is
    made of every stage's averages, a replicated parameter's from the stage that trains it (the stem's gradients
    arise on stage 0, the head's on the last): another stage's copy of it moves only when the pipeline drains."""
    got = train(tmp_path, schedule, *ARGS, "--devices", "2", "--schedule", schedule, "--n", "2")
    ranks = [_load(tmp_path / f"{schedule}.pt.rank{r}") for r in range(2)]
    trains = {"stem": 0, "net.0": 0, "net.2": 0, "net.4": 1, "net.6": 1, "head": 1}
    expected: dict[str, torch.Tensor] = {}
    for r, rank in enumerate(ranks):
        history = rank["history"]
        assert len(history) == 18
        average = dict(history[0])
        for step in history[1:]:
            average = {k: DECAY * average[k] + (1 - DECAY) * step[k] for k in average}
        expected.update({k: v for k, v in average.items() if trains[k.rsplit(".", 1)[0]] == r})
    assert sorted(expected) == sorted(got["state_dict"])
    for k, v in expected.items():
        torch.testing.assert_close(got["state_dict"][k], v, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    # the replicated parameters' copies on the other stage lagged, and every rank ends with the same model
    assert not torch.equal(ranks[0]["history"][3]["head.weight"], ranks[1]["history"][3]["head.weight"])
    for k in ("stem.weight", "head.weight"):
        torch.testing.assert_close(ranks[0]["values"][k], ranks[1]["values"][k], rtol=0, atol=0)
    # the weights moved over the run: an average of them is not the last of them
    assert not torch.allclose(expected["net.0.weight"], ranks[0]["history"][-1]["net.0.weight"])


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.norm = nn.BatchNorm1d(3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight  # tied
        self.register_buffer("scratch", torch.zeros(2), persistent=False)
        self.acc = MulticlassAccuracy(num_classes=3)
        self.acc.add_state("seen", torch.zeros(1), persistent=True)  # a metric state that state_dict holds


def test_tensor_copy_has_the_parameters_and_buffers_by_name_in_order_with_their_ties():
    module = _Tied()
    copy = tensor_copy(module)
    assert [n for n, _ in copy.named_parameters()] == [n for n, _ in module.named_parameters()]
    assert [n for n, _ in copy.named_buffers()] == [n for n, _ in module.named_buffers()]
    assert copy.b.weight is copy.a.weight  # one tensor, as in the module: averaged once
    assert "scratch" not in copy.state_dict()  # non-persistent, as in the module
    for (_, p), (_, q) in zip(copy.named_parameters(), module.named_parameters(), strict=True):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()  # copies
    # what the copy leaves out of the module's state_dict: the metric's own state
    assert set(module.state_dict()) - set(copy.state_dict()) == {"acc.seen"}


def test_a_loaded_checkpoint_is_cut_to_the_stage_for_the_callback():
    """On resume the callback loads the averaged and the current model strictly: each gets this stage's entries
    (a metric state the averaged copy lacks stays out of the averaged one)."""
    trainer = Trainer(callbacks=[EMAWeightAveraging()], logger=False, enable_progress_bar=False)
    stage = _Tied()
    ema = trainer.callbacks[0]
    ema._average_model = object()  # (as after the callback's setup: replaced below)
    compat.rebuild_average_model(ema, tensor_copy(stage), torch.device("cpu"))
    whole = {**{f"other.{k}": v for k, v in _Tied().state_dict().items()}, **stage.state_dict()}
    checkpoint = {"state_dict": dict(whole), "current_model_state": dict(whole)}
    stage_averaged_states(trainer, checkpoint, stage)
    stage.load_state_dict(checkpoint["current_model_state"])  # strict
    average = compat.average_model(ema)
    average.load_state_dict(
        {**{f"module.{k}": v for k, v in checkpoint["state_dict"].items()}, "n_averaged": torch.tensor(0)}
    )
    assert "acc.seen" in checkpoint["current_model_state"] and "acc.seen" not in checkpoint["state_dict"]


@slow
def test_ema_of_a_traced_model_equals_one_device(tmp_path, reference):
    """A traced stage's module holds its graph (fake tensors that do not copy): the averaged copy holds tensors only."""
    args = ("--model", "MultiInputNet", "--epochs", "2", "--val", "--ema", str(DECAY))
    ref = reference(*args)
    got = train(tmp_path, "traced", *args, "--devices", "2", "--schedule", "gpipe", "--split-points", "gate")
    assert_same_params(ref["state_dict"], got["state_dict"])
    for a, b in zip(ref["epochs"], got["epochs"], strict=True):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
