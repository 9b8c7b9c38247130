"""Run directories: one writer, damaged checkpoints set aside in one line, saved runs that do not fit the settings
refused before JAX is imported, and the paths each stage writes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
from conftest import HEAVY_MODULES, hold_run_lock_in_a_child, run_stage, tiny_run_config

import config
import rundir

# ----------------------------------------------------------------------------- one writer


def test_one_writer_per_run_directory_and_a_killed_writer_blocks_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    holder = hold_run_lock_in_a_child(run_dir)
    try:
        with pytest.raises(config.ConfigError, match=rf"^{run_dir} is being trained by pid {holder} on .*: wait"):
            rundir.RunLock(run_dir)
    finally:
        os.kill(holder, signal.SIGKILL)  # no clean-up of any kind: the OS drops the lock with the process
        os.waitpid(holder, 0)
    with rundir.RunLock(run_dir):
        assert (run_dir / rundir.RUN_LOCK).read_text().startswith(f"pid {os.getpid()} on ")
    with rundir.RunLock(run_dir):  # released at the end of the block
        pass


# ----------------------------------------------------------------------------- damaged checkpoints


def _damage(ckpt_dir: Path, kind: str) -> int:
    """Damages the run's newest checkpoint as a kill, a full disk or a careless hand would; returns its step."""
    step_dir = ckpt_dir / "12"
    if kind == "missing_item_metadata":
        (step_dir / "model_params" / "_METADATA").unlink()
    elif kind == "garbage_checkpoint_metadata":
        (step_dir / "_CHECKPOINT_METADATA").write_text("\x00garbage")
    elif kind == "missing_ocdbt_manifest":
        (step_dir / "model_params" / "manifest.ocdbt").unlink()
    elif kind == "truncated_array":
        for chunk in (step_dir / "optimizer_state").rglob("*"):
            if chunk.is_file() and chunk.parent.name == "d":
                chunk.write_bytes(chunk.read_bytes()[:10])
    elif kind == "empty_step_dir":
        (ckpt_dir / "16").mkdir()
        return 16
    return 12


@pytest.mark.parametrize("kind, problem", [
    ("missing_item_metadata", "its model_params/_METADATA does not read (FileNotFoundError)"),
    ("garbage_checkpoint_metadata", "its _CHECKPOINT_METADATA does not read (JSONDecodeError)"),
    ("missing_ocdbt_manifest", "its model_params arrays do not read back (ValueError: NOT_FOUND)"),
    ("truncated_array", "its optimizer_state arrays do not read back (ValueError: OUT_OF_RANGE)"),
    ("empty_step_dir", "its _CHECKPOINT_METADATA does not read (FileNotFoundError)")])
def test_a_damaged_checkpoint_is_set_aside_in_one_line_and_every_reader_gets_the_newest_good_one(
        tiny_run_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture, kind: str, problem: str) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run_dir)
    ckpt_dir = rundir.checkpoint_dir(run_dir)
    damaged = _damage(ckpt_dir, kind)
    good = 12 if damaged == 16 else 8
    assert rundir.newest_good_step(run_dir) == good  # a question only: nothing is renamed
    assert (ckpt_dir / str(damaged)).is_dir() and capfd.readouterr() == ("", "")
    assert rundir.checkpoint_step(run_dir) == good  # what evaluation, export and --init-from load
    out, err = capfd.readouterr()
    assert err == ""  # one line and nothing else: no traceback from orbax's abandoned reads
    [aside] = ckpt_dir.glob(f"{damaged}.damaged-*")  # renamed, never deleted
    # what is wrong in a few words (no message of paths cut short), then where it went
    assert out == f"checkpoint {ckpt_dir / str(damaged)} cannot be restored: {problem}; set aside as {aside}\n"
    assert not (ckpt_dir / str(damaged)).exists()
    assert rundir.checkpoint_step(run_dir) == rundir.checkpoint_step(run_dir, good) == good
    assert capfd.readouterr().out == ""  # nothing more to set aside
    left = re.escape(str(sorted(rundir.saved_steps(run_dir))))
    with pytest.raises(config.ConfigError, match=rf"has no checkpoint at step {damaged} that can be restored: it "
                                                 rf"has steps {left}$"):
        rundir.checkpoint_step(run_dir, damaged)


