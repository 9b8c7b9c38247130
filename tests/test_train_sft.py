"""Training stage: step planning, masks and loss, the real loaders, runs, resume, init-from, meshes."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jax.numpy as jnp
import pytest
from conftest import TINY_RUN_STEPS, run_on_8_devices, tiny_run_config
from flax import nnx

import config
import model
import train_sft

REPO = Path(__file__).resolve().parents[1]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


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


def test_monitor_caps_the_plan_and_stops_before_the_deadline(tmp_path):
    cfg = config.get_config("cpu-tiny", {"run.budget_probe_steps": "3"})
    plan = train_sft.StepPlan(1000, 1e-3, 0.1, 0.1)
    monitor = train_sft.RunMonitor(cfg, plan, tmp_path, deadline=time.time() + 65.0)
    monitor.step_times = [2.0, 2.0, 2.0]
    ctx = SimpleNamespace(train_steps=10, config=SimpleNamespace(max_steps=1000))
    monitor._maybe_cap_steps(ctx)
    # 65 s left minus the 5 s tiny reserve at 2 s a step: about 30 more steps.
    assert 38 <= plan.total_steps <= 40
    assert ctx.config.max_steps == plan.total_steps
    assert not monitor.should_stop()
    monitor.deadline = time.time() + 6.0
    assert monitor.should_stop()
    monitor.deadline, monitor.stop_requested = None, True  # SIGTERM
    assert monitor.should_stop()


@pytest.mark.parametrize("grad_accum", [1, 4])
def test_the_optimizer_runs_at_the_planned_learning_rate(tiny_model, tmp_path, grad_accum):
    import optax

    cfg = config.get_config("cpu-tiny")
    plan = train_sft.StepPlan(100, 1e-2, 0.1, 0.1)
    tx = train_sft.make_optimizer(cfg, plan)
    optimizer = nnx.Optimizer(tiny_model, optax.MultiSteps(tx, grad_accum) if grad_accum > 1 else tx,
                              wrt=nnx.LoRAParam)  # as PeftTrainer wraps it
    monitor = train_sft.RunMonitor(cfg, plan, tmp_path, deadline=None)
    for step in (0, 5, 60):
        monitor.on_train_step_start(SimpleNamespace(train_steps=step, optimizer=optimizer))
        lr = train_sft._learning_rate_variable(optimizer).get_value()
        assert lr.dtype == jnp.float32 and float(lr) == pytest.approx(plan.learning_rate(step), rel=1e-6)


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("argv, message", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--preset", "kaggle", "--run.mesh_tp", "8"], "does not divide the model's 4 kv heads"),
    (["--preset", "kaggle", "--run.micro_batch", "12"], "not divisible by the data-parallel size"),
    (["--preset", "cpu-tiny", "--lora.nope", "1"], "unknown setting --lora.nope"),
    (["--preset", "cpu-tiny", "--data", "/no/such/dir"], "holds no prepared data"),
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
    assert model.latest_step(tiny_run_dir) == TINY_RUN_STEPS
    assert (tiny_run_dir / "loss_curve.png").stat().st_size > 5000
    assert list((tiny_run_dir / "tensorboard").rglob("events.out.tfevents.*"))


def test_killed_run_resumes_at_its_checkpoint_and_matches_an_unbroken_run(tiny_run_dir, tiny_data_dir, tmp_path):
    run_dir = tmp_path / "killed"
    cfg = tiny_run_config(run_dir, tiny_data_dir)
    args = [sys.executable, "train_sft.py", "--preset", "cpu-tiny", "--data", str(tiny_data_dir)]
    args += [f"--{name}={value}" for name, value in _overrides(cfg).items()]
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and (model.latest_step(run_dir) or 0) < 4:
            time.sleep(0.5)
        # Checkpoint 4 is complete (orbax writes to a temporary name and renames); kill without warning.
        time.sleep(1.5)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    saved = model.latest_step(run_dir)
    assert saved is not None and 4 <= saved < TINY_RUN_STEPS
    summary = train_sft.train(cfg, tiny_data_dir)
    assert summary["steps"] == TINY_RUN_STEPS
    steps_after_resume = [r["step"] for r in read_metrics(run_dir)][-(TINY_RUN_STEPS - saved):]
    assert steps_after_resume == list(range(saved + 1, TINY_RUN_STEPS + 1))
    # Same batches, same schedule, same optimizer state: the same final weights as the unbroken run.
    unbroken = read_metrics(tiny_run_dir)
    assert summary["final_loss"] == pytest.approx(unbroken[-1]["loss"], abs=1e-4)
    assert summary["final_eval_loss"] == pytest.approx(
        [r["eval_loss"] for r in unbroken if "eval_loss" in r][-1], abs=1e-4)


def test_steps_compile_once_per_run(tiny_run_dir):
    compiles = json.loads((tiny_run_dir / "run_summary.json").read_text())["compiles"]
    for step in ("train_step", "eval_step"):  # 12 train steps and 4 evaluations, one compile each
        assert (compiles[step]["compiles"], compiles[step]["from_cache"]) == (1, 0), compiles
    assert any((tiny_run_dir / "jax_cache").iterdir())


def test_a_resumed_session_loads_its_steps_from_the_compile_cache(tiny_data_dir, tmp_path):
    """Two sessions, each its own process as on Kaggle: the second resumes at step 2 and compiles nothing."""
    run_dir = tmp_path / "sessions"
    cfg = tiny_run_config(run_dir, tiny_data_dir, **{"run.max_steps": "4", "run.checkpoint_every_steps": "2",
                                                     "run.eval_every": "2"})
    args = [sys.executable, "train_sft.py", "--preset", "cpu-tiny", "--data", str(tiny_data_dir)]
    args += [f"--{name}={value}" for name, value in _overrides(cfg).items()]
    summaries = []
    for _ in range(2):
        done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        summaries.append(json.loads((run_dir / "run_summary.json").read_text()))
        shutil.rmtree(run_dir / model.CHECKPOINT_SUBDIR / "4")  # the next session resumes at step 2
    first, resumed = summaries
    assert first["steps"] == resumed["steps"] == 4
    for step in ("train_step", "eval_step"):
        assert (first["compiles"][step]["compiles"], first["compiles"][step]["from_cache"]) == (1, 0), first
        assert (resumed["compiles"][step]["compiles"], resumed["compiles"][step]["from_cache"]) == (1, 1), resumed


def _overrides(cfg: config.Config) -> dict[str, str]:
    return {"run.out_dir": cfg.run.out_dir, "run.max_steps": str(cfg.run.max_steps),
            "run.eval_every": str(cfg.run.eval_every), "run.eval_batches": str(cfg.run.eval_batches),
            "run.checkpoint_every_steps": str(cfg.run.checkpoint_every_steps)}


def test_init_from_starts_a_new_run_from_another_runs_lora(tiny_run_dir, tiny_data_dir, tmp_path):
    cfg = tiny_run_config(tmp_path / "continued", tiny_data_dir, **{"run.max_steps": "2",
                                                                     "run.init_from": str(tiny_run_dir)})
    summary = train_sft.train(cfg, tiny_data_dir)
    assert summary["steps"] == 2  # a new run: it counts from 0, not from the source's step
    first_eval = read_metrics(tmp_path / "continued")[0]
    source_final_eval = [r["eval_loss"] for r in read_metrics(tiny_run_dir) if "eval_loss" in r][-1]
    assert first_eval["step"] == 0
    assert first_eval["eval_loss"] == pytest.approx(source_final_eval, abs=1e-5)


def test_init_from_a_run_of_another_rank_names_both_sides(tiny_run_dir, tiny_data_dir, tmp_path):
    cfg = tiny_run_config(tmp_path / "r8", tiny_data_dir, **{"lora.rank": "8", "run.init_from": str(tiny_run_dir)})
    with pytest.raises(config.ConfigError, match=r"holds model tiny with LoRA rank 16 .* needs \(.*8"):
        train_sft.train(cfg, tiny_data_dir)


# ----------------------------------------------------------------------------- 8 simulated devices


def test_tiny_run_shards_over_an_fsdp8_mesh_and_trains(tiny_data_dir, tmp_path):
    out = run_on_8_devices(f"""
        import json, jax
        from flax import nnx
        import config, model, train_sft
        cfg = config.get_config("cpu-tiny", {{"run.mesh_fsdp": "8", "run.micro_batch": "8", "run.max_steps": "3",
            "run.grad_accum": "2",
            "run.eval_every": "3", "run.eval_batches": "1", "run.out_dir": "{tmp_path / 'fsdp8'}",
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
    assert result["steps"] == 3 and result["devices"] == 8
    assert result["kernel_devices"] == 8 and result["kernel_shard"] == [128 // 8, 512]  # fsdp splits D
    assert math.isfinite(result["final_eval_loss"])


def test_a_run_stops_and_saves_before_its_time_budget(tiny_data_dir, tmp_path):
    budget_s = 50.0
    cfg = tiny_run_config(tmp_path / "budget", tiny_data_dir, **{"run.max_steps": "0",
                                                                  "run.time_budget_min": str(budget_s / 60)})
    summary = train_sft.train(cfg, tiny_data_dir)
    assert summary["stopped_early"] and 0 < summary["steps"] <= summary["planned_steps"] < summary["data_steps"]
    assert summary["wall_s"] < budget_s + 10  # the final save and the summary fit in the reserve
    assert model.latest_step(tmp_path / "budget") == summary["steps"]
