"""Bad configurations fail before training starts, with a message that says what to change; a dead stage ends
every rank promptly."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import run_script, wait_for_ranks_to_exit
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import GradientAccumulationScheduler, ModelPruning, StochasticWeightAveraging
from lightning.pytorch.tuner import Tuner
from models import Distillation, ManualOptimization, SkipsABatch, StemNetHead, TwoOptimizers, TwoViews, loader
from processes import GRACE_S

from lightning_timeprest import PipelineConfigError, TiMePReStStrategy
from lightning_timeprest.errors import CheckpointError, PipelineCommError, peer_lost


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"schedule": "zigzag"}, "unknown schedule 'zigzag'; choose one of: gpipe, 1f1b"),
        ({"num_microbatches": 0}, "num_microbatches must be a positive integer"),
        ({"balance": "flops"}, "unknown balance 'flops'"),
        ({"balance": [2, 0]}, "balance must list a positive block count per stage"),
        ({"p2p_timeout": 0}, "p2p_timeout must be positive"),
        ({"schedule": "pipedream", "num_microbatches": 2}, r"pipedream treats every mini-batch as one unit \(N = 1\)"),
        ({"schedule": "timeprest_i", "backward_rule": "guess"}, "unknown backward_rule 'guess'"),
        ({"schedule": "gpipe", "dynamic": True}, "dynamic=True applies to the asynchronous schedules only"),
        ({"schedule": "timeprest_i", "significance": "linear"}, "unknown significance 'linear'"),
        ({"schedule": "timeprest_i", "significance": "power", "power_beta": 2.0}, r"power_beta must be in \[0, 1\]"),
        ({"loss_reduction": "none"}, r"loss_reduction must be 'mean' \(your loss averages .*\) or 'sum'"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, message):
    with pytest.raises(PipelineConfigError, match=message):
        TiMePReStStrategy(**kwargs)


def _fit_one_process(
    model, batch_size: int = 18, schedule: str = "gpipe", val_dataloaders=None, module_name=None, **trainer_kwargs
):
    """A one-stage pipeline in this process: enough to reach every check made at setup or in a step."""
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        strategy=TiMePReStStrategy(schedule=schedule, num_microbatches=4, module_name=module_name),
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(model, loader(batch_size), val_dataloaders)


@pytest.mark.parametrize(
    "model, trainer_kwargs, message",
    [
        (ManualOptimization, {}, r"manual optimization \(automatic_optimization = False\) is not supported"),
        (TwoOptimizers, {}, "configure_optimizers must return exactly one optimizer for a pipeline strategy"),
        (
            StemNetHead,
            {"callbacks": [StochasticWeightAveraging(swa_lrs=0.01)]},
            "StochasticWeightAveraging is not supported by pipeline strategies.*use WeightAveraging",
        ),
        (
            StemNetHead,
            {"callbacks": [ModelPruning("l1_unstructured", amount=0.3)]},
            "ModelPruning is not supported by pipeline strategies.*prune the trained model in one process",
        ),
        (
            StemNetHead,
            {"callbacks": [GradientAccumulationScheduler({0: 1, 1: 2})], "schedule": "timeprest_v"},
            "GradientAccumulationScheduler does not apply to 'timeprest_v'.*gpipe, 1f1b",
        ),
    ],
)
def test_unsupported_setups_fail_at_start(model, trainer_kwargs, message):
    instance = model()
    with pytest.raises(PipelineConfigError, match=message):
        _fit_one_process(instance, **trainer_kwargs)
    assert instance.trainer.global_step == 0


def test_a_step_that_skips_a_batch_fails_with_the_way_out():
    with pytest.raises(RuntimeError, match="A step that skips a batch .* cannot on a pipeline.*out in the data"):
        _fit_one_process(SkipsABatch())


def test_a_step_that_does_not_call_the_chosen_module_names_the_way_out():
    """A frozen teacher larger than the student is the largest nn.Sequential, chosen to be pipelined, but the
    validation step does not call it: the error says to name the model with module_name, which then trains."""
    with pytest.raises(RuntimeError, match=r"did not call the pipelined module 'teacher'.*module_name=\.\.\."):
        _fit_one_process(Distillation(), val_dataloaders=loader(18))
    model = Distillation()
    teacher = [p.detach().clone() for p in model.teacher.parameters()]
    _fit_one_process(model, val_dataloaders=loader(18), module_name="net")
    assert model.trainer.global_step == 2
    assert all(torch.equal(a, p) for a, p in zip(teacher, model.teacher.parameters(), strict=True))


def test_a_step_that_calls_the_pipelined_module_twice_names_the_way_out():
    """Two views through the model in one step: refused with the way out (one call on both concatenated), which
    trains."""
    with pytest.raises(RuntimeError, match=r"called twice in one step.*self\(torch\.cat\(\[x1, x2\]\)\)\.chunk\(2\)"):
        _fit_one_process(TwoViews())
    model = TwoViews()
    model.concatenated = True
    _fit_one_process(model)
    assert model.trainer.global_step == 2


@pytest.mark.parametrize("schedule", ["gpipe", "timeprest_i"])
def test_batch_smaller_than_num_microbatches_trains(schedule):
    """Batches of 3 samples with N = 4 run in 3 micro-batches (was: MicroBatchError after training had started)."""
    model = StemNetHead()
    before = [p.detach().clone() for p in model.parameters()]
    _fit_one_process(model, batch_size=3, schedule=schedule)
    assert model.trainer.global_step == 2
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


@pytest.mark.slow
def test_more_stages_than_layers(tmp_path):
    start = time.monotonic()
    proc = run_script(tmp_path, "--model", "ShortNet", "--devices", "4", "--out", str(tmp_path / "x.pt"), check=False)
    assert proc.returncode != 0
    assert "the pipelined module 'net' has 2 blocks, too few for 4 stages" in proc.stderr
    assert "use at most 2 devices" in proc.stderr
    assert time.monotonic() - start < 120


@pytest.mark.slow
@pytest.mark.parametrize(
    "rank, how, launcher",
    [
        (0, "killed", "lightning"),
        (1, "killed", "lightning"),
        (0, "raises", "lightning"),
        (0, "killed", "forked"),
        (1, "killed", "forked"),
    ],
)
def test_a_failing_stage_ends_every_rank(tmp_path, rank, how, launcher):
    """A rank killed mid-epoch, or one whose step raises (its caller catching the error and living on), ends
    every other rank promptly with an error that says a stage was lost: under Lightning's launcher (which also
    kills the other ranks when one dies), and with the ranks started apart (as torchrun or SLURM start them),
    where nothing but the pipeline's own failure handling ends the survivors."""
    out = str(tmp_path / f"fails{rank}.pt")
    start = time.monotonic()
    args = ("--devices", "2", "--epochs", "3", "--die-rank", str(rank), "--die-step", "3", "--out", out)
    env = {"TEST_RAISE": "1"} if how == "raises" else {}
    proc = run_script(tmp_path, *args, check=False, timeout=120, launcher=launcher, env=env)
    assert proc.returncode != 0
    wait_for_ranks_to_exit(out)
    # (started apart, a survivor that did not end by itself would be killed GRACE_S after the failure)
    assert time.monotonic() - start < (120 if launcher == "lightning" else GRACE_S)
    if how == "raises":
        assert "rank 0 caught the error and lives on" in proc.stdout
    # the surviving rank says that it lost a stage, in the pipeline's own words
    assert "PipelineCommError: stage" in proc.stderr
    assert "another stage of the pipeline crashed, was killed or stopped answering" in proc.stderr or (
        "and got no answer" in proc.stderr
    )


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["gpipe", "timeprest_i"])
def test_sigterm_on_rank_0_stops_every_rank(tmp_path, schedule):
    """A preempted job (SIGTERM to rank 0, which the launcher passes on): every rank stops with Lightning's
    SIGTERMException at the same step, none waits on another (Lightning's own SIGTERM handling broadcasts from
    inside the signal handler and every step; the strategy replaces both with a check that never blocks, read a
    few steps late: 2 under a synchronous schedule, 2W + 4 + max_inflight under an asynchronous one)."""
    out = tmp_path / "term.pt"
    start = time.monotonic()
    args = ("--devices", "3", "--schedule", schedule, "--n", "2", "--epochs", "3", "--batch-size", "6")
    args += ("--sigterm-step", "4", "--out", str(out))
    run_script(tmp_path, *args, check=False, timeout=120, launcher="lightning")
    wait_for_ranks_to_exit(str(out))
    assert time.monotonic() - start < 120
    stopped = [(tmp_path / f"term.pt.stopped{r}").read_text().split() for r in range(3)]
    latest = 4 + (3 if schedule == "gpipe" else 2 * 3 + 4 + 2 + 1)  # the signal's step + the lag + 1
    assert all(kind == "SIGTERMException" for kind, _ in stopped), stopped
    assert len({step for _, step in stopped}) == 1 and 4 <= int(stopped[0][1]) <= latest, stopped


