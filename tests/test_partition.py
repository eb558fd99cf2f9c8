import itertools
from collections.abc import Sequence

import pytest
import torch
from torch import nn

from lightning_timeprest import compat
from lightning_timeprest.partition import (
    BlockCosts,
    PartitionError,
    balance_by_cost,
    find_pipelined_module,
    plan_sequential,
    plan_stages,
)
from lightning_timeprest.placement import sync_batch_norms, unsync_batch_norms
from lightning_timeprest.runtime import StageModule


def test_balance_by_cost_is_optimal_and_contiguous():
    assert balance_by_cost([1, 1, 1, 1], 2) == [2, 2]
    assert balance_by_cost([10, 1, 1, 1, 1, 1, 1, 1, 1, 1], 2) == [1, 9]
    assert balance_by_cost([4, 0, 4, 0, 4, 0, 4], 4) == [1, 2, 2, 2]
    costs = [3, 1, 4, 1, 5, 9, 2, 6]
    counts = balance_by_cost(costs, 3)
    assert sum(counts) == 8 and min(counts) >= 1

    def largest(split: Sequence[int]) -> int:
        ends = list(itertools.accumulate(split))
        return max(sum(costs[a:b]) for a, b in zip([0, *ends[:-1]], ends, strict=True))

    # the largest stage is the smallest any contiguous split into 3 reaches (every split tried)
    best = min(largest(split) for split in itertools.product(range(1, 7), repeat=3) if sum(split) == 8)
    assert largest(counts) == best


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.small = nn.Sequential(nn.Linear(2, 2))
        self.big = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 2)


class WithForward(Model):
    def forward(self, x):
        return self.head(self.big(self.small(x).repeat(1, 4)))


