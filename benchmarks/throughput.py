"""Throughput of every schedule as a user with one accelerator per stage would see it: each stage process pinned
to its own core(s), against one device (one process pinned to one core with the same thread count) and against
torch.distributed.pipelining on the same model, stages and micro-batches, pinned the same way.

A CPU run shows a pipeline's speed-up only when each stage has its own compute, as each stage has its own
accelerator in real use (SPEC, last section); unpinned, the W processes share the cores one device uses alone.
So here stage ``s`` runs on core ``s`` of the cores this process may use, with ``--threads`` threads (1 by
default), and the one-device reference runs on one core with as many threads.

Each configuration trains for a fixed number of steps in its own ``Trainer.fit`` (W processes started by
Lightning's launcher, over gloo on CPU or nccl on GPU); samples per second are taken on rank 0 in the steady state,
between the end of the warm-up steps and the start of the last step. The asynchronous policies drain the pipeline
in the last step of an epoch (every mini-batch in flight finishes); what that step takes beyond an average step is
reported apart (``drain``), once per epoch: an epoch of S steps takes about S / (steps per second) + drain. The
peers are torch.distributed.pipelining's ``ScheduleGPipe`` and ``Schedule1F1B`` on the same model cut at the same
place, with the optimizer stepped after each ``schedule.step``, in a bare loop. Rows are repeated ``--repeats``
times, interleaved (every configuration once, then every configuration again, ...), and reported as the median
with the spread (min-max) over the repeats: the machines here are shared and noisy, so only ratios within one
invocation are compared.

Busy time per stage is what the strategy measures for ``pipeline/stage{s}/idle_fraction``: the time a stage
computes (its forwards, backwards and, for the asynchronous policies, optimizer steps), without the time it waits
on transfers or spends in Lightning's loop. Busy over wall time is compared with the ideal of the op order the
stage ran (``schedules.busy_fractions``: ops start as soon as their inputs exist, a backward costs twice its
forward, transfers are free).

    python benchmarks/throughput.py --quick     # the MLP at N = 2 and 4, the main rows, 2 repeats: about 5 minutes
    python benchmarks/throughput.py             # every row, MLP and GPT at N = 2 and 4, ResNet-50 at N = 4,
                                                # 3 repeats: about an hour on 2 cores
    python benchmarks/throughput.py --models mlp gpt    # without the ResNet

Writes ``benchmarks/results/throughput.{json,md,png}`` with the machine it ran on (``--tag`` names another set
of files, e.g. for a GPU run with ``--accelerator cuda``, where each stage has its own GPU and nothing is pinned).

On a GPU machine with fewer GPUs than stages (one GPU, W = 2), the stages share the GPUs
(``processes_per_device``, activations through host memory over gloo), and the table says so: its speed-ups then
show how much of the stages' work overlaps on a shared card (host work, kernel launches, transfers), not what a GPU
per stage gives, and the torch.distributed.pipelining peers, which need a GPU per rank, are left out. (With CUDA
MPS running, ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` in the environment splits each card's SMs between the
processes, which comes closer to a GPU per stage.) On CUDA the busy columns stay empty: the strategy times ops on
the host, and CUDA runs them asynchronously.

    python benchmarks/throughput.py --accelerator cuda --quick --tag throughput_gpu
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
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
from common import pin as pin_to_core  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
#: glibc hands large freed blocks back to the kernel and page-faults them in again on the next allocation; every
#: row (one device, the peers, the strategy) runs with that switched off, as jemalloc or tcmalloc would do
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
ALLOCATOR_NOTE = (
    "Every process runs with glibc's MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ at 1 GiB (no page faults "
    "on every large allocation)."
)
PEERS = ("peer-gpipe", "peer-1f1b")
SYNCHRONOUS = ("gpipe", "1f1b")
NF1B = ("timeprest", "timeprest_v", "timeprest_i")
DYNAMIC = "timeprest_v+dynamic"  # V-TiMePReSt with ``dynamic=True``: ops ordered by what has arrived
UNIT = "timeprest_v+unit"  # V-TiMePReSt replaying the paper's unit-slot grid instead of the cost-aware order
ROWS = (*SYNCHRONOUS, *PEERS, "pipedream", *NF1B, DYNAMIC, UNIT)

#: each model: the batch, where it is cut in two (``None``: the strategy's own cut of the model's largest
#: ``nn.Sequential``; a name: ``split_points`` for the strategy, and the same module, relative to the network,
#: for the peer), the N it runs at, and the steps measured after the warm-up (a ResNet step takes a second)
MODELS: dict[str, dict[str, Any]] = {
    "mlp": {"batch": 256, "split": None, "ns": (2, 4), "measured": 36},
    "gpt": {"batch": 16, "split": "blocks.4", "ns": (2, 4), "measured": 16},
    "resnet50": {"batch": 32, "split": "layer3.0", "ns": (4,), "measured": 8},
}
#: the rows of ``--quick``: one device, the synchronous reference and its peer, and the policies the targets name
QUICK_ROWS = ("gpipe", "peer-gpipe", "pipedream", "timeprest_v", "timeprest_i")


# ---------------------------------------------------------------------------------------------- the models


def build(name: str) -> tuple[Any, Any]:
    """The LightningModule and its network (the module the peer pipelines)."""
    sys.path.insert(0, str(ROOT))
    if name == "mlp":  # 8 Linear layers 1024 wide
        from examples.spirals import SpiralClassifier

        module = SpiralClassifier(num_features=16, num_classes=5, width=1024, depth=8)
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


def pin(rank: int, args: argparse.Namespace) -> None:
    """Give this process core ``rank`` of ``--cores`` (as a stage owns its accelerator) and ``--threads`` threads."""
    if args.accelerator == "cpu":
        pin_to_core(rank, args.cores, args.threads)


# ---------------------------------------------------------------------------------------------- the workers


def worker(args: argparse.Namespace) -> None:
    """One row with the strategy (or one device): Lightning's launcher starts the other ranks."""
    import torch
    from lightning.pytorch import Callback, Trainer, seed_everything
    from torch.utils.data import DataLoader

    sys.path.insert(0, str(ROOT))
    import lightning_timeprest

    class Measure(Callback):
        """Pins each rank; rank 0's clock for samples/s, and on every rank the stage's busy and wall seconds after
        warm-up, read from the strategy's stage statistics."""

        def __init__(self, warmup: int, steps: int) -> None:
            self.warmup, self.last, self.start, self.stop, self.samples = warmup, steps - 1, 0.0, 0.0, 0
            self.busy, self.wall, self.costs, self.order = 0.0, 0.0, None, None

        def setup(self, trainer, pl_module, stage):  # on every rank, before the model is partitioned
            pin(trainer.local_rank, args)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step in (self.warmup, self.last):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                now = time.perf_counter()
                if trainer.global_step == self.warmup:
                    self.start = now
                else:
                    self.stop = now

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.warmup < trainer.global_step <= self.last:
                self.samples += len(batch[0])

        def on_train_end(self, trainer, pl_module):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            # the steady state: from the end of warm-up to the start of the last step, which (asynchronous
            # policies) drains the pipeline at the end of the epoch; the drain is measured apart, as what the last
            # step took beyond an average step
            self.seconds = self.stop - self.start
            self.drain = time.perf_counter() - self.stop - self.seconds / (self.last - self.warmup)
            # the stage's busy and wall seconds in the steady state, from its records (those behind
            # pipeline/stage{s}/...)
            records = [r for r in getattr(trainer.strategy, "stats", []) if self.warmup <= r.step < self.last]
            self.busy, self.wall = sum(r.busy_s for r in records), sum(r.wall_s for r in records)
            clock = getattr(trainer.strategy, "op_clock", None)
            self.costs = clock.medians() if clock is not None else None
            choice = getattr(trainer.strategy, "order_choice", None)
            if choice is not None:  # the nF1B order run (after calibration): what it was generated from
                order = choice.order
                costs = None if order.costs is None else [order.costs.forward, order.costs.backward, order.costs.step]
                self.order = {"costs": costs, "max_inflight": order.max_inflight, "v": choice.version_difference}

    seed_everything(0)
    spec = MODELS[args.model]
    module, _ = build(args.model)
    measure = Measure(args.warmup, args.steps)
    if args.strategy == "single":
        strategy: Any = "auto"
    else:
        split = spec["split"]
        schedule, _, mode = args.strategy.partition("+")
        options: dict[str, Any] = {"dynamic": True} if mode == "dynamic" else {}
        if mode == "unit":
            options["order"] = "unit"
        if mode.startswith("cap"):  # e.g. timeprest_v+cap3: max_inflight=3
            options["max_inflight"] = int(mode[3:])
        strategy = lightning_timeprest.TiMePReStStrategy(
            schedule=schedule,
            num_microbatches=args.n,
            split_points=[f"model.{split}"] if split else None,
            processes_per_device=args.per_device,
            **options,
        )
    trainer = Trainer(
        strategy=strategy,
        accelerator=args.accelerator,
        devices=args.devices // args.per_device if args.strategy != "single" else 1,
        max_steps=args.steps,
        **QUIET,
        num_sanity_val_steps=0,
        callbacks=[measure],
    )
    data = batches(args.model, spec["batch"], args.steps + 1)
    trainer.fit(module, DataLoader(data, batch_size=None))
    rank = trainer.global_rank
    stage = {"busy": measure.busy, "wall": measure.wall, "costs": measure.costs}
    Path(f"{args.out}.rank{rank}").write_text(json.dumps(stage))
    if trainer.is_global_zero:
        result = {"seconds": measure.seconds, "samples": measure.samples, "order": measure.order}
        result["drain_s"] = measure.drain
        Path(args.out).write_text(json.dumps(result))


