"""Throughput of every schedule against one device and against torch.distributed.pipelining on the same model,
stages and micro-batches, in the same run; and each stage's busy time over wall time against the schedule's ideal.

Each configuration trains for a fixed number of steps in its own ``Trainer.fit`` (W processes started by
Lightning's launcher, over gloo on CPU or nccl on GPU); samples per second are taken on rank 0 between the end of
the warm-up steps and the end of training. The peers are torch.distributed.pipelining's ``ScheduleGPipe`` and
``Schedule1F1B`` on the same model cut at the same place, with the optimizer stepped after each
``schedule.step``, in a bare loop. Every row runs in the same invocation on the same machine and is reported as a
ratio (to one device, and to the peer with the same micro-batches), since absolute numbers on shared machines
are noisy.

Busy time per stage is what the strategy measures for its ``pipeline/stage{s}/idle_fraction`` metric: the time a
stage computes (its schedule's forwards, backwards and, for the asynchronous policies, optimizer steps), without
the time it waits on transfers. Busy over wall time is compared with the schedule's ideal from
``schedules.busy_fractions`` (ops start as soon as their inputs exist, a backward costs twice its forward, no
transfer time).

    python benchmarks/throughput.py --quick     # the MLP, W = 2, N = 4, every schedule: about a minute on 2 cores
    python benchmarks/throughput.py             # adds N in {2, 8}, ResNet-50 and a GPT: about 10 minutes

Writes ``benchmarks/results/throughput.{json,md,png}`` with the machine it ran on. On a CPU machine the W
processes share the cores with each other (and one device uses them all), so a pipeline cannot beat one device
there: the ratios measure the pipeline's overhead (bubble, transfers, Python per micro-batch), and the same
script on a machine with W accelerators (``--accelerator cuda``) measures speed-up.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import QUIET, worker_env  # noqa: E402
from common import machine as machine_info  # noqa: E402  (benchmarks/common.py)

RESULTS = ROOT / "benchmarks" / "results"
SCHEDULES = ("gpipe", "1f1b", "pipedream", "timeprest", "timeprest_v", "timeprest_i")
PEERS = ("peer-gpipe", "peer-1f1b")
SYNCHRONOUS = ("gpipe", "1f1b")
DYNAMIC = "timeprest_v+dynamic"  # V-TiMePReSt with ``dynamic=True``: ops ordered by what has arrived

#: each model: the batch, where it is cut in two (``None``: the strategy's own cut of the model's largest
#: ``nn.Sequential``; a name: ``split_points`` for the strategy, and the same module, relative to the network,
#: for the peer), and its share of ``--steps`` (a ResNet step takes seconds on a CPU)
MODELS: dict[str, dict[str, Any]] = {
    "mlp": {"batch": 256, "split": None, "steps": 1.0},
    "resnet50": {"batch": 32, "split": "layer3.0", "steps": 0.25},
    "gpt": {"batch": 16, "split": "blocks.4", "steps": 0.5},
}


# ---------------------------------------------------------------------------------------------- the models


def build(name: str, width: int) -> tuple[Any, Any]:
    """The LightningModule and its network (the module the peer pipelines)."""
    sys.path.insert(0, str(ROOT))
    if name == "mlp":
        from examples.spirals import SpiralClassifier

        module = SpiralClassifier(num_features=16, num_classes=5, width=width, depth=8)
        return module, module.layers
    if name == "resnet50":
        from examples.vision import ImageClassifier

        module = ImageClassifier("resnet50", width=0.5)
        return module, module.model
    from examples.gpt import GPTLanguageModel

    module = GPTLanguageModel(vocab_size=65, block_size=64, n_layer=8, n_embd=256, dropout=0.0)
    return module, module.model


def batches(name: str, batch: int, count: int) -> list[tuple[Any, Any]]:
    """``count`` ready-made batches: the loader then only hands them out (the same for every row)."""
    import torch

    g = torch.Generator().manual_seed(0)
    if name == "mlp":
        make = lambda: (torch.randn(batch, 16, generator=g), torch.randint(0, 5, (batch,), generator=g))  # noqa: E731
    elif name == "resnet50":
        make = lambda: (torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g))  # noqa: E731
    else:
        make = lambda: tuple(torch.randint(0, 65, (2, batch, 64), generator=g))  # noqa: E731
    return [make() for _ in range(count)]


def loss_fn(name: str) -> Any:
    import torch.nn.functional as F

    if name == "gpt":
        return lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten())
    return F.cross_entropy


# ---------------------------------------------------------------------------------------------- the workers


def worker(args: argparse.Namespace) -> None:
    """One row with the strategy (or one device): Lightning's launcher starts the other ranks."""
    import torch
    from lightning.pytorch import Callback, Trainer, seed_everything
    from torch.utils.data import DataLoader

    sys.path.insert(0, str(ROOT))
    import lightning_timeprest

    class Measure(Callback):
        """Rank 0's clock for samples/s, and on every rank the stage's busy and wall seconds after warm-up."""

        def __init__(self, warmup: int) -> None:
            self.warmup, self.start, self.samples, self.busy, self.wall = warmup, 0.0, 0, 0.0, 0.0

        def on_train_start(self, trainer, pl_module):
            strategy = trainer.strategy
            for attr in ("_sync_stats_record", "_stats_record"):  # the records behind pipeline/stage{s}/...
                take = getattr(strategy, attr, None)
                if take is not None:
                    setattr(strategy, attr, self._keep(trainer, take))

        def _keep(self, trainer, take):
            def keep(*a, **kw):
                record = take(*a, **kw)
                if trainer.global_step >= self.warmup:
                    self.busy += float(record[5])
                    self.wall += float(record[7])
                return record

            return keep

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == self.warmup:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step > self.warmup:
                self.samples += len(batch[0])

        def on_train_end(self, trainer, pl_module):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self.start

    seed_everything(0)
    spec = MODELS[args.model]
    module, _ = build(args.model, args.width)
    measure = Measure(args.warmup)
    if args.strategy == "single":
        strategy: Any = "auto"
    else:
        split = spec["split"]
        schedule, _, mode = args.strategy.partition("+")
        strategy = lightning_timeprest.TiMePReStStrategy(
            schedule=schedule,
            num_microbatches=args.n,
            split_points=[f"model.{split}"] if split else None,
            dynamic=mode == "dynamic",
        )
    trainer = Trainer(
        strategy=strategy,
        accelerator=args.accelerator,
        devices=args.devices,
        max_steps=args.steps,
        **QUIET,
        num_sanity_val_steps=0,
        callbacks=[measure],
    )
    data = batches(args.model, spec["batch"], args.steps + 1)
    trainer.fit(module, DataLoader(data, batch_size=None))
    rank = trainer.global_rank
    Path(f"{args.out}.rank{rank}").write_text(json.dumps({"busy": measure.busy, "wall": measure.wall}))
    if trainer.is_global_zero:
        Path(args.out).write_text(json.dumps({"seconds": measure.seconds, "samples": measure.samples}))


