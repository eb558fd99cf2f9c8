"""Memory per stage and policy: peak RSS growth (CPU), peak CUDA allocation (GPU), weight versions held and their
bytes, activations in flight.

For each schedule (gpipe, 1f1b, pipedream, timeprest, timeprest_v, timeprest_i), W and N, the demo's MLP
(``examples/spirals.py``, made wide, with a large batch, so that weights and activations stand out from the
process's baseline) trains for a number of steps under the real strategy, W processes over gloo. Every rank
measures its own stage and writes its own file; the numbers are:

* **peak RSS growth**: after the warm-up steps (the pipeline is full and the optimizer state exists) the rank
  resets the kernel's peak-RSS mark (``5`` written to ``/proc/self/clear_refs``) and reads its RSS; at the end of
  training, after the final drain, it reads the peak (``VmHWM``) and the RSS again. The growth is the peak over
  the stage's resident memory with nothing in flight (the lower of the two RSS readings: an asynchronous stage
  already holds activations and stashed versions of earlier mini-batches at the reset, a drained one none),
  i.e. what training holds beyond the weights and the optimizer state: activations in flight, gradients,
  stashed weight versions, transfer buffers. Where ``clear_refs`` is not writable the lifetime peak
  (``VmHWM`` unreset, or ``getrusage`` without procfs) is used and the report says so: it is the window's peak
  only if it rose during the window (``rss_peak_exact``), else an upper bound. The workers run with
  ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB: glibc then serves every large tensor with its own mapping and gives
  it back on free, so RSS follows the live tensors. Without it glibc raises that threshold as large blocks are
  freed and keeps freed heap memory, so the warm-up's freed tensors would be reused unseen in the window and the
  drained RSS would keep them (the growth would be a lower bound).
* **peak CUDA allocation** (``--accelerator cuda``): ``torch.cuda.max_memory_allocated`` of the rank's device from
  the same reset to the end, absolute (weights and optimizer state included); n/a on CPU.
* **weight versions held and their bytes**: the asynchronous engine's per-step statistics (``StepStats``: live
  weights plus stashed copies plus a temporary intermediate weight), max over the run; a synchronous stage holds
  one version, its own parameters.
* **activations in flight**: the largest number of micro-batches whose forward ran and whose backward has not,
  in the op order the stage ran (``Schedule.max_forwards_in_flight``; for the nF1B policies the order generated
  from the measured op costs, recorded by the engine), times the bytes one micro-batch keeps on that stage, measured on
  the rank in every training forward: the tensors autograd saves inside the stage's layers
  (``saved_tensors_hooks``; the weights excluded) plus the stage's input and output. The count the run actually
  reached (forwards minus gradients that came back through the stage's output) is reported beside it.

The JSON also gives, per stage, the RSS growth beyond what these counts account for (the extra weight versions,
the activations in flight and one gradient buffer): transient memory such as optimizer temporaries, gradients
accumulated over micro-batches and the copies a backward on other weights makes.

Several fits share one launch (one per W; one Trainer per fit in the same processes) to amortise process
start-up. Each measurement is relative to the fit's own drained RSS and peak reset, so what earlier fits left
resident (Python objects, glibc's small-block arenas: kept, not given back) is part of the baseline and not of
the growth; a fit repeated at the end of a launch measured within 0.2 MiB of its first run.

    python benchmarks/memory.py --quick      # W in {2, 3}, N in {2, 4}: about 2 minutes on 2 CPU cores
    python benchmarks/memory.py              # W in {2, 3, 4}, N in {2, 4, 8}, a wider MLP, more steps
    python benchmarks/memory.py --accelerator cuda   # peak CUDA allocation too (stages share a GPU if few)

Writes ``benchmarks/results/memory.{json,md,png}`` with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import re
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

RESULTS = ROOT / "benchmarks" / "results"
SYNCHRONOUS = ("gpipe", "1f1b")
ASYNCHRONOUS = ("timeprest_v", "timeprest", "timeprest_i", "pipedream")
POLICIES = SYNCHRONOUS + ASYNCHRONOUS
MIB = 2**20


# -- measuring, on each rank ------------------------------------------------------------------------------------


def rss_kib() -> dict[str, int]:
    """This process's resident memory (``VmRSS``) and its peak since the last reset (``VmHWM``), in KiB."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:  # no procfs: psutil for the RSS, getrusage for the lifetime peak
        import resource

        import psutil

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux
        return {"VmRSS": psutil.Process().memory_info().rss // 1024, "VmHWM": peak}
    return {k: int(re.search(rf"^{k}:\s+(\d+)", status, re.M).group(1)) for k in ("VmRSS", "VmHWM")}


def reset_peak_rss() -> str:
    """Restart the kernel's peak-RSS mark; return how the peak is read: ``clear_refs`` (the window's own peak) or
    ``lifetime`` (nothing could be reset: ``VmHWM`` unreset, or ``getrusage`` without procfs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return "clear_refs"
    except OSError:
        return "lifetime"


def make_probe(warmup: int) -> Any:
    """The callback that measures this rank's stage, resetting the peaks at the start of step ``warmup``."""
    import torch
    from lightning.pytorch import Callback
    from torch.utils import _pytree as pytree

    def float_tensors(value: Any) -> list[torch.Tensor]:
        return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor) and t.is_floating_point()]

    class MemoryProbe(Callback):
        def __init__(self) -> None:
            self.warmup = warmup
            self.measuring = False
            self.activation_bytes = 0  # per micro-batch forward, max
            self.in_flight = 0
            self.peak_in_flight = 0
            self.method = "none"
            self.rss_at_reset_kib = self.peak_at_reset_kib = 0
            self.result: dict[str, Any] = {}

        def on_train_start(self, trainer, pl_module):
            strategy = trainer.strategy
            self.device = strategy.root_device
            self.strategy = strategy
            params = [p for p in pl_module.parameters() if not p.is_meta]
            self.param_bytes = sum(p.numel() * p.element_size() for p in params)
            runner = strategy.stage_runner
            run_layers = runner.run_layers
            runner.run_layers = lambda x: self.forward(run_layers, x)

        def forward(self, run_layers: Any, x: Any) -> Any:
            """One micro-batch through the stage's layers: count what it keeps for its backward."""
            if not torch.is_grad_enabled():
                return run_layers(x)
            # every weight version the stage holds (a forward may read a stashed one): not activations
            weights = {t.untyped_storage().data_ptr() for t in self.strategy.held_weights()}
            kept: dict[tuple[int, int, torch.dtype], int] = {}

            def keep(t: torch.Tensor) -> None:
                if t.untyped_storage().data_ptr() not in weights:
                    kept[(t.data_ptr(), t.numel(), t.dtype)] = t.numel() * t.element_size()

            def pack(t: torch.Tensor) -> torch.Tensor:
                keep(t)
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = run_layers(x)
            for t in [*float_tensors(x), *float_tensors(out)]:
                keep(t)
            self.activation_bytes = max(self.activation_bytes, sum(kept.values()))
            grads = [t for t in float_tensors(out) if t.requires_grad]
            if grads:  # in flight until a gradient comes back through the output
                self.in_flight += 1
                self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
                grads[0].register_hook(self.backward_arrived)
            return out

        def backward_arrived(self, grad: torch.Tensor) -> None:
            self.in_flight -= 1

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx != self.warmup:
                return
            self.method = reset_peak_rss()
            at_reset = rss_kib()
            self.rss_at_reset_kib, self.peak_at_reset_kib = at_reset["VmRSS"], at_reset["VmHWM"]
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
            self.measuring = True

        def on_train_end(self, trainer, pl_module):
            if not self.measuring:
                raise RuntimeError(f"training ended before the warm-up of {self.warmup} steps was over")
            now = rss_kib()  # after the final drain: nothing in flight
            baseline_kib = min(self.rss_at_reset_kib, now["VmRSS"])
            cuda_peak = None
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                cuda_peak = torch.cuda.max_memory_allocated(self.device)
            in_flight_order = None
            if self.strategy.is_asynchronous:
                stats = self.strategy.stats
                versions = max(s.versions_held for s in stats)
                weight_bytes = max(s.weight_bytes for s in stats)
                n = self.strategy.num_microbatches
                in_flight_order = max(order_in_flight([e.op for e in t], n) for t in self.strategy.trace if t)
            else:
                versions, weight_bytes = 1, self.param_bytes
            self.result = {
                "stage": trainer.strategy.stage,
                "rss_method": self.method,
                "rss_at_reset_bytes": self.rss_at_reset_kib * 1024,
                "rss_at_end_bytes": now["VmRSS"] * 1024,
                "rss_peak_growth_bytes": (now["VmHWM"] - baseline_kib) * 1024,
                # a lifetime peak is the window's own only if it rose in the window; else an upper bound
                "rss_peak_exact": self.method == "clear_refs" or now["VmHWM"] > self.peak_at_reset_kib,
                "cuda_peak_bytes": cuda_peak,
                "param_bytes": self.param_bytes,
                "versions_held": versions,
                "weight_bytes": weight_bytes,
                "activation_bytes_per_microbatch": self.activation_bytes,
                "in_flight_measured": self.peak_in_flight,
                "in_flight_order": in_flight_order,  # of the op order this stage ran (asynchronous)
            }

    return MemoryProbe()


