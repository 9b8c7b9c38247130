"""Tests of the settings and of each stage's preflight: bad settings and paths stop with one line, before JAX."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import config
import kaggle_weights

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


@pytest.mark.parametrize("stage, flag", [("train_sft.py", "--init-from"), ("train_sft.py", "--out"),
                                         ("export.py", "--run")])
def test_a_run_of_the_other_architecture_stops_before_heavy_imports(stage: str, flag: str, tiny_run_dir: Path,
                                                                   tmp_path: Path) -> None:
    """A Gemma2 run given to a Gemma3 setting (--init-from, resuming it as --out, exporting it) is refused by its
    config.json's model.name before JAX is imported."""
    args = {"--init-from": ["--out", tmp_path / "new", "--init-from", tiny_run_dir], "--out": ["--out", tiny_run_dir],
            "--run": ["--run", tiny_run_dir, "--out", tmp_path / "export"]}[flag]
    code, stderr, imported = run_stage(stage, "--preset", "cpu-tiny-gemma3", *args)
    assert code == 1 and len(stderr) == 1, stderr
    assert stderr[0].startswith(f"error: {tiny_run_dir} was trained with --model.name tiny, --model.num_layers 4, "
                                "--model.num_kv_heads 2 but this run has --model.name tiny-gemma3, "
                                "--model.num_layers 6, --model.num_kv_heads 1: use that run's settings"), stderr
    assert not imported & HEAVY_MODULES


def test_unrestricted_continues_the_model_of_its_init_from_run(tmp_path: Path) -> None:
    """unrestricted follows the run it continues: --init-from runs/kaggle-gemma3 alone makes it a Gemma3 run that
    reads the data after that run's; without such a run it is the kaggle (Gemma2) continuation."""
    default = config.get_config("unrestricted")
    assert (default.model.name, default.run.init_from, default.data.continue_from) == (
        "gemma2-2b-it", "runs/kaggle", "runs/kaggle")
    run = tmp_path / "kaggle-gemma3"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config.get_config("kaggle-gemma3").to_dict()))
    cfg = config.get_config("unrestricted", {"run.init_from": str(run)})
    assert (cfg.model.name, cfg.data.continue_from, kaggle_weights.kaggle_handle(cfg.model)) == (
        "gemma3-1b-it", str(run), "google/gemma-3/flax/gemma3-1b-it")
    # what is said outright wins: the model (check_saved_run then names the mismatch), and where the data starts
    assert config.get_config("unrestricted", {"run.init_from": str(run), "model.name": "gemma2-2b-it"}
                             ).model.name == "gemma2-2b-it"
    assert config.get_config("unrestricted", {"run.init_from": str(run), "data.continue_from": "data/x"}
                             ).data.continue_from == "data/x"


def test_each_model_name_builds_its_architecture_and_gemma3_packs_past_its_window() -> None:
    assert {name: config.model_family(config.get_config("cpu-tiny", {"model.name": name}).model)
            for name in config.MODEL_FAMILIES} == {"gemma2-2b-it": "gemma2", "gemma3-1b-it": "gemma3",
                                                   "tiny": "gemma2", "tiny-gemma3": "gemma3"}
    with pytest.raises(config.ConfigError, match=r"--model.name 'gemma3-4b-it' is unknown: use gemma2-2b-it, "):
        config.get_config("cpu-tiny", {"model.name": "gemma3-4b-it"})
    # Gemma2 compares positions with absolute key indices (rows longer than its window leak); Gemma3 does not
    with pytest.raises(config.ConfigError, match="exceeds the sliding window 4096: Gemma2's packed rows"):
        config.get_config("kaggle", {"data.max_len": "8192"})
    assert config.get_config("kaggle-gemma3", {"data.max_len": "8192"}).data.max_len == 8192
    assert config.get_config("kaggle-gemma3").run.mesh_tp == 1
    with pytest.raises(config.ConfigError, match="does not divide the model's 1 kv heads"):
        config.get_config("kaggle-gemma3", {"run.mesh_fsdp": "4", "run.mesh_tp": "2"})