def peer_worker(rank: int, args: argparse.Namespace, port: int, out: str) -> None:
    """torch.distributed.pipelining's ScheduleGPipe / Schedule1F1B on the same model and cut, in a bare loop."""
    import torch
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, SplitPoint, pipeline

    sys.path.insert(0, str(ROOT))
    from lightning_timeprest.partition import plan_sequential

    cuda = args.accelerator == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(1)  # as Lightning's launcher sets for each of its CPU processes
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=args.devices)
    torch.manual_seed(0)
    spec = MODELS[args.model]
    module, net = build(args.model, args.width)
    data = batches(args.model, spec["batch"], 1)
    x, y = (t.to(device) for t in data[0])
    if spec["split"] is None:  # the strategy's own cut of the Sequential, by parameters
        plan = plan_sequential("layers", net, args.devices)
        layers = torch.nn.Sequential(*[net[int(n)] for n in plan.layers_of(rank)]).to(device)
        stage = PipelineStage(layers, rank, args.devices, device)
        params = list(layers.parameters())
    else:
        pipe = pipeline(net, mb_args=(x[: len(x) // args.n],), split_spec={spec["split"]: SplitPoint.BEGINNING})
        stage = pipe.build_stage(rank, device)
        stage.submod.to(device)
        params = list(stage.submod.parameters())
    schedule_class = ScheduleGPipe if args.strategy == "peer-gpipe" else Schedule1F1B
    schedule = schedule_class(stage, n_microbatches=args.n, loss_fn=loss_fn(args.model))
    optimizer = module.configure_optimizers()  # the model's own optimizer and settings, on this stage's params
    accepted = inspect.signature(type(optimizer)).parameters
    optimizer = type(optimizer)(params, **{k: v for k, v in optimizer.defaults.items() if k in accepted})
    start = 0.0
    for step in range(args.steps):
        if step == args.warmup:
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()
            start = time.perf_counter()
        optimizer.zero_grad()
        if rank == 0:
            schedule.step(x)
        elif rank == args.devices - 1:
            schedule.step(target=y)
        else:
            schedule.step()
        optimizer.step()
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    seconds = time.perf_counter() - start
    if rank == 0:
        samples = spec["batch"] * (args.steps - args.warmup)
        Path(out).write_text(json.dumps({"seconds": seconds, "samples": samples}))
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- the driver


def ideal(strategy: str, w: int, n: int, steps: int) -> list[float] | None:
    """The schedule's busy fraction per stage over the measured steps (``None`` for rows without a schedule)."""
    sys.path.insert(0, str(ROOT))
    from lightning_timeprest.schedules import build_schedule, busy_fractions, nf1b, pipedream_1f1b

    if strategy in SYNCHRONOUS:
        return busy_fractions(build_schedule(strategy, w, n))
    if strategy == "pipedream":
        return busy_fractions(pipedream_1f1b(w, steps))
    if strategy in SCHEDULES:
        return busy_fractions(nf1b(w, n, steps))
    return None


def run(config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        if config["strategy"] in PEERS:
            import socket

            import torch.multiprocessing as mp

            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            peer_args = argparse.Namespace(**{**vars(args), **config})  # config's steps replace --steps
            mp.spawn(peer_worker, args=(peer_args, port, str(out)), nprocs=config["devices"], join=True)
            busy = None
        else:
            cmd = [sys.executable, __file__, "--worker", "--out", str(out), "--model", config["model"]]
            cmd += ["--strategy", config["strategy"], "--devices", str(config["devices"]), "--n", str(config["n"])]
            cmd += ["--steps", str(config["steps"]), "--warmup", str(args.warmup), "--width", str(args.width)]
            cmd += ["--accelerator", args.accelerator]
            done = subprocess.run(cmd, cwd=tmp, env=worker_env(), capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{config} failed:\n{done.stderr[-3000:]}")
            ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(config["devices"])]
            busy = [r["busy"] / r["wall"] if r["wall"] > 0 else None for r in ranks]
        measured = json.loads(out.read_text())
    row = {**config, **measured, "samples_per_s": measured["samples"] / measured["seconds"]}
    if config["strategy"] != "single":
        row["busy_fraction"] = busy
        row["ideal_busy_fraction"] = ideal(config["strategy"], config["devices"], config["n"], config["steps"])
    print(f"  {config['model']:9s} {config['strategy']:12s} N={config['n']}: {row['samples_per_s']:.0f} samples/s")
    return row


def configurations(quick: bool, w: int, steps: int, warmup: int) -> list[dict[str, Any]]:
    configs = []
    models = {"mlp": [4] if quick else [2, 4, 8]} | ({} if quick else {"resnet50": [4], "gpt": [4]})
    for model, ns in models.items():
        common = {"model": model, "steps": max(warmup + 5, round(steps * MODELS[model]["steps"]))}
        configs.append({**common, "strategy": "single", "devices": 1, "n": 1})
        for n in ns:
            for strategy in (*SYNCHRONOUS, *PEERS, "timeprest", "timeprest_v", "timeprest_i", DYNAMIC):
                configs.append({**common, "strategy": strategy, "devices": w, "n": n})
        configs.append({**common, "strategy": "pipedream", "devices": w, "n": 1})
    return configs


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    machine = machine_info()
    shares = {m: v["steps"] for m, v in MODELS.items() if m != "mlp"}
    base = {r["model"]: r["samples_per_s"] for r in rows if r["strategy"] == "single"}
    peers = {(r["model"], r["n"], r["strategy"]): r["samples_per_s"] for r in rows if r["strategy"] in PEERS}
    for r in rows:
        r["ratio_to_single_device"] = r["samples_per_s"] / base[r["model"]]
        peer = peers.get((r["model"], r["n"], f"peer-{r['strategy']}"))
        r["ratio_to_peer"] = r["samples_per_s"] / peer if peer and r["strategy"] in SYNCHRONOUS else None

    def fractions(values: list[float | None] | None) -> str:
        return "-" if not values else ", ".join("-" if v is None else f"{v:.2f}" for v in values)

    lines = [
        "| model | schedule | W | N | samples/s | vs one device | vs peer | busy/wall per stage | ideal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peer = "-" if r.get("ratio_to_peer") is None else f"{r['ratio_to_peer']:.2f}"
        lines.append(
            f"| {r['model']} | {r['strategy']} | {r['devices']} | {r['n']} | {r['samples_per_s']:.0f} "
            f"| {r['ratio_to_single_device']:.2f} | {peer} | {fractions(r.get('busy_fraction'))} "
            f"| {fractions(r.get('ideal_busy_fraction'))} |"
        )
    lines += [
        "",
        f"Machine: {machine['platform']}, {machine['cpus']} CPUs, torch {machine['torch']}, {args.accelerator}; "
        f"{args.steps} steps per MLP row ({', '.join(f'{m}: {round(v * 100)}%' for m, v in shares.items())} of that "
        f"for the others), the first {args.warmup} of them warm-up.",
        "",
        "`peer-*`: torch.distributed.pipelining's ScheduleGPipe / Schedule1F1B on the same model and cut, in a bare",
        "loop (one fixed batch, no Lightning loop, no logging); `vs peer` compares gpipe and 1f1b with the peer of",
        "the same schedule and N. `pipedream` runs each mini-batch as one micro-batch (N = 1), as PipeDream does.",
        "`ideal`: `schedules.busy_fractions` (a backward costs twice its forward, transfers are free).",
        f"`{DYNAMIC}`: `timeprest_v` with `dynamic=True` (ops ordered by what has arrived; no static ideal).",
    ]
    (RESULTS / "throughput.json").write_text(
        json.dumps({"machine": machine, "steps": args.steps, "warmup": args.warmup, "rows": rows}, indent=2)
    )
    (RESULTS / "throughput.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["model"], r["n"]) for r in rows if r["strategy"] in SYNCHRONOUS}, key=str)
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [1, 1.4]})
    names = [*SYNCHRONOUS, *PEERS, "pipedream", "timeprest", "timeprest_v", "timeprest_i", DYNAMIC]
    width = 0.8 / len(groups)
    for k, (model, n) in enumerate(groups):
        ratio = {r["strategy"]: r["ratio_to_single_device"] for r in rows if r["model"] == model and r["n"] == n}
        pipedream = [r["ratio_to_single_device"] for r in rows if r["model"] == model and r["strategy"] == "pipedream"]
        ratio.setdefault("pipedream", pipedream[0] if pipedream else 0.0)
        values = [ratio.get(name, 0.0) for name in names]
        axes[0].bar([i + k * width for i in range(len(names))], values, width, label=f"{model}, N={n}")
    axes[0].set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=30, ha="right")
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[0].set_ylabel("samples/s relative to one device (pipedream: N = 1)")
    axes[0].legend(fontsize=8)
    staged = [r for r in rows if r.get("busy_fraction")]
    for i, r in enumerate(staged):
        wanted = r["ideal_busy_fraction"] or [None] * len(r["busy_fraction"])  # dynamic order: no static ideal
        for s, (got, want) in enumerate(zip(r["busy_fraction"], wanted, strict=True)):
            axes[1].scatter(i, got, color=f"C{s}", marker="o", label=f"stage {s} measured" if i == 0 else None)
            if want is not None:
                axes[1].scatter(i, want, color=f"C{s}", marker="_", s=200, label=f"stage {s} ideal" if i == 0 else None)
    labels = [f"{r['model']} {r['strategy']} N={r['n']}" for r in staged]
    axes[1].set_xticks(range(len(staged)), labels, rotation=90)
    axes[1].tick_params(axis="x", labelsize=7)
    axes[1].set_ylim(0, 1.05)
    axes[1].set_ylabel("busy time / wall time")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "throughput.png", dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--model", default="mlp", help=argparse.SUPPRESS)
    p.add_argument("--strategy", default="single", help=argparse.SUPPRESS)
    p.add_argument("--devices", type=int, default=2, help="stages W")
    p.add_argument("--n", type=int, default=4, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=None, help="steps per row (warm-up included)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--width", type=int, default=None, help="the MLP's width")
    p.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--models", nargs="*", help="only these models")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    args.steps = args.steps or (30 if args.quick else 60)
    args.width = args.width or (256 if args.quick else 512)
    configs = configurations(args.quick, args.devices, args.steps, args.warmup)
    if args.models:
        configs = [c for c in configs if c["model"] in args.models]
    rows = [run(c, args) for c in configs]
    RESULTS.mkdir(parents=True, exist_ok=True)
    print(report(rows, args))
    plot(rows)


if __name__ == "__main__":
    main()
