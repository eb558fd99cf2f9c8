"""Lightning's gradient hooks under every schedule: ``on_before_zero_grad``, ``on_before_backward``,
``on_after_backward`` and ``on_before_optimizer_step`` fire once per stage update, on the LightningModule and on
callbacks, with the stage's own gradients, and what they log (Lightning's ``grad_norm`` recipe) reaches the logger.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import run_script
from lightning.pytorch.utilities import grad_norm

from lightning_timeprest import SCHEDULES

pytestmark = pytest.mark.slow  # multi-process training runs (the fast subset: -m 'not slow')

HOOKS = ("on_before_zero_grad", "on_before_backward", "on_after_backward", "on_before_optimizer_step")
STEPS = 6  # 100 samples in batches of 18
LR, MOMENTUM = 0.1, 0.9  # tests/models.py's StemNetHead with SGD


def _run(tmp_path, *args: str) -> tuple[dict, list[list], list[dict]]:
    out = tmp_path / "hooks.pt"
    run_script(tmp_path, "--epochs", "1", "--hooks", "--grad-norm", "--out", str(out), *args)
    devices = int(args[args.index("--devices") + 1])
    ranks = range(max(devices, 1))
    calls = [torch.load(f"{out}.hooks{r}", weights_only=False) for r in ranks]
    placements = [torch.load(f"{out}.rank{r}", weights_only=False) for r in ranks] if devices else []
    return torch.load(out, weights_only=False), calls, placements


def _replay_sgd(initial: dict[str, torch.Tensor], updates: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The parameters SGD with momentum reaches applying ``updates`` (each the gradients of one step) in order."""
    params = {n: torch.nn.Parameter(t.clone()) for n, t in initial.items()}
    optimizer = torch.optim.SGD(params.values(), lr=LR, momentum=MOMENTUM)
    for grads in updates:
        for n, p in params.items():
            p.grad = grads.get(n)
        optimizer.step()
    return {n: p.detach() for n, p in params.items()}


@pytest.fixture(scope="module")
def one_device(tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    """The gradients on_before_optimizer_step sees on one device, step by step."""
    _, (one,), _ = _run(tmp_path_factory.mktemp("one"), "--devices", "0")
    return [grads for name, _, grads in one if name == "on_before_optimizer_step"]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_gradient_hooks_fire_per_stage_update_with_the_stage_gradients(tmp_path, schedule, one_device):
    n = "1" if schedule == "pipedream" else "2"
    result, calls, placements = _run(tmp_path, "--devices", "2", "--schedule", schedule, "--n", n)
    for rank, (seen, placement) in enumerate(zip(calls, placements, strict=True)):
        # each hook once per update: one update per mini-batch on every stage, as many as one device makes
        for hook in HOOKS:
            assert sum(name == hook for name, _, _ in seen) == STEPS, (schedule, rank, hook)
        own = {k for k, v in placement["params"].items() if v != "meta"}
        befores = [grads for name, _, grads in seen if name == "on_before_optimizer_step"]
        afters = [grads for name, _, grads in seen if name == "on_after_backward"]
        for grads in befores:
            assert set(grads) <= own and grads, (schedule, rank, sorted(grads))  # this stage's own gradients
        # nothing clips here: on_after_backward and on_before_optimizer_step see the same gradients
        for a, b in zip(afters, befores, strict=True):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        # and they are the gradients the step applies: replaying them with SGD gives this stage's final weights
        stage_params = {k: placement["initial"][k] for k in own if k in befores[-1]}
        replayed = _replay_sgd(stage_params, befores)
        for k, value in replayed.items():
            torch.testing.assert_close(placement["values"][k], value, rtol=1e-5, atol=1e-6, msg=f"{schedule} {k}")
    if schedule in ("gpipe", "1f1b"):  # synchronous: each stage's hooks see the gradients one device sees
        for rank, seen in enumerate(calls):
            got = [grads for name, _, grads in seen if name == "on_before_optimizer_step"]
            for step, (g, e) in enumerate(zip(got, one_device, strict=True)):
                for k, v in g.items():
                    torch.testing.assert_close(v, e[k], rtol=1e-4, atol=1e-6, msg=f"rank {rank} step {step} {k}")
    # every stage's hooks saw the same loss for the same mini-batch (the synchronous ones the step's loss; the
    # asynchronous ones the loss of the mini-batch being back-propagated, sent back with its gradients)
    losses = [[loss for name, _, loss in seen if name == "on_before_backward"] for seen in calls]
    assert all(math.isfinite(x) for x in losses[0])
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]))
    # grad_norm logged from on_before_optimizer_step, per stage: rank 0's logger has every stage's last values
    logged = result["logged"]
    for stage, seen in enumerate(calls):
        last = [grads for name, _, grads in seen if name == "on_before_optimizer_step"][-1]
        for k, g in last.items():
            key = f"grad_2.0_norm/{k}/stage{stage}"
            assert key in logged, (schedule, key, sorted(logged))
            assert logged[key] == pytest.approx(float(g.norm()), rel=1e-4), (schedule, key)
        expected_total = float(grad_norm(_Holder(last), norm_type=2)["grad_2.0_norm_total"])
        assert logged[f"grad_2.0_norm_total/stage{stage}"] == pytest.approx(expected_total, rel=1e-4)


class _Holder(torch.nn.Module):
    """Parameters carrying given gradients, for ``grad_norm``."""

    def __init__(self, grads: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for i, g in enumerate(grads.values()):
            p = torch.nn.Parameter(torch.zeros_like(g))
            p.grad = g
            self.register_parameter(f"p{i}", p)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_tensor_hooks_on_parameters_change_their_gradients_under_every_schedule(tmp_path, schedule):
    """A hook registered on a parameter (``register_hook``) sees its gradients and what it returns trains, under the
    asynchronous policies too (their backwards run through weight versions standing in for the parameters): a hook
    that zeroes the first half of every pipelined weight's and bias's gradient leaves that half as it was."""
    from lightning.pytorch import seed_everything
    from models import StemNetHead

    seed_everything(0)  # as train.py does before making the model
    initial = {n: p.detach().clone() for n, p in StemNetHead().named_parameters()}
    n = "1" if schedule == "pipedream" else "2"
    args = ("--epochs", "1", "--mask-hook", "--defer-all", "--optimizer", "adam")
    run_script(tmp_path, *args, "--devices", "2", "--schedule", schedule, "--n", n, "--out", str(tmp_path / "r.pt"))
    checked = set()
    for rank in range(2):
        values = torch.load(tmp_path / f"r.pt.rank{rank}", weights_only=False)["values"]
        for name, value in values.items():
            if not name.startswith("net.") or value.is_meta:
                continue
            half = value.shape[0] // 2
            assert torch.equal(value[:half], initial[name][:half]), (schedule, name)  # its gradient was zeroed
            assert not torch.equal(value[half:], initial[name][half:]), (schedule, name)  # it trained
            checked.add(name)
    assert len(checked) == 8  # the 4 Linear layers' weights and biases
