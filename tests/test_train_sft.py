"""Training stage: step planning, masks and loss, the real loaders, runs, resume, init-from, meshes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import TINY_RUN_STEPS, tiny_run_config
from flax import nnx
from tunix.sft import peft_trainer

import config
import data_prep
import train_sft

REPO = Path(__file__).resolve().parents[1]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_model():
    cfg = config.get_config("cpu-tiny")
    mesh = train_sft.make_mesh(cfg)
    with mesh:
        return train_sft.build_model(cfg, mesh)


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


# ----------------------------------------------------------------------------- masks and loss


def test_packed_mask_keeps_rows_apart():
    segment_ids = jnp.array([[1, 1, 2, 2, 2, 0]])
    mask = np.asarray(train_sft.packed_attention_mask(segment_ids))[0]
    expected = np.array([[1, 0, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0, 0],
                         [0, 0, 1, 0, 0, 0],
                         [0, 0, 1, 1, 0, 0],
                         [0, 0, 1, 1, 1, 0],
                         [0, 0, 0, 0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(mask, expected)


def test_packed_row_sees_nothing_of_its_neighbour(tiny_model):
    """The second row of a packed window gets exactly the logits it gets alone."""
    rng = np.random.default_rng(0)
    row_a, row_b = rng.integers(5, 2000, 7), rng.integers(5, 2000, 5)
    packed = np.concatenate([row_a, row_b, [0, 0]])[None].astype(np.int32)
    segments = np.array([[1] * 7 + [2] * 5 + [0, 0]], np.int32)
    positions = np.array([list(range(7)) + list(range(5)) + [0, 0]], np.int32)
    logits, _ = tiny_model(packed, positions, None, train_sft.packed_attention_mask(segments))
    alone = row_b[None].astype(np.int32)
    alone_logits, _ = tiny_model(alone, np.arange(5)[None], None,
                                 train_sft.packed_attention_mask(np.ones((1, 5), np.int32)))
    np.testing.assert_allclose(logits[0, 7:12], alone_logits[0], atol=1e-5)
    # and the neighbour matters when the mask lets it in: the check above can fail
    leaky = jnp.tril(jnp.ones((1, 14, 14), bool))
    leaky_logits, _ = tiny_model(packed, positions, None, leaky)
    assert not np.allclose(leaky_logits[0, 7:12], alone_logits[0], atol=1e-3)


def test_gather_loss_equals_tunix_one_hot_loss(tiny_model):
    rng = np.random.default_rng(1)
    tokens = rng.integers(5, 2000, (2, 16)).astype(np.int32)
    loss_mask = np.zeros((2, 16), np.int32)
    loss_mask[:, 6:14] = 1
    inputs = train_sft.gen_model_input({"tokens": tokens, "loss_mask": loss_mask,
                                        "segment_ids": np.ones((2, 16), np.int32),
                                        "positions": np.tile(np.arange(16, dtype=np.int32), (2, 1))})
    loss, aux = train_sft.loss_fn(tiny_model, **inputs)
    reference = peft_trainer._default_loss_fn(tiny_model, tokens, loss_mask, inputs["positions"],
                                              inputs["attention_mask"])
    assert float(loss) == pytest.approx(float(reference), rel=1e-5)
    assert float(aux["loss_tokens"]) == 16  # positions 6..13 of both rows are targets
    evaluated = train_sft.evaluate_loss(tiny_model, [{"tokens": tokens, "loss_mask": loss_mask,
                                                      "segment_ids": np.ones((2, 16), np.int32),
                                                      "positions": np.asarray(inputs["positions"])}])
    assert evaluated["loss"] == pytest.approx(float(reference), rel=1e-5)
    assert evaluated["loss_tokens"] == 16


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


def test_mesh_must_match_the_devices():
    cfg = config.get_config("cpu-tiny", {"run.mesh_fsdp": "2", "run.micro_batch": "4"})
    with pytest.raises(config.ConfigError, match="needs 2 devices but 1 are present"):
        train_sft.make_mesh(cfg)


# ----------------------------------------------------------------------------- the Kaggle checkpoint loader


def write_kaggle_checkpoint(state: nnx.State, folder: Path) -> None:
    """Writes weights in the Kaggle Flax gemma2 layout: flat 'transformer/...' keys, linen names."""
    flat = {tuple(str(k) for k in path): np.asarray(v.get_value()) for path, v in state.flat_state()}
    params: dict[str, dict[str, np.ndarray]] = {
        "transformer/embedder": {"input_embedding": flat[("embedder", "input_embedding")]},
        "transformer/final_norm": {"scale": flat[("final_norm", "scale")]}}
    layers = sorted({int(path[1]) for path in flat if path[0] == "layers"})
    for i in layers:
        def get(*names: str, i: int = i) -> np.ndarray:
            return flat[("layers", str(i), *names)]

        prefix = f"transformer/layer_{i}"
        for name in ("q_einsum", "kv_einsum", "attn_vec_einsum"):
            params[f"{prefix}/attn/{name}"] = {"w": get("attn", name, "w")}
        params[f"{prefix}/mlp/gating_einsum"] = {"w": np.stack([get("mlp", "gate_proj", "kernel"),
                                                                get("mlp", "up_proj", "kernel")])}
        params[f"{prefix}/mlp/linear"] = {"w": get("mlp", "down_proj", "kernel")}
        for linen, ours in (("pre_attention_norm", "pre_attention_norm"), ("post_attention_norm", "post_attn_norm"),
                            ("pre_ffw_norm", "pre_ffw_norm"), ("post_ffw_norm", "post_ffw_norm")):
            params[f"{prefix}/{linen}"] = {"scale": get(ours, "scale")}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(folder.resolve(), params)


def test_kaggle_layout_checkpoint_loads_converts_once_and_caches(tmp_path, monkeypatch):
    cfg = config.get_config("cpu-tiny")
    mesh = train_sft.make_mesh(cfg)
    with mesh:
        reference = train_sft.load_base_model(cfg, mesh)
    write_kaggle_checkpoint(nnx.state(reference), tmp_path / "kaggle" / "gemma2-2b-it")
    (tmp_path / "kaggle" / "tokenizer.model").write_bytes(config.TINY_TOKENIZER_PATH.read_bytes())
    # init_seed changes the random init: equal logits prove the weights came from the file.
    loaded_cfg = config.get_config("cpu-tiny", {"model.checkpoint_dir": str(tmp_path / "kaggle"),
                                                "model.cache_dir": str(tmp_path / "cache"), "model.init_seed": "9"})
    tokens = np.array([[2, 106, 30, 40, 50, 107]], np.int32)
    positions, mask = np.arange(6)[None], train_sft.packed_attention_mask(np.ones((1, 6), np.int32))
    with mesh:
        want, _ = reference(tokens, positions, None, mask)
        first = train_sft.load_base_model(loaded_cfg, mesh)
        cached = list((tmp_path / "cache").iterdir())
        assert len(cached) == 1 and cached[0].name.startswith("tiny-nnx-")
        monkeypatch.setattr(train_sft, "_convert_kaggle_checkpoint",
                            lambda *a: pytest.fail("the cached conversion was not reused"))
        second = train_sft.load_base_model(loaded_cfg, mesh)
        np.testing.assert_allclose(first(tokens, positions, None, mask)[0], want, atol=1e-6)
        np.testing.assert_allclose(second(tokens, positions, None, mask)[0], want, atol=1e-6)
        other_model = config.get_config("cpu-tiny", {"model.checkpoint_dir": str(tmp_path / "kaggle"),
                                                     "model.cache_dir": str(tmp_path / "cache"),
                                                     "model.num_layers": "2"})
        monkeypatch.undo()
        with pytest.raises(config.ConfigError, match="does not fit --model.name tiny"):  # no stale cache reuse
            train_sft.load_base_model(other_model, mesh)


def test_wrong_size_checkpoint_names_both_shapes(tmp_path):
    cfg = config.get_config("cpu-tiny")
    mesh = train_sft.make_mesh(cfg)
    with mesh:
        state = nnx.state(train_sft.load_base_model(cfg, mesh))
    write_kaggle_checkpoint(state, tmp_path / "gemma2-2b-it")
    (tmp_path / "tokenizer.model").write_bytes(config.TINY_TOKENIZER_PATH.read_bytes())
    bigger = config.get_config("cpu-tiny", {"model.checkpoint_dir": str(tmp_path), "model.embed_dim": "256"})
    with pytest.raises(config.ConfigError, match=r"of shape \(2048, 128\) but --model.name tiny expects \(2048, 256\)"):
        train_sft.load_base_model(bigger, mesh)


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
    assert train_sft.latest_step(tiny_run_dir) == TINY_RUN_STEPS
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
        while time.time() < deadline and (train_sft.latest_step(run_dir) or 0) < 4:
            time.sleep(0.5)
        # Checkpoint 4 is complete (orbax writes to a temporary name and renames); kill without warning.
        time.sleep(1.5)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    saved = train_sft.latest_step(run_dir)
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


def run_on_8_devices(script: str) -> str:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_tiny_run_shards_over_an_fsdp8_mesh_and_trains(tiny_data_dir, tmp_path):
    out = run_on_8_devices(f"""
        import json, jax
        from flax import nnx
        import config, train_sft
        cfg = config.get_config("cpu-tiny", {{"run.mesh_fsdp": "8", "run.micro_batch": "8", "run.max_steps": "3",
            "run.grad_accum": "2",
            "run.eval_every": "3", "run.eval_batches": "1", "run.out_dir": "{tmp_path / 'fsdp8'}",
            "data.out_dir": "{tiny_data_dir}"}})
        summary = train_sft.train(cfg, cfg.data.out_dir and __import__("pathlib").Path(cfg.data.out_dir))
        mesh = train_sft.make_mesh(cfg)
        with mesh:
            model = train_sft.build_model(cfg, mesh)
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


