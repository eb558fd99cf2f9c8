"""Train a thin copy of one of the example models (VGG-16, ResNet-50, GPT; ordinary nn.Modules, split by tracing)
under several schedules, one ``fit`` after another in the same processes; the tests run this script.

With ``--devices 0`` it trains on one device with the batch cut into ``--n`` micro-batches by the data loader and
gradients accumulated over them: the single-device training the synchronous schedules must equal, batch-norm
statistics included (they are per micro-batch in a pipeline). Rank 0 saves, per model and schedule, the final
state dict, the partition table, the split points (the first block of each stage after the first, from the table),
the batches stage 0 trained on, in order, and the logged metrics; every rank saves the names of the parameters its
optimizer holds, the ops it ran (``strategy.trace``, asynchronous policies), for
tests/generic_async_reference.py to replay, and how many Linear layers took their weight gradients once per
mini-batch (``--defer-all`` makes every one eligible).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for hf_models

import lightning_timeprest  # noqa: F401  (registers the strategies)
from examples.gpt import GPTLanguageModel, make_markov_tokens
from examples.vision import ImageClassifier, make_cifar_like
from lightning_timeprest import TiMePReStStrategy, weight_gradients


def model_and_data(name: str, samples: int, loss: str = "model") -> tuple[torch.nn.Module, TensorDataset]:
    if name == "demo-transformer":  # Lightning's own demo: nn.Transformer with a causal target mask
        from lightning.pytorch.demos import LightningTransformer, Transformer

        class Demo(LightningTransformer):  # its own data here: no WikiText2 download
            def prepare_data(self) -> None:
                pass

        tokens = make_markov_tokens(samples, 13, vocab_size=40, seed=0)
        model = Demo(vocab_size=40)
        model.model = Transformer(vocab_size=40, ninp=32, nhead=2, nhid=32, nlayers=2, dropout=0.0)
        return model, TensorDataset(tokens[:, :-1], tokens[:, 1:])
    if name.startswith("hf-"):
        import hf_models

        return hf_models.HFModule(name[3:], loss), hf_models.make_data(samples)
    if name == "gpt":
        tokens = make_markov_tokens(samples, 17, vocab_size=65, seed=0)
        data = TensorDataset(tokens[:, :-1], tokens[:, 1:])
        return GPTLanguageModel(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0), data
    data = make_cifar_like(samples, num_classes=10, seed=0)
    kwargs = {"dropout": 0.0} if name == "vgg16" else {}
    model = ImageClassifier(arch=name, num_classes=10, width=1 / 16, lr=float(os.environ.get("ZOO_LR", "0.01")))
    if kwargs:  # the reference and the pipeline draw dropout masks from different random streams: none here
        from examples.vision import VGG16

        model.model = VGG16(num_classes=10, width=1 / 16, **kwargs)
    return model, data


class Record(Callback):
    """What the asynchronous reference replays: stage 0's batches (rank 0), this rank's parameters and its ops."""

    def __init__(self) -> None:
        self.batches: list = []
        self.held: list[str] = []
        self.trace: list = []
        self.deferred = 0

    def on_train_start(self, trainer, pl_module):
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self.held = [names[id(p)] for g in trainer.optimizers[0].param_groups for p in g["params"]]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append([t.detach().cpu().clone() for t in batch])

    def on_train_end(self, trainer, pl_module):  # (every stream drained: the last step of the epoch drains)
        self.deferred = getattr(trainer.strategy, "deferred_layers", 0)
        self.trace = [
            [(e.op.kind.value, e.op.minibatch, e.op.microbatch, e.version) for e in stream]
            for stream in getattr(trainer.strategy, "trace", [])
        ]


def main() -> None:
    p = argparse.ArgumentParser()
    models = "vgg16|resnet50|gpt|demo-transformer|hf-FAMILY (tests/hf_models.py), several separated by commas"
    p.add_argument("--model", required=True, help=models)
    p.add_argument("--loss", default="model", help="hf models: model (labels=) or step (computed in the step)")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--schedules", default="gpipe")
    p.add_argument("--n", type=int, default=2, help="micro-batches (pipedream always uses 1)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--balance", default="parameters", help="parameters|time|memory or comma-separated counts")
    p.add_argument("--split-points", default=None, help="comma-separated submodule names")
    p.add_argument("--val", action="store_true")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--out", required=True, help="prefix of the output files (PREFIX.MODEL.SCHEDULE.pt)")
    p.add_argument(
        "--defer-all", action="store_true", help="every Linear layer takes its weight gradient once per mini-batch"
    )
    args = p.parse_args()
    if args.defer_all:  # (the thin models' layers are smaller than the weights it is used for by default)
        weight_gradients.LARGE_WEIGHT = 0

    names = args.model.split(",")
    for name, schedule in [(m, s) for m in names for s in args.schedules.split(",")]:
        seed_everything(0)
        model, data = model_and_data(name, args.batch_size * args.steps, args.loss)
        out = f"{args.out}.{name}.{schedule}"
        if args.devices > 0:
            balance = args.balance if not args.balance[0].isdigit() else [int(b) for b in args.balance.split(",")]
            strategy = TiMePReStStrategy(
                schedule=schedule,
                num_microbatches=None if schedule == "pipedream" else args.n,
                balance=balance,
                split_points=args.split_points.split(",") if args.split_points else None,
            )
            kw = {"strategy": strategy, "devices": args.devices}
            batch, accumulate = args.batch_size, 1
        else:
            kw = {"devices": 1}
            batch, accumulate = args.batch_size // args.n, args.n
        if args.devices == 0:
            torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, f"{args.out}.{name}.initial.pt")
        loader = DataLoader(data, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0))
        val = DataLoader(data, batch_size=args.batch_size) if args.val else None
        record = Record()
        trainer = Trainer(
            **kw,
            callbacks=[record],
            accelerator="cpu",
            precision=args.precision,
            max_epochs=1,
            accumulate_grad_batches=accumulate,
            limit_val_batches=1.0 if args.val else 0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, loader, val)
        table = getattr(trainer.strategy, "partition_table", None)
        if trainer.is_global_zero:
            torch.save(
                {
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
                    "table": table,
                    # a stage's layers read "first .. last (count)" or "only": each later stage begins at its first
                    "split_points": [row[1].split(" .. ")[0] for row in table[2:]] if table else None,
                    "batches": record.batches,
                    "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
                },
                f"{out}.pt",
            )
        if args.devices > 0:
            rank = {"held": record.held, "trace": record.trace, "deferred": record.deferred}
            torch.save(rank, f"{out}.rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
