import pytest
import torch
from lightning.pytorch import LightningModule
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_timeprest.metrics import LogCapture, metric_step_scope, reduce_logged


class Module(LightningModule):
    def __init__(self):
        super().__init__()
        self.acc = MulticlassAccuracy(num_classes=3, average="micro")
        self.mean = MeanMetric()


def _capture(module, values, **kwargs):
    capture = LogCapture(module)
    for v in values:
        with capture.microbatch():
            module.log("loss", torch.tensor(v), **kwargs)
            module.log_dict({"other": v * 2}, prog_bar=True)
    assert "log" not in module.__dict__  # the class method is back
    return capture.calls


def test_reductions_match_one_whole_batch():
    module = Module()
    calls = _capture(module, [1.0, 2.0, 4.0])
    logged = {item.name: item for item in reduce_logged(module, calls, [5, 5, 2])}
    assert logged["loss"].value.item() == pytest.approx((5 * 1 + 5 * 2 + 2 * 4) / 12)
    assert logged["loss"].kwargs["batch_size"] == 12
    assert logged["other"].kwargs["prog_bar"] is True  # positional and keyword arguments both kept

    for fx, expected in [("sum", 7.0), ("max", 4.0), ("min", 1.0), (torch.max, 4.0)]:
        calls = _capture(module, [1.0, 2.0, 4.0], reduce_fx=fx)
        assert reduce_logged(module, calls, [5, 5, 2])[0].value.item() == expected

    calls = _capture(module, [1.0, 3.0], batch_size=10)  # the user's batch_size is the weight
    item = reduce_logged(module, calls, [6, 6])[0]
    assert item.value.item() == 2.0 and item.kwargs["batch_size"] == 20


def test_metric_step_value_covers_the_whole_batch():
    module = Module()
    preds = torch.tensor([0, 1, 2, 0, 1, 2])
    target = torch.tensor([0, 1, 2, 2, 2, 2])  # micro-batch accuracies 1.0 and 1/3
    module.acc(torch.tensor([0]), torch.tensor([1]))  # an earlier step: accuracy 0
    with metric_step_scope(module):
        module.acc(preds[:3], target[:3])
        module.acc(preds[3:], target[3:])
    assert module.acc._forward_cache.item() == pytest.approx(4 / 6)  # this step's batch, not its last micro-batch
    assert module.acc.compute().item() == pytest.approx(4 / 7)  # the running state includes the earlier step
    assert module.mean._update_count == 0  # metrics not used in the step are left as they were


def test_metric_must_be_an_attribute():
    module = Module()
    stray = MeanMetric()
    capture = LogCapture(module)
    with capture.microbatch():
        module.log("m", stray)
    with pytest.raises(ValueError, match="must be an attribute"):
        reduce_logged(module, capture.calls, [1])


def test_stage_statistics_are_logged_once_per_window():
    """Rank 0 sums each stage's step records and logs them every log_every_n_steps steps and at the epoch end."""
    from types import SimpleNamespace

    from lightning_timeprest.stage_stats import StageStatistics

    logged: list[tuple[str, float, dict]] = []

    class Module(SimpleNamespace):
        def log(self, name, value, **kw):
            logged.append((name, float(value), kw))

    module = Module(device=torch.device("cpu"), trainer=SimpleNamespace(log_every_n_steps=3))
    stats = StageStatistics()
    stats.version_difference = 2  # (set at fit start from the order in use)
    # d_sum, d_count, d_max, versions, bytes, busy, wait, wall, samples, cuda peak (StepStats.as_tensor)
    records = [[2, 2, 1, 1, 100, 0.5, 0.1, 1.0, 8, -1], [0, 2, 0, 3, 300, 0.1, 0.2, 1.0, 8, -1]]
    for step in range(3):
        stats.add(0, records[step % 2])
        stats.emit(module, final=False, is_rank_zero=True, share=None)
        assert (logged == []) == (step < 2)  # nothing until the third step
    got = {name: (value, kw["reduce_fx"], kw["batch_size"]) for name, value, kw in logged}
    prefix = "pipeline/stage0/"
    assert got[prefix + "idle_fraction"] == (pytest.approx(1 - 1.1 / 3.0), "mean", 3)  # busy over wall, summed
    assert got[prefix + "samples_per_sec"] == (pytest.approx(24 / 3.0), "mean", 3)
    assert got[prefix + "comm_wait_s"] == (pytest.approx(0.4), "sum", 1)
    assert got[prefix + "versions_held"] == (3, "max", 1) and got[prefix + "weight_bytes"] == (300, "max", 1)
    assert got[prefix + "staleness_mean"] == (pytest.approx(4 / 6), "mean", 6)  # weighted by backwards
    assert got[prefix + "staleness_max"] == (1, "max", 1)
    assert prefix + "cuda_peak_bytes" not in got and got["pipeline/v"] == (2.0, "max", 1)
    # the epoch's last step logs what it has, whatever the window
    logged.clear()
    stats.add(0, records[0])
    stats.emit(module, final=True, is_rank_zero=True, share=None)
    got = {name: value for name, value, _ in logged}
    assert got[prefix + "idle_fraction"] == pytest.approx(0.5) and got[prefix + "staleness_mean"] == 1.0
