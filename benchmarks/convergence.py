"""Convergence of the pipeline policies: epochs and wall time to a target validation accuracy (the paper's claim).

Every variant trains the same model from the same initialisation on the same data order (one per seed), pipelined
over W processes on the CPU: ``gpipe`` (synchronous, the reference: exactly single-device training), ``pipedream``
(weight stashing, N = 1), ``timeprest`` (vertical sync), ``timeprest_v`` and ``timeprest_i`` with both backward rules
(``graph``, ``recompute``), I-TiMePReSt with its ``exp`` significance at lambda in {0.5, 1, 2}. Validation runs after
the pipeline drains at each epoch's end, so every epoch's validation accuracy is exact. A dataset's target accuracy
is ``--target-fraction`` (0.98) x gpipe's mean final accuracy; per variant and seed the report gives the epochs, and
the wall seconds from the start of training to the end of that epoch's validation, to reach it ("not reached"
included), the final accuracy, and the last epoch's logged staleness d and weight versions of every stage.

Datasets, both offline: scikit-learn's bundled handwritten digits (1797 8x8 images; a fixed stratified 80/20 split
whose seed does not depend on the training seed), with a small CNN written as one ``nn.Sequential``; and the
generated CIFAR-shaped set of ``examples/vision.py`` with a thin VGG-16 (an ordinary ``nn.Module`` split by tracing,
classifier dropout off). SGD, momentum 0.9, lr 0.05, batch 32: gpipe needs a few epochs, and the rate is high
enough that staleness shows (at 0.1 the digits CNN diverges under gpipe too).

    python benchmarks/convergence.py --quick   # about 3 minutes on 2 CPU cores
    python benchmarks/convergence.py           # about 30 minutes on 2 CPU cores
    python benchmarks/convergence.py --study time   # wall time to accuracy, each stage on its own core

``--quick``: W = 2, N = 2. Digits: 6 epochs, seeds 0, 1, 2, every variant (lambda swept for the graph rule, lambda
= 1 with recompute). CIFAR-shaped: 1024 training and 512 validation images, VGG-16 at width 1/16, 5 epochs, seed 0,
gpipe, pipedream, timeprest_v (graph) and timeprest_i (lambda = 1, both rules). Full mode: W = 2 and W = 3 (N = 2),
every variant (lambda swept for both rules), seeds 0, 1, 2; 15 epochs of digits; 10 epochs of the CIFAR-shaped
set at the quick mode's size. ``--datasets digits`` runs one of the two; ``--report-only``
rewrites the report from the last run's JSON (e.g. with another ``--target-fraction``) without training.

``--study time`` answers what a user waits for: wall-clock seconds to the target with every stage process pinned
to its own core (one thread each, as each stage has its own accelerator in real use), for one device (``single``:
one process on one core), gpipe, 1f1b, pipedream, timeprest_v and timeprest_i at W = 2, N = 2, seeds 0, 1, 2: 10
epochs of digits and 10 of the CIFAR-shaped set with VGG-16 at width 1/8 (``--quick``: 6 and 5 epochs, seed 0).
``--cores 0,1`` pins the other studies the same way.

One worker launch per (dataset, W) runs all its (variant, seed) fits in turn in the same processes (Lightning's
launcher starts the other ranks). Writes ``benchmarks/results/convergence.{json,md,png}`` with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import math
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

from common import QUIET, pin, worker_env  # noqa: E402
from common import machine as machine_info  # noqa: E402  (benchmarks/common.py)

RESULTS = ROOT / "benchmarks" / "results"
ASYNCHRONOUS = ("pipedream", "timeprest", "timeprest_v", "timeprest_i")
LAMBDAS = (0.5, 1.0, 2.0)
RULES = ("graph", "recompute")
DATASET_TITLES = {"digits": "digits (sklearn), small CNN", "cifar": "CIFAR-shaped (generated), thin VGG-16"}

# ------------------------------------------------------------------------------------------------------ variants


def variant_key(schedule: str, rule: str | None = None, lam: float | None = None) -> str:
    """``schedule[:rule[:lambda]]``: one training configuration, as the worker reads it from its command line."""
    parts = [schedule] + ([rule] if rule else []) + ([f"{lam:g}"] if lam is not None else [])
    return ":".join(parts)


def parse_key(key: str) -> dict[str, Any]:
    """``{"schedule", "rule", "lambda"}`` of a variant key (None where the key leaves them at the default)."""
    schedule, *rest = key.split(":")
    return {
        "schedule": schedule,
        "rule": rest[0] if rest else None,
        "lambda": float(rest[1]) if len(rest) > 1 else None,
    }


def variants(sweep_rules: tuple[str, ...] = RULES) -> list[str]:
    """Every policy; both backward rules where the backward may read other weights than the forward; I-TiMePReSt
    at every lambda for the rules in ``sweep_rules`` (at lambda = 1 for the others)."""
    keys = [variant_key("gpipe"), variant_key("pipedream")]
    keys += [variant_key(schedule, rule) for schedule in ("timeprest", "timeprest_v") for rule in RULES]
    for rule in RULES:
        keys += [variant_key("timeprest_i", rule, lam) for lam in (LAMBDAS if rule in sweep_rules else (1.0,))]
    return keys


#: the quick run's CIFAR-shaped variants: the reference, the baseline, V- and I-TiMePReSt (both rules)
QUICK_CIFAR = ["gpipe", "pipedream", "timeprest_v:graph", "timeprest_i:graph:1", "timeprest_i:recompute:1"]
#: ``--study rules``: the two backward rules where they differ, 3 seeds on both datasets (decides the default)
RULES_STUDY = ["gpipe", "timeprest_v:graph", "timeprest_v:recompute", "timeprest_i:graph:1", "timeprest_i:recompute:1"]
#: ``--study time``: wall-clock time to accuracy with every stage on its own core, against one device (``single``)
TIME_STUDY = ["gpipe", "1f1b", "pipedream", "timeprest_v:graph", "timeprest_i:graph:1"]


# -------------------------------------------------------------------------------------------------------- worker


def digits_data(seed: int, batch_size: int) -> tuple[Any, Any]:
    """Train and validation loaders for sklearn's digits: a fixed stratified 80/20 split (seed 0, whatever the
    training seed), standardised with the training split's statistics; the shuffle order follows ``seed``."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from torch.utils.data import DataLoader, TensorDataset

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8), values 0..16
    y = torch.tensor(digits.target, dtype=torch.long)
    train_idx, val_idx = train_test_split(range(len(y)), test_size=0.2, stratify=digits.target, random_state=0)
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    train = TensorDataset(x[train_idx], y[train_idx])
    val = TensorDataset(x[val_idx], y[val_idx])
    g = torch.Generator().manual_seed(seed)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True, generator=g),
        DataLoader(val, batch_size=len(val)),
    )


