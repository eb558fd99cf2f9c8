import torch
from torch import nn

from lightning_timeprest.checkpoint import (
    canonical_param_names,
    consolidate_optimizer_states,
    local_optimizer_state,
    named_optimizer_state,
)
from lightning_timeprest.partition import parameter_aliases


class Full(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(2, 2)
        self.a = nn.Linear(2, 2)
        self.b = nn.Linear(2, 2)


def _step(params):
    opt = torch.optim.Adam(params, lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return opt


def test_consolidate_and_reshard_round_trip():
    full = Full()
    order = [n for n, _ in full.named_parameters()]
    # two "stages": the stem is replicated, a and b are split; group order differs from model order on purpose
    stage0 = [full.a.weight, full.a.bias, full.stem.weight, full.stem.bias]
    stage1 = [full.stem.weight, full.stem.bias, full.b.weight, full.b.bias]
    names = canonical_param_names(full, parameter_aliases(full))
    parts = [named_optimizer_state(_step(list(stage)), names) for stage in (stage0, stage1)]
    merged = consolidate_optimizer_states(parts, order)
    group = merged["param_groups"][0]
    assert group["param_names"] == order and group["params"] == list(range(6))
    assert sorted(merged["state"]) == list(range(6))
    # a single-process optimizer over the whole model accepts it
    torch.optim.Adam(full.parameters()).load_state_dict(merged)
    # and a stage takes back exactly its entries
    opt = torch.optim.Adam([full.b.weight, full.b.bias])
    local = local_optimizer_state(opt, merged, names)
    assert sorted(local["state"]) == [0, 1]
    torch.testing.assert_close(local["state"][0]["exp_avg"], merged["state"][order.index("b.weight")]["exp_avg"])
    opt.load_state_dict(local)


def test_tied_parameter_has_one_name_on_every_rank():
    full = Full()
    full.b.weight = full.stem.weight
    aliases = parameter_aliases(full)
    assert aliases == {
        "stem.weight": "stem.weight",
        "stem.bias": "stem.bias",
        "a.weight": "a.weight",
        "a.bias": "a.bias",
        "b.weight": "stem.weight",
        "b.bias": "b.bias",
    }
    assert canonical_param_names(full, aliases)[id(full.b.weight)] == "stem.weight"
    # a rank that reaches the tied parameter only through b still calls it stem.weight
    only_b = nn.Module()
    only_b.b = full.b
    assert canonical_param_names(only_b, aliases)[id(full.b.weight)] == "stem.weight"
