"""Splitting modules that are not nn.Sequential: torch.export + torch.distributed.pipelining, the blocks, what
crosses a boundary, balancing by profile, the partition table, and the errors a model that cannot be split gets."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_params, run_script, train
from lightning.pytorch import Trainer
from models import MultiInputNet, StemNetHead, Untraceable, loader
from torch import nn

from lightning_timeprest import TiMePReStStrategy
from lightning_timeprest.comm import _flatten, _unflatten
from lightning_timeprest.partition import PartitionError, balance_by_cost, profile_blocks
from lightning_timeprest.tracing import call_tree, candidate_boundaries, trace

sys.path.insert(0, str(Path(__file__).parent.parent))
from examples.vision import ResNet50


def _traced(module: nn.Module, x: torch.Tensor, target: int):
    names = candidate_boundaries(module, call_tree(module, (x,), {}), target)
    return names, trace(module, (x,), {}, names[1:], "test model")


def test_blocks_follow_the_calls_of_the_forward():
    torch.manual_seed(0)
    model = ResNet50(width=1 / 16)
    tree = call_tree(model, (torch.randn(2, 3, 32, 32),), {})
    # the bottlenecks of the ModuleLists are called by ResNet50.forward itself: they are its children by call
    assert [r.name for r in tree.children][:4] == ["conv1", "bn1", "layer1.0", "layer1.1"]
    names = candidate_boundaries(model, tree, 8)
    assert names[0] == "conv1" and names[-1] == "fc" and len(names) == 20
    # asking for more blocks refines the largest blocks into the calls they make
    finer = candidate_boundaries(model, tree, 24)
    assert len(finer) >= 24 and "layer4.0.conv1" in finer


def test_a_module_called_twice_is_never_a_cut():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.act, self.b = nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)

        def forward(self, x):
            return self.act(self.b(self.act(self.a(x))))

    names = candidate_boundaries(Shared(), call_tree(Shared(), (torch.randn(2, 4),), {}), 8)
    assert names == ["a", "b"]


@pytest.mark.parametrize("batch", [3, 5])
def test_stages_compose_to_the_original_forward_in_both_modes(batch):
    torch.manual_seed(0)
    model = ResNet50(width=1 / 16)
    _, traced = _traced(model, torch.randn(4, 3, 32, 32), 8)
    cut = traced.num_blocks // 2
    first, second = traced.stage(0, cut), traced.stage(cut, traced.num_blocks)
    first.rebind(), second.rebind()
    x = torch.randn(batch, 3, 32, 32)  # another batch size than the trace's: the batch dimension is dynamic
    for mode in (True, False):
        model.train(mode)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        piped = second.run_layers(first.run_layers(first.entry((x,), {})))
        after = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(state)
        assert torch.equal(piped, model(x))
        for k in state:  # batch-norm statistics move in training mode only, through the user's own buffers
            assert torch.equal(after[k], model.state_dict()[k]), k


def test_several_values_cross_a_boundary_and_skip_a_stage():
    model = MultiInputNet()
    x = torch.randn(4, 8)
    mask = torch.ones(4, 16)
    traced = trace(model, (x,), {"mask": mask}, ["gate", "mix"], "MultiInputNet")
    assert traced.num_blocks == 3
    # into the last block: the gate's output, the skipped h, and the batch size (an int) from the first stage
    crossing = traced.live(2)
    assert len(crossing) == 3
    stages = [traced.stage(k, k + 1) for k in range(3)]
    values = stages[0].run_layers(stages[0].entry((x,), {"mask": mask}))
    assert any(isinstance(v, int) for v in values)
    values = stages[1].run_layers(values)
    assert len(values) == 3 and sum(isinstance(v, int) for v in values) == 1
    out = stages[2].run_layers(values)
    expected = model(x, mask=mask)
    assert set(out) == {"logits", "aux"}
    torch.testing.assert_close(out["logits"], expected["logits"])
    torch.testing.assert_close(out["aux"], expected["aux"])
    with pytest.raises(RuntimeError, match="was traced for calls shaped"):
        stages[0].entry((x,), {})
    with pytest.raises(RuntimeError, match=r"traced with shape \(.batch., 8\); only the batch dimension may change"):
        stages[0].entry((torch.randn(4, 9),), {"mask": mask})


def test_boundary_values_round_trip_through_the_wire_format():
    value = (torch.randn(2, 3), 7, None, {"mask": torch.ones(2, dtype=torch.bool), "n": 2.5})
    kind, tensors, structure = _flatten(value)
    assert len(tensors) == 2 and structure
    back = _unflatten(kind, [t.clone() for t in tensors], structure)
    assert back[1:3] == (7, None) and back[3]["n"] == 2.5
    assert torch.equal(back[0], value[0]) and torch.equal(back[3]["mask"], value[3]["mask"])
    # plain tensors and tuples of tensors keep the cheap path (no pickled structure)
    assert _flatten((torch.ones(1), torch.ones(2)))[2] == b""


def test_untraceable_forward_names_the_construct_and_the_way_out():
    with pytest.raises(PartitionError) as info:
        trace(Untraceable(), (torch.randn(4, 8),), {}, ["net"], "Untraceable")
    message = str(info.value)
    assert "torch.export failed" in message and "module_name" in message and "nn.Sequential" in message
    assert "models.py" in message and "if h.sum() > 0:" in message  # the construct, in the user's code


def test_a_shape_fixed_to_one_batch_size_is_refused():
    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(self.a(x).view(4, 4))

    with pytest.raises(PartitionError, match="works for one batch size only(.|\n)*x.flatten"):
        trace(Fixed(), (torch.randn(4, 4),), {}, ["b"], "Fixed")


def test_recorded_dropout_follows_train_and_eval():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)
            self.attn = nn.MultiheadAttention(4, 2, dropout=0.5, batch_first=True)  # dropout inside SDPA

        def forward(self, x):
            h = F.dropout(self.a(x), 0.5, self.training).unsqueeze(1).repeat(1, 3, 1)
            return self.b(self.attn(h, h, h, need_weights=False)[0].mean(1))

    torch.manual_seed(0)
    model = Functional()
    traced = trace(model, (torch.randn(4, 4),), {}, ["b"], "Functional")
    stage = traced.stage(0, 2)
    stage.rebind()
    x = torch.randn(3, 4)
    model.eval()  # the trace was taken in training mode; in eval mode nothing is dropped, as on one device
    torch.testing.assert_close(stage.run_layers(stage.entry((x,), {})), model(x), rtol=0, atol=0)
    assert stage.mode_dependent_ops() == []
    model.train()
    assert not torch.equal(stage.run_layers(stage.entry((x,), {})), stage.run_layers(stage.entry((x,), {})))

    class Norm(nn.Module):  # functional batch-norm cannot be switched: it is reported
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)
            self.register_buffer("mean", torch.zeros(4))
            self.register_buffer("var", torch.ones(4))

        def forward(self, x):
            return self.b(F.batch_norm(self.a(x), self.mean, self.var, training=self.training))

    norm = trace(Norm(), (torch.randn(4, 4),), {}, ["b"], "Norm")
    assert any("batch_norm" in op for op in norm.stage(0, 2).mode_dependent_ops())
    # nn.Dropout and batch-norm modules run as themselves and follow train()/eval(): nothing to report
    _, resnet = _traced(ResNet50(width=1 / 16), torch.randn(4, 3, 32, 32), 4)
    assert resnet.stage(0, resnet.num_blocks).mode_dependent_ops() == []


def test_nn_transformer_with_a_causal_mask_is_traced():
    """Lightning's demo transformer: nn.Transformer's check of the causal mask is decided at trace time, and a
    runtime assertion keeps it honest."""
    from lightning.pytorch.demos import Transformer

    torch.manual_seed(0)
    model = Transformer(vocab_size=20, ninp=16, nhead=2, nhid=16, nlayers=2, dropout=0.0)
    x, y = torch.randint(0, 20, (4, 6)), torch.randint(0, 20, (4, 6))
    for extra in [(), (nn.Transformer.generate_square_subsequent_mask(6),)]:  # made in forward, or passed in
        boundaries = candidate_boundaries(model, call_tree(model, (x, y, *extra), {}), 6)
        traced = trace(model, (x, y, *extra), {}, boundaries[1:], "Transformer")
        assert traced.num_blocks == len(boundaries)
        stage = traced.stage(0, traced.num_blocks)
        stage.rebind()
        x3, y3 = torch.randint(0, 20, (3, 6)), torch.randint(0, 20, (3, 6))
        out = stage.run_layers(stage.entry((x3, y3, *extra), {}))
        torch.testing.assert_close(out, model(x3, y3, *extra), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="traced as causal"):  # a mask that is not causal any more
        stage.run_layers(stage.entry((x3, y3, torch.zeros(6, 6)), {}))


def test_profile_measures_every_block_and_balances_by_time():
    layers = [nn.Linear(64, 64), nn.Linear(64, 512), nn.Linear(512, 512), nn.Linear(512, 8)]
    seconds, forward, nbytes = profile_blocks(layers, layers, torch.randn(32, 64), torch.device("cpu"), 2)
    assert len(seconds) == 4 and all(s > 0 for s in seconds)
    assert all(0 < f < s for f, s in zip(forward, seconds, strict=True))  # the forward is part of the total
    # weights and gradients (2 x 4 bytes per parameter) plus the saved input for 2 micro-batches: a Linear saves
    # its weight too, which is no activation and is not counted again
    assert nbytes[2] == 2 * 4 * (512 * 512 + 512) + 2 * 4 * (32 * 512)
    assert all(p.grad is None for layer in layers for p in layer.parameters())
    assert sum(balance_by_cost(seconds, 2)) == 4


def _fit_one_process(model, strategy: TiMePReStStrategy) -> None:
    Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(model, loader(18))


@pytest.mark.parametrize(
    "model, kwargs, message",
    [
        (Untraceable, {"module_name": ""}, "torch.export failed"),
        (MultiInputNet, {"split_points": ["gate"]}, r"gives 2 stages, but there are 1 devices; give 0 split points"),
        (StemNetHead, {"module_name": "missing"}, "module_name='missing' names no submodule of StemNetHead"),
        (StemNetHead, {"balance": [2, 2]}, r"it needs 1 positive block counts"),
    ],
)
def test_models_that_cannot_be_split_fail_at_start(model, kwargs, message):
    instance = model()
    with pytest.raises(ValueError, match=message):
        _fit_one_process(instance, TiMePReStStrategy(**kwargs))
    assert instance.trainer.global_step == 0


@pytest.mark.slow
def test_unknown_split_point_lists_the_submodules(tmp_path):
    proc = run_script(
        tmp_path, "--model", "MultiInputNet", "--devices", "2", "--split-points", "gait",
        "--out", str(tmp_path / "x.pt"), check=False, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "split_points ['gait'] name no submodule of MultiInputNet" in proc.stderr and "'gate'" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["1f1b"])  # interleaved forwards and backwards; gpipe: test_training
def test_multi_input_model_matches_single_device(tmp_path, reference, schedule):
    args = ("--model", "MultiInputNet", "--epochs", "2", "--n", "3", "--val", "--predict")
    expected = reference(*args)
    got = train(tmp_path, "pipe", *args, "--devices", "3", "--schedule", schedule, "--split-points", "gate,mix")
    assert_same_params(got["state_dict"], expected["state_dict"])
    assert torch.equal(got["predictions"], expected["predictions"])
    assert got["test"][0]["test_loss"] == pytest.approx(expected["test"][0]["test_loss"], rel=1e-5)
    assert [row[1] for row in got["table"][1:]] == ["embed", "gate", "mix"]


@pytest.mark.slow
def test_partition_table_is_printed_with_measured_time_shares(tmp_path):
    proc = run_script(
        tmp_path, "--devices", "2", "--epochs", "1", "--balance", "time", "--out", str(tmp_path / "t.pt"),
    )  # fmt: skip
    got = torch.load(tmp_path / "t.pt", weights_only=False)
    table = got["table"]
    assert table[0] == ["stage", "layers", "parameters", "est. time", "device"]
    assert [row[0] for row in table[1:]] == ["0", "1"]
    shares = [int(row[3].rstrip("%")) for row in table[1:]]
    assert all(row[3].endswith("%") for row in table[1:]) and 98 <= sum(shares) <= 102
    assert sum(int(row[2].replace(",", "")) for row in table[1:]) == 4 * (16 * 16 + 16)  # the net's 4 layers
    assert all(row[4] == "cpu" for row in table[1:])
    printed = proc.stdout + proc.stderr
    assert "stage  layers" in printed and "est. time" in printed and "net.0 .. " in printed


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["1f1b", "timeprest_i"])
def test_traced_checkpoint_loads_in_one_process_and_resumes_exactly(tmp_path, schedule):
    args = ("--model", "MultiInputNet", "--devices", "2", "--split-points", "mix", "--schedule", schedule)
    args += ("--n", "2", "--optimizer", "adam", "--epochs", "2")
    full = train(tmp_path, "full", *args, "--ckpt-dir", str(tmp_path / "ckpts"))
    last = tmp_path / "ckpts" / "epoch=1-step=12.ckpt"
    model = MultiInputNet.load_from_checkpoint(last)
    assert list(model.state_dict()) == list(MultiInputNet().state_dict())  # the original keys
    assert_same_params(model.state_dict(), full["state_dict"], atol=0)
    resumed = train(tmp_path, "resumed", *args, "--resume", str(tmp_path / "ckpts" / "epoch=0-step=6.ckpt"))
    assert resumed["global_step"] == 12
    assert_same_params(resumed["state_dict"], full["state_dict"], atol=0)


def test_plain_arguments_are_fixed_by_the_trace():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x, scale: float = 1.0):
            return self.b(self.a(x) * scale)

    model = Scaled()
    x = torch.randn(4, 4)
    traced = trace(model, (x,), {"scale": 2.0}, ["b"], "Scaled")
    first, last = traced.stage(0, 1), traced.stage(1, 2)
    torch.testing.assert_close(last.run_layers(first.run_layers(first.entry((x,), {"scale": 2.0}))), model(x, 2.0))
    with pytest.raises(RuntimeError, match="was traced as 2.0 and is now 3.0"):
        first.entry((x,), {"scale": 3.0})


def test_a_module_without_forward_pipelines_what_its_step_calls_without_side_effects():
    """No forward, a model called in the step, a metric and a list updated after it: the sample finds the model
    and stops the step at its call, so neither the list nor the metric sees the sample batch."""
    import torchmetrics
    from lightning.pytorch import LightningModule

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    class NoForward(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.acc, self.seen = Tiny(), torchmetrics.Accuracy("multiclass", num_classes=4), []

        def training_step(self, batch, batch_idx):
            x, y = batch
            out = self.model(x)
            self.acc(out, y)
            self.seen.append(len(x))
            return F.cross_entropy(out, y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = NoForward()
    strategy = TiMePReStStrategy(num_microbatches=2)
    Trainer(
        accelerator="cpu", devices=1, strategy=strategy, max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    ).fit(module, loader(18))  # fmt: skip
    assert module.seen == [9, 9]  # the step ran once per micro-batch of the one training step; not for the sample
    assert module.acc._update_count == 2
    assert strategy.partition_table[1][1].startswith("model.a")


def test_use_cache_is_switched_off_for_training_and_refused_when_asked_for():
    """A forward that takes use_cache (Hugging Face models): the trace adds use_cache=False to every call; a call
    with use_cache=True is refused with a message."""

    class Cached(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x, use_cache=True):
            h = self.b(self.a(x))
            return (h, [h.detach()]) if use_cache else (h,)  # a "cache" no stage could pass on

    model = Cached()
    traced = trace(model, (torch.randn(4, 4),), {}, ["b"], "Cached")
    assert traced.injected == {"use_cache": False}
    stage = traced.stage(0, 2)
    stage.rebind()
    x = torch.randn(3, 4)
    (out,) = stage.run_layers(stage.entry((x,), {}))
    torch.testing.assert_close(out, model(x, use_cache=False)[0])
    with pytest.raises(PartitionError, match="use_cache=True: a pipeline stage cannot pass on a key/value cache"):
        trace(model, (torch.randn(4, 4),), {"use_cache": True}, ["b"], "Cached")
