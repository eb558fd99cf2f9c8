"""Names, registries, the CLI and the demo."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, clean_env
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import StrategyRegistry

import lightning_timeprest
from lightning_timeprest import TiMePReStStrategy
from lightning_timeprest.registry import register


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpipe", "1f1b", "timeprest_v", "timeprest", "timeprest_i", "pipedream"])
def test_names_resolve_in_the_trainer(name):
    trainer = Trainer(strategy=name, accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, TiMePReStStrategy)
    assert trainer.strategy.schedule_name == name
    assert StrategyRegistry[name]["strategy"] is TiMePReStStrategy


def test_registration_is_idempotent():
    register()
    register()
    assert StrategyRegistry["gpipe"]["init_params"] == {"schedule": "gpipe"}


@pytest.mark.slow
def test_pytorch_lightning_gets_its_own_class():
    pl = pytest.importorskip("pytorch_lightning")
    from lightning_timeprest.pytorch_lightning import TiMePReStStrategy as PLStrategy

    assert pl.strategies.StrategyRegistry["1f1b"]["strategy"] is PLStrategy
    trainer = pl.Trainer(strategy="1f1b", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, pl.strategies.DDPStrategy) and trainer.strategy.schedule_name == "1f1b"


@pytest.mark.slow
def test_default_microbatches_and_sampler():
    strategy = Trainer(strategy="gpipe", accelerator="cpu", devices=2, logger=False).strategy
    assert strategy.num_microbatches == 4
    assert strategy.distributed_sampler_kwargs == {"num_replicas": 1, "rank": 0}
    assert lightning_timeprest.SCHEDULES == ("gpipe", "1f1b", "timeprest_v", "timeprest", "timeprest_i", "pipedream")


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=240)


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, launch",
    [
        ("spirals_gpipe.yaml", "console script"),  # the installed `lightning-timeprest` entry point
        ("spirals_1f1b.yaml", "module"),  # python -m lightning_timeprest
    ],
)
def test_cli_yaml(tmp_path, config, launch):
    script = shutil.which("lightning-timeprest", path=str(Path(sys.executable).parent))
    if launch == "console script":
        assert script is not None, "the package's console script is not installed next to this Python"
        command = [script]
    else:
        command = [sys.executable, "-m", "lightning_timeprest"]
    # (default_root_dir: LightningCLI saves the resolved config.yaml there, not in the repository)
    overrides = ["--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"]
    overrides += ["--trainer.default_root_dir", str(tmp_path)]
    proc = _run(*command, "fit", "--config", f"examples/configs/{config}", *overrides)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "All distributed processes registered. Starting with 2 processes" in proc.stdout + proc.stderr
    printed = proc.stdout + proc.stderr
    # the partition table: one row per stage, each with its run of the Sequential's layers
    assert "stage  layers" in printed and "\n0      layers.0 .. " in printed and "\n1      layers." in printed


@pytest.mark.slow
def test_demo_learns():
    proc = _run(sys.executable, "examples/spirals.py", "--epochs", "4")
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("finished:"))
    val_acc = float(line.split("'val_acc': ")[1].rstrip("}"))
    assert val_acc > 0.5  # five classes: chance is 0.2


@pytest.mark.slow
def test_pytorch_lightning_trains_like_one_device(tmp_path):
    pytest.importorskip("pytorch_lightning")
    script = str(REPO / "tests" / "scripts" / "pl_train.py")
    results = []
    for strategy, devices in (("1f1b", "2"), ("auto", "1")):
        out = tmp_path / f"{strategy}.pt"
        proc = _run(sys.executable, script, strategy, devices, str(out))
        assert proc.returncode == 0, proc.stderr[-4000:]
        results.append(torch.load(out))
    pipelined, single = results
    for key, value in single["state_dict"].items():
        torch.testing.assert_close(pipelined["state_dict"][key], value, rtol=1e-4, atol=1e-5)
    assert pipelined["loss"] == pytest.approx(single["loss"], rel=1e-5)
