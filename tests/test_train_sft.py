"""Training stage: step planning, masks and loss, the real loaders, runs, resume, init-from, meshes."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jax.numpy as jnp
import pytest
from conftest import TINY_RUN_STEPS, hold_run_lock_in_a_child, tiny_run_config
from flax import nnx

import config
import model
import rundir
import train_sft

REPO = Path(__file__).resolve().parents[1]


def read_metrics(run_dir: Path) -> list[dict]:
    return train_sft.read_metrics(run_dir / "metrics.jsonl")


# ----------------------------------------------------------------------------- step planning


def test_planned_steps_follow_the_data():
    assert train_sft.planned_steps(4, 1000, 32) == 125
    assert train_sft.planned_steps(4, 1001, 32) == 126  # ceil, never a partial epoch short
    assert train_sft.planned_steps(0.5, 10, 32) == 1
    assert train_sft.planned_steps(4, 1000, 32, max_steps=50) == 50
    assert train_sft.planned_steps(4, 1000, 32, max_steps=500) == 125


def test_budget_cap_leaves_room_for_the_final_save():
    # 100 s left, 10 s reserved, 3 s a step: 30 more steps fit.
    assert train_sft.budget_capped_steps(5, 1000, 3.0, 100.0, 10.0) == 35
    assert train_sft.budget_capped_steps(5, 20, 3.0, 100.0, 10.0) == 20  # the plan already fits
    assert train_sft.budget_capped_steps(5, 1000, 3.0, 5.0, 10.0) == 5  # past the deadline: stop now


def test_schedule_warms_up_then_decays_to_the_end_ratio():
    plan = train_sft.StepPlan(total_steps=100, peak_lr=1e-3, warmup_ratio=0.1, end_lr_ratio=0.1)
    lrs = [plan.learning_rate(s) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4)
    assert lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10], strict=True))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert plan.learning_rate(100) == pytest.approx(1e-4)
    plan.total_steps = 50  # re-planned by the time budget: the decay now ends at step 50
    assert plan.learning_rate(50) == pytest.approx(1e-4)


class FakeClock:
    """A clock the test drives: ``now`` is set by the test, and every reading moves it on by ``tick`` seconds
    (a run then takes the same simulated time however busy the machine is)."""

    def __init__(self, now: float = 1000.0, tick: float = 0.0):
        self.now, self.tick = now, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def run_hooks(cfg: config.Config, plan: train_sft.StepPlan, budget: train_sft.TimeBudget, tmp_path: Path,
              probe: train_sft.FormatProbe | None = None) -> train_sft.RunHooks:
    return train_sft.RunHooks(cfg, plan, budget, train_sft.MetricsLog(tmp_path / "metrics.jsonl"), probe)


def test_the_plan_is_cut_to_the_budget_and_the_run_stops_before_the_deadline(tmp_path):
    cfg = config.get_config("cpu-tiny", {"run.budget_probe_steps": "3"})
    plan = train_sft.StepPlan(1000, 1e-3, 0.1, 0.1)
    clock = FakeClock(now=0.0)
    budget = train_sft.TimeBudget(65.0, cfg.run.save_reserve_s, clock)
    budget.step_times = [2.0, 2.0, 2.0]
    ctx = SimpleNamespace(train_steps=10, config=SimpleNamespace(max_steps=1000))
    run_hooks(cfg, plan, budget, tmp_path).cut_plan_to_budget(ctx)
    # 65 s left minus the 5 s tiny reserve and the stop check's half-step margin, at 2 s a step: 29 more steps.
    assert plan.total_steps == 39
    assert ctx.config.max_steps == plan.total_steps
    assert not budget.should_stop()
    clock.now = 59.0
    assert budget.should_stop()
    budget.deadline, budget.stop_requested = None, True  # SIGTERM
    assert budget.should_stop()


def test_a_multi_session_plan_is_never_cut_to_the_budget(tmp_path):
    cfg = config.get_config("cpu-tiny", {"run.budget_probe_steps": "3", "run.multi_session": "true"})
    plan = train_sft.StepPlan(1000, 1e-3, 0.1, 0.1)
    budget = train_sft.TimeBudget(65.0, cfg.run.save_reserve_s, FakeClock(now=0.0))
    budget.step_times = [2.0, 2.0, 2.0]
    hooks = run_hooks(cfg, plan, budget, tmp_path)
    hooks.cut_plan_to_budget(SimpleNamespace(train_steps=10, config=SimpleNamespace(max_steps=1000)))
    assert plan.total_steps == 1000  # the schedule spans the whole data; the session just stops at its deadline


def test_the_stop_check_works_from_the_first_step():
    reserve = config.get_config("cpu-tiny").run.save_reserve_s  # 5 s kept back for the final save until one is timed
    clock = FakeClock(now=10.0)  # 10 s of the budget went on imports, data and the build
    budget = train_sft.TimeBudget(100.0, reserve, clock, started=0.0)
    assert not budget.should_stop()
    budget.mark_step_start(0)
    clock.now = 70.0  # the first step is still compiling after 60 s: that bounds the next one
    assert budget.should_stop()

    budget = train_sft.TimeBudget(100.0, reserve, clock, started=0.0)
    clock.now = 10.0
    budget.mark_step_start(0)
    clock.now = 30.0
    budget.mark_step_start(1)  # the compile-inclusive first step took 20 s
    assert budget.first_step_s == 20.0 and budget.step_seconds() is None
    clock.now = 65.0  # 65 + 1.5 x 20 + 5 = 100: the step and the save just fit
    assert not budget.should_stop()
    clock.now = 66.0
    assert budget.should_stop()
    clock.now = 30.0
    for step in (2, 3):
        clock.now += 2.0
        budget.mark_step_start(step)  # real steps of 2 s replace the bound
    assert budget.step_seconds() == 2.0
    clock.now = 91.0  # 91 + 3 + 5 <= 100
    assert not budget.should_stop()
    clock.now = 93.0
    assert budget.should_stop() and budget.stopped_for_budget


def test_the_final_save_reserve_is_learned():
    budget = train_sft.TimeBudget(None, 30.0, FakeClock())
    assert budget.reserve_seconds() == 30.0  # the configured guess until a save is timed
    budget.save_times += [3.0, 4.0]
    assert budget.reserve_seconds() == 8.0  # twice the slowest save
    # A resumed session starts from the slowest save its checkpoint recorded.
    resumed = train_sft.TimeBudget(None, 30.0, FakeClock(), save_seconds=6.0)
    assert resumed.reserve_seconds() == 12.0


def test_progress_lines_come_at_the_configured_interval(tmp_path, capsys):
    cfg = config.get_config("cpu-tiny", {"run.log_every_s": "10"})
    plan = train_sft.StepPlan(100, 1e-3, 0.1, 0.1)
    clock = FakeClock(now=100.0)
    budget = train_sft.TimeBudget(700.0, cfg.run.save_reserve_s, clock, started=40.0)
    hooks = run_hooks(cfg, plan, budget, tmp_path)
    assert hooks.show_progress  # stdout is captured here, not a terminal
    for now, step in ((100.0, 1), (105.0, 2), (112.0, 3)):
        clock.now = now
        budget.mark_step_start(step)
        hooks.report_progress({"step": step, "loss": 2.5, **({"tokens_per_s": 1234.0} if step == 3 else {})})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2  # at 100 s and 112 s; not 5 s after the first
    assert lines[0].startswith("progress: step 1 of 100, loss 2.5000, elapsed 0:01:00")
    assert lines[0].endswith("0:10:00 left of the budget")
    # 7 s a step (the compile-inclusive first step bounds it) for the 97 steps left; 588 s to the deadline.
    assert lines[1] == ("progress: step 3 of 100, loss 2.5000, 1,234 tokens/s, elapsed 0:01:12, "
                        "~0:11:19 left for the plan, 0:09:48 left of the budget")


def test_a_torn_metrics_line_is_skipped_with_a_note(tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n{"step": 3, "lo')  # killed mid-write
    log = train_sft.MetricsLog(metrics)
    log.write({"step": 3, "loss": 1.8})  # the resumed run appends after the torn line
    log.close()
    records = train_sft.read_metrics(metrics)
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["loss"] == 1.8
    note = capsys.readouterr().out.strip()
    assert note == f"{metrics}: skipped torn line 3 (written when a run was killed)"


@pytest.mark.parametrize("grad_accum", [1, 4])
def test_the_optimizer_runs_at_the_planned_learning_rate(tiny_model, tmp_path, grad_accum):
    import optax

    cfg = config.get_config("cpu-tiny")
    plan = train_sft.StepPlan(100, 1e-2, 0.1, 0.1)
    tx = train_sft.make_optimizer(cfg, plan)
    optimizer = nnx.Optimizer(tiny_model, optax.MultiSteps(tx, grad_accum) if grad_accum > 1 else tx,
                              wrt=nnx.LoRAParam)  # as PeftTrainer wraps it
    hooks = run_hooks(cfg, plan, train_sft.TimeBudget(None, cfg.run.save_reserve_s), tmp_path)
    for step in (0, 5, 60):
        hooks.on_train_step_start(SimpleNamespace(train_steps=step, optimizer=optimizer))
        lr = train_sft._learning_rate_variable(optimizer).get_value()
        assert lr.dtype == jnp.float32 and float(lr) == pytest.approx(plan.learning_rate(step), rel=1e-6)


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("argv, message", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--preset", "kaggle", "--run.mesh_tp", "8"], "does not divide the model's 4 kv heads"),
    (["--preset", "kaggle", "--run.micro_batch", "12"], "not divisible by the data-parallel size"),
    (["--preset", "cpu-tiny", "--lora.nope", "1"], "unknown setting --lora.nope"),
    (["--preset", "cpu-tiny", "--data", "/no/such/dir"], "holds no prepared data"),
    (["--preset", "cpu-tiny", "--run.checkpoints_to_keep", "0"], "keeps no checkpoint, not even the final one"),
])
def test_bad_settings_stop_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        train_sft.main(argv)
    assert message in str(stop.value)
    assert "\n" not in str(stop.value)


# ----------------------------------------------------------------------------- runs


def test_tiny_run_learns_logs_and_checkpoints(tiny_run_dir):
    records = read_metrics(tiny_run_dir)
    assert all("step" in r and "loss" in r for r in records)
    train = [r for r in records if r["loss"] is not None]
    assert [r["step"] for r in train] == list(range(1, TINY_RUN_STEPS + 1))
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 4, 8, 12]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert evals[-1] < evals[0] - 0.5, evals  # the loss falls clearly
    assert all(r["learning_rate"] > 0 and r["grad_norm"] > 0 for r in train)
    assert all(r["tokens_per_s"] > 0 for r in train[3:])
    summary = json.loads((tiny_run_dir / "run_summary.json").read_text())
    assert summary["steps"] == TINY_RUN_STEPS and not summary["stopped_early"]
    assert summary["final_eval_loss"] == pytest.approx(evals[-1])
    assert summary["trainable_params"] < summary["total_params"] / 4
    assert Path(summary["checkpoint"]).is_dir() and Path(summary["checkpoint"]).name == str(TINY_RUN_STEPS)
    assert rundir.newest_good_step(tiny_run_dir) == TINY_RUN_STEPS
    assert (tiny_run_dir / "loss_curve.png").stat().st_size > 5000
    assert list((tiny_run_dir / "tensorboard").rglob("events.out.tfevents.*"))


def _final_losses(run_dir: Path) -> tuple[float, float]:
    records = read_metrics(run_dir)
    return ([r["loss"] for r in records if r.get("loss") is not None][-1],
            [r["eval_loss"] for r in records if "eval_loss" in r][-1])


# A training process that freezes itself (SIGSTOP) just before orbax renames checkpoint BEFORE into place, or just
# after it renames checkpoint AFTER, so that the test can kill it there.
FREEZE_AT_A_RENAME = """
import os, signal, sys
from pathlib import Path
from orbax.checkpoint._src.path import async_path
rename = async_path.rename
async def rename_with_a_freeze(src, dst):
    if Path(dst).name == {before!r}:
        os.kill(os.getpid(), signal.SIGSTOP)
    renamed = await rename(src, dst)
    if Path(dst).name == {after!r}:
        os.kill(os.getpid(), signal.SIGSTOP)
    return renamed
