import pytest
from torch import nn

from lightning_timeprest.partition import PartitionError, balance_by_cost, find_pipelined_module, plan_stages


def test_balance_by_cost_is_optimal_and_contiguous():
    assert balance_by_cost([1, 1, 1, 1], 2) == [2, 2]
    assert balance_by_cost([10, 1, 1, 1, 1, 1, 1, 1, 1, 1], 2) == [1, 9]
    assert balance_by_cost([4, 0, 4, 0, 4, 0, 4], 4) == [1, 2, 2, 2]
    counts = balance_by_cost([3, 1, 4, 1, 5, 9, 2, 6], 3)
    assert sum(counts) == 8 and min(counts) >= 1
    # the optimum's largest stage: [3,1,4,1,5] = 14? no: [3,1,4,1]=9, [5,9]=14, [2,6]... best max is 14
    runs, start = [], 0
    costs = [3, 1, 4, 1, 5, 9, 2, 6]
    for c in counts:
        runs.append(sum(costs[start : start + c]))
        start += c
    assert max(runs) == 14


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.small = nn.Sequential(nn.Linear(2, 2))
        self.big = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 2)


def test_find_pipelined_module_picks_the_largest_sequential():
    name, seq = find_pipelined_module(Model())
    assert name == "big" and len(seq) == 3
    assert find_pipelined_module(Model(), "small")[0] == "small"


def test_find_pipelined_module_errors():
    with pytest.raises(PartitionError, match="no nn.Sequential submodule to pipeline.*module_name"):
        find_pipelined_module(nn.Linear(2, 2))
    with pytest.raises(PartitionError, match="is a Linear, not an nn.Sequential"):
        find_pipelined_module(Model(), "head")
    with pytest.raises(PartitionError, match="names no submodule.*'small', 'big'"):
        find_pipelined_module(Model(), "nope")


def test_plan_stages():
    _, seq = find_pipelined_module(Model())
    plan = plan_stages("big", seq, 2, "parameters")
    assert plan.balance == (1, 2) and plan.layers_of(1) == ("1", "2")
    assert plan_stages("big", seq, 2, [2, 1]).layers_of(0) == ("0", "1")
    with pytest.raises(PartitionError, match="has 3 layers, too few for 4 stages"):
        plan_stages("big", seq, 4, "parameters")
    with pytest.raises(PartitionError, match=r"balance=\[1, 1\] does not fit"):
        plan_stages("big", seq, 2, [1, 1])
