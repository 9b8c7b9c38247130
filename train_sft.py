"""Stage 2: LoRA SFT of Gemma2 with Tunix's PeftTrainer.

    python train_sft.py --preset cpu-tiny            # tiny random Gemma2 on the shipped sample, CPU
    python train_sft.py --preset kaggle              # Gemma2-2B-it on a TPU v5e-8
    python train_sft.py --preset unrestricted        # continue a kaggle run on fresh rows

Top to bottom: mesh -> abstract model -> weights restored into their shards -> qwix LoRA ->
PeftTrainer with a packed-row attention mask and a gather cross-entropy -> dynamic step
count capped by the time budget -> orbax checkpoints (LoRA, optimizer, data iterator) that
a re-run of the same command resumes -> metrics (TensorBoard, metrics.jsonl, loss PNG).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
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
import qwix
from flax import nnx
from tunix.models.gemma import model as gemma_lib
from tunix.models.gemma import params as gemma_params
from tunix.sft import hooks, metrics_logger, peft_trainer

import data_prep
from config import Config, ConfigError, ModelConfig, config_from_argv

# Tunix 0.1.7's trainer and model read the mesh from the legacy `with mesh:` context (jax.set_mesh does not set it).
warnings.filterwarnings("ignore", message="`with mesh:` context manager has been deprecated")

CHECKPOINT_SUBDIR = "checkpoints"
# Peak dense bf16 FLOP/s of one device, by jax device_kind, for model FLOPs utilisation.
PEAK_FLOPS = {"TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v4": 275e12, "TPU v5p": 459e12,
              "TPU v6 lite": 918e12, "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H200": 989e12}


# ----------------------------------------------------------------------------- mesh and model


def maybe_initialize_distributed() -> None:
    """Multi-host TPU slices and GPU clusters announce themselves through the environment."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()


def make_mesh(cfg: Config) -> jax.sharding.Mesh:
    """An (fsdp, tp) mesh over every device, with Auto axes (Explicit ones break Gemma's embedding lookup)."""
    fsdp, tp = cfg.run.mesh_fsdp, cfg.run.mesh_tp
    if fsdp * tp != jax.device_count():
        raise ConfigError(f"mesh fsdp={fsdp} x tp={tp} needs {fsdp * tp} devices but {jax.device_count()} are "
                          f"present: set --run.mesh_fsdp and --run.mesh_tp so that their product is "
                          f"{jax.device_count()}")
    auto = jax.sharding.AxisType.Auto
    return jax.make_mesh((fsdp, tp), ("fsdp", "tp"), axis_types=(auto, auto))


