"""Linear layers' weight gradients taken once per mini-batch (weight_gradients), without processes: the gradients
equal autograd's, and anywhere but the engine's own backward the layers back-propagate as F.linear does."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_timeprest.weight_gradients import WeightGradients


class Net(nn.Module):
    """Linear layers with and without a bias, one called twice (shared weights), one sharing that one's weight with
    a bias of its own, over (batch, time, features)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 16, bias=False)
        self.d = nn.Linear(16, 16)
        self.d.weight = self.b.weight
        self.c = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.a(x))
        h = F.gelu(self.b(h)) + self.b(h.flip(-1)) + self.d(h)
        return self.c(h)


def _pair() -> tuple[Net, Net, WeightGradients]:
    torch.manual_seed(0)
    plain = Net()
    deferred = copy.deepcopy(plain)
    grads = WeightGradients()
    assert grads.install(deferred, min_weight=0) == 4
    return plain, deferred, grads


def _grads(net: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.clone() for n, p in net.named_parameters()}


@pytest.mark.parametrize("micro", [1, 4])
@pytest.mark.parametrize("shape", [(5,), (2, 3)], ids=["2d", "3d"])
def test_a_mini_batch_backward_gives_autograds_gradients(micro, shape):
    plain, deferred, grads = _pair()
    xs = [torch.randn(*shape, 8, requires_grad=True) for _ in range(micro)]
    targets = [torch.randn(*shape, 4) for _ in range(micro)]
    ys = [deferred(x) for x in xs]  # every forward first, then the backwards, as a stage runs them
    with grads.deferring():
        for y, t in zip(ys, targets, strict=True):
            torch.autograd.backward(y, t)
    assert all(p.grad is None for p in deferred.parameters())  # kept for the flush, not per micro-batch
    input_grads = [x.grad.clone() for x in xs]
    grads.flush()
    for x, t in zip(xs, targets, strict=True):
        x.grad = None
        torch.autograd.backward(plain(x), t)
    assert all(torch.equal(x.grad, g) for x, g in zip(xs, input_grads, strict=True))  # per micro-batch, at once
    got, want = _grads(deferred), _grads(plain)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-6)


def test_the_flush_adds_into_an_existing_gradient_in_place():
    plain, deferred, grads = _pair()
    start = {n: torch.randn_like(p) for n, p in deferred.named_parameters()}
    for net in (plain, deferred):
        for n, p in net.named_parameters():
            p.grad = start[n].clone()
    buffers = {n: p.grad for n, p in deferred.named_parameters()}
    x, t = torch.randn(5, 8), torch.randn(5, 4)
    with grads.deferring():
        torch.autograd.backward(deferred(x), t)
    grads.flush()
    torch.autograd.backward(plain(x), t)
    for n, p in deferred.named_parameters():
        assert p.grad is buffers[n]
        torch.testing.assert_close(p.grad, dict(plain.named_parameters())[n].grad, rtol=1e-6, atol=1e-6)


