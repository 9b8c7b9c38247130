"""Stage 2: LoRA SFT of Gemma2 with Tunix's PeftTrainer.

    python train_sft.py --preset cpu-tiny            # tiny random Gemma2 on the shipped sample, CPU
    python train_sft.py --preset kaggle              # Gemma2-2B-it on a TPU v5e-8
    python train_sft.py --preset unrestricted        # continue a kaggle run on fresh rows

Top to bottom: the model with LoRA (from ``model.py``) -> optimizer and a dynamic step count
capped by the time budget -> PeftTrainer with the packed-row loss of ``model.py`` -> orbax
checkpoints (LoRA, optimizer, data iterator) that a re-run of the same command resumes ->
metrics (TensorBoard, metrics.jsonl, loss PNG).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import signal
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tunix.sft import hooks, metrics_logger, peft_trainer

import data_prep
from config import Config, ConfigError, config_from_argv
from model import (
    CHECKPOINT_SUBDIR,
    build_model,
    check_same_tokenizer,
    checkpoint_step,
    count_params,
    flops_per_token,
    gen_model_input,
    latest_step,
    loss_fn,
    make_mesh,
    maybe_initialize_distributed,
    peak_flops,
    restore_lora,
)

# Tunix 0.1.7's trainer and model read the mesh from the legacy `with mesh:` context (jax.set_mesh does not set it).
warnings.filterwarnings("ignore", message="`with mesh:` context manager has been deprecated")

# ----------------------------------------------------------------------------- optimizer and steps


@dataclass
class StepPlan:
    """How many optimizer steps this run takes; the LR schedule spans exactly these."""

    total_steps: int
    peak_lr: float
    warmup_ratio: float
    end_lr_ratio: float

    def learning_rate(self, step: int) -> float:
        """Linear warmup, then cosine decay to peak * end_lr_ratio at total_steps."""
        warmup = max(1, round(self.warmup_ratio * self.total_steps))
        if step < warmup:
            return self.peak_lr * (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, self.total_steps - warmup))
        end = self.peak_lr * self.end_lr_ratio
        return end + (self.peak_lr - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def planned_steps(epochs: float, windows: int, effective_batch: int, max_steps: int = 0) -> int:
    """Dynamic steps: ceil(epochs x packed rows / effective batch), or max_steps when set lower."""
    steps = max(1, math.ceil(epochs * windows / effective_batch))
    return min(steps, max_steps) if max_steps else steps


def budget_capped_steps(done_steps: int, planned: int, step_seconds: float, seconds_left: float,
                        reserve_seconds: float) -> int:
    """The most steps that still finish, with the final save, before the deadline."""
    affordable = int(max(0.0, seconds_left - reserve_seconds) // max(step_seconds, 1e-9))
    return max(done_steps, min(planned, done_steps + affordable))


def make_optimizer(cfg: Config, plan: StepPlan) -> optax.GradientTransformation:
    """AdamW with clipping; the learning rate is a float32 hyperparameter (bf16 would round b2 to 1)
    that the run sets from the plan each step, so the schedule can follow a re-planned step count."""

    def adamw(learning_rate):
        o = cfg.optim
        return optax.chain(optax.clip_by_global_norm(o.grad_clip),
                           optax.adamw(learning_rate, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))

    return optax.inject_hyperparams(adamw, hyperparam_dtype=jnp.float32)(learning_rate=plan.learning_rate(0))


def _learning_rate_variable(optimizer: nnx.Optimizer) -> nnx.Variable:
    state = optimizer.opt_state
    state = getattr(state, "inner_opt_state", state)  # under optax.MultiSteps (gradient accumulation)
    return state.hyperparams["learning_rate"]




class RunMonitor(hooks.TrainingHooks):
    """Step timing, tokens/s, MFU, the LR schedule and the time budget; writes metrics.jsonl beside TensorBoard."""

    def __init__(self, cfg: Config, plan: StepPlan, run_dir: Path, deadline: float | None):
        self.cfg, self.plan, self.deadline = cfg, plan, deadline
        self.jsonl = (run_dir / "metrics.jsonl").open("a")
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.max_len)
        self.peak = peak_flops(cfg)
        self.step_started: dict[int, float] = {}  # optimizer step (0-based) -> when its first micro-batch went in
        self.step_tokens: dict[int, list[int]] = {}  # optimizer step -> [tokens, loss tokens] fed
        self.step_times: list[float] = []
        self.pending_eval: dict[int, float] = {}
        self.stop_requested = False
        self.probed = False

    def count(self, step: int, batch: dict[str, np.ndarray]) -> None:
        """The feeder reports each batch it feeds; the rates come from these counts."""
        counts = self.step_tokens.setdefault(step, [0, 0])
        counts[0] += int(np.count_nonzero(batch["segment_ids"]))
        counts[1] += int(np.count_nonzero(batch["loss_mask"]))

    def step_seconds(self) -> float | None:
        recent = self.step_times[-20:]
        return statistics.median(recent) if recent else None

    def should_stop(self) -> bool:
        """At a step boundary: stop for SIGTERM, or when the next step and the save would pass the deadline."""
        if self.stop_requested:
            return True
        if self.deadline is None or (step := self.step_seconds()) is None:
            return False
        return time.time() + 1.5 * step + self.reserve_seconds() > self.deadline

    def reserve_seconds(self) -> float:
        """Time kept back for the final checkpoint."""
        return 5.0 if self.cfg.model.name == "tiny" else 60.0

    def on_train_step_start(self, train_ctx):
        step = train_ctx.train_steps
        if step in self.step_started:
            return  # a later micro-batch of the same optimizer step
        self.step_started[step] = time.perf_counter()
        # With two steps in flight, starts are paced by completions: their spacing is the step time.
        if step - 1 in self.step_started and step - 2 in self.step_started:  # skips the compiling first step
            self.step_times.append(self.step_started[step] - self.step_started[step - 1])
        lr = _learning_rate_variable(train_ctx.optimizer)
        lr.set_value(jax.device_put(jnp.asarray(self.plan.learning_rate(step), jnp.float32),
                                    lr.get_value().sharding))

    def on_train_step_end(self, train_ctx, train_step, train_loss):
        step = train_step - 1  # PeftTrainer reports steps 1-based, one step late
        history = train_ctx.metrics_logger
        record: dict[str, Any] = {"step": int(train_step), "loss": float(train_loss),
                                  "learning_rate": self.plan.learning_rate(step),
                                  "grad_norm": float(history.get_metric_history("", "grad_norm", "train")[-1])}
        seconds = self.step_seconds()
        tokens, loss_tokens = self.step_tokens.pop(step, [0, 0])
        if seconds:
            record.update(step_s=seconds, tokens_per_s=tokens / seconds, loss_tokens_per_s=loss_tokens / seconds)
            if self.peak:
                record["mfu"] = tokens * self.flops_per_token / seconds / self.peak
        if train_step in self.pending_eval:
            record["eval_loss"] = self.pending_eval.pop(train_step)
        for name in ("tokens_per_s", "loss_tokens_per_s", "step_s", "mfu"):
            if name in record:
                history.log("", name, record[name], "train", train_step)
        self.write(record)
        self._maybe_cap_steps(train_ctx)

    def _maybe_cap_steps(self, train_ctx) -> None:
        """After the probe steps, shrink the plan (and the LR schedule with it) to what the budget allows."""
        if self.probed or self.deadline is None or len(self.step_times) < self.cfg.run.budget_probe_steps:
            return
        self.probed = True
        capped = budget_capped_steps(train_ctx.train_steps, self.plan.total_steps, self.step_seconds(),
                                     self.deadline - time.time(), self.reserve_seconds())
        if capped < self.plan.total_steps:
            print(f"time budget: {self.step_seconds():.2f} s/step allows {capped} of {self.plan.total_steps} "
                  f"planned steps; the schedule now ends at step {capped}")
            self.plan.total_steps = capped
            train_ctx.config.max_steps = capped

    def on_eval_step_end(self, train_ctx, eval_loss):
        loss = float(train_ctx.metrics_logger.get_metric_history("", "loss", "eval")[-1])
        if train_ctx.train_steps == 0:
            self.write({"step": 0, "loss": None, "eval_loss": loss})
        else:  # written with the step's training loss, which PeftTrainer reports one step later
            self.pending_eval[train_ctx.train_steps] = loss

    def write(self, record: dict[str, Any]) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()

    def on_train_start(self, train_ctx):
        pass

    def on_train_end(self, train_ctx):
        pass

    def on_eval_step_start(self, train_ctx):
        pass


class BatchFeeder(hooks.DataHooks):
    """Feeds the trainer from the resumable grain iterator, and ends the loop early when told to."""

    def __init__(self, iterator: Any, eval_batches: list[dict[str, np.ndarray]], monitor: RunMonitor,
                 grad_accum: int):
        self.iterator, self.eval_batches, self.monitor, self.grad_accum = iterator, eval_batches, monitor, grad_accum
        self.eval_index = 0

    def load_next_train_batch(self, train_ctx):
        if train_ctx.iter_steps % self.grad_accum == 0 and self.monitor.should_stop():
            return None
        batch = next(self.iterator)
        self.monitor.count(train_ctx.train_steps, batch)
        return batch

    def load_next_eval_batch(self, train_ctx):
        if self.eval_index == len(self.eval_batches):
            self.eval_index = 0
            return None
        self.eval_index += 1
        return self.eval_batches[self.eval_index - 1]


class SFTTrainer(peft_trainer.PeftTrainer):
    """PeftTrainer whose checkpoints also carry the data iterator's state and the step plan."""

    feeder: BatchFeeder
    plan: StepPlan

    def custom_checkpoint_metadata(self) -> dict[str, Any]:
        if not hasattr(self, "feeder"):
            return {}
        return {"data_iterator": self.feeder.iterator.get_state(), "planned_steps": self.plan.total_steps}

    def _save_last_checkpoint(self):
        # PeftTrainer's own final save omits custom metadata; without it a resume would replay data.
        last_saved_step = self.checkpoint_manager.latest_step()
        if last_saved_step is None or last_saved_step < self._train_steps:
            self.checkpoint_manager.save(self._train_steps, self.model, self.optimizer,
                                         save_only_lora_params=self._lora_enabled, force=True,
                                         custom_metadata=self.custom_checkpoint_metadata())


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """Loss and eval loss against step (the last record of a step wins, as after a resume)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = {}, {}
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        if record.get("loss") is not None:
            train[record["step"]] = record["loss"]
        if record.get("eval_loss") is not None:
            evals[record["step"]] = record["eval_loss"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(sorted(train), [train[s] for s in sorted(train)], label="train loss")
    ax.plot(sorted(evals), [evals[s] for s in sorted(evals)], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per completion token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- the run


def train(cfg: Config, data_dir: Path | None = None) -> dict[str, Any]:
    """Runs (or resumes) one training run into cfg.run.out_dir and returns its summary."""
    started = time.time()
    run_dir = Path(cfg.run.out_dir)
    data_dir = data_dir or data_prep.prepare(cfg)
    mesh = make_mesh(cfg)
    windows = data_prep.num_windows(data_dir, "train")
    resume_step = latest_step(run_dir)
    if cfg.run.init_from and resume_step is None:
        checkpoint_step(cfg.run.init_from)  # fail before any heavy work
    if cfg.run.init_from:
        check_same_tokenizer(Path(cfg.run.init_from), data_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(
        {**cfg.to_dict(), "data_manifest": data_prep.read_manifest(data_dir)}, indent=2))

    with mesh:
        model = build_model(cfg, mesh)
        if cfg.run.init_from and resume_step is None:
            step = restore_lora(model, cfg.run.init_from)
            print(f"initialised LoRA from {cfg.run.init_from} step {step} (fresh optimizer)")
        data_steps = planned_steps(cfg.run.epochs, windows, cfg.effective_batch, cfg.run.max_steps)
        plan = StepPlan(data_steps, cfg.optim.learning_rate, cfg.optim.warmup_ratio, cfg.optim.end_lr_ratio)
        checkpoint_policy = ocp.checkpoint_managers.AnySavePolicy([
            ocp.checkpoint_managers.FixedIntervalPolicy(cfg.run.checkpoint_every_steps),
            ocp.checkpoint_managers.ContinuousCheckpointingPolicy(
                minimum_interval_secs=int(cfg.run.checkpoint_every_min * 60))])
        trainer = SFTTrainer(model, make_optimizer(cfg, plan), peft_trainer.TrainingConfig(
            eval_every_n_steps=cfg.run.eval_every, max_steps=plan.total_steps,
            gradient_accumulation_steps=cfg.run.grad_accum if cfg.run.grad_accum > 1 else None,
            checkpoint_root_directory=str((run_dir / CHECKPOINT_SUBDIR).resolve()),
            checkpointing_options=ocp.CheckpointManagerOptions(save_decision_policy=checkpoint_policy,
                                                               max_to_keep=cfg.run.checkpoints_to_keep),
            metrics_logging_options=metrics_logger.MetricsLoggerOptions(log_dir=str(run_dir / "tensorboard"),
                                                                        flush_every_n_steps=10),
            pbar_description=f"train {cfg.preset}"))
        restored = trainer._restored_custom_metadata or {}
        if trainer.train_steps:
            plan.total_steps = restored.get("planned_steps", plan.total_steps)
            trainer.config.max_steps = plan.total_steps
            print(f"resuming {run_dir} at step {trainer.train_steps} of {plan.total_steps}")
        deadline = started + cfg.run.time_budget_min * 60 if cfg.run.time_budget_min else None
        monitor = RunMonitor(cfg, plan, run_dir, deadline)
        per_process_batch = cfg.run.micro_batch // jax.process_count()
        iterator = data_prep.train_loader(data_dir, per_process_batch, cfg.data.seed,
                                          shard_index=jax.process_index(), shard_count=jax.process_count())
        if "data_iterator" in restored:
            iterator.set_state(restored["data_iterator"])
        eval_batches = data_prep.eval_batches(data_dir, per_process_batch)[:cfg.run.eval_batches]
        trainer.feeder = BatchFeeder(iterator, eval_batches, monitor, cfg.run.grad_accum)
        trainer.plan = plan
        trainer.with_gen_model_input_fn(gen_model_input).with_loss_fn(
            functools.partial(loss_fn, loss_chunk=cfg.model.loss_chunk), has_aux=True)
        trainer.with_training_hooks(monitor)
        trainer.with_data_hooks(trainer.feeder)

        previous = signal.signal(signal.SIGTERM, lambda *_: setattr(monitor, "stop_requested", True))
        try:
            trainer.train(iterator, eval_batches)  # the feeder supplies both; these only switch eval on
        finally:
            signal.signal(signal.SIGTERM, previous)
            monitor.jsonl.close()

    summary = {
        "steps": trainer.train_steps, "data_steps": data_steps, "planned_steps": plan.total_steps,
        "epochs": trainer.train_steps * cfg.effective_batch / windows,
        "tokens_seen": trainer.train_steps * cfg.effective_batch * cfg.data.max_len,
        "wall_s": time.time() - started, "stopped_early": trainer.train_steps < data_steps,
        "final_loss": _last(run_dir / "metrics.jsonl", "loss"),
        "final_eval_loss": _last(run_dir / "metrics.jsonl", "eval_loss"),
        "checkpoint": str(run_dir / CHECKPOINT_SUBDIR / str(latest_step(run_dir))),
        "trainable_params": count_params(model, nnx.LoRAParam), "total_params": count_params(model),
        "step_s_median": monitor.step_seconds(), "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
    }
    (run_dir / "run_summary.json").write_text(json.dumps(summary, indent=2))
    plot_losses(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
    return summary


def _last(metrics_path: Path, key: str) -> float | None:
    values = [r[key] for r in map(json.loads, metrics_path.read_text().splitlines()) if r.get(key) is not None]
    return values[-1] if values else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    cfg, _ = config_from_argv(argv, "LoRA SFT of Gemma2 with Tunix")
    argv = sys.argv[1:] if argv is None else argv
    try:
        maybe_initialize_distributed()
        explicit_data = any(a == "--data" or a.startswith(("--data=", "--data.out_dir")) for a in argv)
        data_dir = Path(cfg.data.out_dir)
        if explicit_data and not (data_dir / "manifest.json").exists():
            raise ConfigError(f"--data {data_dir} holds no prepared data (no manifest.json): run "
                              f"`python data_prep.py --preset {cfg.preset} --data.out_dir {data_dir}` first")
        summary = train(cfg, data_dir if explicit_data else None)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    print(f"done: {summary['steps']} steps, final loss {summary['final_loss']}, eval loss "
          f"{summary['final_eval_loss']}, checkpoint {summary['checkpoint']}")
    return summary


if __name__ == "__main__":
    main()
