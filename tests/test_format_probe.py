"""Format compliance during training: greedy generations for held-out prompts, logged and plotted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_run_config
from matplotlib.image import imread

import config
import kaggle_weights
import model
import train_sft
import tunix_adapter


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_generates_at_step_0_every_n_steps_and_at_the_end_with_one_sampler(tiny_data_dir, tmp_path,
                                                                                  monkeypatch):
    built: list[model.Sampler] = []

    class CountedSampler(model.Sampler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(model, "Sampler", CountedSampler)
    run_dir = tmp_path / "probe"
    max_new = 24
    cfg = tiny_run_config(run_dir, tiny_data_dir, **{"run.max_steps": "7", "eval.generate_every": "3",
                                                     "eval.generate_prompts": "3", "eval.max_new_tokens": str(max_new)})
    train_sft.train(cfg, tiny_data_dir)
    rows = [r for r in read_metrics(run_dir) if "format_compliance" in r]
    assert [r["step"] for r in rows] == [0, 3, 6, 7]  # step 0, every 3 steps, and the end
    for r in rows:
        assert r["loss"] is None and 0 <= r["format_compliance"] <= 1 and 0 <= r["truncation_rate"] <= 1
        assert 0 < r["generated_tokens_mean"] <= max_new and r["generate_s"] > 0
    # One sampler for the run, and no compile per call: four calls, and its prefill and decode compiled at most
    # twice (the weights' shardings change form once, after the first training step, then never again).
    assert len(built) == 1
    assert max(tunix_adapter.sampler_compiles(built[0])) <= 2
    events = b"".join(path.read_bytes() for path in (run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    for name in (b"format_compliance", b"truncation_rate", b"generated_tokens_mean"):
        assert name in events
    assert imread(run_dir / "loss_curve.png").shape[1] == 12 * 120  # the second panel widens the figure


def test_no_generation_when_the_interval_is_0(tiny_run_dir):
    assert not [r for r in read_metrics(tiny_run_dir) if "format_compliance" in r]  # the fixture runs with 0
    assert imread(tiny_run_dir / "loss_curve.png").shape[1] == 7 * 120  # the loss panel alone


def test_held_out_prompts_are_the_first_n_and_an_empty_set_stops(tmp_path):
    rows = [{"prompt": f"question {i}", "reference": "r"} for i in range(5)]
    (tmp_path / "eval_prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert train_sft.held_out_prompts(tmp_path, 3) == [{"domain": "held-out", "prompt": f"question {i}"}
                                                       for i in range(3)]
    (tmp_path / "eval_prompts.jsonl").write_text("")
    with pytest.raises(config.ConfigError, match="holds no prompts"):
        train_sft.held_out_prompts(tmp_path, 3)
    with pytest.raises(config.ConfigError, match="--data.eval_rows"):
        config.get_config("cpu-tiny", {"data.eval_rows": "0"})


def test_the_probe_skips_what_is_not_due_near_the_deadline_or_after_sigterm(tmp_path):
    from types import SimpleNamespace


    cfg = config.get_config("cpu-tiny", {"eval.generate_every": "5"})
    mesh = model.make_mesh(cfg)
    with mesh:
        probe = train_sft.FormatProbe(cfg, model.build_model(cfg, mesh), kaggle_weights.load_tokenizer(cfg.model),
                                      [{"domain": "held-out", "prompt": "What is 2 + 2?"}], max_new_tokens=8)
    clock = SimpleNamespace(now=1000.0)
    budget = train_sft.TimeBudget(None, cfg.run.save_reserve_s, lambda: clock.now)
    hooks = train_sft.RunHooks(cfg, train_sft.StepPlan(100, 1e-3, 0.1, 0.1), budget,
                               train_sft.MetricsLog(tmp_path / "metrics.jsonl"), probe)
    logger = SimpleNamespace(log=lambda *args: None)
    assert hooks.maybe_probe(SimpleNamespace(train_steps=3, metrics_logger=logger)) == 0.0  # not a multiple of 5
    budget.deadline = clock.now + 3.0  # inside the 5 s kept for the final checkpoint
    assert hooks.maybe_probe(SimpleNamespace(train_steps=5, metrics_logger=logger), final=True) == 0.0
    budget.deadline, budget.stop_requested = None, True  # SIGTERM
    assert hooks.maybe_probe(SimpleNamespace(train_steps=10, metrics_logger=logger), final=True) == 0.0
    budget.stop_requested = False  # and when due, with time left, it runs and writes its record
    assert hooks.maybe_probe(SimpleNamespace(train_steps=10, metrics_logger=logger)) >= 0.0
    hooks.metrics.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10] and probe.last_step == 10