def gemma_config(model_cfg: ModelConfig) -> gemma_lib.ModelConfig:
    """Tunix's ModelConfig for the named model; "tiny" is the same architecture, smaller."""
    if model_cfg.name == "gemma2-2b-it":
        mc = gemma_lib.ModelConfig.gemma2_2b_it()
    else:
        mc = gemma_lib.ModelConfig(
            num_layers=model_cfg.num_layers, num_embed=model_cfg.vocab_size, embed_dim=model_cfg.embed_dim,
            hidden_dim=model_cfg.hidden_dim, num_heads=model_cfg.num_heads, head_dim=model_cfg.head_dim,
            num_kv_heads=model_cfg.num_kv_heads, final_logit_softcap=30.0, use_post_attn_norm=True,
            use_post_ffw_norm=True,
            attention_types=[gemma_lib.AttentionType.LOCAL_SLIDING, gemma_lib.AttentionType.GLOBAL]
            * (model_cfg.num_layers // 2) + [gemma_lib.AttentionType.LOCAL_SLIDING] * (model_cfg.num_layers % 2),
            attn_logits_soft_cap=50.0, sliding_window_size=model_cfg.sliding_window)
    mc.remat_config = gemma_lib.RematConfig[model_cfg.remat.upper()]
    return mc


def abstract_model(model_cfg: ModelConfig) -> gemma_lib.Gemma:
    """The model's structure, shapes and sharding annotations, without allocating any weight."""
    return nnx.eval_shape(lambda: gemma_lib.Gemma(gemma_config(model_cfg), rngs=nnx.Rngs(params=0)))


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh) -> None:
    """Places every variable on the mesh as its sharding annotation says."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, nnx.get_named_sharding(state, mesh)))


def random_tiny_state(abstract_state: nnx.State, seed: int, embed_dim: int) -> nnx.State:
    """Stand-in weights for the tiny model, drawn on the host with fan-in scaling. Every tensor is random:
    Tunix's own init zeroes MLP kernels and norm scales (zero MLP and MLP-LoRA gradients), and its small
    embedding would cap the logits so that no LoRA could make a confident prediction."""
    rng = np.random.default_rng(seed)

    def draw(path: Any, leaf: Any) -> np.ndarray:
        name = jax.tree_util.keystr(path)
        if len(leaf.shape) == 1:
            std = 0.1  # norm scales: RMSNorm multiplies by 1 + scale
        elif "attn_vec_einsum" in name or "down_proj" in name:
            std = math.prod(leaf.shape[:-1]) ** -0.5  # writes back to the residual stream
        else:
            std = embed_dim ** -0.5  # reads the residual stream (the embedding also projects to logits)
        return rng.standard_normal(leaf.shape, dtype=np.float32) * std

    return jax.tree_util.tree_map_with_path(draw, abstract_state)


def _convert_kaggle_checkpoint(model_cfg: ModelConfig, abstract: nnx.Module) -> nnx.State:
    """Kaggle's linen-layout params -> the NNX state of our model, checking every shape (Tunix checks none)."""
    source = data_prep.kaggle_checkpoint_dir(model_cfg)
    with jax.default_device(jax.devices("cpu")[0]):
        params = gemma_params.load_and_format_params(str(source))
        try:
            model = gemma_lib.module_from_linen_variables(
                module_factory=lambda: gemma_lib.Gemma(gemma_config(model_cfg), rngs=nnx.Rngs(params=0)),
                variables=params["transformer"],
                map_key_fn=gemma_lib._map_linen_var_names,  # from_params knows only the published sizes
                assign_val_fn=gemma_lib._assign_linen_params_to_nnx_state)
        except ValueError as err:  # a tensor the model does not have
            raise ConfigError(f"checkpoint {source} does not fit --model.name {model_cfg.name} "
                              f"({str(err).splitlines()[0]}): use the checkpoint of that model") from None
    state, expected = nnx.state(model), nnx.state(abstract)
    for (path, got), (_, want) in zip(state.flat_state(), expected.flat_state(), strict=True):
        if tuple(got.shape) != tuple(want.shape):
            raise ConfigError(f"checkpoint {source} has {'/'.join(map(str, path))} of "
                              f"shape {tuple(got.shape)} but --model.name {model_cfg.name} expects "
                              f"{tuple(want.shape)}: use the checkpoint of that model")
    return state


def _cached_nnx_checkpoint(model_cfg: ModelConfig, abstract: nnx.Module) -> Path | None:
    """Converts the Kaggle checkpoint once into an NNX orbax checkpoint, keyed by model and source."""
    if not model_cfg.cache_dir:
        return None
    source = str(data_prep.kaggle_checkpoint_dir(model_cfg).resolve())
    shapes = [(str(p), tuple(v.shape)) for p, v in nnx.state(abstract).flat_state()]
    key = hashlib.sha256(json.dumps([model_cfg.name, source, shapes]).encode()).hexdigest()[:12]
    path = Path(model_cfg.cache_dir).expanduser().resolve() / f"{model_cfg.name}-nnx-{key}"
    if not (path / "_CHECKPOINT_METADATA").exists():
        print(f"converting {source} to an NNX checkpoint at {path} (once)")
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(path, _convert_kaggle_checkpoint(model_cfg, abstract), force=True)
    return path


def load_base_model(cfg: Config, mesh: jax.sharding.Mesh) -> gemma_lib.Gemma:
    """Gemma2 with its base weights, each placed straight into its shard on the mesh."""
    dtype = jnp.dtype(cfg.model.dtype)
    abstract = abstract_model(cfg.model)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = nnx.get_named_sharding(abstract_state, mesh)
    cached = None
    if cfg.model.name == "tiny" and not cfg.model.checkpoint_dir:
        state = random_tiny_state(abstract_state, cfg.model.init_seed, cfg.model.embed_dim)
    elif (cached := _cached_nnx_checkpoint(cfg.model, abstract)) is None:
        state = _convert_kaggle_checkpoint(cfg.model, abstract)
    if cached is None:
        state = jax.device_put(jax.tree.map(lambda x: np.asarray(x, dtype), state), shardings)
    else:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype, sharding=s),
                              abstract_state, shardings)
        with ocp.StandardCheckpointer() as ckptr:
            state = ckptr.restore(cached, target)
    return nnx.merge(graphdef, state)


