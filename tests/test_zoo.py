"""The example model zoo (examples/vision.py, examples/gpt.py) on one process: sizes, shapes, export with a
dynamic batch dimension, and the data modules. The pipelined runs of these models are not tested here."""

from __future__ import annotations

import math
import pickle
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn

sys.path.insert(0, str(Path(__file__).parent.parent))  # the repository root, where the `examples` package lives
from examples.gpt import GPT, GPTLanguageModel, TextDataModule, make_markov_tokens
from examples.vision import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    VGG16,
    CIFAR10DataModule,
    ImageClassifier,
    RandomCropFlip,
    ResNet50,
    load_cifar10,
    make_cifar_like,
)


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_full_width_parameter_counts():
    # pinned: VGG-16-BN with bias-free convs and a 512-512-10 classifier; ResNet-50 for CIFAR (3x3 stem)
    vgg, resnet = VGG16(num_classes=10), ResNet50(num_classes=10)
    assert num_params(vgg) == 15_249_354
    assert num_params(resnet) == 23_520_842
    assert sum(isinstance(m, nn.Conv2d) for m in vgg.modules()) == 13
    assert sum(isinstance(m, nn.MaxPool2d) for m in vgg.modules()) == 5
    assert [len(stage) for stage in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)] == [3, 4, 6, 3]
    assert sum(isinstance(m, nn.Conv2d) for m in resnet.modules()) == 49 + 4  # 49 main-path convs, 4 shortcuts
    assert resnet.fc.in_features == 2048


@pytest.mark.parametrize("arch", [VGG16, ResNet50])
def test_thin_copies_keep_the_architecture(arch):
    torch.manual_seed(0)
    model = arch(num_classes=7, width=0.125)
    assert not any(isinstance(m, nn.Sequential) for m in model.modules())
    full = arch(num_classes=7)
    assert len(list(model.modules())) == len(list(full.modules()))  # same layers, thinner
    assert num_params(model) < num_params(full) / 30
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def _tiny_gpt() -> GPT:
    return GPT(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=16)


