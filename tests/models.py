"""Small LightningModules and data for the tests: deterministic layers only, so that pipelined and
single-device training can be compared exactly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import SumMetric
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

    def __init__(
        self, optimizer: str = "sgd", lr: float = 0.1, width: int = 16, batch_dict: bool = False, scheduler: str = ""
    ) -> None:
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
        self._validate(batch)

    def _validate(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Log the validation loss and accuracy of ``batch``; return its logits and labels."""
        x, y = self._unpack(batch)
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.val_acc(logits, y)
        self.log("val_acc", self.val_acc)
        return logits, y

    def test_step(self, batch, batch_idx):
        x, y = self._unpack(batch)
        self.log("test_loss", F.cross_entropy(self(x), y))

    def predict_step(self, batch, batch_idx):
        x, _ = self._unpack(batch)
        return self(x).argmax(dim=1)

    def configure_optimizers(self):
        if self.hparams.optimizer == "adam":
            optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr * 0.1)
        else:
            optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        if self.hparams.scheduler == "step":  # the rate halves every 2 optimizer steps
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        return optimizer


class Reshaped(torch.utils.data.Dataset):
    """``base``'s samples ``(x, y)`` as ``make(i, x, y)`` makes them."""

    def __init__(self, base: TensorDataset, make: Callable[[int, torch.Tensor, torch.Tensor], Any]) -> None:
        self.base, self.make = base, make

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> Any:
        return self.make(i, *self.base[i])


def dict_loader(batch_size: int = 18, num_samples: int = 100) -> DataLoader:
    samples = Reshaped(dataset(num_samples), lambda i, x, y: {"x": x, "y": y, "meta": "sample"})
    return DataLoader(samples, batch_size=batch_size, shuffle=False)


def named_loader(batch_size: int = 18, num_samples: int = 100) -> DataLoader:
    """(x, y, name): ``default_collate`` leaves the names a list of strings, one per sample."""
    return DataLoader(Reshaped(dataset(num_samples), lambda i, x, y: (x, y, f"s{i}")), batch_size=batch_size)


def two_loaders(batch_size: int = 18, num_samples: int = 100) -> dict[str, DataLoader]:
    """Two loaders of different batch sizes and lengths, trained on together (Lightning's CombinedLoader)."""
    return {"a": loader(batch_size, num_samples), "b": loader(batch_size // 3, num_samples // 2)}


VOCAB = 12


def token_loader(batch_size: int = 16, num_samples: int = 96, seq: int = 6) -> DataLoader:
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (num_samples, seq + 1), generator=g)
    return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=batch_size, shuffle=False)


class TiedLM(LightningModule):
    """Embedding (stem) tied to the output projection (head) and to the last pipelined layer; two pipelined layers
    on different stages share a bias."""

    def __init__(self, optimizer: str = "sgd") -> None:
        super().__init__()
        self.save_hyperparameters()
        width = VOCAB  # square, so that a pipelined layer can share the embedding matrix too
        self.embed = nn.Embedding(VOCAB, width)
        self.net = nn.Sequential(
            nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width, bias=False)
        )
        self.net[4].weight = self.embed.weight
        self.net[2].bias = self.net[0].bias  # tied across stages inside the pipelined module
        self.head = nn.Linear(width, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.head(self.net(self.embed(x)))
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=0.01)
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class ConfigureModelNet(StemNetHead):
    """Builds its pipelined layers in configure_model, the way large models are built."""

    def __init__(self, optimizer: str = "sgd") -> None:
        super().__init__(optimizer=optimizer)
        self.net = None
        self.created_on_meta: bool | None = None

    def configure_model(self) -> None:
        if self.net is not None:
            return
        width = self.hparams.width
        layers = [nn.Linear(width, width) if i % 2 == 0 else nn.Tanh() for i in range(7)]
        self.net = nn.Sequential(*layers)
        self.created_on_meta = all(p.is_meta for p in self.net.parameters())


class ManualOptimization(StemNetHead):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


class TwoOptimizers(StemNetHead):
    def configure_optimizers(self):
        return [torch.optim.SGD(self.net.parameters(), lr=0.1), torch.optim.SGD(self.head.parameters(), lr=0.1)]