def test_asynchronous_policies_refuse_the_learning_rate_finder():
    """Tuner.lr_find would read each step's loss a few steps late (NaN at first): no suggestion, silently."""
    trainer = Trainer(
        accelerator="cpu", devices=1, strategy=TiMePReStStrategy(schedule="timeprest_v", num_microbatches=2),
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
    )  # fmt: skip
    with pytest.raises(PipelineConfigError, match="Find the learning rate with schedule='gpipe'"):
        Tuner(trainer).lr_find(StemNetHead(), loader(18), num_training=5)


def test_asynchronous_policies_refuse_gradient_accumulation():
    with pytest.raises(PipelineConfigError, match="accumulate_grad_batches=2 does not apply to 'timeprest_i'"):
        _fit_one_process(StemNetHead(), schedule="timeprest_i", accumulate_grad_batches=2)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        # in the paper's grid, W = 4 > N + 1 = 3: V-TiMePReSt would not be staleness-free (v = 2)
        (("--schedule", "timeprest_v", "--n", "2", "--devices", "4", "--order", "unit"), "Use num_microbatches >= 3"),
        # a cap that lets stage 0 hold 5 mini-batches: d = 4 steps between its forward and backward, v = 2
        (("--schedule", "timeprest_v", "--n", "2", "--devices", "4", "--max-inflight", "5"), "Use max_inflight <= "),
        # the embedding is tied to a layer on another stage
        (
            ("--schedule", "timeprest_i", "--n", "2", "--devices", "2", "--model", "TiedLM"),
            "tie_word_embeddings=False in its config",
        ),
    ],
)
def test_asynchronous_setups_fail_at_start(tmp_path, args, message):
    proc = run_script(tmp_path, *args, "--epochs", "1", "--out", str(tmp_path / "x.pt"), check=False, timeout=120)
    assert proc.returncode != 0
    assert "PipelineConfigError" in proc.stderr and message in proc.stderr