async_path.rename = rename_with_a_freeze
import train_sft
train_sft.main({argv!r})
"""


def _kill_when_frozen(argv: list[str], before: str = "", after: str = "") -> None:
    """Runs train_sft.main(argv) in a child process that freezes at a checkpoint's rename, then kills it (SIGKILL)."""
    script = FREEZE_AT_A_RENAME.format(before=before, after=after, argv=argv)
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        give_up = time.time() + 400  # only a hung child ends this wait; the freeze itself is deterministic
        status = 0
        while time.time() < give_up:
            pid, status = os.waitpid(process.pid, os.WUNTRACED | os.WNOHANG)
            if pid:
                break
            time.sleep(0.2)
        assert os.WIFSTOPPED(status), f"the training process did not freeze at the rename (status {status})"
    finally:
        process.kill()
        process.wait(timeout=60)


def test_a_run_killed_at_either_end_of_a_checkpoint_rename_ends_as_the_unbroken_run(tiny_run_dir, tiny_data_dir,
                                                                                    tmp_path):
    """Killed once checkpoint 8 is written in full under orbax's temporary name, just before the rename that
    publishes it, the re-run resumes from checkpoint 4. Killed again just after checkpoint 12, the plan's last, is
    renamed into place (before orbax removes checkpoint 4), the next re-run finds the plan done. The run ends with
    the unbroken run's weights, final metrics row, summary and kept checkpoints."""
    run_dir = tmp_path / "killed"
    ckpt_dir = rundir.checkpoint_dir(run_dir)
    cfg = tiny_run_config(run_dir, tiny_data_dir)
    argv = ["--preset", "cpu-tiny", "--data", str(tiny_data_dir)]
    argv += [f"--{name}={value}" for name, value in _overrides(cfg).items()]
    _kill_when_frozen(argv, before="8")
    assert (ckpt_dir / "8.orbax-checkpoint-tmp").is_dir() and not (ckpt_dir / "8").exists()
    assert rundir.newest_good_step(run_dir) == 4
    _kill_when_frozen(argv, after=str(TINY_RUN_STEPS))  # the killed writer's lock does not block the re-run
    assert rundir.saved_steps(run_dir) == [TINY_RUN_STEPS, 8, 4]
    summary = train_sft.train(cfg, tiny_data_dir)
    assert rundir.saved_steps(run_dir) == rundir.saved_steps(tiny_run_dir) == [TINY_RUN_STEPS, 8]  # keep 2
    assert not list(ckpt_dir.glob("*.orbax-checkpoint-tmp*"))
    records, unbroken_records = read_metrics(run_dir), read_metrics(tiny_run_dir)
    assert [r["step"] for r in records][-(TINY_RUN_STEPS - 4):] == list(range(5, TINY_RUN_STEPS + 1))
    final = ("step", "loss", "eval_loss", "learning_rate", "grad_norm")
    assert {k: records[-1][k] for k in final} == pytest.approx({k: unbroken_records[-1][k] for k in final}, abs=1e-4)
    # Same batches, same schedule, same optimizer state: the same final weights and summary as the unbroken run.
    unbroken = json.loads((tiny_run_dir / "run_summary.json").read_text())
    same = ("steps", "planned_steps", "plan_done", "epochs", "tokens_seen", "stopped_early", "final_loss",
            "final_eval_loss")
    assert {k: summary[k] for k in same} == pytest.approx({k: unbroken[k] for k in same}, abs=1e-4)
    assert json.loads((run_dir / "run_summary.json").read_text())["final_loss"] == summary["final_loss"]
    assert Path(summary["checkpoint"]) == ckpt_dir / str(TINY_RUN_STEPS)