def worker(args: argparse.Namespace) -> None:
    """Every fit of this launch (one W), one after the other in the same processes; each rank writes its files."""
    import gc

    import torch
    from lightning.pytorch import Trainer, seed_everything
    from torch.utils.data import DataLoader, TensorDataset

    sys.path.insert(0, str(ROOT))
    import lightning_timeprest
    from examples.spirals import SpiralClassifier

    w = args.devices
    devices, per_device = w, 1
    if args.accelerator == "cuda" and torch.cuda.device_count() < w:
        devices, per_device = 1, w  # the stages share GPU 0 (each process has its own allocator and peak)
    for i, config in enumerate(json.loads(args.configs)):
        seed_everything(0)
        g = torch.Generator().manual_seed(0)
        n = args.batch_size * (args.warmup + args.steps)
        data = TensorDataset(torch.randn(n, 16, generator=g), torch.randint(0, 5, (n,), generator=g))
        model = SpiralClassifier(num_features=16, num_classes=5, width=args.width, depth=args.depth)
        probe = make_probe(args.warmup)
        strategy = lightning_timeprest.TiMePReStStrategy(
            schedule=config["policy"],
            num_microbatches=None if config["policy"] == "pipedream" else config["n"],
            processes_per_device=per_device,
        )
        trainer = Trainer(
            strategy=strategy,
            accelerator=args.accelerator,
            devices=devices,
            max_epochs=1,
            **QUIET,
            num_sanity_val_steps=0,
            callbacks=[probe],
        )
        start = time.perf_counter()
        trainer.fit(model, DataLoader(data, batch_size=args.batch_size))
        result = {**probe.result, "fit_s": time.perf_counter() - start}
        Path(f"{args.out}.{i}.stage{result['stage']}").write_text(json.dumps(result))
        del trainer, strategy, model, probe, data
        gc.collect()


