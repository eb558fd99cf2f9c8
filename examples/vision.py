"""Image classification with real architectures (VGG-16, ResNet-50), pipeline-parallel over CPU processes.

The models are ordinary ``nn.Module`` trees (``nn.ModuleList`` stages, residual additions in plain ``forward``
code), written as for one device; the only pipeline-specific choice is the Trainer's ``strategy``. Without
``--data-dir`` the data is generated (CIFAR-shaped images with learnable class structure), so the demo needs no
download; ``--data-dir`` reads the official CIFAR-10 python batches (``cifar-10-batches-py``) from disk.

    python examples/vision.py                                   # resnet50, gpipe, 2 stages
    python examples/vision.py --arch vgg16 --schedule 1f1b --num-microbatches 4
    python examples/vision.py --schedule auto --devices 1       # plain single-device training
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule, Trainer, seed_everything
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

import lightning_timeprest  # importing it registers the strategy names ("gpipe", "1f1b", "timeprest_i", ...)

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "VGG16",
    "VGG16_STAGES",
    "Bottleneck",
    "CIFAR10DataModule",
    "ConvBNReLU",
    "Downsample",
    "ImageClassifier",
    "RandomCropFlip",
    "ResNet50",
    "VGGClassifier",
    "load_cifar10",
    "make_cifar_like",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILES = ("test_batch",)

# VGG-16 ("configuration D"): the channel counts of the 13 3x3 convolutions, by stage; each stage ends in a max-pool
VGG16_STAGES: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def _scaled(channels: int, width: float) -> int:
    """Channel count scaled by ``width``: thin copies of one architecture for tests and CPU demos."""
    return max(1, round(channels * width))


# ----------------------------------------------------------------------------------------------------- VGG-16


class ConvBNReLU(nn.Module):
    """3x3 convolution, BatchNorm, ReLU: one VGG layer, and a natural pipeline split point.

    The convolution has no bias: BatchNorm's shift would cancel it.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


class VGGClassifier(nn.Module):
    """VGG's three fully connected layers, sized for the 1x1x512 map a 32x32 input leaves after five pools."""

    def __init__(self, in_features: int, hidden: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.relu1 = nn.ReLU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, hidden)
        self.relu2 = nn.ReLU()
        self.drop2 = nn.Dropout(dropout)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop1(self.relu1(self.fc1(x)))
        x = self.drop2(self.relu2(self.fc2(x)))
        return self.fc3(x)


class VGG16(nn.Module):
    """VGG-16 with BatchNorm for 32x32 inputs (CIFAR): 13 conv layers in ``blocks``, then ``classifier``.

    ``blocks`` is a flat ``nn.ModuleList`` of ``ConvBNReLU`` layers and ``MaxPool2d`` modules, so every entry
    (``blocks.0`` ... ``blocks.17``) is a clean place to cut the network into pipeline stages.

    Args:
        num_classes: output logits.
        width: multiplies every channel and hidden size (1.0 is the real VGG-16); thin copies keep the shape.
        dropout: the classifier's dropout probability.
    """

    def __init__(self, num_classes: int = 10, width: float = 1.0, dropout: float = 0.5) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        in_channels = 3
        for stage in VGG16_STAGES:
            for channels in stage:
                out_channels = _scaled(channels, width)
                self.blocks.append(ConvBNReLU(in_channels, out_channels))
                in_channels = out_channels
            self.blocks.append(nn.MaxPool2d(kernel_size=2, stride=2))
        hidden = _scaled(512, width)
        self.classifier = VGGClassifier(in_channels, hidden, num_classes, dropout)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.classifier(torch.flatten(x, 1))


# --------------------------------------------------------------------------------------------------- ResNet-50


class Downsample(nn.Module):
    """The projection shortcut (1x1 conv + BatchNorm) where a bottleneck changes the shape of the residual."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class Bottleneck(nn.Module):
    """ResNet's 1x1-3x3-1x1 bottleneck (stride on the 3x3, as in torchvision's "ResNet v1.5")."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        needs_projection = stride != 1 or in_channels != out_channels
        self.downsample = Downsample(in_channels, out_channels, stride) if needs_projection else None

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + identity)


