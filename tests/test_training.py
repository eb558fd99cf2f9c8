"""The schedules against single-device training (and a model's ways of using the step), with real processes over
gloo."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_same_params, run_script, train

# validation on, 2 epochs (an epoch boundary), 100 samples in batches of 18 (uneven micro-batches 5,5,4,4 and a
# short last batch of 10), gradient accumulation over 2 batches
COMMON = ("--val", "--epochs", "2", "--batch-size", "18", "--accumulate", "2", "--n", "4")


# each schedule at W = 2 and 4, each with both optimizers across them (not every product: the suite's time)
@pytest.mark.parametrize(
    "devices, schedule, optimizer",
    [
        (2, "gpipe", "sgd"),  # in the fast subset: one multi-process run against one device
        pytest.param(2, "1f1b", "adam", marks=pytest.mark.slow),
        pytest.param(4, "gpipe", "adam", marks=pytest.mark.slow),
        pytest.param(4, "1f1b", "sgd", marks=pytest.mark.slow),
    ],
)
def test_matches_single_device(tmp_path, reference, devices, schedule, optimizer):
    ref = reference(*COMMON, "--optimizer", optimizer)
    # --defer-all: gpipe's Linear layers take their weight gradients once per mini-batch (weight_gradients), as the
    # larger layers they are meant for do by default; 1f1b's stay with autograd
    args = (*COMMON, "--optimizer", optimizer, "--devices", str(devices), "--schedule", schedule, "--defer-all")
    proc = run_script(tmp_path, *args, "--out", str(tmp_path / "pp.pt"))
    got = torch.load(tmp_path / "pp.pt", weights_only=False)
    assert_same_params(ref["state_dict"], got["state_dict"])
    deferred = [torch.load(tmp_path / f"pp.pt.rank{r}", weights_only=False)["deferred_layers"] for r in range(devices)]
    assert all((count >= 1) == (schedule == "gpipe") for count in deferred), deferred
    # the start-up line says so
    said = f"stage 0: {deferred[0]} nn.Linear layers take weight gradients once per mini-batch"
    assert (said in proc.stdout + proc.stderr) == (schedule == "gpipe")
    assert got["global_step"] == ref["global_step"] == 6
    ref_losses = torch.tensor([s["train_loss_step"] for s in ref["steps"]])
    got_losses = torch.tensor([s["train_loss_step"] for s in got["steps"]])
    assert len(got_losses) == 12
    torch.testing.assert_close(got_losses, ref_losses, rtol=1e-5, atol=1e-6)
    for key in ("logged", "progress_bar"):
        torch.testing.assert_close(torch.tensor([s[key] for s in got["steps"]]), ref_losses, rtol=1e-5, atol=1e-6)
    # what training_step returned to Lightning (the closure loss) is the true mini-batch loss as well
    torch.testing.assert_close(
        torch.tensor([s["returned"] for s in got["steps"]]), torch.tensor([s["returned"] for s in ref["steps"]])
    )
    for ref_epoch, got_epoch in zip(ref["epochs"], got["epochs"], strict=True):
        stage_stats = {k for k in got_epoch if k.startswith("pipeline/")}  # the strategy's own, per stage
        assert {f"pipeline/stage{s}/idle_fraction_epoch" for s in range(devices)} <= stage_stats
        got_epoch = {k: v for k, v in got_epoch.items() if k not in stage_stats}
        assert set(got_epoch) == set(ref_epoch) >= {"train_loss_epoch", "val_loss", "val_acc"}
        for k in ref_epoch:
            assert got_epoch[k] == pytest.approx(ref_epoch[k], rel=1e-5, abs=1e-6), k


def test_shuffled_data_matches_single_device(tmp_path, reference):
    """The data order is drawn from the seed, as on one device: setting up the pipeline (cutting, timing the ops)
    leaves every random state as it found it, so the shuffled batches and the result are the same."""
    args = ("--epochs", "2", "--batch-size", "18", "--n", "2", "--shuffle", "--balance", "time")
    ref = reference(*args)
    got = train(tmp_path, "pp", *args, "--devices", "2", "--schedule", "1f1b")
    assert got["global_step"] == ref["global_step"] == 12
    torch.testing.assert_close(
        torch.tensor([s["train_loss_step"] for s in got["steps"]]),
        torch.tensor([s["train_loss_step"] for s in ref["steps"]]),
        rtol=1e-5,
        atol=1e-6,
    )
    assert_same_params(ref["state_dict"], got["state_dict"])


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_a_batch_smaller_than_n_matches_single_device(tmp_path, reference, schedule):
    """100 samples in batches of 33 with N = 4: the last batch of 1 sample runs as one micro-batch."""
    args = ("--epochs", "1", "--batch-size", "33", "--n", "4")
    ref = reference(*args)
    got = train(tmp_path, "pp", *args, "--devices", "2", "--schedule", schedule)
    assert got["global_step"] == ref["global_step"] == 4
    assert_same_params(ref["state_dict"], got["state_dict"])


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "timeprest_v", "timeprest_i"])
def test_a_stage_that_trains_nothing_matches_single_device(tmp_path, reference, schedule):
    """Stage 0's layers frozen and left out of the optimizer: its configure_optimizers gets no parameter to give
    (SGD of an empty list fails in torch). Only the last stage trains, so every schedule equals one device."""
    args = ("--model", "FrozenFirstStage", "--epochs", "2", "--n", "2")
    ref = reference(*args)
    got = train(tmp_path, "pp", *args, "--devices", "2", "--schedule", schedule)
    assert_same_params(ref["state_dict"], got["state_dict"])
    initial = {}
    for rank in range(2):
        initial.update(torch.load(tmp_path / f"pp.pt.rank{rank}", weights_only=False)["initial"])
    for name, value in got["state_dict"].items():  # the frozen layers as they were built, the others trained
        frozen = name.split(".")[0] in ("stem", "head") or name.startswith(("net.0.", "net.2."))
        assert torch.equal(value, initial[name]) == frozen, name


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_configure_optimizers_may_index_the_pipelined_sequential(tmp_path, reference, schedule):
    """Layer-wise rates from ``self.net[i]``, ``enumerate(self.net[:-1])``, ``len(self.net)``: on each stage the
    layers another stage holds give no parameters, so every stage's groups together are one device's."""
    args = ("--model", "LayerwiseRates", "--epochs", "2", "--n", "2")
    ref = reference(*args)
    got = train(tmp_path, "pp", *args, "--devices", "2", "--schedule", schedule)
    assert_same_params(ref["state_dict"], got["state_dict"])


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["gpipe", "timeprest_v"])
def test_values_collected_in_steps_reach_the_epoch_end_hooks(tmp_path, reference, schedule):
    """Lists filled in the steps (on the last stage, after the pipelined call) and reduced in the epoch-end hooks
    (on every rank): each reduces what the steps collected, as the Metric and the logged loss of the same run do,
    and under gpipe as on one device."""
    args = ("--model", "CollectsOutputs", "--epochs", "2", "--n", "2", "--val")
    got = train(tmp_path, "pp", *args, "--devices", "2", "--schedule", schedule)

    def collected(run):  # per epoch (the module's on_train_epoch_end logs after the recording callback's)
        train_loss = [e["train_loss_collected"] for e in run["epochs"][1:]] + [run["logged"]["train_loss_collected"]]
        return [e["val_acc_collected"] for e in run["epochs"]], train_loss

    val_acc, train_loss = collected(got)
    assert val_acc == pytest.approx([e["val_acc"] for e in got["epochs"]], abs=1e-6)
    assert train_loss == pytest.approx([e["train_loss_epoch"] for e in got["epochs"]], rel=1e-5)
    if schedule == "gpipe":
        ref_acc, ref_loss = collected(reference(*args))
        assert val_acc == pytest.approx(ref_acc, abs=1e-6) and train_loss == pytest.approx(ref_loss, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["gpipe", "timeprest_v"])
def test_what_training_step_returns_besides_the_loss_reaches_on_train_batch_end(tmp_path, reference, schedule):
    """A dict's other keys, joined over the micro-batches (a scalar: size-weighted mean; per-sample values:
    concatenated), on every rank; under gpipe as on one device, under an asynchronous policy with its loss (a
    mini-batch that completed a few steps ago)."""
    args = ("--model", "ReturnsExtras", "--epochs", "1", "--n", "2")
    got = train(tmp_path, "pp", *args, "--devices", "2", "--schedule", schedule)
    ranks = [torch.load(tmp_path / f"pp.pt.rank{r}", weights_only=False)["steps"] for r in range(2)]
    for a, b in zip(*ranks, strict=True):  # every rank received the same
        assert a["extras"].keys() == b["extras"].keys()
        assert all(torch.equal(a["extras"][k], b["extras"][k]) for k in a["extras"])
    if schedule == "gpipe":
        for ours, ref in zip(got["steps"], reference(*args)["steps"], strict=True):
            assert torch.equal(ours["extras"]["preds"], ref["extras"]["preds"])
            assert float(ours["extras"]["acc"]) == pytest.approx(float(ref["extras"]["acc"]), abs=1e-6)
    else:
        steps = [s for s in got["steps"] if s["extras"]]  # once a mini-batch has completed
        assert len(steps) >= len(got["steps"]) - 2 and not any(math.isnan(s["returned"]) for s in steps)
        for step in steps:  # a whole mini-batch's per-sample predictions, and its accuracy a fraction of them
            assert step["extras"]["preds"].shape[0] in (18, 10) and 0 <= float(step["extras"]["acc"]) <= 1


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["gpipe", "timeprest_v"])
def test_metrics_computed_in_the_epoch_end_hook_and_the_hooks_collectives(tmp_path, reference, schedule):
    """A Metric updated in the step (on the last stage) and computed in the epoch-end hook (on every rank) gives
    the logged Metric's value on rank 0 too (before, the metric of nothing); a ``sync_dist`` sum and
    ``self.all_gather`` count one pipeline once, as one process (before, once per stage)."""
    args = ("--model", "EpochEndMetrics", "--epochs", "2", "--n", "2", "--val")
    got = train(tmp_path, "pp", *args, "--devices", "2", "--schedule", schedule)
    for epoch in got["epochs"]:
        assert epoch["val_acc_computed"] == pytest.approx(epoch["val_acc"], abs=1e-6)
        assert epoch["val_seen"] == epoch["val_seen_summed"] == 100
        assert epoch["val_gathered"] == 1
    if schedule == "gpipe":
        for ours, ref in zip(got["epochs"], reference(*args)["epochs"], strict=True):
            assert ours["val_acc_computed"] == pytest.approx(ref["val_acc_computed"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["gpipe", "timeprest_v", "timeprest_i"])
def test_a_backbone_unfrozen_between_epochs_trains(tmp_path, reference, schedule):
    """BackboneFinetuning freezes the backbone (the pipelined module), then unfreezes it at epoch 1 and gives the
    optimizer its group. The asynchronous policies version what trains from the next stream on (before, the
    unfrozen weights were updated in place under pending graphs: "modified by an inplace operation"); gpipe
    equals one device, the asynchronous policies are a step or two stale at most (close to it)."""
    args = ("--model", "WithBackbone", "--epochs", "3", "--n", "2", "--unfreeze-at", "1")
    got = train(tmp_path, "pp", *args, "--devices", "2", "--schedule", schedule)
    ref = reference(*args)
    initial = torch.load(tmp_path / "pp.pt.rank0", weights_only=False)["initial"]
    assert (ref["state_dict"]["backbone.0.weight"] - initial["backbone.0.weight"]).abs().max() > 1e-3
    if schedule == "gpipe":
        assert_same_params(ref["state_dict"], got["state_dict"])
    else:
        assert (got["state_dict"]["backbone.0.weight"] - initial["backbone.0.weight"]).abs().max() > 1e-3
        assert_same_params(ref["state_dict"], got["state_dict"], atol=1e-3, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["gpipe", "timeprest_i"])
def test_a_compiled_pipelined_module_trains_uncompiled(tmp_path, reference, schedule):
    """``self.net = torch.compile(self.net)``: the wrapper's compiled code called the nn.Sequential that was cut
    (other stages' layers on the meta device: it crashed). On a pipeline the wrapper calls the stage, uncompiled,
    and a warning says so; the parameters keep the compiled model's names (``net._orig_mod.*``). gpipe equals one
    device running the compiled model; timeprest_i equals the model without the wrapper under timeprest_i."""
    args = ("--epochs", "2", "--n", "2", "--devices", "2", "--schedule", schedule)
    out, env = str(tmp_path / "pp.pt"), {"PYTHONWARNINGS": "default"}  # (fresh interpreters: pytest records warnings)
    proc = run_script(tmp_path, "--model", "CompiledNet", *args, "--out", out, env=env, launcher="lightning")
    assert "torch.compile of ['net'] is not applied on a pipeline" in proc.stdout + proc.stderr
    got = torch.load(tmp_path / "pp.pt", weights_only=False)["state_dict"]
    assert "net._orig_mod.0.weight" in got
    if schedule == "gpipe":
        assert_same_params(reference("--model", "CompiledNet", *args[:4])["state_dict"], got)
    else:
        plain = train(tmp_path, "plain", "--model", "StemNetHead", *args)["state_dict"]
        plain = {k.replace("net.", "net._orig_mod.", 1) if k.startswith("net.") else k: v for k, v in plain.items()}
        assert_same_params(plain, got, atol=0, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["gpipe", "timeprest_i"])
def test_a_compiled_lightning_module_trains(tmp_path, reference, schedule):
    """``trainer.fit(torch.compile(model))``, as Lightning documents it: Lightning compiles the steps and forward,
    which call the pipelined module (dynamo made graphs of what it could). gpipe equals one device uncompiled,
    timeprest_i the uncompiled model under timeprest_i."""
    args = ("--epochs", "2", "--n", "2")
    got = train(tmp_path, "pp", *args, "--compile", "--devices", "2", "--schedule", schedule)
    assert torch.load(tmp_path / "pp.pt.rank0", weights_only=False)["compiled_graphs"] > 0
    if schedule == "gpipe":
        assert_same_params(reference(*args)["state_dict"], got["state_dict"])
    else:
        plain = train(tmp_path, "plain", *args, "--devices", "2", "--schedule", schedule)
        assert_same_params(plain["state_dict"], got["state_dict"])


@pytest.mark.slow
def test_a_compiled_traced_model_trains_uncompiled(tmp_path, reference):
    """The model the steps call, not an nn.Sequential, wrapped by ``torch.compile``: traced through the wrapper
    (torch.export failed on it), it trains as on one device with the compiled model."""
    args = ("--model", "CompiledModel", "--epochs", "2", "--n", "2")
    got = train(tmp_path, "pp", *args, "--devices", "2", "--schedule", "gpipe")
    assert_same_params(reference(*args)["state_dict"], got["state_dict"])


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["gpipe", "timeprest_i"])
def test_blocks_compiled_in_place_run_compiled_on_their_stages(tmp_path, reference, schedule):
    """``block.compile()`` on each block of the pipelined nn.Sequential: the stages run their blocks compiled
    (dynamo made graphs on both ranks); gpipe equals one device, timeprest_i the uncompiled blocks."""
    args = ("--epochs", "2", "--n", "2")
    got = train(tmp_path, "pp", "--model", "CompiledBlocks", *args, "--devices", "2", "--schedule", schedule)
    for rank in (0, 1):
        assert torch.load(tmp_path / f"pp.pt.rank{rank}", weights_only=False)["compiled_graphs"] > 0
    if schedule == "gpipe":
        assert_same_params(reference("--model", "CompiledBlocks", *args)["state_dict"], got["state_dict"])
    else:
        plain = train(tmp_path, "plain", "--model", "Blocks", *args, "--devices", "2", "--schedule", schedule)
        assert_same_params(plain["state_dict"], got["state_dict"])  # (compiled kernels round differently)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["gpipe", "timeprest_v"])
def test_several_training_loaders_at_once(tmp_path, reference, schedule):
    """``trainer.fit(model, {"a": loader_a, "b": loader_b})`` (Lightning's CombinedLoader, batches of 18 and 6):
    each loader's batch is split into the micro-batches (before: "the tensors of the batch disagree on their dim-0
    size"). gpipe equals one device; timeprest_v trains close to it."""
    args = ("--model", "TwoLoaders", "--epochs", "2", "--n", "2")
    got = train(tmp_path, "pp", *args, "--devices", "2", "--schedule", schedule)
    ref = reference(*args)
    assert got["global_step"] == ref["global_step"] == 18  # (b's 9 batches an epoch; a cycles)
    if schedule == "gpipe":
        assert_same_params(ref["state_dict"], got["state_dict"])
    else:
        assert_same_params(ref["state_dict"], got["state_dict"], atol=1e-2, rtol=0)


@pytest.mark.slow
def test_a_summed_loss_with_loss_reduction_sum_equals_one_device(tmp_path, reference):
    """A loss with ``reduction="sum"`` and ``loss_reduction="sum"``: a mini-batch's loss is the sum of its
    micro-batch losses (N = 3, parts of 7, 7 and 6 and of the short last batch), so gpipe's weights, its step
    losses and the logged loss (the returned tensor) equal one device's; with the default (a mean), the gradient
    would be about 1/N of one device's."""
    args = ("--model", "SummedLoss", "--epochs", "2", "--n", "3", "--batch-size", "20", "--lr", "0.005")
    got = train(tmp_path, "pp", *args, "--devices", "2", "--loss-reduction", "sum")
    ref = reference(*args)
    assert_same_params(ref["state_dict"], got["state_dict"])
    ours = torch.tensor([s["train_loss_step"] for s in got["steps"]])
    theirs = torch.tensor([s["train_loss_step"] for s in ref["steps"]])
    assert len(ours) == 10 and ours.min() > 15  # (a sum over 20 samples)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_loss_reduction_sum_under_an_asynchronous_policy(tmp_path):
    """Under timeprest_i, a summed loss with ``loss_reduction="sum"`` and the learning rate / 20 (batches of 20)
    trains exactly as the mean loss with the default and the full learning rate: the gradient of each micro-batch
    counts once, 20 times the mean's (SGD with momentum is linear in it)."""
    common = ("--epochs", "2", "--n", "2", "--batch-size", "20", "--devices", "2", "--schedule", "timeprest_i")
    summed = train(tmp_path, "sum", "--model", "SummedLoss", "--lr", "0.005", "--loss-reduction", "sum", *common)
    mean = train(tmp_path, "mean", "--model", "StemNetHead", "--lr", "0.1", *common)
    assert_same_params(mean["state_dict"], summed["state_dict"])


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["gpipe", "timeprest_v"])
def test_lists_of_strings_in_the_batch_split_with_the_samples(tmp_path, reference, schedule):
    """Each sample's name (a list of strings from default_collate) goes with its sample into the micro-batches:
    the loss weighs the samples by their names, so gpipe equals one device only if each micro-batch gets its own;
    the names the step returns and those ``predict_step`` returns are the whole batch's, in order."""
    args = ("--model", "NamedSamples", "--epochs", "2", "--n", "2", "--predict")
    got = train(tmp_path, "pp", *args, "--devices", "2", "--schedule", schedule)
    ref = reference(*args)
    names = [tuple(f"s{i}" for i in range(start, min(start + 18, 100))) for start in range(0, 100, 18)]
    assert [s["extras"]["names"] for s in ref["steps"]] == names * 2  # (default_collate makes tuples of them)
    assert [p["names"] for p in got["predictions"]] == [[f"{n}:" for n in batch] for batch in names]
    if schedule == "gpipe":
        assert_same_params(ref["state_dict"], got["state_dict"])
        assert [s["extras"]["names"] for s in got["steps"]] == names * 2
        for ours, theirs in zip(got["predictions"], ref["predictions"], strict=True):
            assert torch.equal(ours["classes"], theirs["classes"])
    else:  # a mini-batch's names with its lagging loss, once it completed
        steps = [s for s in got["steps"] if s["extras"]]
        assert len(steps) >= len(got["steps"]) - 2 and all(s["extras"]["names"] in names for s in steps)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["gpipe", "timeprest_i"])