def apply_lora(base: nnx.Module, cfg: Config, mesh: jax.sharding.Mesh | None) -> nnx.Module:
    """qwix LoRA on the configured modules (B starts at zero, so the model starts equal to the base)."""
    provider = qwix.LoraProvider(module_path=cfg.lora.module_path, rank=cfg.lora.rank, alpha=cfg.lora.alpha)

    @nnx.jit  # qwix runs the model once to find its modules: one compiled call, not thousands of eager ops
    def with_lora(base):
        return qwix.apply_lora_to_model(base, provider, rngs=nnx.Rngs(params=cfg.run.seed),
                                        **base.get_model_input())

    model = with_lora(base)
    if mesh is not None:
        shard_model(model, mesh)
    return model


def build_model(cfg: Config, mesh: jax.sharding.Mesh, with_lora: bool = True) -> nnx.Module:
    base = load_base_model(cfg, mesh)
    return apply_lora(base, cfg, mesh) if with_lora else base


def count_params(model: nnx.Module, kind: type = nnx.Param) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, kind)))


# ----------------------------------------------------------------------------- loss


def packed_attention_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, L, L] causal mask that keeps each packed row to itself; padding (segment 0) attends to nothing."""
    same_row = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = jnp.tril(jnp.ones((segment_ids.shape[1],) * 2, dtype=jnp.bool_))
    return same_row & causal[None] & (segment_ids > 0)[:, :, None]


def gen_model_input(batch: dict[str, Any]) -> dict[str, Any]:
    """Batch from the loader -> keyword arguments of the loss (runs inside the jitted step)."""
    return {"tokens": batch["tokens"], "loss_mask": batch["loss_mask"], "positions": batch["positions"],
            "attention_mask": packed_attention_mask(batch["segment_ids"])}


def token_losses(model: nnx.Module, tokens: jax.Array, positions: jax.Array, attention_mask: jax.Array
                 ) -> jax.Array:
    """Per-token next-token NLL, [B, L-1], as logsumexp minus the target's logit: no one-hot over the vocabulary."""
    logits, _ = model(tokens, positions, None, attention_mask)
    logits = logits[:, :-1].astype(jnp.float32)
    target_logits = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logits


