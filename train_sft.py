"""Stage 2: LoRA SFT of Gemma2 (or Gemma3) with Tunix's PeftTrainer.

    python train_sft.py --preset cpu-tiny            # tiny random Gemma2 on the shipped sample, CPU
    python train_sft.py --preset kaggle              # Gemma2-2B-it on a TPU v5e-8
    python train_sft.py --preset kaggle-gemma3       # Gemma3-1B-it on a TPU v5e-8
    python train_sft.py --preset unrestricted        # continue a kaggle run on fresh rows

Top to bottom: the model with LoRA (from ``model.py``) -> optimizer and a dynamic step count
capped by the time budget -> PeftTrainer with the packed-row loss of ``model.py`` -> orbax
checkpoints (LoRA, optimizer, data iterator) that a re-run of the same command resumes ->
metrics (TensorBoard, metrics.jsonl, loss PNG), with greedy generations for held-out prompts every
``eval.generate_every`` steps that show when the model learns the answer format.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config import Config, ConfigError
from rundir import (
    RunLock,
    check_training_start,
    checkpoint_dir,
    checkpoint_step,
    keep_newest_checkpoints,
    newest_good_step,
    restore_lora,
    saved_steps,
    settings_from_argv,
)

if __name__ == "__main__":  # settings and paths first: a bad one stops in about a second, before the imports below
    settings_from_argv(None, "train_sft", __doc__)

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache as compilation_cache_lib
from tunix.sft import hooks, metrics_logger, peft_trainer

import data_prep
from chat_format import check_format
from kaggle_weights import load_tokenizer
from model import (
    build_model,
    build_sampler,
    count_params,
    flops_per_token,
    generate,
    global_batch,
    make_gen_model_input,
    make_loss_fn,
    make_mesh,
    maybe_initialize_distributed,
    padded_prompt_length,
    peak_flops,
    process_rows,
    wait_for_all_processes,
)
from tunix_adapter import SFTTrainer

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


# ----------------------------------------------------------------------------- metrics log


class MetricsLog:
    """metrics.jsonl: one JSON record a line, append-only. A torn last line (a kill mid-write) is ended first, so it
    stays one unreadable line instead of spoiling the next record. Without a path (a process other than process 0,
    which alone writes the run's files) records go nowhere."""

    def __init__(self, path: Path | None):
        self.handle = None if path is None else path.open("a")
        if self.handle is not None and self.handle.tell() > 0:
            with path.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    self.handle.write("\n")

    def write(self, record: dict[str, Any]) -> None:
        if self.handle is not None:
            self.handle.write(json.dumps(record) + "\n")
            self.handle.flush()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl; torn lines are skipped with a note."""
    records, torn = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif line.strip():
            torn.append(str(number))
    if torn:
        print(f"{path}: skipped torn line {', '.join(torn)} (written when a run was killed)")
    return records


def process_start_time() -> float:
    """When this process started: the time budget counts from here (imports, data and the model build included)."""
    import psutil

    return psutil.Process().create_time()


def _clock_text(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@contextlib.contextmanager
def compilation_cache(cache_dir: Path) -> Iterator[None]:
    """JAX's persistent compilation cache in cache_dir while the run builds and trains: a resumed session loads
    its compiled steps from there. Every executable is kept (no minimum compile time), so it works on a CPU too."""
    settings = {"jax_compilation_cache_dir": str(cache_dir), "jax_persistent_cache_min_compile_time_secs": 0.0,
                "jax_persistent_cache_min_entry_size_bytes": -1}
    previous = {name: getattr(jax.config, name) for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
    compilation_cache_lib.reset_cache()  # JAX settles on a cache (or none) at a process's first compile
    try:
        yield
    finally:
        for name, value in previous.items():
            jax.config.update(name, value)
        compilation_cache_lib.reset_cache()


class CompileLog:
    """Compiles per jitted function (an executable compiled, or loaded from the persistent cache) and their
    seconds (tracing, lowering, compiling or loading), from jax.monitoring's compile events. PeftTrainer.train()
    clears every listener when it ends, so a log covers one run."""

    BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
    TIMED = (BACKEND_COMPILE, "/jax/core/compile/jaxpr_trace_duration",
             "/jax/core/compile/jaxpr_to_mlir_module_duration")

    def __init__(self):
        self.compiles: dict[str, int] = {}
        self.from_cache: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.cache_hit_pending = False
        jax.monitoring.register_event_listener(self.on_event)
        jax.monitoring.register_event_duration_secs_listener(self.on_duration)

    def on_event(self, event: str, **_: Any) -> None:
        # Reported inside the backend compile it answers, just before that compile's duration.
        if event == "/jax/compilation_cache/cache_hits":
            self.cache_hit_pending = True

    def on_duration(self, event: str, seconds: float, fun_name: str = "?", **_: Any) -> None:
        if event not in self.TIMED:
            return
        name = fun_name.removeprefix("jit(").removesuffix(")")  # "f" when traced, "jit(f)" when compiled
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        if event == self.BACKEND_COMPILE:
            self.compiles[name] = self.compiles.get(name, 0) + 1
            self.from_cache[name] = self.from_cache.get(name, 0) + self.cache_hit_pending
            self.cache_hit_pending = False

    def summary(self, names: dict[str, str]) -> dict[str, dict[str, float]]:
        """``{label: {"compiles", "from_cache", "seconds"}}`` for the functions named ``{label: fun_name}``."""
        return {label: {"compiles": self.compiles.get(name, 0), "from_cache": self.from_cache.get(name, 0),
                        "seconds": round(self.seconds.get(name, 0.0), 3)} for label, name in names.items()}


# ----------------------------------------------------------------------------- the time budget


class TimeBudget:
    """When to stop: the deadline, the step time (measured from step starts) and the time the final save needs.
    Every time it reads comes from ``clock``, so tests drive it instead of the wall."""

    def __init__(self, deadline: float | None, save_reserve_s: float, clock: Callable[[], float] = time.time,
                 started: float | None = None, save_seconds: float | None = None):
        self.deadline, self.save_reserve_s, self.clock = deadline, save_reserve_s, clock
        self.started = clock() if started is None else started  # when the budget began
        self.step_started: dict[int, float] = {}  # optimizer step (0-based) -> when its first micro-batch went in
        self.step_times: list[float] = []
        self.first_step_s: float | None = None  # compile included: an upper bound until real step times exist
        self.training_started: float | None = None
        # Durations of the checkpoint saves (a previous session's slowest included): the final save's reserve.
        self.save_times: list[float] = [] if save_seconds is None else [save_seconds]
        self.stop_requested = False  # SIGTERM
        self.stopped_for_budget = False

    def start_training(self) -> None:
        self.training_started = self.clock()
        if self.deadline is not None:
            print(f"time budget: {_clock_text(self.training_started - self.started)} spent before the first step "
                  f"(imports, data, model); {_clock_text(self.deadline - self.training_started)} left to train")

    def mark_step_start(self, step: int) -> None:
        """Times optimizer steps by their starts: with two steps in flight, starts are paced by completions,
        so their spacing is the step time; the first interval of a process includes the compile."""
        self.step_started[step] = self.clock()
        if step - 1 in self.step_started:
            interval = self.step_started[step] - self.step_started[step - 1]
            if step - 2 in self.step_started:
                self.step_times.append(interval)
            else:
                self.first_step_s = interval

    def step_seconds(self) -> float | None:
        """The typical step time, from steps after the compiling first one."""
        recent = self.step_times[-20:]
        return statistics.median(recent) if recent else None

    def step_estimate(self) -> float | None:
        """What the next step may take: real step times, else the compile-inclusive first step (or the time
        the first step has run so far), else nothing yet."""
        if (seconds := self.step_seconds() or self.first_step_s) is not None:
            return seconds
        return self.clock() - min(self.step_started.values()) if self.step_started else None

    def reserve_seconds(self) -> float:
        """Time kept back for the final checkpoint: twice the slowest save timed, or the configured guess."""
        return max(1.0, 2.0 * max(self.save_times)) if self.save_times else self.save_reserve_s

    def has_time_for(self, seconds: float, now: float | None = None) -> bool:
        """Whether work of ``seconds`` from ``now`` still leaves time for the next step and the final save."""
        if self.deadline is None:
            return True
        now = self.clock() if now is None else now
        return now + seconds + 1.5 * (self.step_estimate() or 0.0) + self.reserve_seconds() <= self.deadline

    def should_stop(self) -> bool:
        """At a step boundary: stop for SIGTERM, or when the next step and the save would pass the deadline."""
        if self.stop_requested:
            return True
        now = self.clock()
        if self.has_time_for(0.0, now):
            return False
        if not self.stopped_for_budget:
            self.stopped_for_budget = True
            print(f"time budget: stopping with {_clock_text(self.deadline - now)} left (a step takes "
                  f"{self.step_estimate() or 0.0:.2f} s, the final save is given {self.reserve_seconds():.1f} s)")
        return True

    def affordable_steps(self, done_steps: int, planned: int) -> int:
        """The most steps that finish before the deadline, with the stop check's margin of half a step."""
        step = self.step_seconds()
        return budget_capped_steps(done_steps, planned, step, self.deadline - self.clock(),
                                   self.reserve_seconds() + 0.5 * step)

    def progress_line(self, now: float, step: int, total: int, record: dict[str, Any]) -> str:
        line = f"progress: step {step} of {total}, loss {record['loss']:.4f}"
        if "tokens_per_s" in record:
            line += f", {record['tokens_per_s']:,.0f} tokens/s"
        line += f", elapsed {_clock_text(now - self.started)}"
        if (seconds := self.step_estimate()) is not None:
            line += f", ~{_clock_text((total - step) * seconds)} left for the plan"
        if self.deadline is not None:
            line += f", {_clock_text(self.deadline - now)} left of the budget"
        return line


# ----------------------------------------------------------------------------- has it learned the format yet?


def held_out_prompts(data_dir: Path, count: int) -> list[dict]:
    """The first ``count`` held-out prompts of the prepared data (rows never trained on)."""
    lines = (data_dir / "eval_prompts.jsonl").read_text(encoding="utf-8").splitlines()
    prompts = [{"domain": "held-out", "prompt": json.loads(line)["prompt"]} for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(f"{data_dir}/eval_prompts.jsonl holds no prompts for --eval.generate_every: raise "
                          f"--data.eval_rows or set --eval.generate_every 0")
    return prompts[:count]


class FormatProbe:
    """Has the model learned the format yet? Greedy generations for a fixed set of held-out prompts, with one
    Sampler built for the whole run (so nothing recompiles per call): format compliance, truncation rate and mean
    generated length."""

    def __init__(self, cfg: Config, model: nnx.Module, tokenizer: Any, prompts: list[dict], max_new_tokens: int):
        self.every, self.model, self.tokenizer, self.prompts = cfg.eval.generate_every, model, tokenizer, prompts
        # greedy whatever evaluation samples with, up to the run's generation budget
        self.ecfg = dataclasses.replace(cfg.eval, temperature=0.0, max_new_tokens=max_new_tokens)
        self.sampler = build_sampler(model, tokenizer, padded_prompt_length(tokenizer, prompts),
                                     self.ecfg.max_new_tokens)
        self.last_step: int | None = None
        self.last_seconds = 0.0  # the previous call's duration: a call that would overrun the deadline is skipped

    def due(self, step: int, final: bool = False) -> bool:
        """Every ``eval.generate_every`` steps from step 0, and at the end; never twice at one step."""
        return step != self.last_step and (final or step % self.every == 0)

    def run(self, step: int, clock: Callable[[], float]) -> dict[str, float]:
        """Generates for the prompts, prints a line and returns the measures (the seconds it took: last_seconds)."""
        began = clock()
        records = generate(self.model, self.tokenizer, self.prompts, self.ecfg, "train", sampler=self.sampler,
                           show_progress=False)
        self.last_step, self.last_seconds = step, clock() - began
        well_formed = [check_format(r["output"], r["truncated"]).ok for r in records]
        metrics = {"format_compliance": statistics.fmean(well_formed),
                   "truncation_rate": statistics.fmean(r["truncated"] for r in records),
                   "generated_tokens_mean": statistics.fmean(r["generated_tokens"] for r in records)}
        print(f"step {step}: {sum(well_formed)}/{len(records)} held-out generations well-formed, "
              f"{sum(r['truncated'] for r in records)} truncated, {metrics['generated_tokens_mean']:.0f} tokens "
              f"on average ({self.last_seconds:.1f} s)")
        return metrics


# ----------------------------------------------------------------------------- the trainer's hooks


class RunHooks(hooks.TrainingHooks):
    """Tunix's per-step callbacks for one run: the learning rate from the plan, the plan cut to the time budget
    (single session), token rates and MFU into metrics.jsonl and TensorBoard, the format probe and progress lines."""

    def __init__(self, cfg: Config, plan: StepPlan, budget: TimeBudget, metrics: MetricsLog,
                 probe: FormatProbe | None = None):
        self.cfg, self.plan, self.budget, self.metrics, self.probe = cfg, plan, budget, metrics, probe
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.max_len)
        self.peak = peak_flops(cfg)
        self.step_tokens: dict[int, list[int]] = {}  # optimizer step -> [tokens, loss tokens] fed
        self.pending_eval: dict[int, float] = {}
        self.plan_checked = False
        self.show_progress = cfg.run.log_every_s > 0 and not sys.stdout.isatty()
        self.last_progress: float | None = None

    def count(self, step: int, tokens: int, loss_tokens: int) -> None:
        """The feeder reports the tokens of each global batch it feeds; the rates come from these counts."""
        counts = self.step_tokens.setdefault(step, [0, 0])
        counts[0] += tokens
        counts[1] += loss_tokens

    def maybe_probe(self, train_ctx: Any, final: bool = False) -> float:
        """Runs the format probe when due and there is time left; returns the seconds it took."""
        step = train_ctx.train_steps
        if (self.probe is None or not self.probe.due(step, final) or self.budget.stop_requested
                or not self.budget.has_time_for(self.probe.last_seconds)):
            return 0.0  # not due, SIGTERM (the final checkpoint comes first), or no time left for it
        measures = self.probe.run(step, self.budget.clock)
        for name, value in measures.items():
            train_ctx.metrics_logger.log("", name, value, "eval", step)
        self.metrics.write({"step": step, "loss": None, **measures, "generate_s": self.probe.last_seconds})
        return self.probe.last_seconds

    def on_train_start(self, train_ctx):
        self.budget.start_training()

    def on_train_step_start(self, train_ctx):
        step = train_ctx.train_steps
        if step in self.budget.step_started:
            return  # a later micro-batch of the same optimizer step
        spent = self.maybe_probe(train_ctx)  # before the step's clock starts; taken out of the previous step's
        if step - 1 in self.budget.step_started:
            self.budget.step_started[step - 1] += spent
        self.budget.mark_step_start(step)
        lr = _learning_rate_variable(train_ctx.optimizer)
        # From the host, the same value on every process (a device array would live on one process's device).
        lr.set_value(jax.device_put(np.float32(self.plan.learning_rate(step)), lr.get_value().sharding))

    def on_train_step_end(self, train_ctx, train_step, train_loss):
        step = train_step - 1  # PeftTrainer reports steps 1-based, one step late
        history = train_ctx.metrics_logger
        record: dict[str, Any] = {"step": int(train_step), "loss": float(train_loss),
                                  "learning_rate": self.plan.learning_rate(step),
                                  "grad_norm": float(history.get_metric_history("", "grad_norm", "train")[-1])}
        seconds = self.budget.step_seconds()
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
        self.metrics.write(record)
        self.report_progress(record)
        self.cut_plan_to_budget(train_ctx)

    def report_progress(self, record: dict[str, Any]) -> None:
        """A plain progress line every run.log_every_s seconds, for logs where a progress bar is noise."""
        now = self.budget.clock()
        if not self.show_progress or (self.last_progress is not None
                                      and now - self.last_progress < self.cfg.run.log_every_s):
            return
        self.last_progress = now
        print(self.budget.progress_line(now, record["step"], self.plan.total_steps, record), flush=True)

    def cut_plan_to_budget(self, train_ctx: Any) -> None:
        """Single session: after the probe steps, shrink the plan (and the LR schedule with it) to what the
        budget allows. Several sessions keep the whole plan; each one just stops at its deadline."""
        if (self.cfg.run.multi_session or self.plan_checked or self.budget.deadline is None
                or len(self.budget.step_times) < self.cfg.run.budget_probe_steps):
            return
        self.plan_checked = True
        capped = self.budget.affordable_steps(train_ctx.train_steps, self.plan.total_steps)
        if capped < self.plan.total_steps:
            print(f"time budget: {self.budget.step_seconds():.2f} s/step allows {capped} of {self.plan.total_steps} "
                  f"planned steps; the schedule now ends at step {capped}")
            self.plan.total_steps = capped
            train_ctx.config.max_steps = capped

    def on_eval_step_end(self, train_ctx, eval_loss):
        loss = float(train_ctx.metrics_logger.get_metric_history("", "loss", "eval")[-1])
        if train_ctx.train_steps == 0:
            self.metrics.write({"step": 0, "loss": None, "eval_loss": loss})
        else:  # written with the step's training loss, which PeftTrainer reports one step later
            self.pending_eval[train_ctx.train_steps] = loss

    def on_train_end(self, train_ctx):
        self.maybe_probe(train_ctx, final=True)

    def on_eval_step_start(self, train_ctx):
        pass


class TimedCheckpoints:
    """Tunix's checkpoint manager with every save timed (the final save's reserve is learned, not guessed), and
    the plan's last step saved only when the trainer closes, after its metrics rows: a run killed once that
    checkpoint exists has every row of it, and its re-run has nothing to add."""

    def __init__(self, manager: Any, budget: TimeBudget, plan: StepPlan):
        self.manager, self.budget, self.plan = manager, budget, plan

    def save(self, step: int, *args: Any, force: bool = False, **kwargs: Any) -> bool:
        if step >= self.plan.total_steps and not force:
            return False
        began = self.budget.clock()
        saved = self.manager.save(step, *args, force=force, **kwargs)
        if saved:
            self.budget.save_times.append(self.budget.clock() - began)
        return saved

    def __getattr__(self, name: str) -> Any:
        return getattr(self.manager, name)


class BatchFeeder(hooks.DataHooks):
    """Feeds the trainer global batches assembled from every process's rows of the resumable grain iterator, and
    ends the loop early when the budget says so."""

    def __init__(self, iterator: Any, eval_batches: list[dict[str, jax.Array]], budget: TimeBudget,
                 run_hooks: RunHooks, grad_accum: int, sharding: jax.sharding.Sharding, batch_size: int):
        self.iterator, self.eval_batches, self.budget, self.run_hooks = iterator, eval_batches, budget, run_hooks
        self.grad_accum, self.sharding, self.batch_size = grad_accum, sharding, batch_size
        self.eval_index = 0

    def load_next_train_batch(self, train_ctx):
        if train_ctx.iter_steps % self.grad_accum == 0 and self.budget.should_stop():
            return None
        batch = next(self.iterator)
        self.run_hooks.count(train_ctx.train_steps, *(batch.pop(name) for name in data_prep.GLOBAL_COUNTS))
        return global_batch(batch, self.sharding, self.batch_size)

    def load_next_eval_batch(self, train_ctx):
        if self.eval_index == len(self.eval_batches):
            self.eval_index = 0
            return None
        self.eval_index += 1
        return self.eval_batches[self.eval_index - 1]


def make_trainer(model: nnx.Module, cfg: Config, plan: StepPlan, **training: Any) -> SFTTrainer:
    """The trainer every run builds: the plan's optimizer, gradient accumulation, the packed-row model input and
    the configured (chunked) loss. The benchmarks and the TPU fit check compile this same step."""
    trainer = SFTTrainer(model, make_optimizer(cfg, plan), peft_trainer.TrainingConfig(
        gradient_accumulation_steps=cfg.run.grad_accum if cfg.run.grad_accum > 1 else None, **training))
    trainer.with_gen_model_input_fn(make_gen_model_input(cfg.model))
    trainer.with_loss_fn(make_loss_fn(cfg.model.loss_chunk), has_aux=True)
    return trainer


def plot_losses(records: list[dict[str, Any]], png_path: Path) -> None:
    """Loss and eval loss against step and, when the run generated, a second panel with format compliance and
    truncation rate against step (the last record of a step wins, as after a resume)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[int, float]] = {name: {} for name in (
        "loss", "eval_loss", "format_compliance", "truncation_rate")}
    for record in records:
        for name, values in series.items():
            if record.get(name) is not None:
                values[record["step"]] = record[name]
    generated = bool(series["format_compliance"])
    fig, axes = plt.subplots(1, 2 if generated else 1, figsize=(12 if generated else 7, 4), squeeze=False)

    def plot(ax: Any, name: str, style: str, label: str) -> None:
        steps = sorted(series[name])
        ax.plot(steps, [series[name][s] for s in steps], style, label=label)

    plot(axes[0, 0], "loss", "-", "train loss")
    plot(axes[0, 0], "eval_loss", "o-", "eval loss")
    axes[0, 0].set(xlabel="step", ylabel="loss (nats per completion token)")
    if generated:
        plot(axes[0, 1], "format_compliance", "o-", "format compliance")
        plot(axes[0, 1], "truncation_rate", "s--", "truncation rate")
        axes[0, 1].set(xlabel="step", ylabel="fraction of held-out generations", ylim=(-0.05, 1.05),
                       title="greedy generations for held-out prompts")
    for ax in axes[0]:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- the run


def train(cfg: Config, data_dir: Path | None = None, started: float | None = None,
          clock: Callable[[], float] = time.time) -> dict[str, Any]:
    """Runs (or resumes) one training run into cfg.run.out_dir and returns its summary.

    ``started`` is when the time budget began (default: now; the command line passes the process start);
    ``clock`` is the time source of the budget, the step timing and the progress lines (tests drive it).
    The run directory is locked for the whole run: one writer at a time.
    """
    run_dir = Path(cfg.run.out_dir)
    # The hosts of one multi-host run share the run directory: the first one holds its lock.
    lock = RunLock(run_dir) if jax.process_index() == 0 else None
    try:
        return _train_locked(cfg, run_dir, lock, data_dir, clock() if started is None else started, clock)
    finally:
        if lock is not None:
            lock.close()


def _train_locked(cfg: Config, run_dir: Path, lock: RunLock | None, data_dir: Path | None, started: float,
                  clock: Callable[[], float]) -> dict[str, Any]:
    first = lock is not None  # process 0: it holds the lock and alone writes the run's files
    data_dir, init_step = prepare_run(cfg, run_dir, lock, data_dir)
    mesh = make_mesh(cfg)
    with mesh, compilation_cache(compile_cache_dir(cfg, run_dir)):
        compile_log = CompileLog()
        model = build_model(cfg, mesh)
        if init_step is not None:
            restore_lora(model, cfg.run.init_from, init_step)
            print(f"initialised LoRA from {cfg.run.init_from} step {init_step} (fresh optimizer)")
        windows = data_prep.num_windows(data_dir, "train")
        data_steps = planned_steps(cfg.run.epochs, windows, cfg.effective_batch, cfg.run.max_steps)
        plan = StepPlan(data_steps, cfg.optim.learning_rate, cfg.optim.warmup_ratio, cfg.optim.end_lr_ratio)
        trainer = make_run_trainer(model, cfg, plan, run_dir)
        session_start_step = resume_plan(trainer, plan, run_dir)
        budget = TimeBudget(started + cfg.run.time_budget_min * 60 if cfg.run.time_budget_min else None,
                            cfg.run.save_reserve_s, clock, started, trainer.restored_metadata.get("save_s"))
        metrics = MetricsLog(run_dir / "metrics.jsonl" if first else None)
        probe = make_format_probe(cfg, model, data_dir)
        run_hooks = RunHooks(cfg, plan, budget, metrics, probe)
        feeder = connect_run(trainer, cfg, data_dir, mesh, plan, budget, run_hooks)
        try:
            train_until_done_or_stopped(trainer, plan, budget, feeder, run_dir)
        finally:
            metrics.close()

    if first:
        keep_newest_checkpoints(run_dir, cfg.run.checkpoints_to_keep)
    records = read_metrics(run_dir / "metrics.jsonl")
    summary = run_summary(cfg, run_dir, trainer, plan, budget, records, windows, data_steps, session_start_step,
                          compile_log, clock)
    if first:
        (run_dir / "run_summary.json").write_text(json.dumps(summary, indent=2))
        plot_losses(records, run_dir / "loss_curve.png")
    if cfg.run.multi_session and not summary["plan_done"]:
        print(f"session over at step {trainer.train_steps} of {plan.total_steps} "
              f"({100 * summary['plan_progress']:.0f}% of the plan): re-run the same command to continue")
    return summary


def prepare_run(cfg: Config, run_dir: Path, lock: RunLock | None, data_dir: Path | None) -> tuple[Path, int | None]:
    """The prepared data and the checks that this run can start or resume (before any model is built, leaving
    an existing config.json alone when it cannot); writes config.json. Returns the data directory and the
    ``--init-from`` step to start from (None when resuming or starting fresh). With several processes, process 0
    prepares the data and sets damaged checkpoints aside while the others wait, and alone writes config.json."""
    first = lock is not None  # process 0
    if cfg.run.time_budget_min and jax.process_count() > 1:
        raise ConfigError(f"--run.time_budget_min {cfg.run.time_budget_min:g} would stop each of the "
                          f"{jax.process_count()} processes by its own clock, at different steps: pass "
                          "--time-budget-min 0 (and --max-steps N to end earlier)")
    load_tokenizer(cfg.model)  # the model's tokenizer must fit its embedding: checked before the build
    if first:
        data_dir = data_dir or data_prep.prepare(cfg)
        resume_step = newest_good_step(run_dir, set_aside_damaged=True, lock=lock)
    wait_for_all_processes("tunix_sft_data_prepared", cfg.run.data_wait_min * 60,
                           "process 0 to prepare the data and check the run directory (raise --run.data_wait_min)")
    if not first:
        data_dir = data_dir or data_prep.prepare(cfg, show_progress=False)  # found prepared, unless on another disk
        resume_step = newest_good_step(run_dir)  # process 0 has set the damaged ones aside
    check_training_start(cfg, resume_step is not None, data_dir)
    init_step = checkpoint_step(cfg.run.init_from) if cfg.run.init_from and resume_step is None else None
    if first:
        (run_dir / "config.json").write_text(json.dumps(
            {**cfg.to_dict(), "data_manifest": data_prep.read_manifest(data_dir)}, indent=2))
    return data_dir, init_step


def compile_cache_dir(cfg: Config, run_dir: Path) -> Path:
    cache_dir = Path(cfg.run.compile_cache_dir).expanduser() if cfg.run.compile_cache_dir else run_dir / "jax_cache"
    return cache_dir.resolve()


def make_run_trainer(model: nnx.Module, cfg: Config, plan: StepPlan, run_dir: Path) -> SFTTrainer:
    """The trainer with the run's evaluation interval, checkpoints (restoring the newest one) and TensorBoard."""
    checkpoint_policy = ocp.checkpoint_managers.AnySavePolicy([
        ocp.checkpoint_managers.FixedIntervalPolicy(cfg.run.checkpoint_every_steps),
        ocp.checkpoint_managers.ContinuousCheckpointingPolicy(
            minimum_interval_secs=int(cfg.run.checkpoint_every_min * 60))])
    return make_trainer(
        model, cfg, plan, eval_every_n_steps=cfg.run.eval_every, max_steps=plan.total_steps,
        checkpoint_root_directory=str(checkpoint_dir(run_dir).resolve()),
        # Saves finish before training goes on, so each one is timed whole (the final save's reserve).
        checkpointing_options=ocp.CheckpointManagerOptions(
            save_decision_policy=checkpoint_policy, max_to_keep=cfg.run.checkpoints_to_keep,
            enable_async_checkpointing=False, cleanup_tmp_directories=True),
        metrics_logging_options=metrics_logger.MetricsLoggerOptions(log_dir=str(run_dir / "tensorboard"),
                                                                    flush_every_n_steps=10),
        pbar_description=f"train {cfg.preset}")


def resume_plan(trainer: SFTTrainer, plan: StepPlan, run_dir: Path) -> int:
    """A resumed run keeps the step plan its checkpoint recorded; returns the step this session starts at."""
    if trainer.train_steps:
        plan.total_steps = trainer.restored_metadata["planned_steps"]
        trainer.config.max_steps = plan.total_steps
        print(f"resuming {run_dir} at step {trainer.train_steps} of {plan.total_steps}")
    return trainer.train_steps


def make_format_probe(cfg: Config, model: nnx.Module, data_dir: Path) -> FormatProbe | None:
    if not cfg.eval.generate_every:
        return None
    return FormatProbe(cfg, model, load_tokenizer(cfg.model),
                       held_out_prompts(data_dir, cfg.eval.generate_prompts),
                       data_prep.resolve_max_new_tokens(cfg, data_dir))


def connect_run(trainer: SFTTrainer, cfg: Config, data_dir: Path, mesh: jax.sharding.Mesh, plan: StepPlan,
                budget: TimeBudget, run_hooks: RunHooks) -> BatchFeeder:
    """Wires the run into the trainer: the data (from the checkpoint's position; every process reads its own rows
    of each global batch, those its devices hold under Tunix's data sharding), timed checkpoints that carry that
    position and the plan, and the hooks."""
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*trainer.config.data_sharding_axis))
    rows = process_rows(sharding, cfg.run.micro_batch)
    iterator = data_prep.train_loader(data_dir, cfg.run.micro_batch, cfg.data.seed, rows)
    if "data_iterator" in trainer.restored_metadata:
        iterator.set_state(trainer.restored_metadata["data_iterator"])
    eval_batches = [global_batch(batch, sharding, cfg.run.micro_batch) for batch in data_prep.eval_batches(
        data_dir, cfg.run.micro_batch, rows)[:cfg.run.eval_batches]]
    feeder = BatchFeeder(iterator, eval_batches, budget, run_hooks, cfg.run.grad_accum, sharding,
                         cfg.run.micro_batch)
    trainer.checkpoint_manager = TimedCheckpoints(trainer.checkpoint_manager, budget, plan)
    trainer.checkpoint_metadata = lambda: {"data_iterator": iterator.get_state(), "planned_steps": plan.total_steps,
                                           "save_s": max(budget.save_times, default=None)}
    trainer.with_training_hooks(run_hooks)
    trainer.with_data_hooks(feeder)
    return feeder


