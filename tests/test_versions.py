"""VersionStore without processes: the weights a pending graph reads at its backward, under each policy, and what
the store keeps, copies and moves to get there."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_timeprest import versions
from lightning_timeprest.errors import PipelineConfigError
from lightning_timeprest.versions import POLICIES, LeafSet, VersionStore


def _forward(leaves: LeafSet, x: Tensor) -> Tensor:
    return x @ leaves.leaves[0].T  # the graph saves the weight leaf (a view of the storage the leaves read)


def _step(store: VersionStore, w: nn.Parameter) -> None:
    with store.stepping(), torch.no_grad():
        w.add_(1.0)  # in place, as optimizers do


def _backward(store: VersionStore, policy: str, leaves: LeafSet, y: Tensor, g: Tensor, readers: int) -> int:
    with store.reading_backward(leaves, POLICIES[policy], leaves.version, lambda d: 0.25 * d, readers) as d:
        y.backward(g)
    return d


@pytest.fixture
def setup() -> tuple[VersionStore, nn.Parameter, Tensor, Tensor]:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 3))
    return VersionStore(["w"], [w]), w, torch.randn(2, 3, requires_grad=True), torch.randn(2, 4)


def test_a_pinned_version_keeps_the_storage_its_graphs_saved_and_a_stash_is_read_in_place(setup):
    store, w, x, g = setup
    leaves = store.leaves_for(0)
    store.pin(0)
    y, w0, ptr = _forward(leaves, x), w.detach().clone(), w.data_ptr()
    _step(store, w)
    assert w.data_ptr() != ptr and store.snapshots[0][0].data_ptr() == ptr  # the parameter moved to the copy
    assert torch.equal(store.snapshots[0][0], w0) and torch.equal(w.detach(), w0 + 1)
    assert _backward(store, "pipedream", leaves, y, g, readers=1) == 1
    assert torch.equal(x.grad, g @ w0)
    assert store.peak_versions == 2  # the live weights and the stash: nothing copied in for the backward
    store.unpin(0)
    assert store.versions_held == 1


def test_w_tilde_is_built_over_a_stale_version_read_for_the_last_time(setup):
    store, w, x, g = setup
    leaves = store.leaves_for(0)
    store.pin(0)
    y, w0 = _forward(leaves, x), w.detach().clone()
    _step(store, w)
    live = w.detach().clone()
    assert _backward(store, "timeprest_i", leaves, y, g, readers=1) == 1
    assert torch.equal(x.grad, g @ torch.lerp(live, w0, 0.25))
    assert 0 not in store.snapshots and torch.equal(w.detach(), live)  # the stale version is spent, live intact
    assert store.peak_versions == 2


@pytest.mark.parametrize("trade", [True, False], ids=["traded", "copied"])
def test_a_stale_version_another_backward_still_reads_is_put_back(setup, monkeypatch, trade):
    # traded: W~ is built in a new tensor whose storage pointer the stale storage borrows for the backward;
    # copied (torch without storage trading): the stale weights are copied aside, W~ written over, and put back
    monkeypatch.setattr(versions, "_CAN_TRADE", trade and versions._CAN_TRADE)
    store, w, x, g = setup
    first, second = store.leaves_for(0), store.leaves_for(0)
    assert first is second  # forwards of one version share their leaves
    store.pin(0)
    store.pin(0)
    x2 = torch.randn(2, 3, requires_grad=True)
    y1, y2, w0 = _forward(first, x), _forward(second, x2), w.detach().clone()
    _step(store, w)
    live1 = w.detach().clone()
    assert _backward(store, "timeprest_i", first, y1, g, readers=1) == 1
    assert torch.equal(x.grad, g @ torch.lerp(live1, w0, 0.25))
    assert torch.equal(store.snapshots[0][0], w0)  # restored for the other backward
    assert store.snapshots[0][0].data_ptr() == first.storage[0].data_ptr()  # in the storage its graphs saved
    assert store.peak_versions == 3  # the stale weights' copy while W~ was in their place
    store.unpin(0)
    _step(store, w)  # d = 2 for the second backward
    live2 = w.detach().clone()
    assert _backward(store, "timeprest_i", second, y2, g, readers=1) == 2
    assert torch.equal(x2.grad, g @ torch.lerp(live2, w0, 0.5))
    assert 0 not in store.snapshots


def test_parameters_sharing_a_storage_are_not_moved(setup):
    _, _, x, g = setup
    flat = torch.randn(24)
    w = nn.Parameter(flat[:12].view(4, 3))
    other = nn.Parameter(flat[12:].view(4, 3))
    store = VersionStore(["w", "other"], [w, other])
    leaves = store.leaves_for(0)
    store.pin(0)
    y, w0, ptr = _forward(leaves, x), w.detach().clone(), w.data_ptr()
    _step(store, w)
    assert w.data_ptr() == ptr and torch.equal(store.snapshots[0][0], w0)  # copied aside, not moved
    live = w.detach().clone()
    assert _backward(store, "pipedream", leaves, y, g, readers=1) == 1
    assert torch.equal(x.grad, g @ w0) and torch.equal(w.detach(), live)  # stash copied in, live put back


def test_vertical_sync_writes_the_latest_weights_once_per_version_and_keeps_the_snapshot(setup):
    store, w, x, g = setup
    store.keep_versions_from(0)  # forwards yet to come may read version 0 (timeprest, a later stage)
    _step(store, w)
    w0 = store.snapshots[0][0].clone()
    leaves = store.leaves_for(0)
    assert store.leaves_for(0) is leaves
    y = _forward(leaves, x)
    _step(store, w)
    live = w.detach().clone()
    ptr = w.data_ptr()
    assert _backward(store, "timeprest", leaves, y, g, readers=0) == 2
    assert torch.equal(x.grad, g @ live)  # the latest weights
    assert torch.equal(store.snapshots[0][0], w0) and torch.equal(w.detach(), live) and w.data_ptr() == ptr
    assert store.peak_versions == 3  # live and versions 0, 1: the snapshot borrowed the live storage, no copy
    store.keep_versions_from(2)  # version 0 let go: a graph that still reads it takes the latest weights in place
    x.grad = None
    y = _forward(leaves, x)
    assert 0 not in store.snapshots
    assert _backward(store, "timeprest", leaves, y, g, readers=0) == 2
    assert torch.equal(x.grad, g @ live) and store.versions_held == 1


@pytest.mark.parametrize("trade", [True, False], ids=["traded", "copied"])
def test_what_the_parameters_hold_while_a_backward_borrows_their_storage(setup, monkeypatch, trade):
    # README (Memory): a later stage under vertical sync lends the live weights' storage to a graph that saved a
    # kept version; until it is given back, the parameter holds that version (a backward hook reading module weights
    # sees it), and the latest after. Without storage trading the latest is copied in instead and stays put.
    monkeypatch.setattr(versions, "_CAN_TRADE", trade and versions._CAN_TRADE)
    store, w, x, g = setup
    store.keep_versions_from(0)
    _step(store, w)
    w0 = store.snapshots[0][0].clone()
    leaves = store.leaves_for(0)
    y = _forward(leaves, x)
    _step(store, w)
    live = w.detach().clone()
    seen: list[Tensor] = []
    y.register_hook(lambda grad: seen.append(w.detach().clone()))  # runs inside the backward
    assert _backward(store, "timeprest", leaves, y, g, readers=0) == 2
    assert torch.equal(x.grad, g @ live)
    assert torch.equal(seen[0], w0 if trade else live)
    assert torch.equal(w.detach(), live) and torch.equal(store.snapshots[0][0], w0)


def test_nested_backwards_over_several_versions_all_read_the_latest_weights(setup):
    # the last stage under vertical sync back-propagates one loss through graphs that read two kept versions: the
    # outer block must leave the live weights in place for the inner one, which may then borrow their storage
    store, w, x, g = setup
    store.keep_versions_from(0)
    old = store.leaves_for(0)
    y0 = _forward(old, x)
    _step(store, w)
    newer = store.leaves_for(1)
    x1 = torch.randn(2, 3, requires_grad=True)
    y1 = _forward(newer, x1)
    _step(store, w)
    live, kept = w.detach().clone(), [store.snapshots[v][0].clone() for v in (0, 1)]
    policy = POLICIES["timeprest"]
    with (
        store.reading_backward(old, policy, 0, lambda d: 0.0, alone=False) as d0,
        store.reading_backward(newer, policy, 1, lambda d: 0.0) as d1,
    ):
        assert torch.equal(old.storage[0], live) and torch.equal(newer.storage[0], live)
        torch.autograd.backward([y0, y1], [g, g])
    assert (d0, d1) == (2, 1)
    assert torch.equal(x.grad, g @ live) and torch.equal(x1.grad, g @ live)
    assert torch.equal(w.detach(), live)
    assert [torch.equal(store.snapshots[v][0], k) for v, k in zip((0, 1), kept, strict=True)] == [True, True]


def test_a_parameters_hooks_are_called_from_the_leaves_standing_in_for_it():
    w = nn.Parameter(torch.randn(4, 3))
    seen = []
    w.register_hook(lambda g: seen.append(g.clone()))
    w.register_hook(lambda g: 2 * g)  # what a hook returns is what the next one sees and what accumulates
    w.register_hook(lambda g: seen.append(g.clone()))
    store = VersionStore(["w"], [w])
    leaves = store.live_leaves()
    x, g = torch.randn(2, 3), torch.randn(2, 4)
    torch.autograd.backward(_forward(leaves, x), g)
    want = g.t() @ x
    assert len(seen) == 2
    torch.testing.assert_close(seen[0], want)
    torch.testing.assert_close(seen[1], 2 * want)
    torch.testing.assert_close(leaves.leaves[0].grad, 2 * want)


def test_a_post_accumulate_grad_hook_is_refused_with_the_ways_out():
    w = nn.Parameter(torch.randn(4, 3))
    w.register_post_accumulate_grad_hook(lambda t: None)
    with pytest.raises(PipelineConfigError, match="register_post_accumulate_grad_hook.*schedule='gpipe'"):
        VersionStore(["w"], [w]).live_leaves()