def run(w: int, configs: list[dict], args: argparse.Namespace, warmup: int) -> list[dict]:
    """One launch for all ``configs`` of ``w`` stages; their results, one entry per stage."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result"
        cmd = [sys.executable, __file__, "--worker", "--out", str(out), "--devices", str(w)]
        cmd += ["--configs", json.dumps(configs), "--steps", str(args.steps), "--warmup", str(warmup)]
        cmd += ["--batch-size", str(args.batch_size), "--width", str(args.width), "--depth", str(args.depth)]
        cmd += ["--accelerator", args.accelerator]
        env = {**worker_env(), "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"W={w} failed:\n{proc.stderr[-3000:]}")
        rows = []
        for i, config in enumerate(configs):
            stages = [json.loads(p.read_text()) for p in Path(tmp).glob(f"result.{i}.stage*")]
            if len(stages) != w:
                raise RuntimeError(f"{config}: {len(stages)} stage results for W={w}")
            rows += [{**config, "w": w, "warmup": warmup, **s} for s in sorted(stages, key=lambda r: r["stage"])]
    return rows


def order_in_flight(ops: list[Any], n: int) -> int:
    """The most micro-batches whose forward ran and whose backward has not, in one stage's op order."""
    from lightning_timeprest.schedules import Schedule

    return Schedule("ran", 1, n, (tuple(ops),), synchronous=False).max_forwards_in_flight(0)