def worker(args: argparse.Namespace) -> None:
    """Every rank: train each (variant, seed) of ``args`` in turn; rank 0 writes the records to ``args.out``."""
    import torch
    import torch.nn.functional as F
    from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
    from torch import nn
    from torchmetrics.classification import MulticlassAccuracy

    sys.path.insert(0, str(ROOT))
    import lightning_timeprest
    from examples.vision import VGG16, CIFAR10DataModule, ImageClassifier

    class DigitsCNN(LightningModule):
        """An ordinary classifier for 8x8 digits; ``self.net`` is the ``nn.Sequential`` the strategy cuts."""

        def __init__(self, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(32, 32, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3, padding=1),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(64 * 4 * 4, 128),
                nn.ReLU(),
                nn.Linear(128, 10),
            )
            self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss, on_step=False, on_epoch=True)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)
            self.val_acc(logits, y)
            self.log("val_acc", self.val_acc)

        def configure_optimizers(self):
            hp = self.hparams
            return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)

    class Record(Callback):
        """Rank 0's per-epoch record: validation accuracy, wall seconds since training started, and the latest
        epoch values of the strategy's per-stage statistics. With ``--cores``, pins each rank to its own core."""

        def __init__(self) -> None:
            self.start, self.val_acc, self.seconds, self.stats = 0.0, [], [], {}

        def setup(self, trainer, pl_module, stage):
            if args.cores:
                pin(trainer.local_rank, args.cores, 1)

        def on_train_epoch_end(self, trainer, pl_module):
            self.stats = pipeline_stats(trainer) or self.stats

        def on_train_start(self, trainer, pl_module):
            self.start = time.perf_counter()

        def on_validation_end(self, trainer, pl_module):
            if trainer.sanity_checking:
                return
            self.seconds.append(time.perf_counter() - self.start)
            self.val_acc.append(float(trainer.callback_metrics["val_acc"]))

    def pipeline_stats(trainer: Trainer) -> dict[str, float]:
        return {
            k.removeprefix("pipeline/").removesuffix("_epoch"): float(m)
            for k, m in trainer.callback_metrics.items()
            if k.startswith("pipeline/") and k.endswith("_epoch")
        }

    out = Path(args.out)
    runs: list[dict[str, Any]] = []
    for key in args.variants.split(","):
        v = parse_key(key)
        for seed in (int(s) for s in args.seeds.split(",")):
            seed_everything(seed)
            if args.dataset == "digits":
                model: LightningModule = DigitsCNN(lr=args.lr)
                train, val = digits_data(seed, args.batch_size)
                fit_kw: dict[str, Any] = {"train_dataloaders": train, "val_dataloaders": val}
            else:
                model = ImageClassifier(arch="vgg16", width=args.width, lr=args.lr)
                model.model = VGG16(width=args.width, dropout=0.0)  # a thin classifier: no dropout
                data = CIFAR10DataModule(batch_size=args.batch_size, num_train=args.num_train, num_val=args.num_val)
                fit_kw = {"datamodule": data}
            strategy: Any = (
                "auto"
                if v["schedule"] == "single"
                else lightning_timeprest.TiMePReStStrategy(
                    schedule=v["schedule"],
                    # one cut for every variant and run: a measured ("time") cut can move between fits, and under
                    # the asynchronous policies it decides which layers run on stale weights
                    balance="parameters",
                    num_microbatches=None if v["schedule"] == "pipedream" else args.n,
                    backward_rule=v["rule"] or "graph",
                    decay_lambda=1.0 if v["lambda"] is None else v["lambda"],
                )
            )
            record = Record()
            trainer = Trainer(
                strategy=strategy,
                accelerator="cpu",
                devices=args.devices,
                max_epochs=args.epochs,
                num_sanity_val_steps=0,
                **QUIET,
                callbacks=[record],
            )
            trainer.fit(model, **fit_kw)
            if trainer.is_global_zero:
                stats = pipeline_stats(trainer) or record.stats
                runs.append({"variant": key, **v, "seed": seed, "val_acc": record.val_acc, "seconds": record.seconds})
                runs[-1]["last_epoch_stats"] = stats
                out.write_text(json.dumps(runs))  # after every fit: a failure keeps what finished
                print(f"done: {args.dataset} W={args.devices} {key} seed {seed}: {record.val_acc[-1]:.4f}", flush=True)