def test_kaggle_model_lora_and_sharding_build_abstractly_on_8_devices():
    out = run_on_8_devices("""
        import json, resource, jax
        from flax import nnx
        import config, train_sft
        cfg = config.get_config("kaggle")
        mesh = train_sft.make_mesh(cfg)
        with mesh:
            model = nnx.eval_shape(lambda: train_sft.apply_lora(train_sft.abstract_model(cfg.model), cfg, None))
        shardings = nnx.get_named_sharding(nnx.state(model), mesh)
        specs = {str(p): list(s.spec) for p, s in shardings.flat_state()}
        print(json.dumps({"total": train_sft.count_params(model),
                          "lora": train_sft.count_params(model, nnx.LoRAParam),
                          "live_arrays": len(jax.live_arrays()),
                          "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                          "embedding": specs["('embedder', 'input_embedding')"],
                          "gate": specs["('layers', 0, 'mlp', 'gate_proj', 'kernel')"]}))
    """)
    result = json.loads(out.strip().splitlines()[-1])
    d, f, n, k, h, layers, vocab = 2304, 9216, 8, 4, 256, 26, 256128
    base = vocab * d + d + layers * (n * d * h + 2 * k * d * h + n * h * d + 3 * d * f + 4 * d)
    assert base == 2_614_636_800  # Gemma2-2B with Tunix's 256128-row embedding, counted independently
    # rank 64 on q, kv, attn_vec, gate, up, down: r * (fan_in + fan_out) each
    lora = layers * 64 * ((d + n * h) + (d + 2 * k * h) + (n * h + d) + 2 * (d + f) + (f + d))
    assert result["lora"] == lora == 79_233_024
    assert result["total"] == base + lora
    assert result["live_arrays"] == 0 and result["rss_gb"] < 3  # nothing of the 2.6B was allocated
    assert result["embedding"] == ["tp", "fsdp"] and result["gate"] == ["fsdp", "tp"]