def scheduled_in_flight(policy: str, w: int, n: int, minibatches: int) -> list[int]:
    """Per stage, the schedule's largest number of micro-batches whose forward ran and whose backward has not."""
    from lightning_timeprest.schedules import build_schedule

    schedule = build_schedule(policy, w, 1 if policy == "pipedream" else n, minibatches)
    return [schedule.max_forwards_in_flight(s) for s in range(w)]


def configurations(quick: bool) -> dict[int, list[dict]]:
    """The (policy, N) fits of each W; pipedream once per W (N = 1)."""
    by_w: dict[int, list[dict]] = {}
    for w in (2, 3) if quick else (2, 3, 4):
        configs = []
        for n in (2, 4) if quick else (2, 4, 8):
            for policy in (p for p in POLICIES if p != "pipedream"):
                configs.append({"policy": policy, "n": n})
        configs.append({"policy": "pipedream", "n": 1})
        by_w[w] = configs
    return by_w


# -- the report -------------------------------------------------------------------------------------------------


def mib(value: float | None) -> str:
    return "n/a" if value is None or value < 0 else f"{value / MIB:.1f}"


def groups(rows: list[dict]) -> list[tuple[int, int]]:
    """The (W, N) of the nF1B and synchronous fits (pipedream, N = 1, joins each group of its W)."""
    return sorted({(r["w"], r["n"]) for r in rows if r["policy"] != "pipedream"})


def in_group(rows: list[dict], w: int, n: int) -> list[dict]:
    return [r for r in rows if r["w"] == w and (r["n"] == n or r["policy"] == "pipedream")]


def per_policy(rows: list[dict], key: str) -> dict[str, float]:
    """Per policy, the largest value of ``key`` over its stages (the stage that needs the most)."""
    out: dict[str, float] = {}
    for r in rows:
        out[r["policy"]] = max(out.get(r["policy"], float("-inf")), r[key])
    return out


