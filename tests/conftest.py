"""Shared fixtures: the cpu-tiny data prepared once per test session."""

from __future__ import annotations

import atexit
import functools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import config  # noqa: E402
import data_prep  # noqa: E402

# The longest files first: run_tests.sh hands whole files to two workers (pytest-xdist's --dist loadfile), and a long
# file handed out last would keep one worker busy while the other has finished.
LONGEST_FILES = ("test_train_sft.py", "test_export.py", "test_model.py", "test_eval_samples.py", "test_attention.py",
                 "test_notebook.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        return LONGEST_FILES.index(item.path.name) if item.path.name in LONGEST_FILES else len(LONGEST_FILES)

    items.sort(key=rank)  # a stable sort: each file's tests keep their order


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


@functools.cache
def session_compile_cache() -> Path:
    """One JAX compilation cache for the session's short runs (a run of a shape an earlier one compiled loads its
    steps), made on first use: a process that only imports this file (the 8-device worker, which is killed) makes
    none to leave behind."""
    path = Path(tempfile.mkdtemp(prefix="tunix_sft_tests_jax_cache_"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def tiny_run_config(out_dir: Path, data_dir: Path, preset: str = "cpu-tiny", **overrides: str) -> config.Config:
    """cpu-tiny (or another tiny preset), cut to a short run that evaluates and checkpoints every few steps (and
    generates only when asked), with the session's compilation cache (``run.compile_cache_dir ""`` gives the run its
    own)."""
    settings = {"run.out_dir": str(out_dir), "data.out_dir": str(data_dir), "run.max_steps": str(TINY_RUN_STEPS),
                "run.eval_every": "4", "run.checkpoint_every_steps": "4", "run.eval_batches": "1",
                "run.micro_batch": "2",  # half the preset's rows a step: every behaviour tested, at half the compute
                "eval.generate_every": "0", "run.time_budget_min": "0",  # no wall-clock budget: load changes nothing
                "run.compile_cache_dir": str(session_compile_cache())}
    return config.get_config(preset, settings | overrides)


def logits_of(model, tokens: np.ndarray) -> np.ndarray:
    """The model's logits over tokens [B, L] as one causal row each."""
    import jax.numpy as jnp

    from model import packed_attention_mask

    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    logits, _ = model(jnp.asarray(tokens), jnp.asarray(positions), None,
                      packed_attention_mask(jnp.ones(tokens.shape, jnp.int32)))
    return np.asarray(logits)


def logit_tokens(data_dir: Path) -> np.ndarray:
    """Two held-out rows of 48 tokens: what the tests compare trained, restored and exported models on."""
    return data_prep.eval_batches(data_dir, 2)[0]["tokens"][:, :48]


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_data_dir: Path) -> Path:
    """A short cpu-tiny training run, shared by the training, evaluation and export tests. Beside it,
    ``trained_logits.npy``: the trained model's logits over ``logit_tokens``, taken in memory when training ended."""
    return train_tiny_run(tmp_path_factory, tiny_data_dir, "cpu-tiny")


@pytest.fixture(scope="session")
def each_tiny_run_dir(tiny_preset: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                      tiny_data_dir: Path) -> Path:
    """A short training run of each architecture's tiny model (the same prepared data: one tokenizer), with its
    ``trained_logits.npy`` beside it."""
    if tiny_preset == "cpu-tiny":
        return request.getfixturevalue("tiny_run_dir")
    # 4 steps: its tests read the LoRA it leaves, not how it learned (tiny_run_dir's tests do)
    return train_tiny_run(tmp_path_factory, tiny_data_dir, tiny_preset, **{"run.max_steps": "4"})


def train_tiny_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, preset: str, **overrides: str) -> Path:
    """A short run of a tiny preset, and ``trained_logits.npy`` beside it, recorded from the model in memory."""
    import jax

    import train_sft
    from model import make_mesh

    run_dir = tmp_path_factory.mktemp(preset.replace("-", "_") + "_run") / "run"
    built = []
    with pytest.MonkeyPatch.context() as patch:
        build_model = train_sft.build_model
        patch.setattr(train_sft, "build_model", lambda *a, **k: built.append(build_model(*a, **k)) or built[-1])
        # Its own compilation cache: tests/test_train_sft.py counts what it compiles.
        cfg = tiny_run_config(run_dir, data_dir, preset, **{"run.compile_cache_dir": ""} | overrides)
        train_sft.train(cfg, data_dir)
    with jax.set_mesh(make_mesh(cfg)):
        np.save(run_dir.parent / "trained_logits.npy", logits_of(built[0], logit_tokens(data_dir)))
    return run_dir


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


# The 8-device worker: runs each script it is sent in a fresh namespace and answers with one marked line.
EIGHT_DEVICE_WORKER = r"""
import contextlib, io, json, sys, traceback
for line in sys.stdin:
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            exec(compile(json.loads(line), "<8-device check>", "exec"), {"__name__": "__8_devices__"})
        reply = {"ok": True, "stdout": captured.getvalue()}
    except BaseException:
        reply = {"ok": False, "stdout": captured.getvalue(), "error": traceback.format_exc()}
    print("\0reply\0" + json.dumps(reply), flush=True)
"""


class EightDevices:
    """One Python process with 8 simulated CPU devices (``--xla_force_host_platform_device_count=8``) for every
    8-device check of the session: the interpreter starts and imports JAX and Tunix once, not once per check."""

    def __init__(self, log: Path):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
                   PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
        self.log = log
        self.process = subprocess.Popen([sys.executable, "-c", EIGHT_DEVICE_WORKER], cwd=REPO, env=env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"))

    def __call__(self, script: str, timeout: float = 400.0) -> str:
        """Runs script there and returns what it printed; fails the test on its exception or after timeout s."""
        self.process.stdin.write(json.dumps(textwrap.dedent(script)) + "\n")
        self.process.stdin.flush()
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([self.process.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                self.close()
                pytest.fail(f"the 8-device check gave no answer in {timeout:.0f} s; its stderr: {self.log}")
            line = self.process.stdout.readline()
            if not line:
                pytest.fail(f"the 8-device process ended: {self.log.read_text()[-3000:]}")
            if line.startswith("\0reply\0"):
                reply = json.loads(line.removeprefix("\0reply\0"))
                assert reply["ok"], reply["error"][-3000:]
                return reply["stdout"]

    def close(self) -> None:
        self.process.kill()
        self.process.wait(timeout=60)


@pytest.fixture(scope="session")
def eight_devices(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EightDevices]:
    worker = EightDevices(tmp_path_factory.mktemp("eight_devices") / "stderr.log")
    yield worker
    worker.close()


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
