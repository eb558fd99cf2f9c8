"""Staleness and weight versions of the asynchronous policies, per stage, for several (W, N).

For each policy and (W, N), the demo's MLP trains for a number of steps under the real engine (W processes over
gloo), and every backward's degree of staleness ``d`` (SPEC: optimizer steps the stage has taken when the backward
runs, minus the version its forward used) is collected on every stage, with the weight versions each stage held
at most. Beside the measured numbers: the ``d`` of the op order each stream actually ran (``schedules.staleness``
of the recorded order, for the policies whose forwards read the live weights), which static replay must meet
exactly, and the ``d`` of the paper's unit-slot grid for the same (W, N): the difference the cost-aware order
makes. The order is the strategy's default: generated from the op costs measured at setup and re-derived from
the first steps' (a drain after them, so a run has two streams).

    python benchmarks/staleness.py --quick     # W in {2, 3, 4}, a few minutes on 2 CPU cores
    python benchmarks/staleness.py             # W up to 6, N up to 4, static and dynamic replay

Writes ``benchmarks/results/staleness.{json,md,png}`` with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import QUIET, worker_env  # noqa: E402
from common import machine as machine_info  # noqa: E402  (benchmarks/common.py)

RESULTS = ROOT / "benchmarks" / "results"
POLICIES = ("timeprest_v", "timeprest", "timeprest_i", "pipedream")


def worker(args: argparse.Namespace) -> None:
    import torch
    from lightning.pytorch import Callback, Trainer, seed_everything
    from torch.utils.data import DataLoader, TensorDataset

    sys.path.insert(0, str(ROOT))
    import lightning_timeprest
    from examples.spirals import SpiralClassifier

    class Collect(Callback):
        """Keeps every backward's d on this stage (``strategy.stats``: one record per step) and the op order each
        stream ran (``strategy.trace``)."""

        def __init__(self) -> None:
            self.staleness: list[int] = []
            self.versions_held = 0
            self.orders: list[list] = []

        def on_train_end(self, trainer, pl_module):
            strategy = trainer.strategy
            self.staleness = [d for stats in strategy.stats for d in stats.staleness]
            self.versions_held = max((stats.versions_held for stats in strategy.stats), default=0)
            self.orders = [[(e.op.kind.value, e.op.minibatch, e.op.microbatch) for e in t] for t in strategy.trace if t]
            choice = strategy.order_choice
            self.order = choice.describe() if choice is not None else "PipeDream's 1F1B"

    seed_everything(0)
    g = torch.Generator().manual_seed(0)
    n = args.batch_size * args.steps
    data = TensorDataset(torch.randn(n, 16, generator=g), torch.randint(0, 5, (n,), generator=g))
    model = SpiralClassifier(num_features=16, num_classes=5, width=64, depth=max(4, args.devices + 1))
    collect = Collect()
    strategy = lightning_timeprest.TiMePReStStrategy(
        schedule=args.policy, num_microbatches=None if args.policy == "pipedream" else args.n, dynamic=args.dynamic
    )
    trainer = Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=args.devices,
        max_epochs=1,
        **QUIET,
        callbacks=[collect],
    )
    trainer.fit(model, DataLoader(data, batch_size=args.batch_size))
    stage = trainer.strategy.stage
    out = {"stage": stage, "staleness": collect.staleness, "versions_held": collect.versions_held}
    out |= {"ran": collect.orders, "order": collect.order}
    Path(f"{args.out}.stage{stage}").write_text(json.dumps(out))


def order_staleness(stages: list[dict], n: int) -> list[list[int]]:
    """d of the op orders the streams ran (forwards reading the live weights), per stage, streams one after the
    other."""
    from lightning_timeprest.schedules import Op, OpKind, Schedule, staleness

    w = len(stages)
    out: list[list[int]] = [[] for _ in range(w)]
    for stream in range(len(stages[0]["ran"])):
        ops = tuple(tuple(Op(OpKind(k), m, j) for k, m, j in stage["ran"][stream]) for stage in stages)
        for s, ds in enumerate(staleness(Schedule("ran", w, n, ops, synchronous=False))):
            out[s] += ds
    return out


def grid_staleness(w: int, n: int, minibatches: int) -> list[list[int]]:
    """d of the paper's unit-slot grid (or PipeDream's 1F1B for ``n == 0``), per stage."""
    from lightning_timeprest.schedules import nf1b, pipedream_1f1b, staleness

    return staleness(pipedream_1f1b(w, minibatches) if n == 0 else nf1b(w, n, minibatches))


def run(config: dict, steps: int, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result"
        cmd = [sys.executable, __file__, "--worker", "--out", str(out), "--steps", str(steps)]
        cmd += ["--batch-size", str(batch_size), "--policy", config["policy"], "--devices", str(config["w"])]
        cmd += ["--n", str(config["n"])] + (["--dynamic"] if config["dynamic"] else [])
        proc = subprocess.run(cmd, cwd=tmp, env=worker_env(), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{config} failed:\n{proc.stderr[-3000:]}")
        stages = sorted((json.loads(p.read_text()) for p in Path(tmp).glob("result.stage*")), key=lambda r: r["stage"])
    return {**config, "stages": stages}


def summary(values: list[int]) -> dict:
    if not values:
        return {"mean": 0.0, "max": 0, "histogram": {}}
    return {
        "mean": sum(values) / len(values),
        "max": max(values),
        "histogram": {str(d): c for d, c in sorted(Counter(values).items())},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--policy", default="timeprest_v", help=argparse.SUPPRESS)
    p.add_argument("--devices", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--dynamic", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    quick = args.quick
    steps = args.steps or (16 if quick else 48)
    configs = []
    for w in (2, 3, 4) if quick else (2, 3, 4, 6):
        for n in (2, 3) if quick else (1, 2, 3, 4):
            for policy in ("timeprest_v", "timeprest", "timeprest_i"):
                for dynamic in (False,) if quick else (False, True):
                    configs.append({"policy": policy, "w": w, "n": n, "dynamic": dynamic})
        configs.append({"policy": "pipedream", "w": w, "n": 1, "dynamic": False})
    rows = []
    for config in configs:
        result = run(config, steps, args.batch_size)
        n = 1 if config["policy"] == "pipedream" else config["n"]
        expected = order_staleness(result["stages"], n)
        grid = grid_staleness(config["w"], 0 if config["policy"] == "pipedream" else n, steps)
        live = config["policy"] != "timeprest"  # vertical sync reads stage 0's version, not the live one
        for stage in result["stages"]:
            s = stage["stage"]
            rows.append(
                {
                    **config,
                    "stage": s,
                    "measured": summary(stage["staleness"]),
                    "order_run": summary(expected[s]) if live else None,
                    "paper_grid": summary(grid[s]) if live else None,
                    "versions_held": stage["versions_held"],
                    "order": stage["order"],
                }
            )
        print(f"done: {config}: {result['stages'][0]['order']}", flush=True)

    machine = machine_info()
    report = {"machine": machine, "steps": steps, "batch_size": args.batch_size, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "staleness.json").write_text(json.dumps(report, indent=2))
    lines = [
        "| policy | W | N | replay | stage | mean d | max d | d histogram (d: count) | the order run: mean d, max "
        "| the paper's grid: mean d, max | versions held |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def mean_max(x: dict | None) -> str:
        return f"{x['mean']:.2f}, {x['max']}" if x else "-"

    for r in rows:
        hist = ", ".join(f"{d}: {c}" for d, c in r["measured"]["histogram"].items())
        lines.append(
            f"| {r['policy']} | {r['w']} | {r['n']} | {'dynamic' if r['dynamic'] else 'static'} | {r['stage']} "
            f"| {r['measured']['mean']:.2f} | {r['measured']['max']} | {hist} | {mean_max(r['order_run'])} "
            f"| {mean_max(r['paper_grid'])} | {r['versions_held']} |"
        )
    orders = {(r["policy"], r["w"], r["n"], r["dynamic"]): r["order"] for r in rows}
    lines += [
        "",
        f"Machine: {machine['platform']}, {machine['cpus']} CPUs, torch {machine['torch']}; the demo's MLP, "
        f"{steps} steps of batch {args.batch_size} per configuration (one epoch: a stream until the drain that "
        "re-derives the order from the first steps' op costs, then a stream to the epoch's end). The paper's grid "
        "column is the same number of mini-batches in one stream of the unit-slot grid.",
        "",
        "The orders run (the second stream's):",
        "",
        *(f"- {p} W={w} N={n}{' dynamic' if d else ''}: {o}" for (p, w, n, d), o in orders.items()),
    ]
    (RESULTS / "staleness.md").write_text("\n".join(lines) + "\n")
    plot(rows, RESULTS / "staleness.png")
    print("\n".join(lines))


def plot(rows: list[dict], path: Path) -> None:
    """Mean d per stage, one panel per policy, one line per (W, N) (static replay)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(POLICIES), figsize=(4 * len(POLICIES), 3.4), sharey=True)
    for ax, policy in zip(axes, POLICIES, strict=True):
        keys = sorted({(r["w"], r["n"]) for r in rows if r["policy"] == policy and not r["dynamic"]})
        for w, n in keys:
            points = sorted(
                (r["stage"], r["measured"]["mean"], r["versions_held"])
                for r in rows
                if (r["policy"], r["w"], r["n"], r["dynamic"]) == (policy, w, n, False)
            )
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"W={w}, N={n}")
        ax.set_title(policy)
        ax.set_xlabel("stage")
        ax.set_xticks(range(max((w for w, _ in keys), default=1)))
        ax.legend(fontsize=7)
    axes[0].set_ylabel("mean degree of staleness d")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