def run(dataset: str, devices: int, keys: list[str], seeds: list[int], settings: dict[str, Any]) -> list[dict]:
    """One worker launch (W processes) that trains every (variant, seed) of ``dataset`` in turn."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "runs.json"
        cmd = [sys.executable, __file__, "--worker", "--out", str(out), "--dataset", dataset]
        cmd += ["--devices", str(devices), "--variants", ",".join(keys), "--seeds", ",".join(map(str, seeds))]
        for name, value in settings.items():
            cmd += [f"--{name.replace('_', '-')}", str(value)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tmp, env=worker_env(), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{dataset} W={devices} failed:\n{proc.stderr[-4000:]}")
        runs = json.loads(out.read_text())
    print(f"{dataset} W={devices}: {len(runs)} fits in {time.perf_counter() - start:.0f} s", flush=True)
    return runs


# ------------------------------------------------------------------------------------------------------ analysis


def epochs_to(curve: list[float], target: float) -> int | None:
    """1-based first epoch whose validation accuracy reaches ``target``; None if none does."""
    return next((e + 1 for e, acc in enumerate(curve) if acc >= target), None)


def spread(values: list[float], fmt: str) -> str:
    """``mean [min, max]`` of ``values`` (one seed: the value)."""
    if not values:
        return "-"
    mean = format(statistics.fmean(values), fmt)
    return mean if len(values) == 1 else f"{mean} [{format(min(values), fmt)}, {format(max(values), fmt)}]"


def per_stage(stats: list[dict[str, float]], name: str) -> list[float | None]:
    """The mean over seeds of one logged statistic, per stage (None where a run did not log it: sync schedules
    log no staleness)."""
    stages = sorted({k.split("/")[0] for s in stats for k in s if k.startswith("stage")}, key=lambda s: int(s[5:]))
    per = [[s.get(f"{stage}/{name}") for s in stats] for stage in stages]
    return [statistics.fmean(v for v in vals if v is not None) if None not in vals else None for vals in per]


def summarise(runs: list[dict], target_fraction: float) -> dict[str, Any]:
    """Per variant: epochs and seconds to the target (per seed), final accuracy, logged staleness and versions."""
    gpipe_final = [r["val_acc"][-1] for r in runs if r["schedule"] == "gpipe"]
    target = target_fraction * statistics.fmean(gpipe_final)
    epochs = max(len(r["val_acc"]) for r in runs)
    rows = []
    for key in dict.fromkeys(r["variant"] for r in runs):
        mine = sorted((r for r in runs if r["variant"] == key), key=lambda r: r["seed"])
        reached = [epochs_to(r["val_acc"], target) for r in mine]
        stats = [r["last_epoch_stats"] for r in mine]
        rows.append(
            {
                "variant": key,
                **{k: mine[0][k] for k in ("schedule", "rule", "lambda")},
                "seeds": [r["seed"] for r in mine],
                "epochs_to_target": reached,
                "seconds_to_target": [
                    None if e is None else r["seconds"][e - 1] for e, r in zip(reached, mine, strict=True)
                ],
                "final_val_acc": [r["val_acc"][-1] for r in mine],
                "best_val_acc": [max(r["val_acc"]) for r in mine],
                "mean_val_acc_over_epochs": [statistics.fmean(r["val_acc"]) for r in mine],
                "seconds_per_epoch": statistics.fmean(r["seconds"][-1] / len(r["seconds"]) for r in mine),
                "mean_curve": [statistics.fmean(r["val_acc"][e] for r in mine) for e in range(epochs)],
                "mean_seconds": [statistics.fmean(r["seconds"][e] for r in mine) for e in range(epochs)],
                "staleness_mean_per_stage": per_stage(stats, "staleness_mean"),
                "versions_held_per_stage": per_stage(stats, "versions_held"),
                "weight_bytes_per_stage": per_stage(stats, "weight_bytes"),
            }
        )
    return {"target": target, "gpipe_final_mean": statistics.fmean(gpipe_final), "epochs": epochs, "rows": rows}


def censored(row: dict, epochs: int) -> list[int]:
    """Epochs to target per seed, "not reached" counted as ``epochs + 1`` (a lower bound), for comparisons."""
    return [epochs + 1 if e is None else e for e in row["epochs_to_target"]]


def table(summary: dict) -> list[str]:
    lines = [
        "| variant | reached | epochs to target | seconds to target | final val acc | val acc averaged over epochs "
        "| s / epoch | mean d per stage | versions held per stage |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        reached = [e for e in r["epochs_to_target"] if e is not None]
        secs = [s for s in r["seconds_to_target"] if s is not None]
        n = len(r["epochs_to_target"])
        eps = spread([float(e) for e in reached], ".1f") if reached else f"> {summary['epochs']}"
        if reached and len(reached) < n:
            eps += f" (> {summary['epochs']} for {n - len(reached)})"
        d = ", ".join("-" if x is None else f"{x:.2f}" for x in r["staleness_mean_per_stage"])
        d = "-" if all(x is None for x in r["staleness_mean_per_stage"]) else d
        held = ", ".join("-" if x is None else f"{x:.0f}" for x in r["versions_held_per_stage"]) or "-"
        lines.append(
            f"| {r['variant']} | {len(reached)}/{n} | {eps} | {spread(secs, '.1f')} "
            f"| {spread(r['final_val_acc'], '.4f')} | {spread(r['mean_val_acc_over_epochs'], '.4f')} "
            f"| {r['seconds_per_epoch']:.2f} | {d} | {held} |"
        )
    return lines


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def findings(summary: dict) -> list[str]:
    """What the numbers say about the seed's claims, computed (nothing here is written in advance)."""
    epochs = summary["epochs"]
    rows = {r["variant"]: r for r in summary["rows"]}
    out = []

    def ep(key: str) -> float:
        return _mean(censored(rows[key], epochs))

    def acc(key: str) -> float:
        return _mean(rows[key]["final_val_acc"])

    def auc(key: str) -> float:
        return _mean(rows[key]["mean_val_acc_over_epochs"])

    def paired(a: str, b: str) -> tuple[int, int, int]:
        """Seeds where ``a`` reached the target in fewer, equal, more epochs than ``b`` (same seed: same start)."""
        pairs = list(zip(censored(rows[a], epochs), censored(rows[b], epochs), strict=True))
        return sum(x < y for x, y in pairs), sum(x == y for x, y in pairs), sum(x > y for x, y in pairs)

    # I-TiMePReSt against V-TiMePReSt, per backward rule
    for rule in RULES:
        v_key = variant_key("timeprest_v", rule)
        i_keys = [k for k, r in rows.items() if r["schedule"] == "timeprest_i" and r["rule"] == rule]
        if v_key not in rows or not i_keys:
            continue
        default = variant_key("timeprest_i", rule, 1.0)
        best = min(i_keys, key=lambda k: (ep(k), -auc(k)))
        for i_key in dict.fromkeys([default, best]) if default in rows else [best]:
            fewer, same, more = paired(i_key, v_key)
            verdict = "holds" if ep(i_key) < ep(v_key) else "a tie" if ep(i_key) == ep(v_key) else "does not hold"
            label = "" if i_key == default else " (the best lambda)"
            out.append(
                f"- I-TiMePReSt in fewer epochs than V-TiMePReSt, {rule} rule{label}: {verdict} here. `{i_key}` "
                f"needed {ep(i_key):.2f} epochs on average, `{v_key}` {ep(v_key):.2f} (fewer / as many / more "
                f"epochs in {fewer} / {same} / {more} of {fewer + same + more} seeds); final accuracy "
                f"{acc(i_key):.4f} against {acc(v_key):.4f}, accuracy averaged over the epochs {auc(i_key):.4f} "
                f"against {auc(v_key):.4f}."
            )
    # which backward rule converges better, per policy whose backward reads other weights than its forward
    for schedule, lam in (("timeprest_i", 1.0), ("timeprest_v", None), ("timeprest", None)):
        g, r = variant_key(schedule, "graph", lam), variant_key(schedule, "recompute", lam)
        if g not in rows or r not in rows:
            continue
        diff = ep(r) - ep(g)
        better = "recompute" if diff < 0 else "graph" if diff > 0 else None
        if better is None:
            a_diff = auc(r) - auc(g)
            better = "recompute" if a_diff > 0 else "graph" if a_diff < 0 else "neither"
            how = f"equal mean epochs to target ({ep(g):.2f}); by accuracy averaged over the epochs, {better}"
        else:
            how = f"{better} reached the target in fewer epochs ({ep(g):.2f} graph, {ep(r):.2f} recompute)"
        out.append(
            f"- Backward rule for `{schedule}`{'' if lam is None else f' (lambda {lam:g})'}: {how}; accuracy "
            f"averaged over the epochs {auc(g):.4f} graph, {auc(r):.4f} recompute; final {acc(g):.4f} graph, "
            f"{acc(r):.4f} recompute."
        )
    # lambda
    for rule in RULES:
        lam_rows = sorted(
            (r for r in rows.values() if r["schedule"] == "timeprest_i" and r["rule"] == rule),
            key=lambda r: r["lambda"],
        )
        if len(lam_rows) > 1:
            parts = ", ".join(f"{r['lambda']:g}: {ep(r['variant']):.2f} / {acc(r['variant']):.4f}" for r in lam_rows)
            out.append(
                f"- I-TiMePReSt's lambda, {rule} rule (lambda: mean epochs to target / final accuracy): {parts}."
            )
    # against the synchronous reference
    gpipe = variant_key("gpipe")
    asyncs = [k for k, r in rows.items() if r["schedule"] in ASYNCHRONOUS]
    if gpipe in rows and asyncs:
        faster = [k for k in asyncs if ep(k) < ep(gpipe)]
        slower = [k for k in asyncs if ep(k) > ep(gpipe)]
        close = [k for k in asyncs if acc(gpipe) - acc(k) < 0.003]
        best = max(asyncs, key=acc)
        gap = 100 * (acc(gpipe) - acc(best))
        out.append(
            f"- Against gpipe ({ep(gpipe):.2f} epochs, final accuracy {acc(gpipe):.4f}): {len(faster)} of "
            f"{len(asyncs)} asynchronous variants reached the target in fewer epochs on average"
            f"{' (' + ', '.join(f'`{k}`' for k in faster) + ')' if faster else ''}, {len(slower)} in more. "
            f"{len(close)} of {len(asyncs)} ended at most 0.3 points below gpipe's final accuracy, the seed's "
            f"accuracy claim{': ' + ', '.join(f'`{k}`' for k in close) if close else ''}. The best final accuracy, "
            f"`{best}`'s, is {abs(gap):.2f} points {'below' if gap > 0 else 'above'} gpipe's."
        )
    # wall time to the target
    everywhere = [k for k, r in rows.items() if None not in r["seconds_to_target"]]
    if "single" in rows:
        out += time_findings(rows, epochs)
    elif everywhere:
        fastest = min(everywhere, key=lambda k: _mean(rows[k]["seconds_to_target"]))
        ref = (
            f" (gpipe {_mean(rows[gpipe]['seconds_to_target']):.1f} s)"
            if gpipe in everywhere and fastest != gpipe
            else ""
        )
        out.append(
            f"- Wall time: of the variants that reached the target with every seed, `{fastest}` got there first, in "
            f"{_mean(rows[fastest]['seconds_to_target']):.1f} s on average{ref}. On this shared 2-core machine the "
            "seconds mostly follow the epochs; they are not a pipeline speed-up."
        )
    # memory and staleness of V-TiMePReSt among the asynchronous policies
    policies: dict[str, tuple[float, float]] = {}  # policy -> (weight bytes over all stages, mean d over stages)
    for r in rows.values():
        if r["schedule"] not in ASYNCHRONOUS or None in r["weight_bytes_per_stage"] or not r["weight_bytes_per_stage"]:
            continue
        nbytes = sum(r["weight_bytes_per_stage"])
        d = _mean([x for x in r["staleness_mean_per_stage"] if x is not None])
        old = policies.get(r["schedule"], (0.0, 0.0))
        policies[r["schedule"]] = (max(old[0], nbytes), max(old[1], d))
    if "timeprest_v" in policies and len(policies) > 1:
        v_bytes, v_d = policies["timeprest_v"]
        v_held = max(
            x for r in rows.values() if r["schedule"] == "timeprest_v" for x in r["versions_held_per_stage"] if x
        )
        least_mem = all(v_bytes <= b for b, _ in policies.values())
        least_d = all(v_d <= d + 1e-9 for _, d in policies.values())
        tied_d = [p for p, (_, d) in policies.items() if p != "timeprest_v" and abs(d - v_d) < 1e-9]
        parts = ", ".join(f"`{p}` {b / 1024:.0f} KiB / {d:.2f}" for p, (b, d) in sorted(policies.items()))
        out.append(
            f"- V-TiMePReSt least memory of the asynchronous policies: {'holds' if least_mem else 'does not hold'}; "
            f"least staleness d: {'holds' if least_d else 'does not hold'}"
            f"{' (tied with ' + ', '.join(f'`{p}`' for p in tied_d) + ')' if least_d and tied_d else ''}. Weight "
            f"versions held, summed over stages, and mean d over stages, last epoch, the largest over a policy's "
            f"variants: {parts}. d counts optimizer steps between a forward and its backward, so the schedule sets "
            "it, not what the backward reads: V-TiMePReSt's backward reads the latest weights, "
            f"so the weights it differentiates are never stale; it held at most {v_held:.0f} version(s) on a stage."
        )
    return out