def test_a_damaged_checkpoint_is_left_in_place_while_another_process_writes_the_run(tiny_run_dir: Path,
                                                                                   tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run_dir)
    (rundir.checkpoint_dir(run_dir) / "16").mkdir()
    holder = hold_run_lock_in_a_child(run_dir)
    try:
        assert rundir.checkpoint_step(run_dir) == 12
        note = capsys.readouterr().out
        assert note.startswith(f"checkpoint {rundir.checkpoint_dir(run_dir) / '16'} cannot be restored: its "
                               f"_CHECKPOINT_METADATA does not read (FileNotFoundError); left in place while pid "
                               f"{holder} on ")
        assert (rundir.checkpoint_dir(run_dir) / "16").is_dir()  # the writer's directory is not touched
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)


def test_a_process_other_than_process_0_leaves_a_damaged_checkpoint_to_process_0(
        tiny_run_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """The run's own files are process 0's in a multi-process run (tests/test_multihost.py runs real ones)."""
    import jax

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run_dir)
    (rundir.checkpoint_dir(run_dir) / "16").mkdir()
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert rundir.newest_good_step(run_dir, read_arrays=False, set_aside_damaged=True) == 12
    assert capsys.readouterr().out == (f"checkpoint {rundir.checkpoint_dir(run_dir) / '16'} cannot be restored: its "
                                       "_CHECKPOINT_METADATA does not read (FileNotFoundError); left in place for "
                                       "process 0 to set aside\n")
    assert (rundir.checkpoint_dir(run_dir) / "16").is_dir()


# ----------------------------------------------------------------------------- saved runs that do not fit


def test_saved_lora_shape_reads_orbax_metadata_and_skips_unreadable_steps(tiny_run_dir: Path, tmp_path: Path
                                                                          ) -> None:
    run = tmp_path / "run"
    shutil.copytree(rundir.checkpoint_dir(tiny_run_dir), rundir.checkpoint_dir(run))
    steps = rundir.saved_steps(run)
    cfg = config.get_config("cpu-tiny")
    want = {"rank": cfg.lora.rank, "num_layers": cfg.model.num_layers, "embed_dim": cfg.model.embed_dim}
    assert rundir.saved_lora_shape(run) == (rundir.checkpoint_dir(run) / str(steps[0]), want)
    (rundir.checkpoint_dir(run) / str(steps[0]) / "model_params" / "_METADATA").write_text('{"tree_metadata": {')
    assert rundir.saved_lora_shape(run) == (rundir.checkpoint_dir(run) / str(steps[1]), want)
    assert rundir.saved_lora_shape(run, steps[0]) is None
    assert rundir.saved_lora_shape(tmp_path / "no_run") is None
    # without its config.json, a run is checked by its checkpoint's LoRA shapes
    rundir.check_saved_run(run, cfg, "--run")
    with pytest.raises(config.ConfigError, match=r"holds LoRA rank 16 on 4 layers of width 128, but these settings "
                                                 r"build rank 8 on 4 layers of width 128: .* or another --run$"):
        rundir.check_saved_run(run, config.get_config("cpu-tiny", {"lora.rank": "8"}), "--run")


@pytest.mark.parametrize("script, flag, setting", [
    ("train_sft.py", "--out", ("--lora.rank", "8")), ("train_sft.py", "--out", ("--model.num_layers", "2")),
    ("train_sft.py", "--init-from", ("--lora.rank", "8")), ("eval_samples.py", "--run", ("--lora.rank", "8"))])