class ShortNet(StemNetHead):
    """Only two layers in the pipelined module."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))


class BatchNormNet(StemNetHead):
    """Batch norm on both stages' part of the pipelined module: buffers (running statistics, a batch count) that
    every training forward updates."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.1) -> None:
        super().__init__(optimizer=optimizer, lr=lr)
        w = self.hparams.width
        self.net = nn.Sequential(
            *(nn.Linear(w, w), nn.BatchNorm1d(w), nn.Tanh()),
            *(nn.Linear(w, w), nn.BatchNorm1d(w), nn.Tanh()),
            nn.Linear(w, w),
        )


class FrozenFirstStage(StemNetHead):
    """Fine-tuning: the stem, the head and the first half of ``net`` are frozen, and ``configure_optimizers`` gives
    the optimizer only what trains, so that stage 0 of two has nothing to train."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.1) -> None:
        super().__init__(optimizer=optimizer, lr=lr)
        for frozen in (self.stem, self.net[0], self.net[2], self.head):
            frozen.requires_grad_(False)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr, momentum=0.9)


class CollectsOutputs(StemNetHead):
    """Aggregates over the epoch the way Lightning's docs show without a Metric: steps append to lists, the
    epoch-end hooks reduce and log them and clear the lists."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.1) -> None:
        super().__init__(optimizer=optimizer, lr=lr)
        self.validation_step_outputs: list[torch.Tensor] = []
        self.training_step_outputs: list[tuple[torch.Tensor, int]] = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.training_step_outputs.append((loss.detach() * len(batch[0]), len(batch[0])))
        return loss

    def on_train_epoch_end(self):
        total = sum(n for _, n in self.training_step_outputs)
        self.log("train_loss_collected", torch.stack([s for s, _ in self.training_step_outputs]).sum() / total)
        self.training_step_outputs.clear()

    def validation_step(self, batch, batch_idx):
        logits, y = self._validate(batch)
        self.validation_step_outputs.append(logits.argmax(dim=1) == y)

    def on_validation_epoch_end(self):
        self.log("val_acc_collected", torch.cat(self.validation_step_outputs).float().mean())
        self.validation_step_outputs.clear()


class ReturnsExtras(StemNetHead):
    """A ``training_step`` that returns more than the loss, for the callbacks' ``on_train_batch_end``."""

    def training_step(self, batch, batch_idx):
        x, y = self._unpack(batch)
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        preds = logits.argmax(dim=1)
        return {"loss": loss, "acc": (preds == y).float().mean(), "preds": preds}


class EpochEndMetrics(StemNetHead):
    """torchmetrics' own pattern: metrics updated in ``validation_step`` and computed, logged and reset in
    ``on_validation_epoch_end``; and the collectives such a hook may call (a ``sync_dist`` sum over the processes,
    ``self.all_gather``)."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.1) -> None:
        super().__init__(optimizer=optimizer, lr=lr)
        self.acc = MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")
        self.seen = SumMetric()

    def validation_step(self, batch, batch_idx):
        logits, y = self._validate(batch)
        self.acc.update(logits, y)
        self.seen.update(torch.tensor(float(len(y))))

    def on_validation_epoch_end(self):
        self.log("val_acc_computed", self.acc.compute())
        seen = self.seen.compute()
        self.log("val_seen", seen)
        self.log("val_seen_summed", seen, sync_dist=True, reduce_fx="sum")
        self.log("val_gathered", float(self.all_gather(seen).numel()))  # one per process that saw other data
        self.acc.reset()
        self.seen.reset()


class WithBackbone(StemNetHead):
    """The pipelined ``nn.Sequential`` is ``self.backbone``, as Lightning's ``BackboneFinetuning`` expects; the
    optimizer gets what trains at the start (the callback adds the backbone's group when it unfreezes it)."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.1) -> None:
        super().__init__(optimizer=optimizer, lr=lr)
        self.backbone = self.net
        del self.net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.backbone(torch.tanh(self.stem(x)))))

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)


class NamedSamples(StemNetHead):
    """Batches carry each sample's name (a list of strings) beside the tensors: the loss weighs each sample by a
    number read from its name, the step returns the names, ``predict_step`` returns them with the classes."""

    @staticmethod
    def _weights(names: list[str], like: torch.Tensor) -> torch.Tensor:
        return torch.tensor([1.0 + int(n[1:]) % 3 for n in names], dtype=like.dtype)

    def training_step(self, batch, batch_idx):
        x, y, names = batch
        assert len(names) == len(x), "the names split with the samples"
        logits = self(x)
        loss = (F.cross_entropy(logits, y, reduction="none") * self._weights(names, logits)).mean()
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return {"loss": loss, "names": names}

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch[:2], batch_idx)

    def test_step(self, batch, batch_idx):
        super().test_step(batch[:2], batch_idx)

    def predict_step(self, batch, batch_idx):
        x, _, names = batch
        return {"names": [f"{n}:" for n in names], "classes": self(x).argmax(dim=1)}


