"""What every benchmark records and how it starts its worker processes."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

#: variables a launched rank leaves behind; a new worker run must not mistake itself for one
_LAUNCHED = {"MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK"}


#: Trainer arguments of every benchmark fit: nothing written, printed or summarised besides what is measured
QUIET = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}


def machine() -> dict[str, object]:
    """The machine a benchmark ran on, for its report."""
    import torch

    info: dict[str, object] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def pin(rank: int, cores: str, threads: int) -> None:
    """Give this process core ``rank`` of ``cores`` (e.g. "0,1") and ``threads`` threads: on a CPU, each pipeline
    stage then has compute of its own, as each stage has its own accelerator in real use."""
    import torch

    core = {int(cores.split(",")[rank])}
    # every thread of the process, not only the caller: torch.distributed's threads (gloo's transport loops, the
    # store) may have started before, and a thread pinned later does not move the ones that exist
    tasks = Path("/proc/self/task")
    for tid in [int(t.name) for t in tasks.iterdir()] if tasks.is_dir() else [0]:
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(tid, core)
    torch.set_num_threads(threads)


def worker_env() -> dict[str, str]:
    """The environment for a fresh worker run (Lightning's launcher then starts the other ranks)."""
    return {k: v for k, v in os.environ.items() if k not in _LAUNCHED}