def test_a_run_of_another_model_or_rank_stops_before_heavy_imports(script: str, flag: str, setting: tuple[str, str],
                                                                   tiny_run_dir: Path, tmp_path: Path) -> None:
    """Resuming a run, starting from one (--init-from) or evaluating one with another LoRA rank or model is refused
    from the run's config.json before JAX is imported, and that config.json is left alone."""
    run_config = (tiny_run_dir / "config.json").read_text()
    args = {"--out": ["--out", tiny_run_dir], "--init-from": ["--out", tmp_path / "new", "--init-from", tiny_run_dir],
            "--run": ["--run", tiny_run_dir, "--loss-only"]}[flag]
    code, stderr, imported = run_stage(script, "--preset", "cpu-tiny", *setting, *args)
    name, value = setting[0].removeprefix("--"), setting[1]
    theirs = json.loads(run_config)[name.split(".")[0]][name.split(".")[1]]
    assert code == 1 and len(stderr) == 1, stderr
    assert stderr[0] == (f"error: {tiny_run_dir} was trained with --{name} {theirs} but this run has --{name} "
                         f"{value}: use that run's settings, or pass another {flag}")
    assert not imported & HEAVY_MODULES
    assert (tiny_run_dir / "config.json").read_text() == run_config


def test_a_run_of_another_tokenizer_stops_training_before_the_build_and_keeps_its_config(
        tiny_run_dir: Path, tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import train_sft

    monkeypatch.setattr(train_sft, "build_model", lambda *_: pytest.fail("the model was built"))
    run_dir = tmp_path / "existing"
    shutil.copytree(tiny_run_dir, run_dir)
    other_tokenizer = json.loads((run_dir / "config.json").read_text())
    other_tokenizer["data_manifest"]["tokenizer_sha256"] = "0" * 64
    (run_dir / "config.json").write_text(json.dumps(other_tokenizer))
    with pytest.raises(config.ConfigError, match=rf"^run {run_dir} was trained with tokenizer .* \(sha256 "
                                                 rf"000000000000\) but {tiny_data_dir} uses .*--model.tokenizer_path"):
        train_sft.train(tiny_run_config(run_dir, tiny_data_dir), tiny_data_dir)
    assert json.loads((run_dir / "config.json").read_text()) == other_tokenizer  # never overwritten


# ----------------------------------------------------------------------------- paths a stage writes


def test_eval_writes_into_the_run_by_default_and_must_be_able_to(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval").write_text("a file where the report directory goes")
    with pytest.raises(SystemExit, match=rf"^error: --out {run}/eval is a file, not a directory"):
        rundir.settings_from_argv(["--run", str(run)], "eval_samples", "doc")
    cfg, args = rundir.settings_from_argv(["--run", str(run), "--out", str(tmp_path / "report"), "--data",
                                           str(tmp_path / "data")], "eval_samples", "doc")
    assert args.out == str(tmp_path / "report") and cfg.data.out_dir == str(tmp_path / "data")
    assert args.overrides == {"data.out_dir": str(tmp_path / "data")}


def test_a_run_in_the_old_checkpoint_layout_stops_with_the_move_to_make(tiny_run_dir: Path, tmp_path: Path) -> None:
    """Checkpoints live at RUN/actor/<step>, where the hackathon's template looks; a run made before kept them in
    RUN/checkpoints: every stage that reads it stops with one line naming the mv that fixes it, before JAX."""
    run = tmp_path / "old_run"
    shutil.copytree(tiny_run_dir, run)
    rundir.checkpoint_dir(run).rename(run / rundir.OLD_CHECKPOINT_SUBDIR)
    move = f"mv {run / 'checkpoints'} {run / 'actor'}"
    for script, *args in (("eval_samples.py", "--run", run), ("export.py", "--run", run, "--out", tmp_path / "x"),
                          ("train_sft.py", "--out", run), ("train_sft.py", "--out", tmp_path / "new", "--init-from",
                                                           run)):
        code, stderr, imported = run_stage(script, "--preset", "cpu-tiny", *args)
        assert code != 0 and len(stderr) == 1 and move in stderr[0] and not imported & HEAVY_MODULES, (script, stderr)
    (run / rundir.OLD_CHECKPOINT_SUBDIR).rename(run / rundir.CHECKPOINT_SUBDIR)  # the move it names
    assert rundir.saved_lora_shape(run) is not None