def test_a_run_resumes_past_a_damaged_checkpoint_and_a_torn_metrics_line(tiny_run_dir, tiny_data_dir, tmp_path,
                                                                         capsys):
    run_dir = tmp_path / "damaged"
    shutil.copytree(tiny_run_dir, run_dir)
    ckpt_dir = rundir.checkpoint_dir(run_dir)
    (ckpt_dir / "12" / "_CHECKPOINT_METADATA").write_text("{not json")  # the data position would be lost
    with (run_dir / "metrics.jsonl").open("a") as log:
        log.write('{"step": 13, "lo')  # a kill mid-write
    summary = train_sft.train(tiny_run_config(run_dir, tiny_data_dir), tiny_data_dir)
    out = capsys.readouterr().out
    assert f"checkpoint {ckpt_dir / '12'} cannot be restored" in out and "skipped torn line" in out
    assert f"resuming {run_dir} at step 8 of {TINY_RUN_STEPS}" in out
    assert len(list(ckpt_dir.glob("12.damaged-*"))) == 1
    assert summary["checkpoint"] == str(ckpt_dir / "12"), (sorted(p.name for p in ckpt_dir.iterdir()), summary, out)
    assert summary["steps"] == TINY_RUN_STEPS and (run_dir / "run_summary.json").exists()
    assert _final_losses(run_dir) == pytest.approx(_final_losses(tiny_run_dir), abs=1e-4)


