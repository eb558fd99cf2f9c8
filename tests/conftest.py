"""Shared helpers: run tests/scripts/train.py as one job's processes (see processes.py) and load what rank 0
saved."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from processes import clean_env, run_job

__all__ = ["clean_env"]

SCRIPT = Path(__file__).parent / "scripts" / "train.py"
REPO = Path(__file__).parent.parent


def _flag(args: tuple[str, ...], name: str, default: int) -> int:
    return int(args[args.index(name) + 1]) if name in args else default


def run_script(
    tmp_path: Path,
    *args: str,
    timeout: float = 240,
    check: bool = True,
    env: dict[str, str] | None = None,
    launcher: str = "forked",
    script: Path = SCRIPT,
) -> subprocess.CompletedProcess:
    """Run ``script`` (train.py unless told) with ``--devices`` processes (2 unless told; 0: one process, no
    strategy). ``launcher="forked"`` forks the job's processes and starts its ranks at once (processes.py);
    ``"lightning"`` starts rank 0 as a fresh interpreter and lets Lightning's popen launcher start the rest."""
    env = {**clean_env(), **(env or {})}
    if launcher == "forked" and _flag(args, "--num-nodes", 1) == 1:
        proc = run_job(script, list(args), _flag(args, "--devices", 2), cwd=tmp_path, env=env, timeout=timeout)
    else:
        argv = [sys.executable, str(script), *args]
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{script.name} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def train(tmp_path: Path, name: str, *args: str, launcher: str = "forked") -> dict[str, Any]:
    out = tmp_path / f"{name}.pt"
    run_script(tmp_path, *args, "--out", str(out), launcher=launcher)
    return torch.load(out, weights_only=False)


def assert_same_params(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6, rtol: float = 1e-6
) -> None:
    """Equal but for float32 rounding (micro-batches add a batch's gradient up in another order)."""
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


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
