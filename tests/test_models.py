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

pytestmark = pytest.mark.slow  # multi-process training runs (the fast subset: -m 'not slow')

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
    reference = torch.load(tmp_path / f"one.{model}.reference.pt", weights_only=False)["state"]
    initial = torch.load(tmp_path / f"one.{model}.initial.pt", weights_only=False)
    for schedule in SCHEDULES:
        run = torch.load(tmp_path / f"pipe.{model}.{schedule}.pt", weights_only=False)
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


def _compare(tmp_path: Path, names: list[str], schedules: list[str], initial: bool = False) -> None:
    """Each pipelined run against one device: equal under gpipe/1f1b, every weight moved and finite otherwise."""
    for name in names:
        reference = torch.load(tmp_path / f"one.{name}.reference.pt", weights_only=False)["state"]
        start = torch.load(tmp_path / f"one.{name}.initial.pt", weights_only=False)
        for schedule in schedules:
            state = torch.load(tmp_path / f"pipe.{name}.{schedule}.pt", weights_only=False)["state"]
            assert list(state) == list(reference), (name, schedule)
            for key, value in reference.items():
                if schedule in SYNCHRONOUS:  # (float64; HF's fused attention adds up in another order: 1e-9)
                    torch.testing.assert_close(
                        state[key], value, rtol=1e-7, atol=1e-8, msg=lambda m, k=key, n=name: f"{n} {k}: {m}"
                    )
                elif value.is_floating_point():
                    assert torch.isfinite(state[key]).all(), (name, schedule, key)
                    if key.endswith("weight") and "norm" not in key:
                        assert not torch.equal(state[key], start[key]), (name, schedule, key)


def test_hugging_face_models_and_the_lightning_demo_transformer_equal_one_device(tmp_path):
    """Hugging Face models from tiny configs (tests/hf_models.py: no forward in the LightningModule, the model's own
    labels= loss, attention masks with padding, GPT-2's tied embeddings, Llama's rotary buffers, T5's encoder-decoder)
    and Lightning's demo nn.Transformer (a causal target mask) under gpipe at W = 2 equal one device."""
    pytest.importorskip("transformers")
    names = ["hf-gpt2", "hf-llama", "hf-qwen2", "hf-mistral", "hf-bert", "hf-t5", "demo-transformer"]
    common = ("--model", ",".join(names), "--n", "2", "--precision", "64-true", "--batch-size", "8", "--steps", "2")
    run_zoo(tmp_path, *common, "--devices", "2", "--schedules", "gpipe", "--out", "pipe")
    run_zoo(tmp_path, *common, "--devices", "0", "--schedules", "reference", "--out", "one")
    _compare(tmp_path, names, ["gpipe"])


def test_hugging_face_models_train_under_every_policy_with_a_loss_in_the_step(tmp_path):
    """Llama with the loss computed in the step (from .logits) under every schedule; Qwen2, BERT and GPT-2 with an
    untied output layer (the asynchronous policies refuse weights tied across stages) under timeprest_i."""
    pytest.importorskip("transformers")
    common = ("--n", "2", "--precision", "64-true", "--batch-size", "8", "--steps", "3", "--loss", "step")
    run_zoo(tmp_path, "--model", "hf-llama", "--devices", "2", "--schedules", ",".join(SCHEDULES),
            "--out", "pipe", *common)  # fmt: skip
    run_zoo(tmp_path, "--model", "hf-llama", "--devices", "0", "--schedules", "reference", "--out", "one",
            *common)  # fmt: skip
    _compare(tmp_path, ["hf-llama"], list(SCHEDULES))
    names = ["hf-qwen2", "hf-bert", "hf-gpt2-untied"]
    run_zoo(tmp_path, "--model", ",".join(names), "--devices", "2", "--schedules", "timeprest_i", "--out", "pipe",
            *common)  # fmt: skip
    run_zoo(tmp_path, "--model", ",".join(names), "--devices", "0", "--schedules", "reference", "--out", "one",
            *common)  # fmt: skip
    _compare(tmp_path, names, ["timeprest_i"])