def test_a_second_process_on_a_run_being_trained_stops_at_once(tiny_data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train_sft.data_prep, "prepare", lambda *_: pytest.fail("the data was prepared"))
    run_dir = tmp_path / "busy"
    holder = hold_run_lock_in_a_child(run_dir)  # as a training process holds it
    try:
        with pytest.raises(config.ConfigError, match=rf"is being trained by pid {holder} on .*: wait for it"):
            train_sft.train(tiny_run_config(run_dir, tiny_data_dir))
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)


def test_steps_compile_once_per_run(tiny_run_dir):
    compiles = json.loads((tiny_run_dir / "run_summary.json").read_text())["compiles"]
    for step in ("train_step", "eval_step"):  # 12 train steps and 4 evaluations, one compile each
        assert (compiles[step]["compiles"], compiles[step]["from_cache"]) == (1, 0), compiles
    assert any((tiny_run_dir / "jax_cache").iterdir())


@pytest.mark.slow  # two fresh processes; the multi-session test below checks the same cache within one process
def test_a_resumed_session_loads_its_steps_from_the_compile_cache(tiny_data_dir, tmp_path):
    """Two sessions, each its own process as on Kaggle: the second resumes at step 2 and compiles nothing."""
    run_dir = tmp_path / "sessions"
    cfg = tiny_run_config(run_dir, tiny_data_dir, **{"run.max_steps": "4", "run.checkpoint_every_steps": "2",
                                                     "run.eval_every": "2", "run.compile_cache_dir": ""})
    args = [sys.executable, "train_sft.py", "--preset", "cpu-tiny", "--data", str(tiny_data_dir)]
    args += [f"--{name}={value}" for name, value in _overrides(cfg).items()]
    summaries = []
    for _ in range(2):
        done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        summaries.append(json.loads((run_dir / "run_summary.json").read_text()))
        shutil.rmtree(rundir.checkpoint_dir(run_dir) / "4")  # the next session resumes at step 2
    first, resumed = summaries
    assert first["steps"] == resumed["steps"] == 4
    for step in ("train_step", "eval_step"):
        assert (first["compiles"][step]["compiles"], first["compiles"][step]["from_cache"]) == (1, 0), first
        assert (resumed["compiles"][step]["compiles"], resumed["compiles"][step]["from_cache"]) == (1, 1), resumed


