"""How the tests start a job's processes.

Each process of a run spends most of its life importing torch, Lightning and torchmetrics (about 6 s of CPU on
this machine, 75% of a small training run); the suite starts a few hundred. So the tests fork every process of a
job from a multiprocessing forkserver that has imported them once (``set_forkserver_preload``, Python's own
mechanism for this). A forked process then runs the script exactly as ``python script args`` would: its own
environment, working directory, ``sys.argv``, output files, ``__main__`` and exit handlers. The forkserver only
imports: it runs no torch operation and joins no process group, so each process starts its own (a forked process
runs torch's intra-op threads as a fresh interpreter does: the same thread count, the same speed, checked).

A multi-process job's ranks start at once with the variables torchrun or SLURM set (Lightning's
``LightningEnvironment`` sees ``LOCAL_RANK`` and launches nothing). Tests about Lightning's launchers, failures and
signals start a fresh interpreter with ``subprocess`` instead (``launcher="lightning"`` in conftest.run_script).
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

PRELOAD = ["torch", "torch.distributed", "lightning.pytorch", "torchmetrics", "lightning_timeprest", "models"]
GRACE_S = 30  # how long the other ranks may take to end by themselves once one has failed


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _context() -> multiprocessing.context.BaseContext:
    """The forkserver context, the server started (once) in ``clean_env()``, the environment of a fresh run, so
    that what torch's libraries read at load time (OpenMP's thread count) is what a fresh interpreter reads."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(clean_env())
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return ctx


def _main(script: str, args: list[str], env: dict[str, str], cwd: str, out: str, err: str) -> None:
    """The forked process: become ``python script *args`` run in ``cwd`` with ``env``."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    if env.get("PYTHONWARNINGS") == "ignore":
        warnings.simplefilter("ignore")
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(script))
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        atexit._run_exitfuncs()  # the exit handlers the script and its libraries registered, as at interpreter exit
        sys.stdout.flush()
        sys.stderr.flush()


def run_job(
    script: Path, args: list[str], world: int, *, cwd: Path, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess:
    """Run ``script`` as ``world`` ranks of one single-node job (one process, no distributed variables, when
    ``world`` is 0 or 1) and wait for all. Once a rank fails, the others get ``GRACE_S`` to end by themselves,
    then are killed. The result has the first failing rank's exit code and every rank's output, rank by rank."""
    ctx = _context()
    ranks = max(world, 1)
    port = str(free_port())
    with tempfile.TemporaryDirectory() as logs:
        procs, files = [], []
        for rank in range(ranks):
            rank_env = dict(env)
            if world > 1:
                rank_env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=str(world), NODE_RANK="0")
                rank_env.update(RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
            out, err = (os.path.join(logs, f"{rank}.{k}") for k in ("out", "err"))
            files.append((out, err))
            p = ctx.Process(target=_main, args=(str(script), list(args), rank_env, str(cwd), out, err))
            p.start()
            procs.append(p)
        deadline = time.monotonic() + timeout
        failed_at = None
        while any(p.is_alive() for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.exitcode for p in procs):
                failed_at = now
            if now > deadline or (failed_at is not None and now > failed_at + GRACE_S):
                for p in procs:
                    p.kill()
                for p in procs:
                    p.join()
                if now > deadline:
                    raise subprocess.TimeoutExpired([str(script), *args], timeout)
                break
            time.sleep(0.05)
        for p in procs:
            p.join()
        outputs = [(Path(o).read_text(), Path(e).read_text()) for o, e in files]
    code = next((p.exitcode for p in procs if p.exitcode), 0)
    return subprocess.CompletedProcess(
        [str(script), *args], code, "".join(o for o, _ in outputs), "".join(e for _, e in outputs)
    )