class MixupDropout(StemNetHead):
    """Mixup in ``training_step`` (a mixing weight and a permutation drawn before the pipelined call, the labels
    mixed after it), noise drawn onto the logits after it, and dropout inside the pipelined module; ``draws``
    keeps what each step drew before the call on this rank."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.1) -> None:
        super().__init__(optimizer=optimizer, lr=lr)
        self.net.insert(1, nn.Dropout(0.25))
        self.draws: list[tuple[float, list[int]]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        lam, perm = float(torch.rand(())), torch.randperm(len(x))
        self.draws.append((lam, perm.tolist()))
        logits = self(lam * x + (1 - lam) * x[perm])
        logits = logits + 0.01 * torch.randn_like(logits)
        loss = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss


class SkipsABatch(StemNetHead):
    """Returns ``None`` from ``training_step`` for its second batch, before calling the model (Lightning's way to
    skip a batch on one device)."""

    def training_step(self, batch, batch_idx):
        return None if batch_idx == 1 else super().training_step(batch, batch_idx)


class _Block(nn.Module):
    def __init__(self, layer: nn.Module, checkpointed: bool, reentrant: bool) -> None:
        super().__init__()
        self.layer, self.checkpointed, self.reentrant = layer, checkpointed, reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointed and self.training:  # activation checkpointing, as Hugging Face models do it
            return checkpoint(self.layer, x, use_reentrant=self.reentrant)
        return self.layer(x)


class PlainBlocks(StemNetHead):
    """The pipelined layers (a dropout among them) wrapped in blocks; :class:`CheckpointedBlocks` checkpoints them."""

    checkpointed = reentrant = False

    def __init__(self, optimizer: str = "sgd", lr: float = 0.1) -> None:
        super().__init__(optimizer=optimizer, lr=lr)
        self.net.insert(1, nn.Dropout(0.25))
        self.net = nn.Sequential(*(_Block(layer, self.checkpointed, self.reentrant) for layer in self.net))


class CheckpointedBlocks(PlainBlocks):
    """Each block's forward rerun in the backward (``torch.utils.checkpoint``), dropout masks drawn again."""

    checkpointed = True


class ReentrantCheckpointedBlocks(PlainBlocks):
    """:class:`CheckpointedBlocks` with the reentrant checkpoint (``use_reentrant=True``, older code's default)."""

    checkpointed = reentrant = True


class CompiledNet(StemNetHead):
    """The pipelined ``nn.Sequential`` wrapped by ``torch.compile`` (``self.net = torch.compile(self.net)``): its
    parameters are named ``net._orig_mod.*``."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.1) -> None:
        super().__init__(optimizer=optimizer, lr=lr)
        self.net = torch.compile(self.net)


class Blocks(StemNetHead):
    """The pipelined layers in blocks (no dropout); :class:`CompiledBlocks` compiles each in place."""

    compiled = False

    def __init__(self, optimizer: str = "sgd", lr: float = 0.1) -> None:
        super().__init__(optimizer=optimizer, lr=lr)
        self.net = nn.Sequential(*(_Block(layer, False, False) for layer in self.net))
        for block in self.net if self.compiled else ():
            block.compile()


class CompiledBlocks(Blocks):
    """Each block compiled in place (``block.compile()``)."""

    compiled = True


class TwoLoaders(StemNetHead):
    """Trained on :func:`two_loaders`: each batch holds both loaders' batches, of different sizes; the loss is over
    their samples together."""

    def training_step(self, batch, batch_idx):
        (xa, ya), (xb, yb) = batch["a"], batch["b"]
        return super().training_step((torch.cat([xa, xb]), torch.cat([ya, yb])), batch_idx)


class Distillation(StemNetHead):
    """A frozen teacher, larger than the student (the largest nn.Sequential), called in training only."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.1) -> None:
        super().__init__(optimizer=optimizer, lr=lr)
        self.teacher = nn.Sequential(nn.Linear(NUM_FEATURES, 96), nn.Tanh(), nn.Linear(96, 96), nn.Tanh())
        self.teacher.append(nn.Linear(96, NUM_CLASSES))
        self.teacher.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        with torch.no_grad():
            target = F.softmax(self.teacher(x), dim=1)
        logits = self(x)
        return F.cross_entropy(logits, y) + F.kl_div(F.log_softmax(logits, dim=1), target, reduction="batchmean")

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)


