"""Tests of the settings and of each stage's preflight: bad settings and paths stop with one line, before JAX."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import config

REPO = Path(__file__).resolve().parents[1]
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


@pytest.mark.parametrize("script, args, message", [
    ("train_sft.py", ["--lora.rank", "0"], "error: --lora.rank 0 must be at least 1"),
    ("train_sft.py", ["--optim.learning_rate", "nan"], "error: --optim.learning_rate nan is not a finite number"),
    ("train_sft.py", ["--run.time_budget_min", "inf"], "error: --run.time_budget_min inf is not a finite number"),
    ("train_sft.py", ["--out", "{file}"], "error: --out {file} is a file, not a directory"),
    ("train_sft.py", ["--out", "{file}/run"], "error: --out {file}/run cannot be created: {file} is a file"),
    ("train_sft.py", ["--out", "{tmp}/run", "--init-from", "{tmp}/missing"],
     "error: run directory {tmp}/missing does not exist"),
    ("data_prep.py", ["--out", "{tmp}/x"], "error: data_prep.py writes the prepared data to --data DIR; --out is "
                                           "train_sft.py's run directory: use --data {tmp}/x"),
    ("data_prep.py", ["--data.source", "{tmp}"], "error: source {tmp} is a directory, not a .jsonl/.parquet file"),
    ("data_prep.py", ["--data.source", "{tmp}/rows.parquet"], "error: source {tmp}/rows.parquet is not a Parquet file"),
    ("data_prep.py", ["--data", "{file}"], "error: --data {file} is a file, not a directory"),
    ("eval_samples.py", ["--run", "{tmp}/missing"], "error: run directory {tmp}/missing does not exist"),
    ("eval_samples.py", ["--run", "{tmp}", "--max-steps", "3"], "error: eval_samples.py does not use --max-steps"),
    ("export.py", ["--run", "{tmp}", "--out", "{file}"], "error: --out {file} is a file, not a directory"),
    ("train_sft.py", ["--out", "gs://bucket/run"], "error: --out gs://bucket/run is a URL: the run's lock"),
    ("data_prep.py", ["--data", "gs://bucket/data"], "error: --data gs://bucket/data is a URL"),
    ("train_sft.py", ["--run.num_processes", "2"], "error: --run.num_processes 2 needs --run.coordinator HOST:PORT"),
    ("train_sft.py", ["--run.coordinator", "10.0.0.2", "--run.num_processes", "2", "--run.process_id", "1"],
     "error: --run.coordinator '10.0.0.2' is not HOST:PORT"),
    ("train_sft.py", ["--run.coordinator", "h:1", "--run.num_processes", "2", "--run.process_id", "2"],
     "error: --run.process_id 2 is not one of the 2 processes"),
])
def test_bad_settings_stop_before_heavy_imports(script: str, args: list[str], message: str, tmp_path: Path) -> None:
    """The README's "bad settings stop before any heavy work": one line, and JAX (or numpy) was never imported."""
    names = {"tmp": tmp_path, "file": tmp_path / "a_file"}
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "rows.parquet").write_text('{"prompt": "a JSON line named .parquet"}\n')
    code, stderr, imported = run_stage(script, "--preset", "cpu-tiny", *[a.format(**names) for a in args])
    assert code == 1 and stderr and stderr[-1].startswith(message.format(**names)), stderr
    assert len([line for line in stderr if line.strip()]) == 1, stderr
    assert not imported & HEAVY_MODULES, imported & HEAVY_MODULES


