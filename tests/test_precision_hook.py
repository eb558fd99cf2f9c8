"""The precision hook's asynchronous stage update, exercised directly in one process (no pipeline): the loss scale
that travelled with the gradients is the one each stage unscales by, an overflow skips only that stage's update,
and the last stage backs its scale off when an earlier stage overflowed."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_timeprest.precision import PipelineLink, PipelinePrecision

LR = 0.5


class Tiny(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
        self.seen: list[tuple[str, float | None]] = []

    def on_before_backward(self, loss):
        self.seen.append(("on_before_backward", float(loss)))

    def on_after_backward(self):
        self.seen.append(("on_after_backward", float(self.w.grad.sum())))

    def on_before_optimizer_step(self, optimizer):
        self.seen.append(("on_before_optimizer_step", float(self.w.grad.sum())))

    def on_before_zero_grad(self, optimizer):
        self.seen.append(("on_before_zero_grad", None))


def _stage(stage: int) -> tuple[Tiny, torch.optim.Optimizer, PipelinePrecision]:
    module = Tiny()
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    module.trainer = trainer
    plugin = PipelinePrecision(MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**16)))
    plugin.link = PipelineLink(
        stage=stage,
        num_stages=2,
        asynchronous=True,
        install_gradients=lambda: None,
        all_reduce=lambda tensor, op: None,
        counted_elsewhere=set,
        average_over_replicas=lambda params: None,
    )
    return module, torch.optim.SGD(module.parameters(), lr=LR), plugin


def test_an_earlier_stage_unscales_by_the_scale_that_travelled():
    module, optimizer, plugin = _stage(0)
    true_grad = torch.tensor([0.25, 0.5, -1.0])

    def backward(tensor: torch.Tensor) -> None:  # the gradients arrive from the next stage, scaled by 8
        module.w.grad = true_grad * 8.0

    before = module.w.detach().clone()
    skipped = plugin.stage_update(module, optimizer, [module.w], torch.tensor(1.5), backward, scale=8.0)
    assert not skipped
    torch.testing.assert_close(module.w.detach(), before - LR * true_grad)
    # the hooks ran in Lightning's order, on_before_backward with the loss as scaled, the others unscaled or not
    assert [name for name, _ in module.seen] == [
        "on_before_zero_grad",
        "on_before_backward",
        "on_after_backward",
        "on_before_optimizer_step",
    ]
    assert module.seen[1][1] == 1.5 * 8.0
    assert module.seen[2][1] == pytest.approx(float(true_grad.sum()) * 8.0)  # before unscaling, as on one device
    assert module.seen[3][1] == pytest.approx(float(true_grad.sum()))  # after
    assert module.w.grad is None  # zeroed for the next update


def test_an_overflow_skips_only_this_update():
    module, optimizer, plugin = _stage(0)
    before = module.w.detach().clone()

    def overflowing(tensor: torch.Tensor) -> None:
        module.w.grad = torch.tensor([1.0, float("inf"), 0.0])

    assert plugin.stage_update(module, optimizer, [module.w], torch.tensor(1.0), overflowing, scale=4.0)
    torch.testing.assert_close(module.w.detach(), before)

    def finite(tensor: torch.Tensor) -> None:
        module.w.grad = torch.tensor([4.0, 4.0, 4.0])

    assert not plugin.stage_update(module, optimizer, [module.w], torch.tensor(1.0), finite, scale=4.0)
    torch.testing.assert_close(module.w.detach(), before - LR)


def test_the_last_stage_scales_the_loss_and_backs_off_when_an_earlier_stage_overflowed():
    module, optimizer, plugin = _stage(1)
    x = torch.tensor([2.0, 0.0, -1.0])
    scale = plugin.loss_scale()
    assert scale == 2.0**16
    loss = (module.w * x).sum()
    before = module.w.detach().clone()
    skipped = plugin.stage_update(
        module, optimizer, [module.w], loss, lambda tensor: tensor.backward(), scale=scale, upstream_overflow=True
    )
    assert not skipped  # its own gradients were finite: its step is taken
    torch.testing.assert_close(module.w.detach(), before - LR * x)  # d loss / d w = x, unscaled
    assert module.seen[1][1] == pytest.approx(float(loss) * 2.0**16)  # the loss the backward ran on
    assert plugin.loss_scale() == 2.0**15  # and the scale backed off, for the mini-batches to come
    # without news of an overflow the scale stays (growth_interval 2000)
    loss = (module.w * x).sum()
    plugin.stage_update(module, optimizer, [module.w], loss, lambda t: t.backward(), scale=plugin.loss_scale())
    assert plugin.loss_scale() == 2.0**15


@pytest.mark.parametrize("schedule", ["gpipe", "timeprest_i"])
def test_checkpoints_keep_the_scaler_under_the_user_plugin_name(tmp_path, schedule):
    """The wrapped plugin's state is saved under its own name (a one-device run resumes from it as its own) and
    restored from there: a resumed fit continues with the saved loss scale."""
    from models import StemNetHead, loader

    from lightning_timeprest import TiMePReStStrategy

    def fit(init_scale: float, max_steps: int, ckpt_path: str | None = None) -> Trainer:
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1)
        trainer = Trainer(
            accelerator="cpu",
            devices=1,
            strategy=TiMePReStStrategy(schedule=schedule, num_microbatches=2),
            plugins=[MixedPrecision("16-mixed", "cpu", scaler)],
            max_steps=max_steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(StemNetHead(), loader(18), ckpt_path=ckpt_path)
        return trainer

    trainer = fit(4.0, 3)
    assert trainer.scaler.get_scale() == 4.0 * 2**3  # grew after each of the 3 steps
    path = tmp_path / "fp16.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)
    assert "PipelinePrecision" not in saved and saved["MixedPrecision"]["scale"] == 32.0
    resumed = fit(1024.0, 4, ckpt_path=str(path))
    assert resumed.scaler.get_scale() == 64.0  # 32 restored, then one more step