def time_findings(rows: dict[str, dict], epochs: int) -> list[str]:
    """Time to the target with every stage on its own core, against one device and the synchronous schedules
    (a variant that missed the target with some seed is compared on the seeds where both reached it)."""
    out = []

    def seconds(key: str) -> list[float | None]:
        return rows[key]["seconds_to_target"]

    def against(key: str, ref: str) -> str:
        pairs = [(a, b) for a, b in zip(seconds(key), seconds(ref), strict=True) if a is not None and b is not None]
        if not pairs:
            return f"`{ref}`: no seed where both reached it"
        ratio = statistics.fmean(b / a for a, b in pairs)
        return f"{ratio:.2f}x as fast as `{ref}` ({len(pairs)} seeds)"

    per_epoch = {k: r["seconds_per_epoch"] for k, r in rows.items()}
    for key in rows:
        if key == "single":
            continue
        reached = sum(x is not None for x in seconds(key))
        refs = [r for r in ("single", "gpipe", "1f1b") if r in rows and r != key]
        out.append(
            f"- `{key}`: an epoch in {per_epoch[key]:.2f} s ({per_epoch['single'] / per_epoch[key]:.2f}x one "
            f"device's speed); reached the target with {reached} of {len(seconds(key))} seeds; to the target "
            + "; ".join(against(key, ref) for ref in refs)
            + "."
        )
    return out


