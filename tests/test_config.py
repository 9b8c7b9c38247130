"""Tests of the settings and of each stage's preflight: bad settings and paths stop with one line, before JAX."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import HEAVY_MODULES, run_stage

import config
import kaggle_weights
import rundir


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
    # outputs that no user can create, which permission bits call writable (as root under /proc): refused at once
    ("train_sft.py", ["--out", "{long}/run"], "error: --out {long}/run cannot be created (File name too long)"),
    ("train_sft.py", ["--out", "/proc/tunix-sft-probe/run"], "error: --out /proc/tunix-sft-probe/run "),
    ("data_prep.py", ["--data", "{long}"], "error: --data {long} cannot be created (File name too long)"),
    ("eval_samples.py", ["--run", "{tmp}", "--out", "{long}"], "error: --out {long} cannot be created (File name"),
    ("eval_samples.py", ["--run", "{tmp}", "--out", "/proc/tunix-sft-probe"], "error: --out /proc/tunix-sft-probe "),
    ("export.py", ["--run", "{tmp}", "--out", "{long}/x"], "error: --out {long}/x cannot be created (File name too"),
])
def test_bad_settings_stop_before_heavy_imports(script: str, args: list[str], message: str, tmp_path: Path) -> None:
    """The README's "bad settings stop before any heavy work": one line, and JAX (or numpy) was never imported."""
    names = {"tmp": tmp_path, "file": tmp_path / "a_file", "long": tmp_path / ("n" * 300)}
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "rows.parquet").write_text('{"prompt": "a JSON line named .parquet"}\n')
    code, stderr, imported = run_stage(script, "--preset", "cpu-tiny", *[a.format(**names) for a in args])
    assert code == 1 and stderr and stderr[-1].startswith(message.format(**names)), stderr
    assert len([line for line in stderr if line.strip()]) == 1, stderr
    assert not imported & HEAVY_MODULES, imported & HEAVY_MODULES


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
@pytest.mark.parametrize("stage, flag", [("train_sft.py", "--init-from"), ("train_sft.py", "--out"),
                                         ("export.py", "--run")])
def test_a_run_of_the_other_architecture_stops_before_heavy_imports(stage: str, flag: str, tmp_path: Path) -> None:
    """A Gemma2 run given to a Gemma3 setting (--init-from, resuming it as --out, exporting it) is refused by its
    config.json's model.name before JAX is imported."""
    tiny_run_dir = tmp_path / "run"
    rundir.checkpoint_dir(tiny_run_dir).mkdir(parents=True)
    (tiny_run_dir / "config.json").write_text(json.dumps(config.get_config("cpu-tiny").to_dict()))  # as train writes it
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
    assert (cfg.model.name, cfg.model.attention, cfg.data.continue_from, kaggle_weights.kaggle_handle(cfg.model)) == (
        "gemma3-1b-it", "xla", str(run), "google/gemma-3/flax/gemma3-1b-it")
    assert default.model.attention == "splash"  # the kaggle (Gemma2) continuation keeps kaggle's attention
    # what is said outright wins: the model (check_saved_run then names the mismatch), and where the data starts
    assert config.get_config("unrestricted", {"run.init_from": str(run), "model.name": "gemma2-2b-it"}
                             ).model.name == "gemma2-2b-it"
    assert config.get_config("unrestricted", {"run.init_from": str(run), "data.continue_from": "data/x"}
                             ).data.continue_from == "data/x"


def test_each_model_name_builds_its_architecture_and_gemma3_packs_past_its_window_with_xla() -> None:
    assert {name: config.model_family(config.get_config("cpu-tiny", {"model.name": name}).model)
            for name in config.MODEL_FAMILIES} == {"gemma2-2b-it": "gemma2", "gemma3-1b-it": "gemma3",
                                                   "tiny": "gemma2", "tiny-gemma3": "gemma3"}
    with pytest.raises(config.ConfigError, match=r"--model.name 'gemma3-4b-it' is unknown: use gemma2-2b-it, "):
        config.get_config("cpu-tiny", {"model.name": "gemma3-4b-it"})
    # Tunix's Gemma2 compares positions with absolute key indices (with XLA's attention, rows longer than its window
    # leak); Tunix's Gemma3 does not, so kaggle-gemma3 (XLA's attention) packs rows past its 512 window
    with pytest.raises(config.ConfigError, match="exceeds the sliding window 4096: packed rows"):
        config.get_config("kaggle", {"data.max_len": "8192", "model.attention": "xla"})
    gemma3 = config.get_config("kaggle-gemma3", {"data.max_len": "8192"})
    assert (gemma3.model.attention, gemma3.data.max_len, gemma3.data.pack) == ("xla", 8192, True)
    # splash runs Gemma2's attention block: a Gemma3 model stops with one line naming the fix
    for preset in ("kaggle-gemma3", "gpu-gemma3", "cpu-tiny-gemma3"):
        assert config.get_config(preset).model.attention == "xla"
        with pytest.raises(config.ConfigError, match=r"^--model.attention splash runs Gemma2's attention block, "
                                                     r"not \S+'s: use --model.attention xla$"):
            config.get_config(preset, {"model.attention": "splash"})
    assert config.get_config("kaggle-gemma3").run.mesh_tp == 1
    with pytest.raises(config.ConfigError, match="does not divide the model's 1 kv heads"):
        config.get_config("kaggle-gemma3", {"run.mesh_fsdp": "4", "run.mesh_tp": "2"})
