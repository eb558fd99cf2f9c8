"""Throughput of the synchronous pipeline schedules against single-device training of the same model, and
against torch.distributed.pipelining's own GPipe and 1F1B schedules on the same model and split.

Each configuration trains the demo's MLP (``examples/spirals.py``, made deeper and wider so that a step is
not all overhead) for a fixed number of steps in its own ``Trainer.fit``; the time between the end of the
warm-up steps and the end of training on rank 0 gives samples per second. Every configuration runs in the
same invocation on the same machine, and the report gives ratios to single-device training, since absolute
numbers on shared machines are noisy.

    python benchmarks/sync_throughput.py --quick     # a minute or two on 2 CPU cores
    python benchmarks/sync_throughput.py             # more steps, wider model, N in {2, 4, 8}

Writes ``benchmarks/results/sync_throughput.{json,md}``. On CPU, W processes share the machine's cores:
a pipeline cannot beat one device there unless the cores outnumber the stages' threads; the numbers show the
pipeline's overhead (bubble, transfers, Python per micro-batch) rather than a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import machine as machine_info  # noqa: E402  (benchmarks/common.py)
from common import worker_env  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def worker(args: argparse.Namespace) -> None:
    import torch
    from lightning.pytorch import Callback, Trainer, seed_everything
    from torch.utils.data import DataLoader, TensorDataset

    sys.path.insert(0, str(ROOT))
    import lightning_timeprest
    from examples.spirals import SpiralClassifier

    class Clock(Callback):
        def __init__(self, warmup: int) -> None:
            self.warmup, self.start, self.samples = warmup, 0.0, 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == self.warmup:
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step > self.warmup:
                self.samples += len(batch[0])

        def on_train_end(self, trainer, pl_module):
            self.seconds = time.perf_counter() - self.start

    seed_everything(0)
    g = torch.Generator().manual_seed(0)
    n = args.batch_size * (args.steps + 1)
    data = TensorDataset(torch.randn(n, 16, generator=g), torch.randint(0, 5, (n,), generator=g))
    model = SpiralClassifier(num_features=16, num_classes=5, width=args.width, depth=args.depth)
    clock = Clock(args.warmup)
    strategy = (
        "auto"
        if args.strategy == "single"
        else lightning_timeprest.TiMePReStStrategy(schedule=args.strategy, num_microbatches=args.n)
    )
    trainer = Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=args.devices,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[clock],
    )
    trainer.fit(model, DataLoader(data, batch_size=args.batch_size))
    if trainer.is_global_zero:
        Path(args.out).write_text(json.dumps({"seconds": clock.seconds, "samples": clock.samples}))


def peer_worker(rank: int, args: argparse.Namespace, port: int, out: str) -> None:
    """torch.distributed.pipelining's own ScheduleGPipe / Schedule1F1B on the same MLP, split as the strategy
    splits it by parameters, with the optimizer stepped after each ``schedule.step``: the peer in the same run."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    sys.path.insert(0, str(ROOT))
    from examples.spirals import SpiralClassifier
    from lightning_timeprest.partition import plan_sequential

    torch.set_num_threads(1)  # as Lightning's launcher sets for each of its processes
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=args.devices)
    torch.manual_seed(0)
    model = SpiralClassifier(num_features=16, num_classes=5, width=args.width, depth=args.depth)
    plan = plan_sequential("layers", model.layers, args.devices)
    layers = torch.nn.Sequential(*[model.layers[int(n)] for n in plan.layers_of(rank)])
    stage = PipelineStage(layers, rank, args.devices, torch.device("cpu"))
    schedule_class = ScheduleGPipe if args.strategy == "peer-gpipe" else Schedule1F1B
    schedule = schedule_class(stage, n_microbatches=args.n, loss_fn=F.cross_entropy)
    optimizer = torch.optim.AdamW(layers.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(args.batch_size, 16, generator=g), torch.randint(0, 5, (args.batch_size,), generator=g)
    start = 0.0
    for step in range(args.steps):
        if step == args.warmup:
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
    dist.barrier()
    seconds = time.perf_counter() - start
    if rank == 0:
        samples = args.batch_size * (args.steps - args.warmup)
        Path(out).write_text(json.dumps({"seconds": seconds, "samples": samples}))
    dist.destroy_process_group()


def run_peer(config: dict, args: argparse.Namespace) -> dict:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        peer_args = argparse.Namespace(**{**vars(args), "strategy": config["strategy"], "n": config["n"]})
        peer_args.devices = config["devices"]
        mp.spawn(peer_worker, args=(peer_args, port, out), nprocs=config["devices"], join=True)
        measured = json.loads(Path(out).read_text())
    return {**config, **measured, "samples_per_s": measured["samples"] / measured["seconds"]}


def run(config: dict, common: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", "--out", str(out), *common]
        cmd += ["--strategy", config["strategy"], "--devices", str(config["devices"]), "--n", str(config["n"])]
        subprocess.run(cmd, check=True, cwd=tmp, env=worker_env(), capture_output=True, text=True)
        measured = json.loads(out.read_text())
    return {**config, **measured, "samples_per_s": measured["samples"] / measured["seconds"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--strategy", default="single", help=argparse.SUPPRESS)
    p.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=4, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--depth", type=int, default=8)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    steps = args.steps or (30 if args.quick else 120)
    width = args.width or (256 if args.quick else 512)
    common = ["--steps", str(steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size)]
    common += ["--width", str(width), "--depth", str(args.depth)]
    configs = [{"strategy": "single", "devices": 1, "n": 1}]
    for n in [4] if args.quick else [2, 4, 8]:
        configs += [{"strategy": s, "devices": 2, "n": n} for s in ("gpipe", "1f1b", "peer-gpipe", "peer-1f1b")]
    args.steps, args.width = steps, width
    rows = [run_peer(c, args) if c["strategy"].startswith("peer-") else run(c, common) for c in configs]
    base = rows[0]["samples_per_s"]
    for row in rows:
        row["ratio_to_single_device"] = row["samples_per_s"] / base

    machine = machine_info()
    report = {"machine": machine, "model": {"width": width, "depth": args.depth}, "steps": steps, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sync_throughput.json").write_text(json.dumps(report, indent=2))
    lines = [
        "| schedule | stages | micro-batches | samples/s | ratio to one device |",
        "|---|---|---|---|---|",
        *(
            f"| {r['strategy']} | {r['devices']} | {r['n']} | {r['samples_per_s']:.0f} "
            f"| {r['ratio_to_single_device']:.2f} |"
            for r in rows
        ),
        "",
        f"Machine: {machine['platform']}, {machine['cpus']} CPUs, torch {machine['torch']}; MLP width {width}, "
        f"depth {args.depth}, batch {args.batch_size}, {steps} steps after {args.warmup} warm-up steps.",
        "",
        "`peer-*`: torch.distributed.pipelining's ScheduleGPipe / Schedule1F1B on the same MLP and split, in a",
        "bare loop (one fixed batch, no Lightning loop, no logging, no data loader); the strategy's rows include",
        "Lightning's loop, the batch sent from stage 0 to the last stage and the logged values sent to every rank.",
    ]
    (RESULTS / "sync_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