def findings(rows: list[dict]) -> list[str]:
    """Which policy needs the least memory per stage, from the numbers."""
    lines = []
    least_versions = least_rss = compared = 0
    for w, n in groups(rows):
        group = in_group(rows, w, n)
        rss = per_policy(group, "rss_peak_growth_bytes")
        versions = per_policy(group, "versions_held")
        weights = per_policy(group, "weight_bytes")
        flight = per_policy(group, "activations_in_flight_bytes")
        asynchronous = [p for p in ASYNCHRONOUS if p in rss]
        best_rss = min(rss, key=rss.get)
        best_async_rss = min(asynchronous, key=rss.get)
        fewest = min(versions[p] for p in asynchronous)
        holders = [p for p in asynchronous if versions[p] == fewest]
        most = max(asynchronous, key=versions.get)
        if len(holders) == len(asynchronous):
            held = f"every asynchronous policy holds at most {fewest} weight versions on a stage"
        else:
            held = (
                f"fewest weight versions among the asynchronous policies: {', '.join(holders)} ({fewest}; most: "
                f"{most}, {versions[most]}, {mib(weights[most])} MiB)"
            )
        lines.append(
            f"- W={w}, N={n}: lowest peak RSS growth on the most loaded stage: {best_rss} "
            f"({mib(rss[best_rss])} MiB; highest {max(rss, key=rss.get)}, {mib(max(rss.values()))} MiB); among the "
            f"asynchronous policies {best_async_rss} ({mib(rss[best_async_rss])} MiB); {held}; fewest activation "
            f"bytes in flight: {min(flight, key=flight.get)} ({mib(min(flight.values()))} MiB; most: "
            f"{max(flight, key=flight.get)}, {mib(max(flight.values()))} MiB)."
        )
        if "timeprest_v" in asynchronous:
            compared += 1
            least_versions += versions["timeprest_v"] == fewest
            least_rss += best_async_rss == "timeprest_v"
    beyond = []
    for kind, names in (("synchronous", SYNCHRONOUS), ("asynchronous", ASYNCHRONOUS)):
        values = sorted(r["rss_beyond_counted_bytes"] for r in rows if r["policy"] in names)
        if values:
            beyond.append(
                f"{statistics.median(values) / MIB:.1f} MiB for the {kind} policies (from {values[0] / MIB:.1f} "
                f"to {values[-1] / MIB:.1f})"
            )
    lines.append(
        "- Peak RSS growth beyond what the counts account for (the extra weight versions, the activations in flight "
        f"and one gradient buffer), median per stage: {'; '.join(beyond)}. That is transient memory the counts do "
        "not cover: optimizer temporaries, gradients accumulated across micro-batches, copies made for a backward "
        "on other weights, transfer buffers."
    )
    agree = sum(r["in_flight_measured"] == r["in_flight_schedule"] for r in rows)
    lines.append(
        f"- The micro-batches in flight the runs reached equal the schedule's count in {agree} of {len(rows)} stages."
    )
    if compared:
        lines.append(
            f"- timeprest_v held the fewest weight versions of the asynchronous policies (ties included) in "
            f"{least_versions} of "
            f"{compared} (W, N) configurations where it runs, and had the lowest peak RSS growth of them (most "
            f"loaded stage) in {least_rss} of {compared}."
        )
    return lines


