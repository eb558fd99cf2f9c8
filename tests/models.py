"""Small LightningModules and data for the tests: deterministic layers only, so that pipelined and
single-device training can be compared exactly."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

NUM_FEATURES, NUM_CLASSES = 8, 4


def dataset(num_samples: int = 100, seed: int = 1234) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, NUM_FEATURES, generator=g)
    w = torch.randn(NUM_FEATURES, NUM_CLASSES, generator=g)
    y = (x @ w).argmax(dim=1)
    return TensorDataset(x, y)


def loader(batch_size: int = 18, num_samples: int = 100, drop_last: bool = False) -> DataLoader:
    return DataLoader(dataset(num_samples), batch_size=batch_size, shuffle=False, drop_last=drop_last)


class StemNetHead(LightningModule):
    """A stem and a head outside the pipelined ``net`` (replicated), 4 parameterised layers inside it."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.1, width: int = 16, batch_dict: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.stem = nn.Linear(NUM_FEATURES, width)
        self.net = nn.Sequential(
            nn.Linear(width, width),
            nn.Tanh(),
            nn.Linear(width, width),
            nn.Tanh(),
            nn.Linear(width, width),
            nn.Tanh(),
            nn.Linear(width, width),
        )
        self.head = nn.Linear(width, NUM_CLASSES)
        self.val_acc = MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.net(torch.tanh(self.stem(x)))))

    def _unpack(self, batch):
        if self.hparams.batch_dict:
            return batch["x"], batch["y"]
        return batch

    def training_step(self, batch, batch_idx):
        x, y = self._unpack(batch)
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = self._unpack(batch)
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.val_acc(logits, y)
        self.log("val_acc", self.val_acc)

    def test_step(self, batch, batch_idx):
        x, y = self._unpack(batch)
        self.log("test_loss", F.cross_entropy(self(x), y))

    def predict_step(self, batch, batch_idx):
        x, _ = self._unpack(batch)
        return self(x).argmax(dim=1)

    def configure_optimizers(self):
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr * 0.1)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