def peer_worker(rank: int, args: argparse.Namespace, port: int, out: str) -> None:
    """torch.distributed.pipelining's ScheduleGPipe / Schedule1F1B on the same model and cut, in a bare loop."""
    import torch
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, SplitPoint, pipeline

    sys.path.insert(0, str(ROOT))
    from lightning_timeprest.partition import plan_sequential

    pin(rank, args)
    cuda = args.accelerator == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=args.devices)
    torch.manual_seed(0)
    spec = MODELS[args.model]
    module, net = build(args.model)
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
        Path(out).write_text(json.dumps({"seconds": seconds, "samples": samples, "order": None}))
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- the driver


def run(config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One run of one configuration: samples/s on rank 0 and each stage's busy/wall."""
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
            cmd += ["--steps", str(config["steps"]), "--warmup", str(args.warmup), "--cores", args.cores]
            cmd += ["--threads", str(args.threads), "--accelerator", args.accelerator]
            cmd += ["--per-device", str(args.per_device)]
            done = subprocess.run(cmd, cwd=tmp, env=worker_env(), capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{config} failed:\n{done.stderr[-3000:]}")
            ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(config["devices"])]
            busy = [r["busy"] / r["wall"] if r["wall"] > 0 else None for r in ranks]
            if args.accelerator == "cuda":  # host times of asynchronous CUDA ops: not the stages' compute
                busy = None
        measured = json.loads(out.read_text())
    result = {"samples_per_s": measured["samples"] / measured["seconds"], "busy_fraction": busy}
    result["drain_s"] = measured.get("drain_s")
    if busy is not None and config["strategy"] != "single":
        costs = [r["costs"] for r in ranks]
        result["op_costs"] = costs
        result["order"] = measured["order"]
        result["ideal_busy_fraction"] = ideal(config, costs, measured["order"])
    print(f"  {config['model']:9s} {config['strategy']:20s} N={config['n']}: {result['samples_per_s']:.0f} samples/s")
    return result


def ideal(config: dict[str, Any], measured: list[list[float] | None], order: dict[str, Any] | None) -> list[float]:
    """Each stage's busy fraction in the op order the row ran, with the op costs measured in that run: the
    schedule's own ideal (transfers free), which the measured busy fraction is compared with. A dynamic row is
    compared with list scheduling on the measured costs (what ordering by arrival would give with no overhead)."""
    sys.path.insert(0, str(ROOT))
    from lightning_timeprest.schedules import (
        NF1BOrder,
        OpCosts,
        build_schedule,
        busy_fractions,
        pipedream_1f1b,
        steady_state,
    )

    w, n, name = config["devices"], config["n"], config["strategy"].partition("+")[0]
    costs = OpCosts(*(tuple(c[i] for c in measured) for i in range(3)))  # type: ignore[index]
    if name in SYNCHRONOUS:
        return busy_fractions(build_schedule(name, w, n), costs=costs)
    if name == "pipedream":
        return busy_fractions(pipedream_1f1b(w, 8 * w + 16), costs=costs)
    assert order is not None
    cap = order["max_inflight"]
    if config["strategy"] == DYNAMIC:
        return list(steady_state(w, n, NF1BOrder(costs, cap), costs)[0])
    generated = None if order["costs"] is None else OpCosts(*(tuple(c) for c in order["costs"]))
    return list(steady_state(w, n, NF1BOrder(generated, cap), costs)[0])


def processes_per_device(stages: int, accelerator: str) -> int:
    """Stages per GPU: 1 with a GPU per stage, else the stages share the GPUs there are (W a multiple of them)."""
    if accelerator != "cuda":
        return 1
    import torch

    gpus = torch.cuda.device_count()
    if gpus == 0:
        raise SystemExit("--accelerator cuda: no GPU here")
    if gpus >= stages:
        return 1
    if stages % gpus:
        raise SystemExit(f"W = {stages} stages cannot share {gpus} GPUs evenly; use --devices a multiple of {gpus}")
    return stages // gpus


def configurations(models: list[str], w: int, warmup: int, rows: tuple[str, ...]) -> list[dict[str, Any]]:
    """Every row to run, in order: one device, pipedream, then each schedule of ``rows`` at each N."""
    configs = []
    for model in models:
        common = {"model": model, "steps": warmup + MODELS[model]["measured"]}
        configs.append({**common, "strategy": "single", "devices": 1, "n": 1})
        configs.append({**common, "strategy": "pipedream", "devices": w, "n": 1})
        for n in MODELS[model]["ns"]:
            for strategy in rows:
                if strategy != "pipedream":
                    configs.append({**common, "strategy": strategy, "devices": w, "n": n})
    return configs


def median_row(config: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median over the repeats of each figure, with the spread of samples/s."""
    speeds = [r["samples_per_s"] for r in runs]
    row = {**config, "samples_per_s": statistics.median(speeds), "min": min(speeds), "max": max(speeds)}
    row["runs"] = speeds
    row["busy_fraction"] = _stage_medians([r["busy_fraction"] for r in runs])
    row["ideal_busy_fraction"] = _stage_medians([r.get("ideal_busy_fraction") for r in runs])
    row["orders"] = [r.get("order") for r in runs]
    drains = [r["drain_s"] for r in runs if r.get("drain_s") is not None]
    row["drain_s"] = statistics.median(drains) if drains else None
    return row


def _stage_medians(per_run: list[list[float | None] | None]) -> list[float] | None:
    """Per stage, the median over the runs that measured every stage (``None`` if none did)."""
    complete = [values for values in per_run if values and None not in values]
    return [statistics.median(v[s] for v in complete) for s in range(len(complete[0]))] if complete else None


def ratios(rows: list[dict[str, Any]]) -> None:
    """Speed-up over one device, ratio to gpipe with the same N, and to the peer (gpipe and 1f1b: the peer of the
    same schedule; the others: the faster peer), each a ratio of medians. Then the speed-up taken apart:
    ``work`` is the compute the stages do together per sample over one device's (more than 1 where micro-batches
    run less efficiently than whole batches, or ops carry overhead), and ``ideal_speedup`` what the row would reach
    with every stage as busy as its order allows: the sum of the ideal busy fractions over ``work``. The speed-up
    over the ideal one is then the sum of the measured busy fractions over the sum of the ideal ones."""
    speed = {(r["model"], r["strategy"], r["n"]): r["samples_per_s"] for r in rows}
    for r in rows:
        model, n = r["model"], r["n"]
        r["speedup"] = r["samples_per_s"] / speed[(model, "single", 1)]
        ns = MODELS[model]["ns"]
        gpipe = speed.get((model, "gpipe", n)) or speed.get((model, "gpipe", ns[-1]))
        r["vs_gpipe"] = r["samples_per_s"] / gpipe if gpipe and r["strategy"] not in ("single", "gpipe") else None
        if r["strategy"] in SYNCHRONOUS:
            peer = speed.get((model, f"peer-{r['strategy']}", n))
        else:
            peer = max((speed.get((model, p, n)) or 0.0 for p in PEERS), default=0.0)
        r["vs_peer"] = r["samples_per_s"] / peer if peer and r["strategy"] not in ("single", *PEERS) else None
        busy, ideal = r.get("busy_fraction"), r.get("ideal_busy_fraction")
        r["work"] = sum(busy) / r["speedup"] if busy else None
        r["ideal_speedup"] = sum(ideal) / r["work"] if ideal and r["work"] else None
        r["of_ideal"] = r["speedup"] / r["ideal_speedup"] if r["ideal_speedup"] else None


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    machine = machine_info()

    def num(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    def fractions(values: list[float | None] | None) -> str:
        return "-" if not values else ", ".join(num(v) for v in values)

    lines = [
        "| model | schedule | N | samples/s (min-max) | speed-up vs one device | vs gpipe | vs peer | busy/wall per "
        "stage | ideal | work vs one device | ideal speed-up | speed-up / ideal | drain, ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        drain = r.get("drain_s") if r["strategy"] not in ("single", *SYNCHRONOUS) else None
        lines.append(
            f"| {r['model']} | {r['strategy']} | {r['n']} | {r['samples_per_s']:.0f} ({r['min']:.0f}-{r['max']:.0f}) "
            f"| {num(r['speedup'])} | {num(r['vs_gpipe'])} | {num(r['vs_peer'])} "
            f"| {fractions(r.get('busy_fraction'))} | {fractions(r.get('ideal_busy_fraction'))} | {num(r['work'])} "
            f"| {num(r['ideal_speedup'])} | {num(r['of_ideal'])} | {'-' if drain is None else f'{1e3 * drain:.0f}'} |"
        )
    measured = ", ".join(f"{m}: {v['measured']}" for m, v in MODELS.items())
    gpus = machine.get("gpus") if args.accelerator == "cuda" else None
    accelerator = f"cuda ({', '.join(gpus)})" if isinstance(gpus, list) else args.accelerator
    if args.accelerator == "cpu":
        pinning = (
            f"each stage process pinned to its own core ({args.cores}), {args.threads} thread(s) each; one device = "
            f"one process on core {args.cores.split(',')[0]} with {args.threads} thread(s)"
        )
    elif args.per_device == 1:
        pinning = "one GPU per stage; busy fractions not measured (ops are timed on the host, CUDA runs them later)"
    else:
        pinning = (
            f"{args.per_device} stages share each GPU (processes_per_device, activations through host memory): the "
            "speed-ups show how much of the stages' work overlaps on a shared card, not what a GPU per stage gives; "
            "no peers (torch.distributed.pipelining needs a GPU per rank); busy fractions not measured (ops are "
            "timed on the host, CUDA runs them later)"
        )
    lines += [
        "",
        f"Machine: {machine['platform']}, {machine['cpus']} CPUs, torch {machine['torch']}, {accelerator}; "
        f"{pinning}. W = {args.devices}; each row runs {measured} steps after {args.warmup} warm-up steps and is "
        "measured in the steady state, up to the start of its last step (peers: every step after warm-up); medians "
        f"of {args.repeats} interleaved repeats. {ALLOCATOR_NOTE}",
        "",
        "`peer-*`: torch.distributed.pipelining's ScheduleGPipe / Schedule1F1B on the same model and cut, pinned the",
        "same way, in a bare loop (one fixed batch, no Lightning loop, no logging). `vs gpipe`: against gpipe at the",
        "same N (pipedream runs N = 1 and is compared with gpipe at the largest N); `vs peer`: gpipe and 1f1b against",
        "the peer of the same schedule and N, the others against the faster peer. `busy/wall`: each stage's compute",
        "(its forwards, backwards and optimizer steps) over wall time. `ideal`: each stage's busy fraction in the op",
        "order the row ran, with the op times measured in that run (`schedules.busy_fractions` / `steady_state`,",
        "transfers free; dynamic rows: list scheduling on the measured times). `work vs one device`: the stages'",
        "compute per sample, summed, over one device's (speed-up = sum of busy fractions / work). `ideal speed-up`:",
        "the sum of the ideal busy fractions over that work. `pipedream` runs each mini-batch as one micro-batch.",
        f"`{DYNAMIC}`: ops ordered by what has arrived; `{UNIT}`: the paper's unit-slot nF1B grid replayed.",
        "`drain`: what the last step of the epoch took beyond an average step (the asynchronous policies finish",
        "every mini-batch in flight there), once per epoch; the synchronous schedules have none.",
    ]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["model"], r["n"]) for r in rows if r["strategy"] not in ("single", "pipedream")}, key=str)
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [1, 1.4]})
    width = 0.8 / len(groups)
    for k, (model, n) in enumerate(groups):
        speedup = {r["strategy"]: r["speedup"] for r in rows if r["model"] == model and r["n"] == n}
        pipedream = [r["speedup"] for r in rows if r["model"] == model and r["strategy"] == "pipedream"]
        speedup.setdefault("pipedream", pipedream[0] if pipedream else 0.0)
        values = [speedup.get(name, 0.0) for name in ROWS]
        axes[0].bar([i + k * width for i in range(len(ROWS))], values, width, label=f"{model}, N={n}")
    axes[0].set_xticks([i + 0.4 - width / 2 for i in range(len(ROWS))], ROWS, rotation=30, ha="right")
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[0].set_ylabel("speed-up over one device (median; pipedream: N = 1)")
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
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--model", default="mlp", help=argparse.SUPPRESS)
    p.add_argument("--strategy", default="single", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=4, help=argparse.SUPPRESS)
    p.add_argument("--devices", type=int, default=2, help="stages W")
    p.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=24, help="steps before measuring (two calibration drains, 10 each)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats of every row")
    p.add_argument("--threads", type=int, default=1, help="threads per stage and for the one-device reference")
    p.add_argument("--cores", default=None, help="the cores stages are pinned to, e.g. 0,1 (default: all allowed)")
    p.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--per-device", type=int, default=1, help=argparse.SUPPRESS)  # set from the GPUs there are
    p.add_argument("--models", nargs="*", help="only these models (mlp, gpt, resnet50)")
    p.add_argument("--only", nargs="*", help="only these rows (as in the table; single and pipedream always run)")
    p.add_argument("--tag", default="throughput", help="the name of the result files")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    os.environ.update(ALLOCATOR)  # inherited by every worker and peer process
    args.cores = args.cores or ",".join(map(str, sorted(os.sched_getaffinity(0))))
    if args.accelerator == "cpu" and len(args.cores.split(",")) < args.devices:
        p.error(f"W = {args.devices} stages need as many cores to pin them to; this process may use {args.cores}")
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.per_device = processes_per_device(args.devices, args.accelerator)
    models = args.models or (["mlp"] if args.quick else ["mlp", "gpt", "resnet50"])
    rows = tuple(args.only) if args.only else QUICK_ROWS if args.quick else ROWS
    if args.per_device > 1:  # torch.distributed.pipelining over nccl needs a GPU per rank
        rows = tuple(r for r in rows if r not in PEERS)
    configs = configurations(models, args.devices, args.warmup, rows)
    runs: list[list[dict[str, Any]]] = [[] for _ in configs]
    for repeat in range(args.repeats):
        print(f"repeat {repeat + 1} of {args.repeats}")
        for i, config in enumerate(configs):
            runs[i].append(run(config, args))
    rows = [median_row(c, r) for c, r in zip(configs, runs, strict=True)]
    ratios(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = report(rows, args)
    print(text)
    record = {"machine": machine_info(), "args": {k: v for k, v in vars(args).items() if k != "worker"}, "rows": rows}
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(record, indent=2))
    (RESULTS / f"{args.tag}.md").write_text(text + "\n")
    plot(rows, RESULTS / f"{args.tag}.png")


if __name__ == "__main__":
    main()