@pytest.mark.parametrize(
    "make, example",
    [
        (lambda: VGG16(width=0.125), lambda b: torch.randn(b, 3, 32, 32)),
        (lambda: ResNet50(width=0.125), lambda b: torch.randn(b, 3, 32, 32)),
        (_tiny_gpt, lambda b: torch.randint(11, (b, 16))),
    ],
    ids=["vgg16", "resnet50", "gpt"],
)
def test_export_with_dynamic_batch_matches_eager(make, example):
    torch.manual_seed(0)
    model = make().eval()
    exported = torch.export.export(model, (example(4),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    for batch in (2, 3):
        x = example(batch)
        with torch.no_grad():
            torch.testing.assert_close(exported.module()(x), model(x))


def test_gpt_is_causal_untied_and_checks_its_inputs():
    torch.manual_seed(0)
    model = _tiny_gpt().eval()
    assert not any(isinstance(m, nn.Sequential) for m in model.modules())
    assert model.lm_head.weight.data_ptr() != model.wte.weight.data_ptr()
    idx = torch.randint(11, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 11
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert a.shape == (2, 16, 11)
    torch.testing.assert_close(a[:, :10], b[:, :10])  # the future does not leak into earlier positions
    assert not torch.allclose(a[:, 10:], b[:, 10:])
    with pytest.raises(ValueError, match="block_size"):
        model(torch.randint(11, (1, 17)))
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPT(vocab_size=11, n_head=3, n_embd=16)


def test_cifar_like_is_deterministic_balanced_and_learnable():
    x, y = make_cifar_like(600, num_classes=10, seed=1).tensors
    again, _ = make_cifar_like(600, num_classes=10, seed=1).tensors
    other, _ = make_cifar_like(600, num_classes=10, seed=2).tensors
    assert x.shape == (600, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x, again) and not torch.equal(x, other)
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.1
    assert torch.bincount(y).tolist() == [60] * 10
    # nearest class mean: fitted on 400 samples, far above the 10% of chance on the other 200
    means = torch.stack([x[:400][y[:400] == c].mean(0) for c in range(10)])
    predicted = torch.cdist(x[400:].flatten(1), means.flatten(1)).argmin(1)
    assert (predicted == y[400:]).float().mean() > 0.5


def test_cifar_datamodule_generated_splits_and_augmentation():
    data = CIFAR10DataModule(batch_size=16, num_train=64, num_val=24, augment=True)
    data.setup("fit")
    assert len(data.train_set) == 64 and len(data.val_set) == 24
    assert isinstance(data.train_set, RandomCropFlip)
    assert len(data.train_dataloader()) == 4  # drop_last
    assert [len(b[0]) for b in data.val_dataloader()] == [16, 8]  # no drop_last, in order
    torch.manual_seed(0)
    image, label = data.train_set[5]
    original, original_label = data.train_set.dataset[5]
    assert label == original_label and image.shape == original.shape
    padded = torch.nn.functional.pad(original, (4, 4, 4, 4))
    crops = [padded[:, i : i + 32, j : j + 32] for i in range(9) for j in range(9)]
    assert any(torch.equal(image, c) or torch.equal(image, c.flip(-1)) for c in crops)


@pytest.fixture
def fake_cifar(tmp_path: Path) -> Path:
    """CIFAR-10's python layout with 4 images per batch: pickled dicts of uint8 (N, 3072) data and labels."""
    np = pytest.importorskip("numpy")
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        data = np.full((4, 3072), 10 * k, dtype=np.uint8)
        data[:, 1024:2048] = 255  # the green plane
        entry = {b"batch_label": name.encode(), b"labels": [k, k, 9 - k, 1], b"data": data, b"filenames": []}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    return tmp_path


def test_load_cifar10_reads_the_official_format(fake_cifar):
    train = load_cifar10(fake_cifar, train=True)
    x, y = train.tensors
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32
    assert y.tolist()[:8] == [0, 0, 9, 1, 1, 1, 8, 1]
    torch.testing.assert_close(x[4, 0, 0, 0], torch.tensor((10 / 255 - CIFAR10_MEAN[0]) / CIFAR10_STD[0]))
    torch.testing.assert_close(x[:, 1], torch.full((20, 32, 32), (1 - CIFAR10_MEAN[1]) / CIFAR10_STD[1]))
    test = load_cifar10(fake_cifar / "cifar-10-batches-py", train=False)  # the folder itself works too
    assert len(test) == 4 and test.tensors[1].tolist() == [5, 5, 4, 1]


def test_load_cifar10_names_the_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1.*data_batch_5"):
        load_cifar10(tmp_path, train=True)


def test_cifar_datamodule_caps_the_real_splits(fake_cifar):
    data = CIFAR10DataModule(str(fake_cifar), batch_size=4, num_train=6, num_val=None)
    data.setup("fit")
    assert len(data.train_set) == 6 and len(data.val_set) == 4
    assert [int(data.train_set[i][1]) for i in range(6)] == [0, 0, 9, 1, 1, 1]  # the first images, in order


def test_text_datamodule_tokenises_a_file(tmp_path):
    text = "hello world\n" * 40
    path = tmp_path / "tiny.txt"
    path.write_text(text, encoding="utf-8")
    data = TextDataModule(str(path), block_size=8, batch_size=4, seed=0)
    assert data.vocab_size == len(set(text)) == 9  # known before setup, to build the model with
    data.setup("fit")
    windows = (len(text) - 9) // 8 + 1
    assert len(data.train_set) + len(data.val_set) == windows and len(data.val_set) == round(0.1 * windows)
    x, y = data.train_set[0]
    assert x.shape == y.shape == (8,) and torch.equal(x[1:], y[:-1])
    decoded = "".join(data.vocabulary[i] for i in torch.cat([x, y[-1:]]).tolist())
    assert decoded in text
    again = TextDataModule(str(path), block_size=8, seed=0)
    again.setup("fit")
    assert data.train_set.indices == again.train_set.indices


def test_text_datamodule_generates_a_sparse_markov_chain():
    tokens = make_markov_tokens(200, 33, seed=3)
    assert torch.equal(tokens, make_markov_tokens(200, 33, seed=3))
    assert int(tokens.max()) < 65 == TextDataModule().vocab_size == GPTLanguageModel().hparams.vocab_size
    pairs = torch.unique(tokens.unfold(1, 2, 1).reshape(-1, 2), dim=0)
    assert int(torch.bincount(pairs[:, 0]).max()) <= 4  # at most 4 successors per token: learnable structure
    data = TextDataModule(block_size=32, num_sequences=200)
    data.setup("fit")
    assert (len(data.train_set), len(data.val_set)) == (180, 20)


@pytest.mark.slow
def test_lightning_modules_train_a_few_steps(tmp_path):
    torch.manual_seed(0)
    kwargs = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    kwargs.update(default_root_dir=tmp_path)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=2, limit_val_batches=1, **kwargs)
    model = ImageClassifier(arch="vgg16", width=0.125, optimizer="adam", lr=1e-3)
    assert isinstance(model.configure_optimizers(), torch.optim.Adam)
    trainer.fit(model, datamodule=CIFAR10DataModule(batch_size=8, num_train=16, num_val=8))
    assert {"train_loss", "val_loss", "val_acc"} <= set(trainer.callback_metrics)
    assert math.isfinite(float(trainer.callback_metrics["train_loss"]))

    trainer = Trainer(accelerator="cpu", devices=1, max_steps=2, limit_val_batches=1, **kwargs)
    lm = GPTLanguageModel(block_size=16, n_layer=1, n_head=2, n_embd=16)
    trainer.fit(lm, datamodule=TextDataModule(block_size=16, batch_size=8, num_sequences=20))  # 2 batches: one epoch
    assert abs(float(trainer.callback_metrics["val_loss"]) - math.log(65)) < 0.5  # small init: near uniform
    with pytest.raises(ValueError, match="unknown arch"):
        ImageClassifier(arch="alexnet")