class ResNet50(nn.Module):
    """ResNet-50 for 32x32 inputs: a 3x3 stride-1 stem without max-pool (the CIFAR adaptation), then four stages.

    The stages ``layer1`` ... ``layer4`` are ``nn.ModuleList`` attributes of 3, 4, 6 and 3 bottlenecks, so a
    pipeline can be cut at a stage (``model.layer3``) or at any single block (``model.layer3.2``).

    Args:
        num_classes: output logits.
        width: multiplies the base channel count (64 at 1.0, the real ResNet-50) and hence every stage's.
    """

    layers: tuple[int, int, int, int] = (3, 4, 6, 3)

    def __init__(self, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        base = _scaled(64, width)
        self.conv1 = nn.Conv2d(3, base, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        in_channels = base
        stages: list[nn.ModuleList] = []
        for i, num_blocks in enumerate(self.layers):
            planes = _scaled(64 * 2**i, width)
            blocks = nn.ModuleList()
            for j in range(num_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(Bottleneck(in_channels, planes, stride))
                in_channels = planes * Bottleneck.expansion
            stages.append(blocks)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = block(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


ARCHITECTURES: dict[str, type[nn.Module]] = {"vgg16": VGG16, "resnet50": ResNet50}


# ---------------------------------------------------------------------------------------------- LightningModule


class ImageClassifier(LightningModule):
    """An ordinary LightningModule around ``VGG16`` or ``ResNet50``: nothing in it knows about pipelines.

    Args:
        arch: ``"vgg16"`` or ``"resnet50"``.
        num_classes: output logits.
        width: channel multiplier passed to the architecture.
        lr, momentum, weight_decay: optimiser settings (``momentum`` is SGD's only).
        optimizer: ``"sgd"`` or ``"adam"``.
    """

    def __init__(
        self,
        arch: str = "resnet50",
        num_classes: int = 10,
        width: float = 1.0,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        optimizer: str = "sgd",
    ) -> None:
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown arch {arch!r}; choose one of: {', '.join(ARCHITECTURES)}")
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"unknown optimizer {optimizer!r}; choose 'sgd' or 'adam'")
        self.save_hyperparameters()
        self.model = ARCHITECTURES[arch](num_classes=num_classes, width=width)
        self.val_acc = MulticlassAccuracy(num_classes=num_classes)
        self.test_acc = MulticlassAccuracy(num_classes=num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True)
        self.val_acc(logits, y)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("test_loss", F.cross_entropy(logits, y))
        self.test_acc(logits, y)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        if hp.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)


# ------------------------------------------------------------------------------------------------------- data


def make_cifar_like(num_samples: int, num_classes: int = 10, seed: int = 0) -> TensorDataset:
    """CIFAR-shaped images (float, 3x32x32, about zero mean and unit variance) whose class must be learnt.

    Each class has a smooth colour prototype (random 4x4 and 8x8 patterns, upsampled); a sample is its class's
    prototype shifted by up to 4 pixels and maybe mirrored, plus a weaker smooth distractor pattern of its own
    and white noise. A deep CNN trained from scratch gets well above chance in an epoch or two of 2000 images
    (a check that a model learns, not a benchmark: the per-pixel nearest class mean is nearly perfect).
    Deterministic from ``seed``; the prototypes are drawn first, so calls with one seed share the classes.
    """
    g = torch.Generator().manual_seed(seed)

    def smooth_patterns(count: int) -> Tensor:
        coarse = F.interpolate(torch.randn(count, 3, 4, 4, generator=g), size=32, mode="bilinear")
        fine = F.interpolate(torch.randn(count, 3, 8, 8, generator=g), size=32, mode="bilinear")
        pattern = coarse + 0.5 * fine
        return (pattern - pattern.mean(dim=(1, 2, 3), keepdim=True)) / pattern.std(dim=(1, 2, 3), keepdim=True)

    protos = smooth_patterns(num_classes)
    labels = torch.randperm(num_samples, generator=g) % num_classes  # balanced classes
    # shift each sample's prototype by (dy, dx) in [-4, 4], repeating the edge pixels
    dy, dx = torch.randint(-4, 5, (2, num_samples, 1), generator=g)
    rows = (torch.arange(32) - dy).clamp(0, 31)
    cols = (torch.arange(32) - dx).clamp(0, 31)
    images = protos[labels[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    flip = torch.rand(num_samples, generator=g) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    # a smooth distractor pattern of its own per sample, and white noise as strong as the prototype
    images = images + 0.5 * smooth_patterns(num_samples) + torch.randn(images.shape, generator=g)
    images = images / (1 + 0.5**2 + 1) ** 0.5
    return TensorDataset(images.contiguous(), labels)


def load_cifar10(data_dir: str | Path, train: bool) -> TensorDataset:
    """The official CIFAR-10 python batches, normalised with the usual per-channel mean and std.

    Reads ``data_batch_1`` ... ``data_batch_5`` (``train=True``) or ``test_batch`` from ``data_dir`` or
    ``data_dir/cifar-10-batches-py``: pickled dicts with ``b"data"`` (uint8, N x 3072, channel-major) and
    ``b"labels"``. Unpickling runs code from the file: only point this at a copy you trust.
    """
    root = Path(data_dir).expanduser()
    names = CIFAR10_TRAIN_FILES if train else CIFAR10_TEST_FILES
    candidates = [root / "cifar-10-batches-py", root]
    folder = next((d for d in candidates if all((d / n).is_file() for n in names)), None)
    if folder is None:
        raise FileNotFoundError(
            f"CIFAR-10 {'training' if train else 'test'} batches not found: expected {', '.join(names)} in "
            f"{candidates[0]} or {candidates[1]} (the python version, cifar-10-python.tar.gz, extracted)"
        )
    images, labels = [], []
    for name in names:
        with open(folder / name, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        images.append(torch.as_tensor(entry[b"data"], dtype=torch.uint8).reshape(-1, 3, 32, 32))
        labels.append(torch.as_tensor(entry[b"labels"], dtype=torch.long))
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    x = (torch.cat(images).float() / 255.0 - mean) / std
    return TensorDataset(x, torch.cat(labels))


class RandomCropFlip(Dataset):
    """Standard CIFAR augmentation with tensor ops (no torchvision): a random 32x32 crop of the image padded by
    ``padding`` zeros, and a horizontal flip half the time. Draws from torch's global RNG (seeded by
    ``seed_everything``); under a pipeline strategy stage 0's batch is the one that trains, so ranks drawing
    differently does not matter."""

    def __init__(self, dataset: Dataset, padding: int = 4) -> None:
        self.dataset = dataset
        self.padding = padding

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, label = self.dataset[index]
        p = self.padding
        h, w = image.shape[-2:]
        padded = F.pad(image, (p, p, p, p))
        top, left = torch.randint(0, 2 * p + 1, (2,)).tolist()
        image = padded[..., top : top + h, left : left + w]
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, label


class CIFAR10DataModule(LightningDataModule):
    """CIFAR-10 from disk when ``data_dir`` is given, otherwise ``make_cifar_like`` data of the same shape.

    Args:
        data_dir: folder holding ``cifar-10-batches-py`` (or its files); ``None`` generates data.
        batch_size: training and validation batch size.
        num_train, num_val: generated data: the sizes of the two splits (``None``: CIFAR-10's 50000 and
            10000). Real data: caps on the official training and test splits, which keep their first images
            (the official batches are already in random order); ``None`` uses a split whole.
        seed: the generated data's seed.
        augment: random crop (padding 4) and horizontal flip of the training images.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 64,
        num_train: int | None = 2000,
        num_val: int | None = 500,
        seed: int = 0,
        augment: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        hp = self.hparams
        if hp.data_dir is not None:
            train: Dataset = load_cifar10(hp.data_dir, train=True)
            val: Dataset = load_cifar10(hp.data_dir, train=False)
            if hp.num_train is not None:
                train = Subset(train, range(min(hp.num_train, len(train))))
            if hp.num_val is not None:
                val = Subset(val, range(min(hp.num_val, len(val))))
        else:
            num_train = 50000 if hp.num_train is None else hp.num_train
            num_val = 10000 if hp.num_val is None else hp.num_val
            full = make_cifar_like(num_train + num_val, seed=hp.seed)  # one call: both splits share the classes
            train, val = Subset(full, range(num_train)), Subset(full, range(num_train, num_train + num_val))
        self.train_set = RandomCropFlip(train) if hp.augment else train
        self.val_set = val

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


# ------------------------------------------------------------------------------------------------------- demo


def main() -> None:
    from summary import print_summary  # examples/summary.py, beside this script

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50", choices=sorted(ARCHITECTURES))
    parser.add_argument("--schedule", default="gpipe", help="a pipeline schedule, or 'auto' for one device")
    parser.add_argument("--devices", type=int, default=2, help="pipeline stages (one process each)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=float, default=0.25, help="channel multiplier (1.0: the real model)")
    parser.add_argument("--data-dir", default=None, help="folder with CIFAR-10's cifar-10-batches-py")
    parser.add_argument("--num-train", type=int, default=2000, help="training images (a cap with --data-dir)")
    parser.add_argument("--num-microbatches", type=int, default=None, help="micro-batches per batch")
    args = parser.parse_args()

    seed_everything(0)
    data = CIFAR10DataModule(args.data_dir, batch_size=args.batch_size, num_train=args.num_train)
    model = ImageClassifier(arch=args.arch, width=args.width)
    strategy: Any = args.schedule
    if args.num_microbatches is not None:
        strategy = lightning_timeprest.TiMePReStStrategy(schedule=args.schedule, num_microbatches=args.num_microbatches)
    trainer = Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=args.devices,
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, datamodule=data)
    print_summary(trainer, f"{args.arch} width {args.width}, {args.devices} stages, schedule {args.schedule}")


if __name__ == "__main__":
    main()