def train_until_done_or_stopped(trainer: SFTTrainer, plan: StepPlan, budget: TimeBudget, feeder: BatchFeeder,
                                run_dir: Path) -> None:
    """Trains to the end of the plan, or until the budget or SIGTERM stops it at a step boundary; the trainer
    saves its final checkpoint either way. One process alone stops at a step boundary on SIGTERM; several would
    stop at different steps (the others then lose the one that stopped at the next collective): there SIGTERM
    ends the process and the run resumes from its last checkpoint."""
    stop = (lambda *_: setattr(budget, "stop_requested", True)) if jax.process_count() == 1 else signal.SIG_DFL
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        if trainer.train_steps < plan.total_steps:
            trainer.train(feeder.iterator, feeder.eval_batches)  # the feeder supplies both; these switch eval on
        else:  # killed after its last checkpoint: the rows and the weights are all there
            print(f"the plan of {run_dir} is done: nothing to train")
            trainer.close()
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_summary(cfg: Config, run_dir: Path, trainer: SFTTrainer, plan: StepPlan, budget: TimeBudget,
                records: list[dict[str, Any]], windows: int, data_steps: int, session_start_step: int,
                compile_log: CompileLog, clock: Callable[[], float]) -> dict[str, Any]:
    """run_summary.json: how far along the plan the run is, what this session spent, the final losses."""
    saved_step = next(iter(saved_steps(run_dir)), None)  # the trainer's last save
    return {
        "steps": trainer.train_steps, "data_steps": data_steps, "planned_steps": plan.total_steps,
        # single: the plan was cut to fit one session; multi: re-run the same command until plan_done.
        "sessions": "multi" if cfg.run.multi_session else "single",
        "session_steps": trainer.train_steps - session_start_step,
        "plan_done": trainer.train_steps >= plan.total_steps,
        "plan_progress": trainer.train_steps / plan.total_steps,
        "epochs": trainer.train_steps * cfg.effective_batch / windows,
        "tokens_seen": trainer.train_steps * cfg.effective_batch * cfg.data.max_len,
        "wall_s": clock() - budget.started, "stopped_early": trainer.train_steps < data_steps,
        "stopped_for_budget": budget.stopped_for_budget,
        "startup_s": None if budget.training_started is None else budget.training_started - budget.started,
        "first_step_s": budget.first_step_s, "save_s_max": max(budget.save_times, default=None),
        "final_loss": _last(records, "loss"), "final_eval_loss": _last(records, "eval_loss"),
        "checkpoint": None if saved_step is None else str(checkpoint_dir(run_dir) / str(saved_step)),
        "trainable_params": count_params(trainer.model, nnx.LoRAParam), "total_params": count_params(trainer.model),
        "step_s_median": budget.step_seconds(), "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "compiles": compile_log.summary({"train_step": "_train_step", "eval_step": "_eval_step"}),
        "compile_s_total": round(sum(compile_log.seconds.values()), 3),
    }


def _last(records: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return values[-1] if values else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    cfg, args = settings_from_argv(argv, "train_sft", __doc__)
    try:
        maybe_initialize_distributed(cfg.run)
        explicit_data = "data.out_dir" in args.overrides  # prepared data given (checked by the preflight)
        summary = train(cfg, Path(cfg.data.out_dir) if explicit_data else None, started=process_start_time())
    except ConfigError as err:
        sys.exit(f"error: {err}")
    print(f"done: {summary['steps']} steps, final loss {summary['final_loss']}, eval loss "
          f"{summary['final_eval_loss']}, checkpoint {summary['checkpoint']}")
    return summary


if __name__ == "__main__":
    main()