def test_leaf_sets_retargeted_to_the_parameters_take_one_product_per_weight(monkeypatch):
    """As the asynchronous engine runs a mini-batch whose forwards read two weight versions: each version's leaves
    stand in for the parameters; their kept calls go to the parameters' gradients, one product per weight."""
    from torch.func import functional_call

    from lightning_timeprest import weight_gradients

    plain, deferred, grads = _pair()
    names = [n for n, _ in deferred.named_parameters()]
    versions = [[p.detach().clone() + 0.01 * k for p in deferred.parameters()] for k in range(2)]
    xs, targets = [torch.randn(5, 8) for _ in range(4)], [torch.randn(5, 4) for _ in range(4)]

    def leaf_set(values: list[Tensor]) -> list[Tensor]:
        return [v.clone().requires_grad_() for v in values]

    def run(net: nn.Module, sets: list[list[Tensor]], defer: bool) -> None:
        for j, (x, t) in enumerate(zip(xs, targets, strict=True)):  # micro-batches 0, 1 read version 0; 2, 3 version 1
            leaves = sets[j // 2]
            y = functional_call(net, dict(zip(names, leaves, strict=True)), (x,))
            with grads.deferring() if defer else contextlib.nullcontext():
                torch.autograd.backward(y, t)

    got_sets, want_sets = [leaf_set(v) for v in versions], [leaf_set(v) for v in versions]
    run(deferred, got_sets, defer=True)
    for leaves in got_sets:
        assert all(leaf.grad is None for leaf in leaves)
        grads.retarget(zip(leaves, deferred.parameters(), strict=True))
    products = []
    original = weight_gradients._accumulate
    monkeypatch.setattr(weight_gradients, "_accumulate", lambda leaf, g: (products.append(leaf), original(leaf, g)))
    grads.flush()
    layers = {(id(m.weight), id(m.bias)): m for m in deferred.modules() if isinstance(m, nn.Linear)}
    assert len(products) == sum(1 + (m.bias is not None) for m in layers.values())  # as if one version were read
    assert {id(t) for t in products} == {id(p) for p in deferred.parameters()}
    run(plain, want_sets, defer=False)
    for i, (name, p) in enumerate(deferred.named_parameters()):
        want = want_sets[0][i].grad + want_sets[1][i].grad
        torch.testing.assert_close(p.grad, want, rtol=1e-6, atol=1e-6, msg=name)


def test_a_weight_with_hooks_back_propagates_at_once_and_its_hooks_see_each_calls_gradient():
    plain, deferred, grads = _pair()
    seen: dict[str, list[Tensor]] = {"plain": [], "deferred": []}
    plain.a.weight.register_hook(lambda g: seen["plain"].append(g.clone()))
    deferred.a.weight.register_hook(lambda g: seen["deferred"].append(g.clone()))
    accumulated = []
    deferred.c.bias.register_post_accumulate_grad_hook(lambda t: accumulated.append(t.grad.clone()))
    xs, targets = [torch.randn(5, 8) for _ in range(2)], [torch.randn(5, 4) for _ in range(2)]
    with grads.deferring():
        for x, t in zip(xs, targets, strict=True):
            torch.autograd.backward(deferred(x), t)
    assert deferred.a.weight.grad is not None and deferred.c.weight.grad is not None  # taken at once: hooked layers
    assert deferred.b.weight.grad is None  # kept for the flush: no hooks on it
    grads.flush()
    for x, t in zip(xs, targets, strict=True):
        torch.autograd.backward(plain(x), t)
    assert len(seen["deferred"]) == len(seen["plain"]) == 2 and len(accumulated) == 2
    for got, want in zip(seen["deferred"], seen["plain"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    got, want = _grads(deferred), _grads(plain)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-6)


def test_outside_the_engines_backward_the_layers_back_propagate_at_once_and_twice():
    plain, deferred, _ = _pair()
    x = torch.randn(4, 8, requires_grad=True)
    penalties = []
    for net in (plain, deferred):  # a gradient penalty: the input's gradient, differentiated again
        (gx,) = torch.autograd.grad(net(x).square().sum(), x, create_graph=True)
        penalties.append(gx.square().sum())
        penalties[-1].backward()
    torch.testing.assert_close(penalties[1], penalties[0])
    got, want = _grads(deferred), _grads(plain)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-6)


def test_without_grad_or_under_autocast_the_layers_run_f_linear():
    _, deferred, _ = _pair()
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert deferred.a(x).grad_fn is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = deferred.a(x)
    assert y.dtype == torch.bfloat16 and "Deferred" not in type(y.grad_fn).__name__
    assert "Deferred" in type(deferred.a(x).grad_fn).__name__


def test_only_plain_linear_layers_are_installed_and_uninstall_gives_their_forward_back():
    class Scaled(nn.Linear):
        def forward(self, x: Tensor) -> Tensor:
            return 2 * super().forward(x)

    net = nn.Sequential(nn.Linear(3, 3), Scaled(3, 3), nn.Sequential(nn.Linear(3, 3)), nn.Linear(3, 2))
    grads = WeightGradients()
    assert grads.install(net, min_weight=9) == 2  # not the subclass, nor the layer with the smaller weight
    assert "forward" in vars(net[0]) and "forward" not in vars(net[1]) and "forward" in vars(net[2][0])
    assert "forward" not in vars(net[3])
    grads.uninstall()
    assert not any("forward" in vars(m) for m in net.modules())
    y = net[:3](torch.randn(2, 3, requires_grad=True))
    assert "Deferred" not in type(y.grad_fn).__name__


@pytest.mark.parametrize(
    "schedule, n, defer, expected",
    [
        ("gpipe", 4, True, True),
        ("timeprest_v", 2, True, True),
        ("timeprest_i", 4, True, True),
        ("1f1b", 4, True, False),  # frees each micro-batch's activations at its backward
        ("pipedream", None, True, False),  # one micro-batch per mini-batch
        ("gpipe", 1, True, False),
        ("timeprest", 2, False, False),
    ],
)
def test_which_schedules_take_weight_gradients_once_per_mini_batch(schedule, n, defer, expected):
    from lightning_timeprest import TiMePReStStrategy

    strategy = TiMePReStStrategy(schedule=schedule, num_microbatches=n, defer_weight_grads=defer)
    assert strategy.config.defers_weight_grads(2) is expected