def _overrides(cfg: config.Config) -> dict[str, str]:
    return {"run.out_dir": cfg.run.out_dir, "run.max_steps": str(cfg.run.max_steps),
            "run.micro_batch": str(cfg.run.micro_batch),
            "run.eval_every": str(cfg.run.eval_every), "run.eval_batches": str(cfg.run.eval_batches),
            "run.checkpoint_every_steps": str(cfg.run.checkpoint_every_steps),
            "eval.generate_every": str(cfg.eval.generate_every), "run.time_budget_min": str(cfg.run.time_budget_min),
            "run.compile_cache_dir": cfg.run.compile_cache_dir}


def test_init_from_starts_a_new_run_from_another_runs_lora(tiny_run_dir, tiny_data_dir, tmp_path, capsys):
    """A run continues from a single-session run's final checkpoint (as unrestricted does) with a fresh optimizer."""
    cfg = tiny_run_config(tmp_path / "continued", tiny_data_dir, **{"run.max_steps": "2",
                                                                     "run.init_from": str(tiny_run_dir)})
    summary = train_sft.train(cfg, tiny_data_dir)
    assert f"initialised LoRA from {tiny_run_dir} step {TINY_RUN_STEPS}" in capsys.readouterr().out
    assert summary["steps"] == 2  # a new run: it counts from 0, not from the source's step
    first_eval = read_metrics(tmp_path / "continued")[0]
    source_final_eval = [r["eval_loss"] for r in read_metrics(tiny_run_dir) if "eval_loss" in r][-1]
    assert first_eval["step"] == 0
    assert first_eval["eval_loss"] == pytest.approx(source_final_eval, abs=1e-5)


