"""What the steps collect reaches every rank before the epoch-end hooks (lightning_timeprest.collected), in
one process with a stand-in for the pipeline's broadcast."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics import SumMetric

from lightning_timeprest import collected


class Collecting(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 2)
        self.outputs: list[torch.Tensor] = []
        self.counts: dict[str, int] = {}
        self.frozen = [self.layer]  # references to modules: not data, never replaced
        self.epochs_seen = 0
        self.seen = SumMetric()  # updated in the steps, computed in the hook

    def on_validation_epoch_end(self) -> None:
        self.epochs_seen += 1


def _stage(index: int, sent: list) -> SimpleNamespace:
    """Stage ``index`` of two; the last stage's broadcast payload is appended to ``sent`` and given to the other."""

    def broadcast_object(obj, src_stage):
        if index == src_stage:
            sent.append(obj)
            return obj
        return sent[-1]

    return SimpleNamespace(index=index, num_stages=2, last_stage=1, device=torch.device("cpu"),
                           comm=SimpleNamespace(broadcast_object=broadcast_object))  # fmt: skip


def test_the_epoch_end_hooks_a_module_defines_take_the_last_stage_collected_values():
    sent: list = []
    last, first = Collecting(), Collecting()
    last.outputs += [torch.tensor([1.0]), torch.tensor([2.0, 3.0], requires_grad=True) * 1]  # one still in a graph
    last.counts["batches"] = 2
    last.seen.update(torch.tensor(5.0))
    first_outputs = first.outputs
    wrapped = {rank: collected.install(m, _stage(rank, sent)) for rank, m in ((1, last), (0, first))}
    assert wrapped[0] == wrapped[1] == ["on_validation_epoch_end"]  # the only one the module defines
    last.on_validation_epoch_end()  # (the last stage sends first: ranks call the hook in lockstep)
    first.on_validation_epoch_end()
    assert first.epochs_seen == last.epochs_seen == 1  # the user's hook ran on both
    assert first.outputs is first_outputs and torch.equal(torch.cat(first.outputs), torch.tensor([1.0, 2.0, 3.0]))
    assert not first.outputs[1].requires_grad
    assert first.counts == {"batches": 2}
    assert first.frozen[0] is first.layer  # not data: left as it was
    assert float(first.seen.compute()) == 5.0  # the metric's state, the last stage's
    assert set(sent[0][0]) == {"outputs", "counts"}  # nothing of Lightning's own, no module references
    collected.uninstall(first, wrapped[0])
    assert "on_validation_epoch_end" not in vars(first)


def test_nothing_is_wrapped_for_one_stage():
    module = Collecting()
    assert collected.install(module, SimpleNamespace(num_stages=1)) == []