def test_the_step_draws_alike_on_every_stage_while_the_layers_draw_too(tmp_path, schedule):
    """Mixup draws its weight and permutation before the pipelined call, and the last stage mixes the labels with
    them after it; dropout inside the pipelined module draws on stage 0 only, the noise on the logits after the call
    on the last stage only. Each draws from a stream of its own, so the last stage's step draws before the call
    what stage 0's drew (before, from the first dropout on, it drew other numbers: labels mixed by another
    permutation than their inputs)."""
    train(tmp_path, "pp", "--model", "MixupDropout", "--epochs", "2", "--n", "2", "--schedule", schedule)
    first, last = (torch.load(tmp_path / f"pp.pt.rank{r}", weights_only=False)["draws"] for r in range(2))
    assert len(first) >= 2 * 6 * 2 and len({lam for lam, _ in first}) == len(first)
    assert first == last


@pytest.mark.slow
def test_a_recomputed_forward_draws_its_dropout_masks_again(tmp_path):
    """pipedream reads the stashed weights in the backward, so the recompute rule (the forward rerun at backward
    time) trains exactly as the graph rule, if the rerun draws the forward's dropout masks again."""
    args = ("--model", "MixupDropout", "--epochs", "2", "--n", "1", "--schedule", "pipedream")
    graph = train(tmp_path, "graph", *args, "--rule", "graph")
    recompute = train(tmp_path, "recompute", *args, "--rule", "recompute")
    assert_same_params(graph["state_dict"], recompute["state_dict"], atol=0, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "schedule, rule, n, model",
    [
        ("gpipe", "graph", "2", "CheckpointedBlocks"),
        ("timeprest_i", "graph", "2", "CheckpointedBlocks"),
        ("timeprest_i", "recompute", "2", "CheckpointedBlocks"),
        ("pipedream", "graph", "1", "CheckpointedBlocks"),
        ("timeprest_i", "graph", "2", "ReentrantCheckpointedBlocks"),
    ],
)
def test_activation_checkpointing_inside_a_stage_trains_as_without_it(tmp_path, schedule, rule, n, model):
    """torch.utils.checkpoint reruns a block's forward in the backward, reading the block's parameters then: it
    must read the weights the backward reads (I-TiMePReSt's intermediate, pipedream's stashed ones), not the live
    ones, and draw the same dropout masks; training then equals training without checkpointing, exactly (before,
    the asynchronous policies took the gradients at the live weights)."""
    args = ("--epochs", "2", "--n", n, "--devices", "2", "--schedule", schedule, "--rule", rule)
    plain = train(tmp_path, "plain", "--model", "PlainBlocks", *args)
    checkpointed = train(tmp_path, "checkpointed", "--model", model, *args)
    assert_same_params(plain["state_dict"], checkpointed["state_dict"], atol=0, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["gpipe", "timeprest_i"])