@pytest.mark.parametrize("flag", ["--init-from", "--out"])
def test_a_checkpoint_of_another_rank_stops_before_heavy_imports(flag: str, tiny_run_dir: Path, tmp_path: Path
                                                                 ) -> None:
    """--init-from a run of another rank, or resuming an existing run with another rank, is refused from the
    run's config.json before JAX is imported (and that config.json is left alone)."""
    run_config = (tiny_run_dir / "config.json").read_text()
    out = tiny_run_dir if flag == "--out" else tmp_path / "new"
    code, stderr, imported = run_stage("train_sft.py", "--preset", "cpu-tiny", "--lora.rank", "8", "--out", out,
                                       *(["--init-from", tiny_run_dir] if flag == "--init-from" else []))
    assert code == 1 and len(stderr) == 1, stderr
    assert stderr[0] == (f"error: {tiny_run_dir} was trained with --lora.rank 16 but this run has --lora.rank 8: "
                         f"use that run's settings, or pass another {flag}")
    assert not imported & HEAVY_MODULES
    assert (tiny_run_dir / "config.json").read_text() == run_config


def test_saved_lora_shape_reads_orbax_metadata_and_skips_unreadable_steps(tiny_run_dir: Path, tmp_path: Path
                                                                          ) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir / "checkpoints", run / "checkpoints")
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    cfg = config.get_config("cpu-tiny")
    want = {"rank": cfg.lora.rank, "num_layers": cfg.model.num_layers, "embed_dim": cfg.model.embed_dim}
    assert config.saved_lora_shape(run) == (run / "checkpoints" / str(steps[-1]), want)
    (run / "checkpoints" / str(steps[-1]) / "model_params" / "_METADATA").write_text('{"tree_metadata": {')
    assert config.saved_lora_shape(run) == (run / "checkpoints" / str(steps[-2]), want)
    assert config.saved_lora_shape(run, steps[-1]) is None
    assert config.saved_lora_shape(tmp_path / "no_run") is None
    # without its config.json, a run is checked by its checkpoint's LoRA shapes
    config.check_saved_run(run, cfg, "--run")
    with pytest.raises(config.ConfigError, match=r"holds LoRA rank 16 on 4 layers of width 128, but these settings "
                                                 r"build rank 8 on 4 layers of width 128: .* or another --run$"):
        config.check_saved_run(run, config.get_config("cpu-tiny", {"lora.rank": "8"}), "--run")


@pytest.mark.parametrize("name", ["optim.learning_rate", "optim.b2", "lora.alpha", "run.epochs", "eval.top_p"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused(name: str, value: str) -> None:
    with pytest.raises(config.ConfigError, match=rf"^--{name} {value} is not a finite number"):
        config.get_config("cpu-tiny", {name: value})


def test_short_flags_belong_to_the_stages_that_read_them() -> None:
    assert config.parse_overrides(["--prompts", "p.txt", "--data=d"], "eval_samples") == {
        "eval.prompts": "p.txt", "data.out_dir": "d"}
    assert config.parse_overrides(["--out", "r", "--max-steps", "3"], "train_sft") == {
        "run.out_dir": "r", "run.max_steps": "3"}
    for stage, flag in [("data_prep", "--init-from"), ("export", "--data"), ("train_sft", "--prompts")]:
        with pytest.raises(config.ConfigError, match=rf"^{stage}.py does not use {flag} "):
            config.parse_overrides([flag, "x"], stage)
    # Long overrides are the shared configuration: every stage takes them.
    assert config.parse_overrides(["--run.max_steps", "3"], "data_prep") == {"run.max_steps": "3"}


def test_eval_writes_into_the_run_by_default_and_must_be_able_to(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval").write_text("a file where the report directory goes")
    with pytest.raises(SystemExit, match=rf"^error: --out {run}/eval is a file, not a directory"):
        config.config_from_argv(["--run", str(run)], "eval_samples", "doc")
    cfg, args = config.config_from_argv(["--run", str(run), "--out", str(tmp_path / "report"), "--data",
                                         str(tmp_path / "data")], "eval_samples", "doc")
    assert args.out == str(tmp_path / "report") and cfg.data.out_dir == str(tmp_path / "data")
    assert args.overrides == {"data.out_dir": str(tmp_path / "data")}
