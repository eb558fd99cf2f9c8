"""Real models written as ordinary nn.Modules (the examples' VGG-16 and ResNet-50 for 32x32 inputs, and a small GPT)
train with W = 2 or W = 4 under every registered schedule, split by tracing; under the synchronous schedules the
parameters equal single-device training, under the asynchronous policies the single-process reference of the same
weight rule in the op order each rank ran (tests/generic_async_reference.py).

The comparison runs in float64 (``precision="64-true"``). A pipeline adds up some gradient contributions in another
order than one device does (where a boundary cuts a residual), and thin batch-normalised networks at batch size 8
amplify those float32 rounding differences to visible ones within a few steps; in float64 the runs agree to 1e-9.
The reference trains on one device with the data loader cutting each batch into the same N micro-batches and
gradients accumulated over them, which is what a pipeline computes with batch-norm (statistics per micro-batch).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import generic_async_reference
import pytest
import torch
from conftest import run_script
from lightning.pytorch import seed_everything

from lightning_timeprest import SCHEDULES

pytestmark = pytest.mark.slow  # multi-process training runs (the fast subset: -m 'not slow')

SCRIPT = Path(__file__).parent / "scripts" / "train_zoo.py"
SYNCHRONOUS = ("gpipe", "1f1b")
# a policy whose backward rule differs from each one's: the comparison must tell them apart
OTHER_RULE = {"timeprest_v": "timeprest_i", "timeprest": "timeprest_v", "timeprest_i": "timeprest_v",
              "pipedream": "timeprest_v"}  # fmt: skip
# The asynchronous runs against the reference, in float64 (the reference runs the eager model, the stages an
# exported graph, so a few sums go in another order). VGG-16, ResNet-50, GPT and BERT agree with it to 6e-15 (most
# bit for bit): 1e-11 leaves room for other machines and thread counts. Llama and Qwen2 agree to 1.2e-9 (their
# rotary terms are computed in float32 whatever the model's precision), GPT-2 to 1.6e-10 (its attention adds up in
# another order): the same 1e-8 as under gpipe below. Another policy's rule moves the weights by 2.6e-4 and more,
# BERT's by 5.9e-8 (its stage 0 barely moves in 3 steps); the tests assert 1000 x the tolerance.
EAGER_TOL = {"rtol": 1e-11, "atol": 1e-11}
HF_TOL = {"rtol": 1e-7, "atol": 1e-8}
HF_TOL_MODELS = ("hf-llama", "hf-qwen2", "hf-mistral", "hf-gpt2", "hf-gpt2-untied")


@functools.cache
def _zoo() -> Any:
    spec = importlib.util.spec_from_file_location("train_zoo", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_against_async_reference(
    tmp_path: Path, name: str, schedule: str, stages: int, n: int, tol: dict[str, float], loss: str = "model"
) -> None:
    """The run of ``name`` under the asynchronous ``schedule`` equals the single-process reference of its rule,
    replayed in the op order each rank recorded with the stages the strategy cut at (float64); and the reference of
    another rule does not."""
    run = torch.load(tmp_path / f"pipe.{name}.{schedule}.pt", weights_only=False)
    ranks = [torch.load(tmp_path / f"pipe.{name}.{schedule}.rank{r}.pt", weights_only=False) for r in range(stages)]
    initial = torch.load(tmp_path / f"one.{name}.initial.pt", weights_only=False)
    zoo = _zoo()

    def reference(policy: str) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        seed_everything(0)
        model, _ = zoo.model_and_data(name, len(run["batches"]), loss)
        model.load_state_dict(initial)
        return generic_async_reference.reference(
            model.double(), run["batches"], run["split_points"], [r["trace"] for r in ranks], policy,
            1 if schedule == "pipedream" else n, check_recorded=policy == schedule,
        )  # fmt: skip

    expected, stage_of = reference(schedule)
    # the reference's stages are the strategy's: each parameter it trains on stage s, rank s holds
    assert all(p in ranks[s]["held"] for p, s in stage_of.items()), (name, schedule)
    assert sorted(set(stage_of.values())) == list(range(stages)), (name, schedule)
    state = run["state"]
    assert list(state) == list(expected), (name, schedule)
    for key, value in expected.items():
        msg = lambda m, k=key: f"{name} {schedule} {k}: {m}"  # noqa: E731
        if value.is_floating_point():
            torch.testing.assert_close(state[key], value, **tol, msg=msg)
        else:  # batch-norm's num_batches_tracked
            assert torch.equal(state[key], value), msg("differs")
    other, _ = reference(OTHER_RULE[schedule])
    apart = max((state[k] - v).abs().max().item() for k, v in other.items() if v.is_floating_point())
    assert apart > 1000 * tol["atol"], (name, schedule, OTHER_RULE[schedule], apart)


def assert_deferred(tmp_path: Path, name: str, schedule: str, stages: int) -> None:
    """Under ``--defer-all``, gpipe's and the nF1B policies' stages took Linear weight gradients once per mini-batch
    (N > 1); 1f1b's and pipedream's (one micro-batch) none."""
    deferred = [
        torch.load(tmp_path / f"pipe.{name}.{schedule}.rank{r}.pt", weights_only=False)["deferred"]
        for r in range(stages)
    ]
    assert (sum(deferred) > 0) == (schedule not in ("1f1b", "pipedream")), (name, schedule, deferred)


def run_zoo(tmp_path: Path, *args: str, timeout: float = 420) -> None:
    run_script(tmp_path, *args, timeout=timeout, script=SCRIPT)


# each model once (the suite's time): the CNNs at W = 2 (a cut through ResNet's residuals), GPT at W = 4 (three
# boundaries, each crossed by the residual stream)
@pytest.mark.parametrize("stages, model", [(2, "vgg16"), (2, "resnet50"), (4, "gpt")])
def test_model_trains_under_every_schedule(tmp_path, model, stages):
    n = 2 if stages == 2 else 4  # timeprest_v is staleness-free only for W <= N + 1
    common = ("--model", model, "--n", str(n), "--precision", "64-true", "--batch-size", "8", "--steps", "3")
    # --defer-all: the stages' Linear layers (the user's own modules inside the traced graph) take their weight
    # gradients once per mini-batch, as larger ones do by default
    run_zoo(tmp_path, *common, "--devices", str(stages), "--schedules", ",".join(SCHEDULES), "--out", "pipe",
            "--defer-all")  # fmt: skip
    run_zoo(tmp_path, *common, "--devices", "0", "--schedules", "reference", "--out", "one")
    reference = torch.load(tmp_path / f"one.{model}.reference.pt", weights_only=False)["state"]
    for schedule in SCHEDULES:
        run = torch.load(tmp_path / f"pipe.{model}.{schedule}.pt", weights_only=False)
        state = run["state"]
        assert list(state) == list(reference), schedule
        table = run["table"]
        assert [row[0] for row in table[1:]] == [str(s) for s in range(stages)]
        assert_deferred(tmp_path, model, schedule, stages)
        if schedule in SYNCHRONOUS:
            for key, value in reference.items():
                torch.testing.assert_close(state[key], value, rtol=1e-9, atol=1e-9, msg=lambda m, k=key: f"{k}: {m}")
        else:
            check_against_async_reference(tmp_path, model, schedule, stages, n, EAGER_TOL)


def _compare(tmp_path: Path, names: list[str], schedules: list[str], loss: str = "model") -> None:
    """Each pipelined run (W = 2, N = 2) against one device under gpipe/1f1b, against the single-process reference
    of its rule under the asynchronous policies."""
    for name in names:
        reference = torch.load(tmp_path / f"one.{name}.reference.pt", weights_only=False)["state"]
        for schedule in schedules:
            if schedule not in SYNCHRONOUS:
                tol = HF_TOL if name in HF_TOL_MODELS else EAGER_TOL
                check_against_async_reference(tmp_path, name, schedule, 2, 2, tol, loss)
                continue
            state = torch.load(tmp_path / f"pipe.{name}.{schedule}.pt", weights_only=False)["state"]
            assert list(state) == list(reference), (name, schedule)
            for key, value in reference.items():  # (float64; HF's fused attention adds up in another order: 1e-9)
                torch.testing.assert_close(
                    state[key], value, rtol=1e-7, atol=1e-8, msg=lambda m, k=key, n=name: f"{n} {k}: {m}"
                )


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
    """Llama with the loss computed in the step (from .logits) under every schedule; Qwen2, Mistral, BERT and GPT-2
    with an untied output layer (the asynchronous policies refuse weights tied across stages) under timeprest_i."""
    pytest.importorskip("transformers")
    common = ("--n", "2", "--precision", "64-true", "--batch-size", "8", "--steps", "3", "--loss", "step")
    run_zoo(tmp_path, "--model", "hf-llama", "--devices", "2", "--schedules", ",".join(SCHEDULES),
            "--out", "pipe", "--defer-all", *common)  # fmt: skip
    for schedule in SCHEDULES:  # Llama's projections are nn.Linear: they ran deferred (gpipe, nF1B)
        assert_deferred(tmp_path, "hf-llama", schedule, 2)
    run_zoo(tmp_path, "--model", "hf-llama", "--devices", "0", "--schedules", "reference", "--out", "one",
            *common)  # fmt: skip
    _compare(tmp_path, ["hf-llama"], list(SCHEDULES), loss="step")
    names = ["hf-qwen2", "hf-mistral", "hf-bert", "hf-gpt2-untied"]
    run_zoo(tmp_path, "--model", ",".join(names), "--devices", "2", "--schedules", "timeprest_i", "--out", "pipe",
            *common)  # fmt: skip
    run_zoo(tmp_path, "--model", ",".join(names), "--devices", "0", "--schedules", "reference", "--out", "one",
            *common)  # fmt: skip
    _compare(tmp_path, names, ["timeprest_i"], loss="step")