def test_a_run_of_another_tokenizer_is_refused(tiny_run_dir, tiny_data_dir, tmp_path):
    recorded = json.loads((tiny_run_dir / "config.json").read_text())
    assert recorded["data_manifest"]["tokenizer_sha256"] == data_prep.read_manifest(tiny_data_dir)["tokenizer_sha256"]
    train_sft.check_same_tokenizer(tiny_run_dir, tiny_data_dir)  # its own data: accepted
    recorded["data_manifest"]["tokenizer_sha256"] = "0" * 64
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    with pytest.raises(config.ConfigError, match=r"was trained with tokenizer .* \(sha256 000000000000\)"):
        train_sft.check_same_tokenizer(tmp_path, tiny_data_dir)


def test_a_run_stops_and_saves_before_its_time_budget(tiny_data_dir, tmp_path):
    budget_s = 50.0
    cfg = tiny_run_config(tmp_path / "budget", tiny_data_dir, **{"run.max_steps": "0",
                                                                  "run.time_budget_min": str(budget_s / 60)})
    summary = train_sft.train(cfg, tiny_data_dir)
    assert summary["stopped_early"] and 0 < summary["steps"] <= summary["planned_steps"] < summary["data_steps"]
    assert summary["wall_s"] < budget_s + 10  # the final save and the summary fit in the reserve
    assert train_sft.latest_step(tmp_path / "budget") == summary["steps"]
