"""Shared fixtures: the cpu-tiny data prepared once per test session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import config  # noqa: E402
import data_prep  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped sample prepared with the cpu-tiny preset into a temporary directory."""
    cfg = config.get_config("cpu-tiny", {"data.out_dir": str(tmp_path_factory.mktemp("cpu_tiny_data"))})
    return data_prep.prepare(cfg, show_progress=False)


# The tiny model of each architecture: the tests of what differs between Gemma2 and Gemma3 run on both.
TINY_PRESETS = ("cpu-tiny", "cpu-tiny-gemma3")


def build_tiny_model(preset: str):
    from model import build_model, make_mesh

    cfg = config.get_config(preset)
    mesh = make_mesh(cfg)
    with mesh:
        return build_model(cfg, mesh)


@pytest.fixture(scope="session")
def tiny_model():
    """The cpu-tiny model with fresh LoRA, built once for the tests that only run it."""
    return build_tiny_model("cpu-tiny")


@pytest.fixture(scope="session")
def tiny_gemma3_model():
    """The cpu-tiny-gemma3 model with fresh LoRA."""
    return build_tiny_model("cpu-tiny-gemma3")


@pytest.fixture(scope="session", params=TINY_PRESETS)
def tiny_preset(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def each_tiny_model(tiny_preset: str, request: pytest.FixtureRequest):
    """The tiny model of each architecture with fresh LoRA (tiny_model, tiny_gemma3_model)."""
    return request.getfixturevalue({"cpu-tiny": "tiny_model", "cpu-tiny-gemma3": "tiny_gemma3_model"}[tiny_preset])


TINY_RUN_STEPS = 12


def tiny_run_config(out_dir: Path, data_dir: Path, preset: str = "cpu-tiny", **overrides: str) -> config.Config:
    """cpu-tiny, cut to a short run that evaluates and checkpoints every few steps (and generates only when asked)."""
    settings = {"run.out_dir": str(out_dir), "data.out_dir": str(data_dir), "run.max_steps": str(TINY_RUN_STEPS),
                "run.eval_every": "4", "run.checkpoint_every_steps": "4", "run.eval_batches": "1",
                "eval.generate_every": "0", "run.time_budget_min": "0"}  # no wall-clock budget: load changes nothing
    return config.get_config(preset, settings | overrides)


def train_tiny_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, preset: str) -> Path:
    import train_sft

    run_dir = tmp_path_factory.mktemp(preset.replace("-", "_") + "_run") / "run"
    train_sft.train(tiny_run_config(run_dir, data_dir, preset), data_dir)
    return run_dir


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_data_dir: Path) -> Path:
    """A short cpu-tiny training run, shared by the training, evaluation and export tests."""
    return train_tiny_run(tmp_path_factory, tiny_data_dir, "cpu-tiny")


@pytest.fixture(scope="session")
def each_tiny_run_dir(tiny_preset: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                      tiny_data_dir: Path) -> Path:
    """A short training run of each architecture's tiny model (the same prepared data: one tokenizer)."""
    if tiny_preset == "cpu-tiny":
        return request.getfixturevalue("tiny_run_dir")
    return train_tiny_run(tmp_path_factory, tiny_data_dir, tiny_preset)


# Modules whose import is the heavy work a bad setting must not wait for.
HEAVY_MODULES = {"jax", "numpy", "tunix", "orbax", "flax", "datasets", "grain", "sentencepiece"}


def run_stage(script: str, *args: str | Path) -> tuple[int, list[str], set[str]]:
    """Runs a stage script; returns its exit code, its stderr lines other than import times, and every top-level
    module it imported (from ``python -X importtime``)."""
    done = subprocess.run([sys.executable, "-X", "importtime", script, *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    lines = done.stderr.splitlines()
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in lines if line.startswith("import time:")}
    return done.returncode, [line for line in lines if not line.startswith("import time:")], imported


def run_on_8_devices(script: str) -> str:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def hold_run_lock_in_a_child(run_dir: Path) -> int:
    """Forks a process that takes the run's lock as a training run does and holds it until killed."""
    ready, tell = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child touches neither JAX nor the test's state
        try:
            import rundir

            with rundir.RunLock(run_dir):
                os.write(tell, b"locked")
                signal.pause()
        finally:
            os._exit(0)
    os.close(tell)  # so that a child that failed to lock reads as an empty pipe, not a hang
    locked = os.read(ready, 6)
    os.close(ready)
    assert locked == b"locked"
    return pid
