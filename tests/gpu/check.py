"""The GPU checks of the strategy, in one run: for a session that is lent a GPU machine (CI never has one).

    python tests/gpu/check.py                 # prints one line per check and a summary; exit status 1 if one failed
    python tests/gpu/check.py --throughput    # then the throughput benchmark's quick rows on the GPU(s) (about 5
                                              # minutes on one GPU): benchmarks/results/throughput_gpu.{md,json,png}

1. ``processes_per_device=2`` on GPU 0: two stages share one card over gloo, with ``16-mixed`` (autocast and a
   GradScaler whose found_inf the stages agree on) and ``bf16-mixed``; compared with one process on the GPU.
2. ``timeprest_i`` on one shared GPU: trains, and logs each stage's ``cuda_peak_bytes``; with ``16-mixed`` (the
   loss scale travelling back with the gradients, doubling every update) it equals the unscaled float16 run.
3. ``balance="time"``: blocks profiled on CUDA (the partition table's est. time column).
4. With 2 or more GPUs: two stages over nccl, one GPU each, against one process on one GPU.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SCRIPT = HERE.parent / "scripts" / "train.py"
THROUGHPUT = HERE.parent.parent / "benchmarks" / "throughput.py"


def run(tmp: Path, name: str, *args: str) -> dict:
    out = tmp / f"{name}.pt"
    env = {k: v for k, v in os.environ.items() if k not in {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK"}}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--accelerator", "gpu", *args, "--out", str(out)],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    result = torch.load(out, weights_only=False)
    result["seconds"] = time.perf_counter() - start
    result["printed"] = proc.stdout + proc.stderr
    return result


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def main() -> int:
    parser = argparse.ArgumentParser(description="the GPU checks of the strategy")
    parser.add_argument("--throughput", action="store_true", help="then benchmarks/throughput.py --quick on CUDA")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no GPU here: nothing to check")
        return 1
    print(f"torch {torch.__version__}, {torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}")
    failures = 0
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        checks = []
        for precision in ("16-mixed", "bf16-mixed"):
            one = run(tmp, f"one-{precision}", "--devices", "0", "--epochs", "1", "--precision", precision)
            shared = run(tmp, f"shared-{precision}", "--devices", "1", "--per-device", "2", "--epochs", "1",
                         "--precision", precision, "--schedule", "gpipe")  # fmt: skip
            diff = max_diff(one["state_dict"], shared["state_dict"])
            checks.append((f"2 stages share GPU 0, {precision}: max |diff| vs one process {diff:.2e}", diff < 5e-3))
        async_run = run(tmp, "async", "--devices", "1", "--per-device", "2", "--epochs", "1", "--schedule",
                        "timeprest_i", "--n", "2", "--precision", "bf16-mixed")  # fmt: skip
        peaks = {k: v for k, v in async_run["pipeline"][-1].items() if "cuda_peak_bytes" in k}
        checks.append((f"timeprest_i on a shared GPU: cuda_peak_bytes {peaks}", len(peaks) >= 2))
        common = ("--devices", "1", "--per-device", "2", "--epochs", "1", "--schedule", "timeprest_i", "--n", "2")
        scaled = run(tmp, "async-fp16", *common, "--fp16", "--init-scale", "2", "--growth-interval", "1")
        unscaled = run(tmp, "async-fp16-unscaled", *common, "--fp16", "--no-scaling")
        diff = max_diff(scaled["state_dict"], unscaled["state_dict"])
        finite = all(torch.isfinite(v).all() for v in scaled["state_dict"].values())
        checks.append(
            (
                f"timeprest_i, 16-mixed on a shared GPU: max |diff| vs unscaled float16 {diff:.2e}",
                finite and diff < 1e-5,
            )
        )
        timed = run(tmp, "time", "--devices", "1", "--per-device", "2", "--epochs", "1", "--balance", "time")
        table = timed["table"]
        checks.append((f"balance='time' on CUDA: {table[1:]}", all(r[3].endswith("%") for r in table[1:])))
        if torch.cuda.device_count() >= 2:
            one = run(tmp, "one-nccl", "--devices", "0", "--epochs", "1")
            nccl = run(tmp, "nccl", "--devices", "2", "--epochs", "1", "--schedule", "1f1b")
            diff = max_diff(one["state_dict"], nccl["state_dict"])
            checks.append((f"2 GPUs over nccl: max |diff| vs one GPU {diff:.2e}", diff < 1e-4))
        for line, ok in checks:
            print(("PASS " if ok else "FAIL ") + line)
            failures += not ok
    print(f"{len(checks) - failures} of {len(checks)} checks passed")
    if args.throughput:  # (fewer GPUs than stages: the stages share them, and the table says so)
        cmd = [sys.executable, str(THROUGHPUT), "--accelerator", "cuda", "--quick", "--tag", "throughput_gpu"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        print(done.stdout[-6000:] if done.returncode == 0 else f"throughput failed:\n{done.stderr[-3000:]}")
        failures += done.returncode != 0
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
