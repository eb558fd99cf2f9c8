"""The callbacks and loggers users rely on, under the pipeline strategies: ModelCheckpoint on a validation metric,
EarlyStopping, LearningRateMonitor with a scheduler, the rich progress bar, CSV and TensorBoard loggers."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from async_reference import recorded_schedules
from conftest import assert_same_params, run_script, train
from models import StemNetHead

from lightning_timeprest.schedules import staleness, version_difference

pytestmark = pytest.mark.slow  # multi-process training runs (the fast subset: -m 'not slow')


@pytest.mark.parametrize("schedule", ["gpipe", "timeprest_i"])
def test_model_checkpoint_keeps_the_best_validation_score(tmp_path, schedule):
    got = train(
        tmp_path, "run", "--devices", "2", "--schedule", schedule, "--n", "2", "--val", "--epochs", "3",
        "--best-ckpt", str(tmp_path / "best"),
    )  # fmt: skip
    path, score = got["best"]
    val_losses = [epoch["val_loss"] for epoch in got["epochs"]]
    assert score == pytest.approx(min(val_losses), rel=1e-6)
    assert Path(path).name.startswith(f"epoch={val_losses.index(min(val_losses))}-")
    assert [p.name for p in (tmp_path / "best").iterdir()] == [Path(path).name]  # save_top_k=1
    model = StemNetHead.load_from_checkpoint(path)  # a whole-model checkpoint, in one process
    assert list(model.state_dict()) == list(StemNetHead().state_dict())


@pytest.mark.parametrize("schedule", ["1f1b", "timeprest_v"])
def test_early_stopping_stops_every_rank_at_the_same_step(tmp_path, schedule):
    out = tmp_path / "es.pt"
    args = ("--devices", "2", "--schedule", schedule, "--n", "2", "--val", "--epochs", "6", "--early-stop", "1")
    run_script(tmp_path, *args, "--out", str(out))
    ranks = [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(2)]
    # no improvement counts (min_delta=10), patience 1: it stops after the second validation, epoch 2 of 6;
    # 100 samples in batches of 18 are 6 steps per epoch
    assert [r["global_step"] for r in ranks] == [12, 12]
    assert all(r["stopped"] for r in ranks)
    assert torch.load(out, weights_only=False)["global_step"] == 12


def test_learning_rate_monitor_and_scheduler_with_the_csv_logger(tmp_path, reference):
    args = ("--epochs", "1", "--scheduler", "step", "--lr-monitor")
    got = train(tmp_path, "lr", *args, "--devices", "2", "--schedule", "1f1b")
    # the scheduler stepped on every stage exactly as on one device
    expected = reference(*args)
    assert_same_params(got["state_dict"], expected["state_dict"])
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    lrs = [float(r["lr-SGD"]) for r in rows if r.get("lr-SGD")]
    assert lrs == [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]  # StepLR(step_size=2, gamma=0.5), logged per step
    losses = [float(r["train_loss_step"]) for r in rows if r.get("train_loss_step")]
    assert losses == pytest.approx([step["train_loss_step"] for step in expected["steps"]], rel=1e-5)  # one device's


def test_tensorboard_logger_receives_losses_and_pipeline_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    got = train(tmp_path, "tb", "--devices", "2", "--schedule", "timeprest_i", "--n", "2", "--epochs", "2", "--val",
                "--logger", "tensorboard")  # fmt: skip
    events = sorted((tmp_path / "logs").rglob("events.out.tfevents*"))
    assert len(events) == 1  # rank 0 writes
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"train_loss_step", "train_loss_epoch", "val_loss", "val_acc", "pipeline/v_epoch"} <= tags
    assert {"pipeline/stage0/staleness_mean_epoch", "pipeline/stage1/versions_held_epoch"} <= tags

    # the values are the run's: its losses, and the staleness and v of the order each epoch ran
    def values(tag: str) -> list[float]:
        return [event.value for event in accumulator.Scalars(tag)]

    assert values("train_loss_epoch") == pytest.approx([e["train_loss_epoch"] for e in got["epochs"]], rel=1e-6)
    assert values("val_loss") == pytest.approx([e["val_loss"] for e in got["epochs"]], rel=1e-6)
    schedules = recorded_schedules([torch.load(tmp_path / f"tb.pt.trace{r}") for r in range(2)], 2, 2)
    assert len(schedules) == 2  # one stream per epoch
    ds = [staleness(schedule)[0] for schedule in schedules]
    assert values("pipeline/stage0/staleness_mean_epoch") == pytest.approx([sum(d) / len(d) for d in ds])
    orders = torch.load(tmp_path / "tb.pt.orders0", weights_only=False)["orders"]
    assert values("pipeline/v_epoch") == [version_difference(2, 2, order) for order in orders[:2]]


def test_rich_progress_bar(tmp_path):
    proc = run_script(tmp_path, "--devices", "2", "--epochs", "1", "--val", "--rich", "--out", str(tmp_path / "r.pt"))
    printed = proc.stdout + proc.stderr
    assert "Epoch 0/0" in printed and "train_loss_step" in printed