def report(rows: list[dict], args: argparse.Namespace, wall_s: float) -> None:
    machine = machine_info()
    methods = sorted({r["rss_method"] for r in rows})
    report = {
        "machine": machine,
        "model": {"name": "SpiralClassifier", "width": args.width, "depth": args.depth},
        "accelerator": args.accelerator,
        "batch_size": args.batch_size,
        "warmup": args.warmup or "W + 2",
        "steps": args.steps,
        "rss_method": methods,
        "malloc_mmap_threshold": 64 * 1024,
        "wall_s": wall_s,
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory.json").write_text(json.dumps(report, indent=2))
    lines = [
        "| policy | W | N | stage | peak RSS growth (MiB) | peak CUDA (MiB) | versions held | weight versions (MiB) "
        "| activations in flight: schedule (measured) | MiB per micro-batch | activations in flight (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['w']} | {r['n']} | {r['stage']} | {mib(r['rss_peak_growth_bytes'])} "
            f"| {mib(r['cuda_peak_bytes'])} | {r['versions_held']} | {mib(r['weight_bytes'])} "
            f"| {r['in_flight_schedule']} ({r['in_flight_measured']}) | {mib(r['activation_bytes_per_microbatch'])} "
            f"| {mib(r['activations_in_flight_bytes'])} |"
        )
    inexact = sum(not r["rss_peak_exact"] for r in rows)
    rss_note = (
        "peak RSS from `/proc/self/status` VmHWM after resetting it through `/proc/self/clear_refs`"
        if methods == ["clear_refs"]
        else "`clear_refs` was not writable: peak RSS is the process's lifetime peak (VmHWM unreset, or getrusage "
        f"without procfs), the window's own only where it rose in the window; an upper bound in {inexact} of "
        f"{len(rows)} rows"
    )
    lines += [
        "",
        *findings(rows),
        "",
        f"Machine: {machine['platform']}, {machine['cpus']} CPUs, torch {machine['torch']}, accelerator "
        f"{args.accelerator}; the demo's MLP, width {args.width}, depth {args.depth}, batch {args.batch_size}, "
        f"{args.warmup or 'W + 2'} warm-up steps then {args.steps} measured steps per fit (one epoch, drained at its "
        "end). Growth: the peak RSS from the end of the warm-up to the end of training (after the final drain), "
        f"minus the stage's RSS with nothing in flight (the lower of the RSS at those two points); {rss_note}; "
        "glibc's mmap threshold fixed at 64 KiB. pipedream runs each mini-batch as one unit (N = 1), so its "
        "micro-batch is the whole batch. Activations in flight (MiB) = the schedule's count x the bytes of one "
        "micro-batch measured on the stage (saved tensors without the weights, the stage's input and output).",
    ]
    (RESULTS / "memory.md").write_text("\n".join(lines) + "\n")
    plot(rows, RESULTS / "memory.png")
    print("\n".join(lines))


def plot(rows: list[dict], path: Path) -> None:
    """Peak RSS growth (top) and weight-version bytes (bottom) per stage, one bar per policy, one panel per (W, N)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = groups(rows)
    fig, axes = plt.subplots(2, len(keys), figsize=(4.2 * len(keys), 6.4), squeeze=False)
    width = 0.8 / len(POLICIES)
    for col, (w, n) in enumerate(keys):
        group = in_group(rows, w, n)
        for row, (key, label) in enumerate(
            [("rss_peak_growth_bytes", "peak RSS growth (MiB)"), ("weight_bytes", "weight versions (MiB)")]
        ):
            ax = axes[row][col]
            for k, policy in enumerate(POLICIES):
                points = sorted((r["stage"], r[key] / MIB) for r in group if r["policy"] == policy)
                if points:
                    name = f"{policy} (N=1)" if policy == "pipedream" else policy
                    offsets = [s + (k - (len(POLICIES) - 1) / 2) * width for s, _ in points]
                    ax.bar(offsets, [v for _, v in points], width, label=name, color=f"C{k}")
            ax.set_xticks(range(w))
            ax.set_xlabel("stage")
            if col == 0:
                ax.set_ylabel(label)
            if row == 0:
                ax.set_title(f"W={w}, N={n}")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--configs", help=argparse.SUPPRESS)
    p.add_argument("--devices", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=None, help="measured steps after the warm-up")
    p.add_argument("--warmup", type=int, default=None, help="steps before the reset (default W + 2: pipeline full)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--depth", type=int, default=8)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    args.steps = args.steps or (6 if args.quick else 16)
    args.width = args.width or (1024 if args.quick else 2048)
    start = time.perf_counter()
    rows = []
    for w, configs in configurations(args.quick).items():
        launch = time.perf_counter()
        warmup = args.warmup or w + 2
        for r in run(w, configs, args, warmup):
            flight = r["in_flight_order"]
            if flight is None:  # a synchronous schedule
                flight = scheduled_in_flight(r["policy"], w, r["n"], warmup + args.steps)[r["stage"]]
            r["in_flight_schedule"] = flight
            r["activations_in_flight_bytes"] = flight * r["activation_bytes_per_microbatch"]
            # what the counts account for: the extra weight versions, the activations in flight, one gradient
            counted = r["weight_bytes"] - r["param_bytes"] + r["activations_in_flight_bytes"] + r["param_bytes"]
            r["rss_beyond_counted_bytes"] = r["rss_peak_growth_bytes"] - counted
            rows.append(r)
        print(f"done: W={w}, {len(configs)} fits in {time.perf_counter() - launch:.0f} s", flush=True)
    order = {p: k for k, p in enumerate(POLICIES)}
    rows.sort(key=lambda r: (r["w"], r["n"] if r["policy"] != "pipedream" else 99, order[r["policy"]], r["stage"]))
    report(rows, args, time.perf_counter() - start)


if __name__ == "__main__":
    main()
