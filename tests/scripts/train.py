"""Train tests/models.py's StemNetHead with a Lightning Trainer; the tests run this script in a subprocess.

With ``--devices > 0`` it uses a pipeline strategy (the tests start every rank of the job at once, or let
Lightning's popen launcher re-run this script once per rank); with ``--devices 0`` it trains on one device, the
reference. Rank 0 saves what the tests compare.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import (
    BackboneFinetuning,
    EarlyStopping,
    EMAWeightAveraging,
    LearningRateMonitor,
    ModelCheckpoint,
    RichProgressBar,
)
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from torch._dynamo.utils import counters as dynamo_counters
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models

import lightning_timeprest  # noqa: F401  (registers the strategies)
from lightning_timeprest import TiMePReStStrategy, weight_gradients


class Record(Callback):
    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.epochs: list[dict[str, float]] = []
        self.pipeline: list[dict[str, float]] = []
        self.trace: list | None = None
        self.history: list[dict[str, torch.Tensor]] | None = None  # each step's parameters (with --ema)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.history is not None:  # (before the weight-averaging callback's update, which reads the same)
            self.history.append({n: p.detach().clone() for n, p in pl_module.named_parameters() if not p.is_meta})
        m = trainer.callback_metrics
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        nan = torch.tensor(float("nan"))
        extras = (
            {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in outputs.items() if k != "loss"}
            if isinstance(outputs, dict)
            else {}
        )
        self.steps.append(
            {
                "extras": extras,  # what training_step returned besides the loss, as on_train_batch_end got it
                # (asynchronous policies log a mini-batch once it has completed: nothing in the first steps)
                "train_loss_step": float(m.get("train_loss_step", m.get("train_loss", nan))),
                "returned": float(loss),
                # what loggers and the progress bar receive
                "logged": float(
                    trainer.logged_metrics.get("train_loss_step", trainer.logged_metrics.get("train_loss", nan))
                ),
                "progress_bar": float(trainer.progress_bar_metrics["train_loss_step"])
                if "train_loss_step" in trainer.progress_bar_metrics
                else None,
            }
        )

    def on_train_start(self, trainer, pl_module):
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self.placement = {
            "params": {n: str(p.device) for n, p in pl_module.named_parameters()},
            "optimizer": [names[id(p)] for g in trainer.optimizers[0].param_groups for p in g["params"]],
            "initial": {n: p.detach().clone() for n, p in pl_module.named_parameters() if not p.is_meta},
        }

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.append({k: float(v) for k, v in trainer.callback_metrics.items()})
        self.pipeline.append({k: float(v) for k, v in trainer.logged_metrics.items() if k.startswith("pipeline/")})

    def on_train_end(self, trainer, pl_module):
        self.deferred_layers = getattr(trainer.strategy, "deferred_layers", None)
        engine = getattr(trainer.strategy, "async_runtime", None)
        if engine is not None:
            self.learning_rates = list(engine.learning_rates)
            self.skipped = engine.skipped
            self.trace = [
                [(e.op.kind.value, e.op.minibatch, e.op.microbatch, e.version) for e in t]
                for t in trainer.strategy.trace
            ]
            self.orders = list(engine.stream_orders)
            self.op_costs = trainer.strategy.op_costs


def constant_one(d: int) -> float:
    return 1.0


def constant_zero(d: int) -> float:
    return 0.0


class HookRecorder(Callback):
    """Counts the gradient hooks and keeps what they see: each call's step, the loss before the backward, and the
    gradients on this rank (by parameter name) after the backward and before the optimizer step."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, object]] = []

    def _grads(self, pl_module):
        return {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    def on_before_zero_grad(self, trainer, pl_module, optimizer):
        self.calls.append(("on_before_zero_grad", trainer.global_step, None))

    def on_before_backward(self, trainer, pl_module, loss):
        self.calls.append(("on_before_backward", trainer.global_step, float(loss)))

    def on_after_backward(self, trainer, pl_module):
        self.calls.append(("on_after_backward", trainer.global_step, self._grads(pl_module)))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.calls.append(("on_before_optimizer_step", trainer.global_step, self._grads(pl_module)))


def with_grad_norm_logging(cls: type) -> type:
    """``cls`` with Lightning's documented recipe: the 2-norm of every gradient, logged before each step."""
    from lightning.pytorch.utilities import grad_norm

    class GradNormLogging(cls):
        def on_before_optimizer_step(self, optimizer):
            self.log_dict(grad_norm(self, norm_type=2))

    return GradNormLogging


class Overflow(Callback):
    """Makes one rank's gradients of its first update infinite, as a float16 overflow on one stage would."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.done = False

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_rank == self.rank and not self.done:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.fill_(float("inf"))
            self.done = True


class Terminate(Callback):
    """Sends SIGTERM to rank 0 at a step (as a cluster's preemption would), and records the step each rank stops at."""

    def __init__(self, step: int, out: str) -> None:
        self.step, self.out = step, out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 0 and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_exception(self, trainer, pl_module, exception):
        with open(f"{self.out}.stopped{trainer.global_rank}", "w") as f:
            f.write(f"{type(exception).__name__} {trainer.global_step}")


class Die(Callback):
    """Kills one rank abruptly in the middle of training (a crashed stage)."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            if os.environ.get("TEST_RAISE"):
                raise RuntimeError(f"rank {self.rank} fails on purpose")
            os._exit(3)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--schedule", default="gpipe")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--optimizer", default="sgd")
    p.add_argument("--lr", type=float, default=None, help="the model's learning rate (its own default if not given)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=18)
    p.add_argument("--val", action="store_true")
    p.add_argument("--shuffle", action="store_true", help="shuffle the training data (its order drawn from the seed)")
    p.add_argument("--start-method", default="popen")
    p.add_argument("--ckpt-dir", default=None)
    p.add_argument("--resume", default=None)
    p.add_argument("--predict", action="store_true")
    p.add_argument("--validate-after", action="store_true", help="trainer.validate after fit (needs --val)")
    p.add_argument("--eval-batch-size", type=int, default=None)
    p.add_argument("--model", default="StemNetHead")
    p.add_argument("--empty-init", action="store_true")
    p.add_argument("--balance", default=None, help="comma-separated layer counts, or parameters|time|memory")
    p.add_argument("--module-name", default=None, help="the pipelined submodule ('' for the forward)")
    p.add_argument("--split-points", default=None, help="comma-separated submodule names")
    p.add_argument("--die-rank", type=int, default=-1)
    p.add_argument("--die-step", type=int, default=-1)
    p.add_argument("--sigterm-step", type=int, default=-1, help="rank 0 receives SIGTERM at this step")
    p.add_argument("--save-final", default=None, help="trainer.save_checkpoint(PATH) after fit")
    p.add_argument("--significance", default="exp", help="exp|inverse|power|one|zero")
    p.add_argument("--rule", default="graph")
    p.add_argument("--dynamic", action="store_true")
    p.add_argument("--order", default="cost", help="cost|unit")
    p.add_argument("--max-inflight", type=int, default=None)
    p.add_argument("--op-costs", default=None, help="forward,backward,step per stage, stages separated by ';'")
    p.add_argument("--scheduler", default="", help="step: StepLR stepping every optimizer step")
    p.add_argument("--logger", default="csv", help="csv|tensorboard")
    p.add_argument("--rich", action="store_true", help="Lightning's rich progress bar")
    p.add_argument("--summary", action="store_true", help="model summary; log_graph too with tensorboard")
    p.add_argument("--lr-monitor", action="store_true")
    p.add_argument("--early-stop", type=int, default=-1, help="EarlyStopping on val_loss with this patience")
    p.add_argument("--best-ckpt", default=None, help="ModelCheckpoint(monitor='val_loss') into this directory")
    p.add_argument("--ema", type=float, default=None, help="EMAWeightAveraging with this decay")
    p.add_argument("--clip", type=float, default=None, help="gradient_clip_val")
    p.add_argument("--clip-algorithm", default="norm")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--fp16", action="store_true", help="16-mixed with a GradScaler of --init-scale (also on the CPU)")
    p.add_argument("--init-scale", type=float, default=2.0**16)
    p.add_argument(
        "--growth-interval", type=int, default=2000, help="the GradScaler's (1: the scale doubles every step)"
    )
    p.add_argument("--no-scaling", action="store_true", help="with --fp16: float16 autocast, the GradScaler disabled")
    p.add_argument("--hooks", action="store_true", help="record the gradient hooks (HookRecorder) on every rank")
    p.add_argument("--grad-norm", action="store_true", help="the model logs grad_norm in on_before_optimizer_step")
    p.add_argument("--inf-rank", type=int, default=-1, help="this rank's first gradients become inf (a lone overflow)")
    p.add_argument("--stages", type=int, default=None, help="W; devices x num_nodes / W data-parallel replicas")
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--sharded", action="store_true", help="sharded_checkpoint=True")
    p.add_argument("--per-device", type=int, default=1, help="processes_per_device")
    p.add_argument(
        "--defer-all", action="store_true", help="every Linear layer takes its weight gradient once per mini-batch"
    )
    p.add_argument("--no-defer", action="store_true", help="defer_weight_grads=False")
    p.add_argument(
        "--mask-hook", action="store_true", help="hooks on net's parameters zero the first half of their gradients"
    )
    p.add_argument("--unfreeze-at", type=int, default=-1, help="BackboneFinetuning unfreezing at this epoch")
    p.add_argument("--sync-bn", action="store_true", help="Trainer(sync_batchnorm=True)")
    p.add_argument("--compile", action="store_true", help="fit torch.compile(model), as Lightning documents")
    p.add_argument("--loss-reduction", default="mean", help="the strategy's loss_reduction: mean|sum")
    p.add_argument("--ddp", action="store_true", help="Lightning's own DDP on --devices processes (a reference)")
    p.add_argument("--accelerator", default="cpu", help="cpu|gpu (the GPU check script)")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    if args.defer_all:  # (the test models' layers are smaller than the weights it is used for by default)
        weight_gradients.LARGE_WEIGHT = 0
    seed_everything(0)
    record = Record()
    callbacks: list[Callback] = [record]
    if args.unfreeze_at >= 0:
        callbacks.append(BackboneFinetuning(unfreeze_backbone_at_epoch=args.unfreeze_at))
    if args.die_step >= 0:
        callbacks.append(Die(args.die_rank, args.die_step))
    if args.sigterm_step >= 0:
        callbacks.append(Terminate(args.sigterm_step, args.out))
    if args.ckpt_dir:
        callbacks.append(ModelCheckpoint(dirpath=args.ckpt_dir, save_top_k=-1, every_n_epochs=1))
    best = None
    if args.best_ckpt:
        best = ModelCheckpoint(dirpath=args.best_ckpt, monitor="val_loss", mode="min", save_top_k=1)
        callbacks.append(best)
    if args.early_stop >= 0:
        # an improvement must be large to count, so it stops after patience + 1 validations
        callbacks.append(EarlyStopping(monitor="val_loss", patience=args.early_stop, min_delta=10.0))
    if args.ema is not None:
        record.history = []
        callbacks.append(EMAWeightAveraging(decay=args.ema))
    if args.lr_monitor:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if args.rich:
        callbacks.append(RichProgressBar())
    if args.inf_rank >= 0:
        callbacks.append(Overflow(args.inf_rank))
    hooks = HookRecorder() if args.hooks else None
    if hooks is not None:
        callbacks.append(hooks)
    plugins = []
    if args.fp16:
        device = "cuda" if args.accelerator == "gpu" else "cpu"
        scaler = torch.amp.GradScaler(
            device, init_scale=args.init_scale, growth_interval=args.growth_interval, enabled=not args.no_scaling
        )
        plugins.append(MixedPrecision("16-mixed", device, scaler))
    if args.devices > 0:
        balance = args.balance or "parameters"
        if balance[0].isdigit():
            balance = [int(b) for b in balance.split(",")]
        significance = {"one": constant_one, "zero": constant_zero}.get(args.significance, args.significance)
        strategy = TiMePReStStrategy(
            schedule=args.schedule,
            num_microbatches=None if args.n == 0 else args.n,
            start_method=args.start_method,
            balance=balance,
            significance=significance,
            backward_rule=args.rule,
            dynamic=args.dynamic,
            order=args.order,
            max_inflight=args.max_inflight,
            op_costs=[list(map(float, row.split(","))) for row in args.op_costs.split(";")] if args.op_costs else None,
            module_name=args.module_name,
            split_points=args.split_points.split(",") if args.split_points else None,
            stages=args.stages,
            sharded_checkpoint=args.sharded,
            processes_per_device=args.per_device,
            defer_weight_grads=not args.no_defer,
            loss_reduction=args.loss_reduction,
        )
        kw = {"strategy": "ddp" if args.ddp else strategy, "devices": args.devices, "num_nodes": args.num_nodes}
    else:
        kw = {"devices": 1}
    trainer = Trainer(
        **kw,
        accelerator=args.accelerator,
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        accumulate_grad_batches=args.accumulate,
        precision=None if args.fp16 else args.precision,
        gradient_clip_val=args.clip,
        gradient_clip_algorithm=args.clip_algorithm,
        sync_batchnorm=args.sync_bn,
        plugins=plugins,
        limit_val_batches=1.0 if args.val else 0,
        num_sanity_val_steps=2 if args.val else 0,
        callbacks=callbacks,
        logger=TensorBoardLogger(save_dir=os.getcwd(), name="logs", log_graph=args.summary)
        if args.logger == "tensorboard"
        else CSVLogger(save_dir=os.getcwd(), name="logs"),
        log_every_n_steps=1,
        enable_checkpointing=bool(args.ckpt_dir or args.best_ckpt),
        enable_progress_bar=args.rich,
        enable_model_summary=args.summary,
    )
    if args.model == "DictBatch":
        cls, kwargs = models.StemNetHead, {"optimizer": args.optimizer, "batch_dict": True}
    else:
        cls = getattr(models, args.model)
        kwargs = {"optimizer": args.optimizer} if "optimizer" in cls.__init__.__code__.co_varnames else {}
        if args.lr is not None:
            kwargs["lr"] = args.lr
        if args.scheduler:
            kwargs["scheduler"] = args.scheduler
    if args.grad_norm:
        cls = with_grad_norm_logging(cls)
    with trainer.init_module(empty_init=True) if args.empty_init else contextlib.nullcontext():
        model = cls(**kwargs)
    created_on_meta = all(p.is_meta for p in model.parameters()) if args.empty_init else None
    if args.mask_hook:
        for param in model.net.parameters():
            param.register_hook(zero_first_half)
    make_loader = {
        "TiedLM": models.token_loader,
        "DictBatch": models.dict_loader,
        "NamedSamples": models.named_loader,
        "TwoLoaders": models.two_loaders,
    }.get(args.model, models.loader)
    val = make_loader(args.eval_batch_size or args.batch_size) if args.val else None
    try:
        train_loader = make_loader(args.batch_size)
        if args.shuffle:
            train_loader = DataLoader(train_loader.dataset, batch_size=args.batch_size, shuffle=True)
        trainer.fit(torch.compile(model) if args.compile else model, train_loader, val, ckpt_path=args.resume)
    except RuntimeError:
        if os.environ.get("TEST_RAISE") and trainer.global_rank == 0:
            # a caller that catches the error and lives on (a notebook, a test): the other ranks must not wait
            print("rank 0 caught the error and lives on", flush=True)
            time.sleep(60)
        raise
    if args.save_final:
        trainer.save_checkpoint(args.save_final)
    result = {
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "steps": record.steps,
        "epochs": record.epochs,
        "global_step": trainer.global_step,
        "pipeline": record.pipeline,
        "table": getattr(trainer.strategy, "partition_table", None),
        "best": (best.best_model_path, float(best.best_model_score)) if best is not None else None,
        "logged": {k: float(v) for k, v in trainer.logged_metrics.items()},
    }
    if args.validate_after:
        result["validate"] = trainer.validate(model, val, verbose=False)
    if args.predict:
        eval_batch = args.eval_batch_size or args.batch_size
        predictions = trainer.predict(model, make_loader(eval_batch))
        result["predictions"] = torch.cat(predictions) if isinstance(predictions[0], torch.Tensor) else predictions
        result["test"] = trainer.test(model, make_loader(eval_batch), verbose=False)
    result["created_on_meta"] = getattr(model, "created_on_meta", created_on_meta)
    result["example_input_array"] = model.example_input_array
    if trainer.is_global_zero:
        torch.save(result, args.out)
    if hooks is not None:
        torch.save(hooks.calls, f"{args.out}.hooks{trainer.global_rank}")
    if args.devices > 0 and hasattr(record, "placement"):
        record.placement["global_step"] = trainer.global_step
        record.placement["values"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        record.placement["buffers"] = {n: b.detach().clone() for n, b in model.named_buffers() if not b.is_meta}
        record.placement["stopped"] = trainer.should_stop
        record.placement["stats"] = [list(s.staleness) for s in getattr(trainer.strategy, "stats", [])]  # per step
        record.placement["pipeline"] = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("pipeline/")
        }
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        record.placement["scale"] = float(scaler.get_scale()) if scaler is not None else None
        record.placement["skipped"] = getattr(record, "skipped", None)
        record.placement["deferred_layers"] = getattr(record, "deferred_layers", None)
        record.placement["history"] = record.history
        record.placement["draws"] = getattr(model, "draws", None)
        record.placement["steps"] = record.steps
        record.placement["compiled_graphs"] = dynamo_counters["stats"]["unique_graphs"]  # torch.compile'd here
        torch.save(record.placement, f"{args.out}.rank{trainer.global_rank}")
    if record.trace is not None:
        torch.save(record.trace, f"{args.out}.trace{trainer.global_rank}")
        torch.save({"orders": record.orders, "op_costs": record.op_costs}, f"{args.out}.orders{trainer.global_rank}")
        torch.save(record.learning_rates, f"{args.out}.lrs{trainer.global_rank}")


def zero_first_half(grad: torch.Tensor) -> torch.Tensor:
    """A tensor hook (``register_hook``): the gradient with its first half of rows zeroed."""
    grad = grad.clone()
    grad[: grad.shape[0] // 2] = 0
    return grad


if __name__ == "__main__":
    main()