def test_a_lost_peer_is_named_in_the_pipeline_words():
    """A collective or transfer that fails because a peer is gone says who was doing what (the strategy prints
    PipelineCommError at once, before Lightning's launcher ends the ranks)."""
    with pytest.raises(PipelineCommError, match=r"^stage 1 \(rank 3\) failed while summing; .*Connection closed"):
        with peer_lost("stage 1 (rank 3)", "summing"):
            raise RuntimeError("[pair.cc:553] Connection closed by peer")
    with pytest.raises(CheckpointError, match="^as it was$"):  # the package's own errors pass through
        with peer_lost("stage 1 (rank 3)", "summing"):
            raise CheckpointError("as it was")


def test_every_error_derives_from_one_base_class():
    """``except TiMePReStError`` catches any error of the package; each is also the built-in error callers expect."""
    import lightning_timeprest as tp

    expected = {
        tp.PipelineConfigError: ValueError,
        tp.PartitionError: ValueError,
        tp.MicroBatchError: ValueError,
        tp.ScheduleError: ValueError,
        tp.PipelineCommError: RuntimeError,
        tp.CheckpointError: RuntimeError,
    }
    for error, builtin in expected.items():
        assert issubclass(error, tp.TiMePReStError) and issubclass(error, builtin), error
    # the modules raise the same classes (no second definition anywhere)
    from lightning_timeprest import checkpoint, comm, microbatch, partition, schedules, strategy

    assert strategy.PipelineConfigError is tp.PipelineConfigError and partition.PartitionError is tp.PartitionError
    assert microbatch.MicroBatchError is tp.MicroBatchError and schedules.ScheduleError is tp.ScheduleError
    assert comm.PipelineCommError is tp.PipelineCommError and checkpoint.CheckpointError is tp.CheckpointError
    with pytest.raises(tp.TiMePReStError, match="unknown schedule 'zigzag'"):
        TiMePReStStrategy(schedule="zigzag")
