"""What the examples print when training ends (rank 0 only)."""

from __future__ import annotations

from typing import Any


def print_summary(trainer: Any, title: str, note: str = "") -> None:
    """The final logged metrics, and for an asynchronous policy each stage's mean staleness and versions held."""
    if not trainer.is_global_zero:
        return
    logged = trainer.callback_metrics
    metrics = {k: round(float(v), 4) for k, v in logged.items() if "pipeline/" not in k}
    print(f"\nfinished: {title}: {metrics}{note}")
    # (every pipeline metric is listed in the README's metrics table; the epoch means of two of them here)
    pipeline = {
        k[len("pipeline/") : -len("_epoch")]: round(float(v), 3)
        for k, v in logged.items()
        if k.startswith("pipeline/") and k.endswith(("staleness_mean_epoch", "versions_held_epoch"))
    }
    if pipeline:
        print(f"pipeline: {pipeline}")
