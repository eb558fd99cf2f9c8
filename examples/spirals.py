"""The main demo: an ordinary LightningModule trained pipeline-parallel over 2 CPU processes.

Nothing in ``SpiralClassifier`` knows about pipelines: it is the model you would write for one device. The only
change is the Trainer's ``strategy``. The data is generated here (interleaved spirals, a classic problem an MLP
must learn non-linear boundaries for), so the demo needs no download; ``--data file.csv`` trains on your own
table instead (numeric feature columns, integer class label in the last column, no header).

    python examples/spirals.py                      # gpipe, 2 stages
    python examples/spirals.py --schedule 1f1b --devices 4
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split
from torchmetrics.classification import MulticlassAccuracy

import lightning_timeprest  # registers strategy="gpipe", "1f1b", "timeprest_i", ...


def make_spirals(num_samples: int = 3000, num_classes: int = 5, noise: float = 0.3, seed: int = 0) -> TensorDataset:
    """``num_classes`` interleaved spiral arms in the plane, plus 14 noise features."""
    g = torch.Generator().manual_seed(seed)
    per_class = num_samples // num_classes
    radius = torch.linspace(0.05, 1.0, per_class).repeat(num_classes)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    angle = radius * 4.0 + labels * (2 * math.pi / num_classes) + noise * torch.randn(len(labels), generator=g)
    xy = torch.stack([radius * torch.sin(angle), radius * torch.cos(angle)], dim=1)
    features = torch.cat([xy, 0.5 * torch.randn(len(labels), 14, generator=g)], dim=1)
    return TensorDataset(features, labels)


def load_csv(path: Path) -> TensorDataset:
    table = torch.tensor([[float(v) for v in line.split(",")] for line in path.read_text().splitlines() if line])
    return TensorDataset(table[:, :-1], table[:, -1].long())


class SpiralDataModule(LightningDataModule):
    def __init__(self, data: str | None = None, batch_size: int = 64, num_samples: int = 3000) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        dataset = load_csv(Path(self.hparams.data)) if self.hparams.data else make_spirals(self.hparams.num_samples)
        self.num_features = dataset.tensors[0].shape[1]
        self.train_set, self.val_set = random_split(dataset, [0.8, 0.2], generator=torch.Generator().manual_seed(0))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


class SpiralClassifier(LightningModule):
    """A plain MLP classifier; ``self.layers`` is the ``nn.Sequential`` the strategy cuts into stages."""

    def __init__(
        self, num_features: int = 16, num_classes: int = 3, width: int = 128, depth: int = 6, lr: float = 3e-3
    ):
        super().__init__()
        self.save_hyperparameters()
        blocks: list[nn.Module] = [nn.Linear(num_features, width), nn.GELU()]
        for _ in range(depth - 2):
            blocks += [nn.Linear(width, width), nn.GELU()]
        blocks.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*blocks)
        self.val_acc = MulticlassAccuracy(num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True)
        self.val_acc(logits, y)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    from summary import print_summary  # examples/summary.py, beside this script

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedule", default="gpipe", choices=list(lightning_timeprest.SCHEDULES))
    parser.add_argument("--devices", type=int, default=2, help="pipeline stages (one process each)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--data", default=None, help="a CSV file: feature columns, then an integer label")
    args = parser.parse_args()

    seed_everything(0)
    data = SpiralDataModule(args.data)
    data.setup("fit")
    num_classes = int(data.train_set.dataset.tensors[1].max()) + 1
    model = SpiralClassifier(num_features=data.num_features, num_classes=num_classes)
    trainer = Trainer(
        strategy=args.schedule,
        accelerator="cpu",
        devices=args.devices,
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, datamodule=data)
    print_summary(trainer, f"{args.devices} stages, schedule {args.schedule}")


if __name__ == "__main__":
    main()