def test_a_model_with_an_example_input_trains_with_the_summary_and_the_graph_logger(tmp_path, reference, schedule):
    """Lightning's model summary and TensorBoard's log_graph call the model on example_input_array outside any
    step, which a rank holding one stage cannot do: it is set aside during the run and given back after it."""
    args = ("--model", "WithExampleInput", "--epochs", "1", "--summary", "--logger", "tensorboard")
    got = train(tmp_path, "pp", *args, "--devices", "2", "--schedule", schedule, "--n", "2")
    assert got["example_input_array"] is not None and got["example_input_array"].shape == (2, 8)
    if schedule == "gpipe":
        assert_same_params(reference(*args, "--n", "2")["state_dict"], got["state_dict"])


@pytest.mark.slow
def test_stage_placement(tmp_path):
    """Each rank holds only its stage's layers plus the replicated stem and head; the optimizer sees only those."""
    out = tmp_path / "pp.pt"
    from conftest import run_script

    run_script(tmp_path, "--devices", "4", "--epochs", "1", "--max-steps", "1", "--out", str(out))
    outside = {"stem.weight", "stem.bias", "head.weight", "head.bias"}
    # balance by parameters over layers Linear,Tanh,Linear,Tanh,Linear,Tanh,Linear -> [1, 2, 2, 2]
    expected = [{"net.0"}, {"net.2"}, {"net.4"}, {"net.6"}]
    for rank in range(4):
        placement = torch.load(f"{out}.rank{rank}")
        names = set(placement["params"])
        assert names == outside | {f"{layer}.{p}" for layer in expected[rank] for p in ("weight", "bias")}
        assert set(placement["optimizer"]) == names
        assert all(device == "cpu" for device in placement["params"].values())
    # the synchronous stage records reach rank 0's logger: one version, this stage's parameter bytes, samples/s
    result = torch.load(out, weights_only=False)
    logged = result["pipeline"][-1]
    for rank in range(4):
        names = torch.load(f"{out}.rank{rank}")["params"]
        nbytes = sum(result["state_dict"][n].numel() * result["state_dict"][n].element_size() for n in names)
        assert logged[f"pipeline/stage{rank}/weight_bytes_step"] == nbytes
        assert logged[f"pipeline/stage{rank}/versions_held_step"] == 1
        assert 0.0 <= logged[f"pipeline/stage{rank}/idle_fraction_step"] < 1.0
        assert logged[f"pipeline/stage{rank}/samples_per_sec_step"] > 0
        assert f"pipeline/stage{rank}/staleness_mean_step" not in logged
    assert logged["pipeline/v_step"] == 0
    # every rank logs the same pipeline/ values (rank 0's), so a callback monitoring one works on every rank
    seen = [torch.load(f"{out}.rank{rank}")["pipeline"] for rank in range(4)]
    assert seen[0] and all(s == seen[0] for s in seen)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["TiedLM", "DictBatch"])