# ---------------------------------------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--target-fraction", type=float, default=0.98, help="target = this x gpipe's mean final acc")
    p.add_argument("--datasets", default="digits,cifar", help="comma-separated: digits, cifar")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the last run's JSON")
    p.add_argument(
        "--study",
        default="all",
        choices=["all", "rules", "time"],
        help="rules: timeprest_v and timeprest_i with each backward_rule, 3 seeds on both datasets "
        "(writes convergence_rules.*; about 4 minutes on 2 cores); time: wall time to the target with each stage "
        "pinned to its own core, against one device on one core (writes convergence_time.*)",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--dataset", default="digits", help=argparse.SUPPRESS)
    p.add_argument("--devices", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--variants", default="gpipe", help=argparse.SUPPRESS)
    p.add_argument("--seeds", default="0", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--epochs", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--lr", type=float, default=0.05, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=32, help=argparse.SUPPRESS)
    p.add_argument("--width", type=float, default=1 / 16, help=argparse.SUPPRESS)
    p.add_argument("--num-train", type=int, default=768, help=argparse.SUPPRESS)
    p.add_argument("--num-val", type=int, default=512, help=argparse.SUPPRESS)
    p.add_argument("--cores", default="", help="pin rank r to the r-th of these cores, e.g. 0,1 (--study time: all)")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    stem = {"all": "convergence", "rules": "convergence_rules", "time": "convergence_time"}[args.study]
    if args.study == "time":
        args.cores = args.cores or ",".join(map(str, sorted(os.sched_getaffinity(0))[:2]))
    if args.report_only:
        write_report(json.loads((RESULTS / f"{stem}.json").read_text()), args.target_fraction, stem)
        return

    quick = args.quick
    datasets = args.datasets.split(",")
    plans: list[dict[str, Any]] = []  # one worker launch each
    if args.study == "rules":
        digits = {"n": 2, "epochs": 6, "lr": 0.05, "batch_size": 32}
        cifar = {"n": 2, "epochs": 8, "lr": 0.05, "batch_size": 32, "width": 1 / 16, "num_train": 1024, "num_val": 512}
        for dataset, settings in (("digits", digits), ("cifar", cifar)):
            if dataset in datasets:
                plan = {"dataset": dataset, "w": 2, "keys": RULES_STUDY, "seeds": [0, 1, 2], "settings": settings}
                plans.append(plan)
    if args.study == "time":
        digits = {"n": 2, "epochs": 6 if quick else 10, "lr": 0.05, "batch_size": 32}
        cifar = {"n": 2, "epochs": 5 if quick else 10, "lr": 0.05, "batch_size": 32, "width": 1 / 8}
        cifar |= {"num_train": 1024, "num_val": 512}
        for dataset, settings in (("digits", digits), ("cifar", cifar)):
            if dataset in datasets:  # one device on one core, then every schedule with W = 2
                seeds = [0] if quick else [0, 1, 2]
                plans.append({"dataset": dataset, "w": 1, "keys": ["single"], "seeds": seeds, "settings": settings})
                plans.append({"dataset": dataset, "w": 2, "keys": TIME_STUDY, "seeds": seeds, "settings": settings})
    for w in () if args.study in ("rules", "time") else (2,) if quick else (2, 3):
        if "digits" in datasets:
            plans.append(
                {
                    "dataset": "digits",
                    "w": w,
                    "keys": variants(("graph",) if quick else RULES),
                    "seeds": [0, 1, 2],
                    "settings": {"n": 2, "epochs": 6 if quick else 15, "lr": 0.05, "batch_size": 32},
                }
            )
        if "cifar" in datasets:
            plans.append(
                {
                    "dataset": "cifar",
                    "w": w,
                    "keys": QUICK_CIFAR if quick else variants(),
                    "seeds": [0] if quick else [0, 1, 2],
                    "settings": {
                        "n": 2,
                        "epochs": 5 if quick else 10,
                        "lr": 0.05,
                        "batch_size": 32,
                        "width": 1 / 16,
                        "num_train": 1024,
                        "num_val": 512,
                    },
                }
            )

    start = time.perf_counter()
    results = []
    single: dict[str, list[dict]] = {}  # the one-device runs join the table of the pipeline runs that follow
    for plan in plans:
        settings = {**plan["settings"], **({"cores": args.cores} if args.cores else {})}
        runs = run(plan["dataset"], plan["w"], plan["keys"], plan["seeds"], settings)
        if plan["w"] == 1:
            single[plan["dataset"]] = runs
            continue
        results.append({**plan, "runs": single.pop(plan["dataset"], []) + runs})
    report = {"machine": machine_info(), "quick": quick, "wall_s": time.perf_counter() - start, "results": results}
    report["study"], report["cores"] = args.study, args.cores
    write_report(report, args.target_fraction, stem)


def write_report(report: dict[str, Any], target_fraction: float, stem: str = "convergence") -> None:
    """Summarise every run of ``report`` against the target and write the JSON, Markdown and plot."""
    report["target_fraction"] = target_fraction
    for res in report["results"]:
        res["summary"] = summarise(res["runs"], target_fraction)
    machine, results = report["machine"], report["results"]
    kind = {"rules": "backward-rule study", "time": "time-to-accuracy study"}.get(report.get("study", ""), "")
    kind = kind or ("quick" if report["quick"] else "full")
    timing = (
        f"each rank pinned to its own core of {report['cores']}, one thread; `single`: one process on one core"
        if report.get("cores")
        else "2 CPU cores shared by W processes: a measure of cost per epoch, not of a speed-up"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"Machine: {machine['platform']}, {machine['cpus']} CPUs, torch {machine['torch']}; "
        f"{kind} run, {report['wall_s'] / 60:.1f} minutes. Target: "
        f"{target_fraction:g} x gpipe's mean final validation accuracy, per dataset and W. Epochs and seconds to "
        "target: mean [min, max] over the seeds that reached it; seconds run from the start of training to the end "
        f"of that epoch's validation ({timing}). Mean d and versions held: the last epoch's logged `staleness_mean` "
        "and `versions_held` of each "
        "stage, mean over seeds. Variants: `schedule:backward_rule:lambda` (lambda of I-TiMePReSt's "
        "alpha(d) = exp(-lambda d)).",
    ]
    for res in results:
        s, st = res["summary"], res["settings"]
        lines += [
            "",
            f"## {DATASET_TITLES[res['dataset']]}, W = {res['w']}, N = {st['n']}",
            "",
            f"{st['epochs']} epochs, batch {st['batch_size']}, SGD lr {st['lr']:g} momentum 0.9, seeds "
            f"{', '.join(map(str, res['seeds']))}; target {s['target']:.4f} (gpipe's mean final "
            f"{s['gpipe_final_mean']:.4f}).",
            "",
            *table(s),
            "",
            'What it shows (a comparison counts "not reached" as one epoch more than were run):',
            "",
            *findings(s),
        ]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    plot(results, RESULTS / f"{stem}.png")
    print("\n".join(lines))


def plot(results: list[dict], path: Path) -> None:
    """Validation accuracy (mean over seeds) against epoch (top) and wall seconds (bottom), one column per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(6 * len(results), 8), squeeze=False)
    colors = {"gpipe": "black", "pipedream": "tab:blue", "timeprest": "tab:orange", "timeprest_v": "tab:green"}
    colors |= {"single": "tab:gray", "1f1b": "tab:olive"}
    lambda_colors = {0.5: "tab:pink", 1.0: "tab:purple", 2.0: "tab:brown"}
    for col, res in enumerate(results):
        s = res["summary"]
        for r in s["rows"]:
            color = colors.get(r["schedule"]) or lambda_colors.get(r["lambda"] or 1.0, "tab:red")
            kw = {
                "color": color,
                "linestyle": "--" if r["rule"] == "recompute" else "-",
                "linewidth": 2.5 if r["schedule"] == "gpipe" else 1.2,
                "marker": ".",
                "label": r["variant"],
            }
            axes[0][col].plot(range(1, len(r["mean_curve"]) + 1), r["mean_curve"], **kw)
            axes[1][col].plot(r["mean_seconds"], r["mean_curve"], **kw)
        axes[0][col].xaxis.get_major_locator().set_params(integer=True)
        for row, xlabel in enumerate(("epoch", "wall seconds (mean over seeds)")):
            ax = axes[row][col]
            ax.axhline(s["target"], color="grey", linewidth=0.8, linestyle=":")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("validation accuracy")
            ax.set_title(f"{DATASET_TITLES[res['dataset']]}, W={res['w']}", fontsize=9)
        axes[0][col].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