class Wide(WithForward):
    """Most parameters sit outside the nn.Sequential: the forward is traced instead."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 64)


def test_find_pipelined_module_picks_the_largest_sequential():
    name, seq, traced, reason = find_pipelined_module(Model())
    assert (name, len(seq), traced) == ("big", 3, False) and "largest nn.Sequential" in reason
    assert find_pipelined_module(Model(), "small")[:1] == ("small",)
    assert find_pipelined_module(WithForward())[0] == "big"


def test_find_pipelined_module_traces_what_is_not_a_sequential():
    root = Wide()
    assert find_pipelined_module(root)[:3] == ("", root, True)
    assert find_pipelined_module(Model(), "head")[2] is True  # a named module that is not an nn.Sequential
    assert find_pipelined_module(Model(), "big", split_points=["big.2"])[2] is True
    assert find_pipelined_module(WithForward(), split_points=["big"])[:1] == ("",)


def test_find_pipelined_module_takes_the_largest_module_the_step_calls():
    """A LightningModule without forward (a Hugging Face model held as self.model, called in the step): of the
    modules the step calls itself, the one with the most parameters; the step calling self(...) means the forward."""
    root = nn.ModuleDict({"loss": nn.Linear(2, 2), "model": nn.ModuleDict({"a": nn.Linear(8, 8)})})
    found = find_pipelined_module(root, called=["loss", "model"])
    assert found[:3] == ("model", root["model"], True)
    assert found.reason == "of the modules your step calls, the largest, 92% of the parameters"
    wide = Wide()
    assert find_pipelined_module(wide, called=["", "head"])[:3] == ("", wide, True)
    seq_root = nn.ModuleDict({"small": nn.Sequential(nn.Linear(2, 2)), "big": nn.Linear(8, 8)})
    assert find_pipelined_module(seq_root, called=["small"])[:3] == ("small", seq_root["small"], False)
    assert find_pipelined_module(seq_root, "big", called=["small"]).reason == "named by module_name"


def test_a_compiled_module_is_pipelined_through_its_wrapper():
    """``torch.compile(m)`` wraps ``m`` (as ``_orig_mod``): the module found, named or called is the wrapped one;
    :func:`compat.call_eagerly` makes the wrapper call whatever it holds, uncompiled, until put back."""
    root = Model()
    big = root.big
    root.big = torch.compile(big)
    assert compat.compiled(root.big) and not compat.compiled(big)
    assert find_pipelined_module(root)[:3] == ("big._orig_mod", big, False)
    assert find_pipelined_module(root, "big")[:3] == ("big._orig_mod", big, False)
    assert find_pipelined_module(root, called=["big"])[:3] == ("big._orig_mod", big, False)
    compiled_forward = root.big.forward
    restore = compat.call_eagerly(root.big)
    stage = nn.Linear(8, 8)
    root.big._orig_mod = stage  # (what placement installs: a stage)
    x = torch.randn(2, 8)
    assert torch.equal(root.big(x), stage(x))
    restore()
    assert root.big.forward is compiled_forward
    in_place = nn.Linear(2, 2)
    in_place.compile()
    assert compat.compiled(in_place)
    restore = compat.call_eagerly(in_place)
    assert not compat.compiled(in_place)
    restore()
    assert compat.compiled(in_place)


def test_find_pipelined_module_errors():
    with pytest.raises(PartitionError, match="defines no forward to pipeline and holds no nn.Sequential, and its step"):
        find_pipelined_module(nn.ModuleDict({"a": nn.Linear(2, 2)}))
    with pytest.raises(PartitionError, match="names no submodule.*'small', 'big'"):
        find_pipelined_module(Model(), "nope")


def test_plan_stages():
    seq = find_pipelined_module(Model()).module
    plan = plan_sequential("big", seq, 2, "parameters")
    assert plan.balance == (1, 2) and plan.layers_of(1) == ("1", "2")
    assert plan_sequential("big", seq, 2, [2, 1]).layers_of(0) == ("0", "1")
    with pytest.raises(PartitionError, match="has 3 blocks, too few for 4 stages"):
        plan_sequential("big", seq, 4, "parameters")
    with pytest.raises(PartitionError, match=r"balance=\[1, 1\] does not fit"):
        plan_sequential("big", seq, 2, [1, 1])
    costs = BlockCosts([1, 1, 1], seconds=[5.0, 1.0, 1.0], bytes=[1, 1, 10])
    assert plan_stages("big", ["0", "1", "2"], 2, "time", costs).balance == (1, 2)
    assert plan_stages("big", ["0", "1", "2"], 2, "memory", costs).balance == (2, 1)
    with pytest.raises(PartitionError, match="needs a profile of each block"):
        plan_stages("big", ["0", "1", "2"], 2, "time", BlockCosts([1, 1, 1]))


def test_a_stage_module_indexes_as_the_original_sequential():
    """Indexed, sliced, iterated: the original layer positions, with nothing for another stage's layers."""
    seq = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2))
    stage = StageModule("layers", [("2", seq[2]), ("3", seq[3])], [str(i) for i in range(5)])  # stage 1 of 2
    assert len(stage) == 5
    assert stage[2] is seq[2] and stage[-2] is seq[3]
    assert [list(layer.parameters()) for layer in stage] == [[], [], list(seq[2].parameters()), [], []]
    assert [n for n, _ in stage[1:4].named_parameters()] == ["2.weight", "2.bias"]  # a slice keeps the names
    assert list(stage[-1].parameters()) == []
    with pytest.raises(RuntimeError, match="layers.4 runs on another stage"):
        stage[4](torch.zeros(1, 2))
    with pytest.raises(AttributeError, match="layers.0 is held by another stage of the pipeline: no 'weight'"):
        stage[0].weight  # noqa: B018
    assert [n for n, _ in stage.named_parameters()] == ["2.weight", "2.bias"]  # what the stage holds, unchanged


def test_sync_batchnorm_turns_the_batch_norms_this_rank_holds_into_synced_ones_over_the_replicas():
    """Trainer(sync_batchnorm=True) under data-parallel replicas: the batch norms of this stage sync over the
    stage's replicas (the group given), keeping their tensors; another stage's (meta) stay; all come back after."""
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Sequential(nn.BatchNorm1d(4, device="meta")))
    held, elsewhere = model[1], model[2][0]
    group = object()  # (stands in for the replicas' process group: conversion only records it)
    swapped = sync_batch_norms(model, group)
    assert isinstance(model[1], nn.SyncBatchNorm) and model[1].process_group is group
    assert model[1].weight is held.weight and model[1].running_mean is held.running_mean
    assert model[2][0] is elsewhere
    unsync_batch_norms(swapped)
    assert model[1] is held and model[2][0] is elsewhere