def test_tied_weights_and_dict_batches(tmp_path, reference, model):
    ref = reference("--model", model, "--epochs", "2", "--batch-size", "16", "--optimizer", "adam")
    got = train(
        tmp_path,
        "pp",
        "--model",
        model,
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--optimizer",
        "adam",
        "--devices",
        "2",
        "--schedule",
        "1f1b",
    )
    assert_same_params(ref["state_dict"], got["state_dict"])
    if model == "TiedLM":
        sd = got["state_dict"]
        assert torch.equal(sd["embed.weight"], sd["head.weight"])
        assert torch.equal(sd["embed.weight"], sd["net.4.weight"])
        assert torch.equal(sd["net.0.bias"], sd["net.2.bias"])  # tied across stages 0 and 1


@pytest.mark.slow
def test_predict_and_test_through_the_pipeline(tmp_path, reference):
    # evaluation batches of 33: the last one (1 sample) is smaller than N = 4 and runs as one micro-batch
    args = ("--epochs", "1", "--predict", "--val", "--eval-batch-size", "33")
    ref = reference(*args)
    got = train(tmp_path, "pp", *args, "--devices", "2")
    assert got["predictions"].shape == (100,)
    assert torch.equal(got["predictions"], ref["predictions"])
    assert got["test"][0]["test_loss"] == pytest.approx(ref["test"][0]["test_loss"], rel=1e-5)
    assert got["epochs"][0]["val_loss"] == pytest.approx(ref["epochs"][0]["val_loss"], rel=1e-5)
    assert got["epochs"][0]["val_acc"] == pytest.approx(ref["epochs"][0]["val_acc"], rel=1e-6)


