"""Shared helpers: run tests/scripts/train.py in a subprocess (Lightning's popen launcher then starts the other
ranks by re-running it) and load what rank 0 saved."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "train.py"
REPO = Path(__file__).parent.parent


def clean_env() -> dict[str, str]:
    """The environment for a fresh run: in-process Trainers of other tests leave the variables of a launched rank
    behind, and a new run must not mistake itself for one."""
    # (OMP_NUM_THREADS too: Lightning sets it for a one-process run, and a forked rank that inherits 2 OpenMP
    # threads from a parent that already used them can deadlock in libgomp)
    launched = {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE"}
    launched |= {"OMP_NUM_THREADS"}
    env = {k: v for k, v in os.environ.items() if k not in launched and not k.startswith("PL_")}
    env.update(PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    return env


def run_script(
    tmp_path: Path, *args: str, timeout: float = 240, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=tmp_path,
        env={**clean_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"train.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def train(tmp_path: Path, name: str, *args: str) -> dict[str, Any]:
    out = tmp_path / f"{name}.pt"
    run_script(tmp_path, *args, "--out", str(out))
    return torch.load(out, weights_only=False)


def assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="session")
def reference_cache(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, ...], dict[str, Any]]:
    return {}


@pytest.fixture
def reference(reference_cache, tmp_path_factory):
    """Single-device training with the same arguments (cached per argument list)."""

    def get(*args: str) -> dict[str, Any]:
        if args not in reference_cache:
            tmp = tmp_path_factory.mktemp("reference")
            reference_cache[args] = train(tmp, "reference", "--devices", "0", *args)
        return reference_cache[args]

    return get


def ranks_alive(marker: str) -> list[str]:
    """The pids of processes whose command line contains ``marker`` (a run's output path)."""
    return subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()


def wait_for_ranks_to_exit(marker: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while ranks_alive(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ranks_alive(marker), "a rank kept running after its peer failed"
