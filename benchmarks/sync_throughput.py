"""Throughput of the synchronous pipeline schedules against single-device training of the same model.

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
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
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


def run(config: dict, common: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", "--out", str(out), *common]
        cmd += ["--strategy", config["strategy"], "--devices", str(config["devices"]), "--n", str(config["n"])]
        env = {k: v for k, v in os.environ.items() if k not in {"MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK"}}
        subprocess.run(cmd, check=True, cwd=tmp, env=env, capture_output=True, text=True)
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
        configs += [{"strategy": s, "devices": 2, "n": n} for s in ("gpipe", "1f1b")]
    rows = [run(c, common) for c in configs]
    base = rows[0]["samples_per_s"]
    for row in rows:
        row["ratio_to_single_device"] = row["samples_per_s"] / base
    import torch

    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
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
    ]
    (RESULTS / "sync_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
