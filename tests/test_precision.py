"""Gradient clipping and 16-bit loss scaling see the whole pipeline: the clipping norm is that of every stage's
gradients together, and a step in which any stage overflows is skipped on every stage."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_same_params, run_script, train

pytestmark = pytest.mark.slow  # multi-process training runs (the fast subset: -m 'not slow')


@pytest.mark.parametrize("algorithm, stages", [("norm", "2"), ("norm", "3"), ("value", "2")])
def test_gradient_clipping_matches_single_device(tmp_path, reference, algorithm, stages):
    args = ("--epochs", "1", "--clip", "0.05", "--clip-algorithm", algorithm)
    got = train(tmp_path, "clip", *args, "--devices", stages, "--schedule", "1f1b")
    expected = reference(*args)
    assert_same_params(got["state_dict"], expected["state_dict"])
    # and clipping was active: without it the parameters end elsewhere
    unclipped = reference("--epochs", "1")["state_dict"]
    assert any(not torch.allclose(expected["state_dict"][k], unclipped[k], atol=1e-4) for k in unclipped)


def test_float16_loss_scaling_matches_single_device(tmp_path, reference):
    args = ("--epochs", "1", "--fp16")
    got = train(tmp_path, "fp16", *args, "--devices", "2", "--schedule", "gpipe")
    expected = reference(*args)
    assert_same_params(got["state_dict"], expected["state_dict"], atol=1e-3)


@pytest.mark.parametrize("schedule", ["1f1b", "timeprest_v"])
def test_bfloat16_autocast(tmp_path, reference, schedule):
    args = ("--epochs", "1", "--precision", "bf16-mixed")
    got = train(tmp_path, "bf16", *args, "--devices", "2", "--schedule", schedule, "--n", "2")
    if schedule == "1f1b":  # synchronous: as on one device
        assert_same_params(got["state_dict"], reference(*args, "--n", "2")["state_dict"], atol=1e-3)
    else:  # the asynchronous policy runs its forwards and backwards under the same autocast
        assert all(torch.isfinite(v).all() for v in got["state_dict"].values())
        assert math.isfinite(got["steps"][-1]["returned"]) and got["epochs"][-1]["train_loss_epoch"] > 0


def test_an_overflow_on_one_stage_skips_the_step_on_every_stage(tmp_path, reference):
    out = tmp_path / "inf.pt"
    run_script(tmp_path, "--devices", "2", "--fp16", "--inf-rank", "1", "--max-steps", "1", "--out", str(out))
    ranks = [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(2)]
    # both stages skipped the step and backed the scale off alike (2**16 -> 2**15)
    assert [r["scale"] for r in ranks] == [2.0**15, 2.0**15]
    initial = reference("--max-steps", "0")["state_dict"]
    assert_same_params(torch.load(out, weights_only=False)["state_dict"], initial, atol=0)