class SummedLoss(StemNetHead):
    """A loss that sums over the samples (``reduction="sum"``), logged as the tensor the step returns."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y, reduction="sum")
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss


class TwoViews(StemNetHead):
    """A contrastive-style step on two views of the batch: calls the model twice, or once on both concatenated."""

    concatenated = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        views = (x, x + 0.1)
        if self.concatenated:
            z1, z2 = self(torch.cat(views)).chunk(2)
        else:
            z1, z2 = self(views[0]), self(views[1])
        return F.cross_entropy(z1, y) + F.mse_loss(z1, z2)


class WithExampleInput(StemNetHead):
    """``example_input_array`` set, as Lightning's docs suggest for the summary's sizes and TensorBoard's graph."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.1) -> None:
        super().__init__(optimizer=optimizer, lr=lr)
        self.example_input_array = torch.zeros(2, NUM_FEATURES)


class LayerwiseRates(StemNetHead):
    """Layer-wise learning-rate decay, made by indexing the pipelined ``nn.Sequential`` in ``configure_optimizers``
    (each layer's rate halves with its distance from the head), as fine-tuning recipes do."""

    def configure_optimizers(self):
        lr, depth = self.hparams.lr, len(self.net)
        groups = [
            {"params": layer.parameters(), "lr": lr * 0.5 ** (depth - 1 - i)} for i, layer in enumerate(self.net[:-1])
        ]
        groups.append({"params": self.net[-1].parameters(), "weight_decay": 0.01})
        groups.append({"params": [*self.stem.parameters(), *self.head.parameters()], "lr": lr * 0.5**depth})
        return torch.optim.SGD(groups, lr=lr)


class Gate(nn.Module):
    """A block of two inputs: what the pipeline must carry across a boundary is more than one tensor."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(h)) * mask


class MultiInputNet(LightningModule):
    """Not an ``nn.Sequential``: a forward with a keyword input, a skip connection over two blocks, an integer (the
    batch size) computed on the first stage and used on the last, and a dict output. Split by tracing."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.1, width: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Linear(NUM_FEATURES, width)
        self.gate = Gate(width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, NUM_CLASSES)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        batch = x.shape[0]
        h = torch.tanh(self.embed(x))
        g = self.gate(h, mask if mask is not None else torch.ones_like(h))
        k = torch.tanh(self.mix(g)) + h  # h skips the gate's stage
        logits = self.head(k).reshape(batch, -1)
        return {"logits": logits, "aux": h.pow(2).mean()}

    def _run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # (a traced module must be called alike in every step: here always with a mask)
        return self(x, mask=(x[:, :1] > -2).float().expand(-1, self.hparams.width))

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self._run(x)
        loss = F.cross_entropy(out["logits"], y) + 0.01 * out["aux"]
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self._run(x)["logits"], y))

    def predict_step(self, batch, batch_idx):
        return self._run(batch[0])["logits"].argmax(dim=1)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self._run(x)["logits"], y))

    def configure_optimizers(self):
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr * 0.1)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class _GatedNet(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.embed, self.gate = nn.Linear(NUM_FEATURES, width), Gate(width)
        self.mix, self.head = nn.Linear(width, width), nn.Linear(width, NUM_CLASSES)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(x))
        return self.head(torch.tanh(self.mix(self.gate(h, mask))) + h)


class CompiledModel(LightningModule):
    """A model that is not an ``nn.Sequential`` (split by tracing), wrapped by ``torch.compile``; the steps call it."""

    def __init__(self, lr: float = 0.1, width: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = torch.compile(_GatedNet(width))

    def _loss(self, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.model(x, mask=(x[:, :1] > -2).float().expand(-1, self.hparams.width)), y)

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class Untraceable(StemNetHead):
    """A forward that branches on a tensor's value: torch.export cannot capture it as one graph."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.stem(x))
        if h.sum() > 0:
            h = -h
        return self.head(torch.tanh(self.net(h)))
