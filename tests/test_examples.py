"""The examples for real models run pipelined as the README shows, and every shipped yaml is a valid configuration
of the strategy (its arguments are checked by LightningCLI's own parser)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, clean_env

pytestmark = pytest.mark.slow  # multi-process training runs (the fast subset: -m 'not slow')

CONFIGS = sorted(p.name for p in (REPO / "examples" / "configs").glob("*.yaml"))


def _run(*cmd: str, timeout: float = 300, warnings: str = "ignore") -> subprocess.CompletedProcess:
    env = {**clean_env(), "PYTHONWARNINGS": warnings}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_every_yaml_the_readme_names_is_shipped():
    """(The configurations are the parameters of the next test: without any, it would not run at all.)"""
    named = set(re.findall(r"examples/configs/(\w+\.yaml)", (REPO / "README.md").read_text()))
    assert named and named <= set(CONFIGS), named - set(CONFIGS)


@pytest.mark.parametrize("config", CONFIGS)
def test_yaml_is_a_valid_configuration(config):
    proc = _run(
        sys.executable, "-m", "lightning_timeprest", "fit", "--config", f"examples/configs/{config}", "--print_config"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = yaml.safe_load(proc.stdout)
    written = yaml.safe_load((REPO / "examples" / "configs" / config).read_text())
    strategy = written["trainer"]["strategy"]
    if isinstance(strategy, dict):  # class_path + init_args: each argument reached the strategy
        for key, value in strategy["init_args"].items():
            assert printed["trainer"]["strategy"]["init_args"][key] == value


def test_vision_example_trains_pipelined():
    cmd = [sys.executable, "examples/vision.py", "--arch", "resnet50", "--schedule", "timeprest_i", "--devices", "2"]
    args = ("--epochs", "1", "--num-train", "128", "--width", "0.125", "--batch-size", "32")
    proc = _run(*cmd, *args, warnings="default")
    assert proc.returncode == 0, proc.stderr[-4000:]
    printed = proc.stdout + proc.stderr
    # a quiet run: no warning from this package, and no sync_dist advice for values every rank logs alike
    assert "lightning_timeprest/" not in proc.stderr and "sync_dist" not in proc.stderr, proc.stderr[-4000:]
    assert "pipelined the forward of ImageClassifier (your step calls self(...), 100% of the parameters; traced" in (
        printed
    )
    assert "stage  layers" in printed
    finished = next(line for line in proc.stdout.splitlines() if line.startswith("finished:"))
    assert "resnet50 width 0.125, 2 stages, schedule timeprest_i" in finished and "val_acc" in finished
    assert any(line.startswith("pipeline: {'stage0/versions_held'") for line in proc.stdout.splitlines())