def loss_fn(model: nnx.Module, tokens: jax.Array, loss_mask: jax.Array, positions: jax.Array,
            attention_mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean NLL over loss tokens (the completion), never over the prompt or padding."""
    weights = loss_mask[:, 1:].astype(jnp.float32)
    nll = token_losses(model, tokens, positions, attention_mask)
    loss_tokens = jnp.sum(weights)
    return jnp.sum(nll * weights) / jnp.maximum(loss_tokens, 1.0), {"loss_tokens": loss_tokens}


@nnx.jit
def _nll_sums(model: nnx.Module, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    inputs = gen_model_input(batch)
    weights = inputs["loss_mask"][:, 1:].astype(jnp.float32)
    nll = token_losses(model, inputs["tokens"], inputs["positions"], inputs["attention_mask"])
    return jnp.sum(nll * weights), jnp.sum(weights)


def evaluate_loss(model: nnx.Module, batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Token-weighted eval loss and perplexity over batches, without training."""
    total, count = 0.0, 0.0
    for batch in batches:
        nll_sum, weight_sum = _nll_sums(model, batch)
        total, count = total + float(nll_sum), count + float(weight_sum)
    loss = total / max(count, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "loss_tokens": int(count)}


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


# ----------------------------------------------------------------------------- run bookkeeping


def flops_per_token(model_cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: forward 2N plus input gradients 2N through the frozen matmuls
    (no weight gradients), and attention's score/value matmuls forward plus twice that backward."""
    mc = gemma_config(model_cfg)
    attn = mc.num_layers * (mc.embed_dim * mc.head_dim * (2 * mc.num_heads + 2 * mc.num_kv_heads))
    mlp = mc.num_layers * 3 * mc.embed_dim * mc.hidden_dim
    matmul_params = attn + mlp + mc.num_embed * mc.embed_dim  # the embedding also projects to logits
    attention = 4 * mc.num_layers * mc.num_heads * mc.head_dim * seq_len
    return 4 * matmul_params + 3 * attention


def peak_flops(cfg: Config) -> float | None:
    if cfg.run.peak_flops_per_device:
        return cfg.run.peak_flops_per_device * jax.device_count()
    kind = jax.devices()[0].device_kind
    return PEAK_FLOPS[kind] * jax.device_count() if kind in PEAK_FLOPS else None


def latest_step(run_dir: Path) -> int | None:
    ckpt_dir = run_dir / CHECKPOINT_SUBDIR
    if not ckpt_dir.is_dir():
        return None
    with ocp.CheckpointManager(ckpt_dir.resolve()) as mgr:
        return mgr.latest_step()


def checkpoint_step(run_dir: str | Path, step: int | None = None) -> int:
    """The checkpoint step to load from a run directory (its latest by default), checked before any model
    is built: a missing run, checkpoint or step stops with one line."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist: pass the --out of a train_sft.py run")
    ckpt_dir = run_dir / CHECKPOINT_SUBDIR
    steps = []
    if ckpt_dir.is_dir():
        with ocp.CheckpointManager(ckpt_dir.resolve()) as mgr:
            steps = list(mgr.all_steps())
    if not steps:
        raise ConfigError(f"no checkpoint in {ckpt_dir}: train first with "
                          f"`python train_sft.py --out {run_dir}` or point at another run directory")
    if step is not None and step not in steps:
        raise ConfigError(f"{run_dir} has no checkpoint at step {step}: it has steps {sorted(steps)}")
    return max(steps) if step is None else step


def restore_lora(model: nnx.Module, run_dir: str | Path, step: int | None = None) -> int:
    """Loads the LoRA weights of another run directory into model; returns the step it loaded.

    Stops with one line naming both sides when the checkpoint is missing or was trained for
    another model size or LoRA rank.
    """
    run_dir = Path(run_dir)
    step = checkpoint_step(run_dir, step)
    target = nnx.state(model, nnx.LoRAParam)
    with ocp.CheckpointManager(
            (run_dir / CHECKPOINT_SUBDIR).resolve(),
            item_handlers={"model_params": ocp.PyTreeCheckpointHandler(),
                           "optimizer_state": ocp.PyTreeCheckpointHandler()}) as mgr:
        saved = mgr.item_metadata(step)["model_params"]
        _check_compatible(run_dir, saved, target)
        restored = mgr.restore(step, args=ocp.args.Composite(model_params=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))))
    nnx.update(model, restored.model_params)
    return step


def check_same_tokenizer(run_dir: Path, data_dir: Path) -> None:
    """A LoRA trained on other token ids is silently meaningless: refuse it."""
    path = run_dir / "config.json"
    theirs = json.loads(path.read_text()).get("data_manifest", {}) if path.exists() else {}
    ours = data_prep.read_manifest(data_dir)
    if theirs.get("tokenizer_sha256", ours["tokenizer_sha256"]) != ours["tokenizer_sha256"]:
        raise ConfigError(f"run {run_dir} was trained with tokenizer {theirs['tokenizer']} "
                          f"(sha256 {theirs['tokenizer_sha256'][:12]}) but {data_dir} uses {ours['tokenizer']} "
                          f"(sha256 {ours['tokenizer_sha256'][:12]}): set --model.tokenizer_path to the run's")


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """``"layers/0/attn/q_einsum/w_lora_a" -> shape`` for a model state or a checkpoint's metadata alike."""

    def name(key: Any) -> str:
        return str(next(getattr(key, a) for a in ("key", "idx", "name") if hasattr(key, a)))

    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return {"/".join(map(name, path)).removesuffix("/value"): tuple(leaf.shape) for path, leaf in flat}


def _check_compatible(run_dir: Path, saved: Any, target: nnx.State) -> None:
    want, got = _shapes(target), _shapes(saved)
    if want == got:
        return
    theirs = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else None
    where = (f"model {theirs['model']['name']} with LoRA rank {theirs['lora']['rank']}" if theirs else
             f"{len(got)} LoRA tensors")
    first = next((k for k in want if got.get(k) != want[k]), next(iter(got), "?"))
    raise ConfigError(f"checkpoint {run_dir} holds {where} ({first}: {got.get(first)}) but this model needs "
                      f"{want.get(first)}: use the run's preset/--model.*/--lora.rank or another --run")


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
        trainer.with_gen_model_input_fn(gen_model_input).with_loss_fn(loss_fn, has_aux=True)
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
