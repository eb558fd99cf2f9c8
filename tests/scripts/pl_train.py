"""Train a ``pytorch_lightning`` (standalone package) module with ``strategy=argv[1]``, ``devices=argv[2]``."""

import sys

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_timeprest  # noqa: F401  (registers the names in pytorch_lightning too)


class M(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))

    def training_step(self, batch, i):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


pl.seed_everything(0)
g = torch.Generator().manual_seed(0)
ds = TensorDataset(torch.randn(64, 8, generator=g), torch.randint(0, 4, (64,), generator=g))
m = M()
t = pl.Trainer(
    strategy=sys.argv[1],
    accelerator="cpu",
    devices=int(sys.argv[2]),
    max_epochs=2,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
)
t.fit(m, DataLoader(ds, batch_size=16))
if t.is_global_zero:
    torch.save({"state_dict": m.state_dict(), "loss": float(t.callback_metrics["train_loss"])}, sys.argv[3])