# ----------------------------------------------------------------------------- 8 simulated devices


def test_tiny_run_shards_over_an_fsdp8_mesh_and_trains(tiny_data_dir, tmp_path, eight_devices):
    out = eight_devices(f"""
        import json, jax
        from flax import nnx
        import config, model, train_sft
        cfg = config.get_config("cpu-tiny", {{"run.mesh_fsdp": "8", "run.micro_batch": "8", "run.max_steps": "2",
            "run.grad_accum": "1", "run.eval_every": "2", "run.eval_batches": "1",
            "run.out_dir": "{tmp_path / 'fsdp8'}",
            "eval.generate_every": "0",  # the format probe is tested on one device (test_format_probe.py)
            "data.out_dir": "{tiny_data_dir}"}})
        summary = train_sft.train(cfg, cfg.data.out_dir and __import__("pathlib").Path(cfg.data.out_dir))
        mesh = model.make_mesh(cfg)
        with mesh:
            model = model.build_model(cfg, mesh)
        kernel = model.layers[0].mlp.gate_proj.kernel.get_value()
        print(json.dumps({{"steps": summary["steps"], "devices": summary["devices"],
                          "kernel_devices": len(kernel.sharding.device_set),
                          "kernel_shard": list(kernel.addressable_shards[0].data.shape),
                          "final_eval_loss": summary["final_eval_loss"]}}))
    """)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["steps"] == 2 and result["devices"] == 8
    assert result["kernel_devices"] == 8 and result["kernel_shard"] == [128 // 8, 512]  # fsdp splits D
    assert math.isfinite(result["final_eval_loss"])


def test_a_run_stops_and_saves_before_its_time_budget(tiny_data_dir, tmp_path):
    """Single session: the plan and its LR schedule are cut to end inside the budget. The clock is simulated
    (each reading is one second later), so how busy the machine is changes nothing."""
    budget_s, startup_s = 90.0, 20.0
    cfg = tiny_run_config(tmp_path / "budget", tiny_data_dir, **{"run.max_steps": "0",
                                                                  "run.time_budget_min": str(budget_s / 60)})
    clock = FakeClock(tick=1.0)
    summary = train_sft.train(cfg, tiny_data_dir, started=clock.now - startup_s, clock=clock)
    assert summary["sessions"] == "single" and summary["stopped_early"] and summary["stopped_for_budget"]
    assert summary["planned_steps"] < summary["data_steps"]  # the schedule was cut to the budget ...
    assert 0 < summary["planned_steps"] - 1 <= summary["steps"] <= summary["planned_steps"]  # ... and trained
    assert summary["startup_s"] >= startup_s  # what went before training counts against the budget
    assert summary["wall_s"] <= budget_s  # the final save and the summary fit in the reserve
    assert rundir.newest_good_step(tmp_path / "budget") == summary["steps"]
    lrs = [r["learning_rate"] for r in read_metrics(tmp_path / "budget") if r.get("loss") is not None]
    assert lrs[-1] < 0.2 * cfg.optim.learning_rate  # the cosine decay ends with the cut plan, not at data_steps


def test_a_multi_session_plan_continues_over_three_sessions(tiny_run_dir, tiny_data_dir, tmp_path):
    """Multi-session: the schedule spans the whole plan; each session trains until its deadline and saves,
    and re-running the same command continues. Three short simulated sessions end with the unbroken run's
    weights."""
    run_dir, budget_s = tmp_path / "sessions", 35.0
    cfg = tiny_run_config(run_dir, tiny_data_dir, **{"run.multi_session": "true",
                                                      "run.time_budget_min": str(budget_s / 60)})
    summaries = []
    for _ in range(3):
        clock = FakeClock(tick=1.0)
        summaries.append(train_sft.train(cfg, tiny_data_dir, started=clock.now - 10.0, clock=clock))
        assert summaries[-1]["wall_s"] <= budget_s
    steps = [s["steps"] for s in summaries]
    assert 0 < steps[0] < steps[1] < steps[2] == TINY_RUN_STEPS, steps
    assert [s["plan_done"] for s in summaries] == [False, False, True]
    assert all(s["sessions"] == "multi" and s["planned_steps"] == TINY_RUN_STEPS for s in summaries)
    assert summaries[0]["plan_progress"] == pytest.approx(steps[0] / TINY_RUN_STEPS)
    for later in summaries[1:]:  # a later session loads its steps from the persistent compilation cache
        assert all((later["compiles"][step]["compiles"], later["compiles"][step]["from_cache"]) == (1, 1)
                   for step in ("train_step", "eval_step")), later["compiles"]
    assert json.loads((run_dir / "run_summary.json").read_text())["plan_done"]
    plan = train_sft.StepPlan(TINY_RUN_STEPS, cfg.optim.learning_rate, cfg.optim.warmup_ratio,
                              cfg.optim.end_lr_ratio)
    train = [r for r in read_metrics(run_dir) if r.get("loss") is not None]
    assert [r["step"] for r in train] == list(range(1, TINY_RUN_STEPS + 1))
    assert [r["learning_rate"] for r in train] == pytest.approx([plan.learning_rate(s) for s in range(12)])
    assert _final_losses(run_dir) == pytest.approx(_final_losses(tiny_run_dir), abs=1e-4)


# ----------------------------------------------------------------------------- the gpu preset


@pytest.mark.parametrize("gpu, tpu, name", [("gpu", "kaggle", "gemma2-2b-it"),
                                            ("gpu-gemma3", "kaggle-gemma3", "gemma3-1b-it")])
def test_gpu_preset_is_the_kaggle_run_on_one_gpu(gpu, tpu, name):
    """What `python train_sft.py --preset gpu --max-steps 2` (or gpu-gemma3) parses and validates."""
    cfg, _ = rundir.settings_from_argv(["--preset", gpu, "--max-steps", "2"], "train_sft", "doc")
    kaggle = config.get_config(tpu)
    kernel_free = {"remat": None, "attention": None}
    assert {**vars(cfg.model), **kernel_free} == {**vars(kaggle.model), **kernel_free}  # the same model ...
    assert cfg.model.remat == "block"  # ... with the remat its memory estimate assumes
    assert cfg.model.attention == "xla"  # ... and XLA's attention: splash is a TPU kernel
    assert (cfg.lora, cfg.optim, cfg.eval) == (kaggle.lora, kaggle.optim, kaggle.eval)
    assert {**vars(cfg.data), "out_dir": None} == {**vars(kaggle.data), "out_dir": None}  # same rows and windows
    assert (cfg.model.name, cfg.model.dtype) == (name, "bfloat16")
    assert (cfg.run.mesh_fsdp, cfg.run.mesh_tp, cfg.run.micro_batch, cfg.run.grad_accum) == (1, 1, 4, 8)
    assert cfg.effective_batch == kaggle.effective_batch == 32
    assert cfg.run.time_budget_min == 0 and cfg.run.max_steps == 2
    assert model.make_mesh(cfg).shape == {"fsdp": 1, "tp": 1}  # one device, as on one GPU