@pytest.mark.slow
def test_configure_model_builds_on_meta(tmp_path):
    got = train(tmp_path, "pp", "--model", "ConfigureModelNet", "--devices", "2", "--epochs", "1", "--predict")
    assert got["created_on_meta"] is True
    # the gathered model is complete and usable after fit
    assert all(not v.is_meta for v in got["state_dict"].values())
    assert got["predictions"].shape == (100,)


@pytest.mark.slow
def test_ties_survive_meta_initialisation(tmp_path):
    """Built under init_module(empty_init=True), each stage materialises its own copies; tied parameters must
    come out as one tensor again, and replicated copies must agree across stages."""
    got = train(
        tmp_path, "pp", "--model", "TiedLM", "--empty-init", "--devices", "2", "--epochs", "1", "--batch-size", "16"
    )
    assert got["created_on_meta"] is True
    sd = got["state_dict"]
    assert torch.equal(sd["embed.weight"], sd["head.weight"])
    assert torch.equal(sd["embed.weight"], sd["net.4.weight"])
    assert torch.equal(sd["net.0.bias"], sd["net.2.bias"])


@pytest.mark.slow
def test_stages_can_share_a_device(tmp_path, reference):
    """processes_per_device=3 on one device: 3 stages (over gloo), as with 3 devices. On a GPU this is how W stages
    share one card; here the shared device is the CPU."""
    got = train(tmp_path, "shared", "--epochs", "1", "--devices", "1", "--per-device", "3", "--schedule", "1f1b")
    assert_same_params(got["state_dict"], reference("--epochs", "1")["state_dict"])
    assert len(got["table"]) == 4  # a header and 3 stages
