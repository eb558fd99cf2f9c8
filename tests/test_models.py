"""Real models written as ordinary nn.Modules (the examples' VGG-16 and ResNet-50 for 32x32 inputs, and a small GPT)
train with W = 2 or W = 4 under every registered schedule, split by tracing; under the synchronous schedules the
parameters equal single-device training.

The comparison runs in float64 (``precision="64-true"``). A pipeline adds up some gradient contributions in another
order than one device does (where a boundary cuts a residual), and thin batch-normalised networks at batch size 8
amplify those float32 rounding differences to visible ones within a few steps; in float64 the runs agree to 1e-9.
The reference trains on one device with the data loader cutting each batch into the same N micro-batches and
gradients accumulated over them, which is what a pipeline computes with batch-norm (statistics per micro-batch).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import clean_env

from lightning_timeprest import SCHEDULES

SCRIPT = Path(__file__).parent / "scripts" / "train_zoo.py"
SYNCHRONOUS = ("gpipe", "1f1b")


def run_zoo(tmp_path: Path, *args: str, timeout: float = 420) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"train_zoo.py {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


# each model once (the suite's time): the CNNs at W = 2 (a cut through ResNet's residuals), GPT at W = 4 (three
# boundaries, each crossed by the residual stream)
@pytest.mark.parametrize("stages, model", [(2, "vgg16"), (2, "resnet50"), (4, "gpt")])
def test_model_trains_under_every_schedule(tmp_path, model, stages):
    n = 2 if stages == 2 else 4  # timeprest_v is staleness-free only for W <= N + 1
    common = ("--model", model, "--n", str(n), "--precision", "64-true", "--batch-size", "8", "--steps", "3")
    run_zoo(tmp_path, *common, "--devices", str(stages), "--schedules", ",".join(SCHEDULES), "--out", "pipe")
    run_zoo(tmp_path, *common, "--devices", "0", "--schedules", "reference", "--out", "one")
    reference = torch.load(tmp_path / "one.reference.pt", weights_only=False)["state"]
    initial = torch.load(tmp_path / "one.initial.pt", weights_only=False)
    for schedule in SCHEDULES:
        run = torch.load(tmp_path / f"pipe.{schedule}.pt", weights_only=False)
        state = run["state"]
        assert list(state) == list(reference), schedule
        table = run["table"]
        assert [row[0] for row in table[1:]] == [str(s) for s in range(stages)]
        if schedule in SYNCHRONOUS:
            for key, value in reference.items():
                torch.testing.assert_close(state[key], value, rtol=1e-9, atol=1e-9, msg=lambda m, k=key: f"{k}: {m}")
        else:
            # every stage trained: each weight moved, and stayed finite
            for key, value in state.items():
                if value.is_floating_point():
                    assert torch.isfinite(value).all(), (schedule, key)
                if key.endswith(("weight", "bias")):
                    assert not torch.equal(value, initial[key]), (schedule, key)
