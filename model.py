"""The model: everything that describes Gemma + LoRA, apart from the training loop.

One code path for Gemma2 and Gemma3 (Tunix's ``tunix.models.gemma`` and ``gemma3``, chosen by ``model.name``):
config -> abstract Gemma (``nnx.eval_shape``) -> base weights restored straight into their shards
(the Kaggle Flax checkpoint, converted once to an NNX cache, or random weights for the tiny model)
-> qwix LoRA -> the forward pass with a packed-row attention mask -> the loss -> FLOPs -> LoRA weights
of a run directory (restore, compatibility checks) -> the LoRA merge that export writes.

Training (``train_sft.py``), evaluation (``eval_samples.py``) and export (``export.py``) all get their
model from here.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import math
import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import qwix
import sentencepiece as spm
from flax import nnx, traverse_util
from tqdm import tqdm
from tunix.generate.sampler import CacheConfig, Sampler
from tunix.generate.utils import next_power_of_2
from tunix.models.gemma import model as gemma_lib
from tunix.models.gemma import params as gemma_params
from tunix.models.gemma3 import model as gemma3_lib
from tunix.models.gemma3 import params as gemma3_params

from chat_format import END_OF_TURN, build_prompt
from config import (
    CHECKPOINT_SUBDIR,
    LORA_MODULES,
    REAL_MODEL_SIZES,
    Config,
    ConfigError,
    EvalConfig,
    ModelConfig,
    existing_run_dir,
    model_family,
)
from kaggle_weights import kaggle_checkpoint_dir

# The items of a training checkpoint, and the custom metadata a resume needs (data position, step plan).
CHECKPOINT_ITEMS = ("model_params", "optimizer_state")
RESUME_METADATA = ("data_iterator", "planned_steps")
# The lock file of a run directory, and the runs this process holds (one writer per run).
RUN_LOCK = "run.lock"
_HELD_LOCKS: dict[Path, Any] = {}
# Peak dense bf16 FLOP/s of one device, by the start of its jax device_kind (the longest match wins), for model
# FLOPs utilisation. NVIDIA's kinds carry the memory and form factor ("NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB
# HBM3"): the A100s all peak at 312e12; an H100 or H200 at 989e12 in SXM form, less as PCIe or NVL cards.
PEAK_FLOPS = {"TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v4": 275e12, "TPU v5p": 459e12,
              "TPU v6 lite": 918e12, "NVIDIA A100": 312e12, "NVIDIA H100": 989e12, "NVIDIA H100 PCIe": 756e12,
              "NVIDIA H100 NVL": 835e12, "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12}



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


# Tunix's modelling code and model class of each architecture (config.MODEL_FAMILIES).
MODEL_LIBS = {"gemma2": gemma_lib, "gemma3": gemma3_lib}
MODEL_CLASSES = {"gemma2": gemma_lib.Gemma, "gemma3": gemma3_lib.Gemma3}


def gemma_config(model_cfg: ModelConfig) -> gemma_lib.ModelConfig | gemma3_lib.ModelConfig:
    """Tunix's ModelConfig for the named model; a tiny model is the same architecture, smaller."""
    family = model_family(model_cfg)
    if model_cfg.name == "gemma2-2b-it":
        mc = gemma_lib.ModelConfig.gemma2_2b_it()
    elif model_cfg.name == "gemma3-1b-it":
        mc = gemma3_lib.ModelConfig.gemma3_1b_it()
    elif family == "gemma3":  # Gemma3's attention pattern (5 local : 1 global) and RoPE bases are fixed by Tunix
        mc = gemma3_lib.ModelConfig(
            num_layers=model_cfg.num_layers, num_embed=model_cfg.vocab_size, embed_dim=model_cfg.embed_dim,
            hidden_dim=model_cfg.hidden_dim, num_heads=model_cfg.num_heads, head_dim=model_cfg.head_dim,
            num_kv_heads=model_cfg.num_kv_heads, sliding_window_size=model_cfg.sliding_window,
            local_base_frequency=10_000, global_base_frequency=1_000_000)
    else:
        mc = gemma_lib.ModelConfig(
            num_layers=model_cfg.num_layers, num_embed=model_cfg.vocab_size, embed_dim=model_cfg.embed_dim,
            hidden_dim=model_cfg.hidden_dim, num_heads=model_cfg.num_heads, head_dim=model_cfg.head_dim,
            num_kv_heads=model_cfg.num_kv_heads, final_logit_softcap=30.0, use_post_attn_norm=True,
            use_post_ffw_norm=True,
            attention_types=[gemma_lib.AttentionType.LOCAL_SLIDING, gemma_lib.AttentionType.GLOBAL]
            * (model_cfg.num_layers // 2) + [gemma_lib.AttentionType.LOCAL_SLIDING] * (model_cfg.num_layers % 2),
            attn_logits_soft_cap=50.0, sliding_window_size=model_cfg.sliding_window)
    if family == "gemma3":
        mc.param_dtype = jnp.dtype(model_cfg.dtype)
    mc.remat_config = MODEL_LIBS[family].RematConfig[model_cfg.remat.upper()]
    return mc


def new_model(model_cfg: ModelConfig) -> nnx.Module:
    """The model with Tunix's own (partly zero) init: call it under ``nnx.eval_shape``."""
    return MODEL_CLASSES[model_family(model_cfg)](gemma_config(model_cfg), rngs=nnx.Rngs(params=0))


def abstract_model(model_cfg: ModelConfig) -> nnx.Module:
    """The model's structure, shapes and sharding annotations, without allocating any weight."""
    return nnx.eval_shape(lambda: new_model(model_cfg))


def final_softcap(model: nnx.Module) -> float | None:
    """The soft-cap of the final logits: Gemma2's 30; Tunix's Gemma3 has none (and no such attribute)."""
    return getattr(model, "final_logits_softcap", None)


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh) -> None:
    """Places every variable on the mesh as its sharding annotation says."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, nnx.get_named_sharding(state, mesh)))


def random_tiny_state(abstract_state: nnx.State, seed: int, embed_dim: int, dtype: Any = np.float32) -> nnx.State:
    """Stand-in weights for the tiny model (or, in dtype, for a real-size one), drawn on the host with fan-in
    scaling one tensor at a time. Every tensor is random:
    Tunix's own init zeroes MLP kernels and norm scales (zero MLP and MLP-LoRA gradients), and its small
    embedding would cap the logits so that no LoRA could make a confident prediction."""
    rng = np.random.default_rng(seed)

    def draw(path: Any, leaf: Any) -> np.ndarray:
        std = init_std(jax.tree_util.keystr(path), leaf.shape, embed_dim)
        weights = rng.standard_normal(leaf.shape, dtype=np.float32)
        weights *= std  # in place: a real-size embedding is 2.4 GB in float32
        return weights.astype(dtype, copy=False)

    return jax.tree_util.tree_map_with_path(draw, abstract_state)


def init_std(name: str, shape: tuple[int, ...], embed_dim: int) -> float:
    """The standard deviation of a random stand-in weight, by its path name and shape."""
    if len(shape) == 1:
        return 0.1  # norm scales: RMSNorm multiplies by 1 + scale
    if "attn_vec_einsum" in name or "down_proj" in name:
        return math.prod(shape[:-1]) ** -0.5  # writes back to the residual stream
    return embed_dim ** -0.5  # reads the residual stream (the embedding also projects to logits)


def _kaggle_params(model_cfg: ModelConfig, source: Path) -> dict[tuple[str | int, ...], Any]:
    """Kaggle's linen-layout params -> NNX paths and arrays, by Tunix's own mapping for the architecture."""
    if model_family(model_cfg) == "gemma3":
        with ocp.StandardCheckpointer() as ckptr:
            params = gemma3_params.map_from_upstream_checkpoint(ckptr.restore(source.resolve()))
        return traverse_util.flatten_dict(params)
    try:
        model = gemma_lib.module_from_linen_variables(
            module_factory=lambda: new_model(model_cfg),
            variables=gemma_params.load_and_format_params(str(source))["transformer"],
            map_key_fn=gemma_lib._map_linen_var_names,  # from_params knows only the published sizes
            assign_val_fn=gemma_lib._assign_linen_params_to_nnx_state)
    except ValueError as err:  # a tensor the model does not have
        raise ConfigError(f"checkpoint {source} does not fit --model.name {model_cfg.name} "
                          f"({str(err).splitlines()[0]}): use the checkpoint of that model") from None
    return {path: v.get_value() for path, v in nnx.state(model).flat_state()}


def _convert_kaggle_checkpoint(model_cfg: ModelConfig, abstract: nnx.Module) -> nnx.State:
    """Kaggle's linen-layout params -> the NNX state of our model, checking every name and shape (Tunix checks
    none)."""
    source = kaggle_checkpoint_dir(model_cfg)
    with jax.default_device(jax.devices("cpu")[0]):
        params = _kaggle_params(model_cfg, source)
    expected = dict(nnx.state(abstract).flat_state())
    if (extra := set(params) - set(expected)) or (missing := set(expected) - set(params)):
        path = "/".join(map(str, min(extra or missing, key=str)))
        raise ConfigError(f"checkpoint {source} does not fit --model.name {model_cfg.name} (it "
                          f"{'has' if extra else 'lacks'} {path}): use the checkpoint of that model")
    for path, want in expected.items():
        if tuple(params[path].shape) != tuple(want.shape):
            raise ConfigError(f"checkpoint {source} has {'/'.join(map(str, path))} of "
                              f"shape {tuple(params[path].shape)} but --model.name {model_cfg.name} expects "
                              f"{tuple(want.shape)}: use the checkpoint of that model")
    state = nnx.state(abstract)
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(params))
    return state


def _cached_nnx_checkpoint(model_cfg: ModelConfig, abstract: nnx.Module) -> Path | None:
    """Converts the Kaggle checkpoint once into an NNX orbax checkpoint, keyed by model and source."""
    if not model_cfg.cache_dir:
        return None
    source = str(kaggle_checkpoint_dir(model_cfg).resolve())
    shapes = [(str(p), tuple(v.shape)) for p, v in nnx.state(abstract).flat_state()]
    key = hashlib.sha256(json.dumps([model_cfg.name, source, shapes]).encode()).hexdigest()[:12]
    path = Path(model_cfg.cache_dir).expanduser().resolve() / f"{model_cfg.name}-nnx-{key}"
    if not (path / "_CHECKPOINT_METADATA").exists():
        print(f"converting {source} to an NNX checkpoint at {path} (once)")
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(path, _convert_kaggle_checkpoint(model_cfg, abstract), force=True)
    return path


def load_base_model(cfg: Config, mesh: jax.sharding.Mesh) -> gemma_lib.Gemma:
    """Gemma with its base weights, each placed straight into its shard on the mesh."""
    dtype = jnp.dtype(cfg.model.dtype)
    abstract = abstract_model(cfg.model)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = nnx.get_named_sharding(abstract_state, mesh)
    cached = None
    if cfg.model.name not in REAL_MODEL_SIZES and not cfg.model.checkpoint_dir:
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


def lora_targets(model: nnx.Module, module_path: str) -> list[str]:
    """The projections (modules with an Einsum ``w`` or a Linear ``kernel``) whose path, such as
    ``layers/0/attn/q_einsum``, the LoRA regex full-matches, as qwix matches it."""
    paths = ("/".join(map(str, path)) for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Module)
             and any(isinstance(getattr(node, name, None), nnx.Param) for name in ("w", "kernel")))
    return [path for path in paths if re.fullmatch(module_path, path)]


def build_model(cfg: Config, mesh: jax.sharding.Mesh, with_lora: bool = True) -> nnx.Module:
    """The base model, with LoRA on the projections ``lora.module_path`` names (a regex matching none stops
    before any weight is loaded)."""
    if with_lora and not lora_targets(abstract_model(cfg.model), cfg.lora.module_path):
        raise ConfigError(f"--lora.module_path {cfg.lora.module_path!r} matches no projection of "
                          f"{cfg.model.name} (paths such as layers/0/attn/q_einsum, layers/0/mlp/gate_proj): "
                          f"fix the regex (the default is {LORA_MODULES!r})")
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
    """Per-token next-token NLL, [B, L-1], from the full logits (logsumexp minus the target's logit)."""
    logits, _ = model(tokens, positions, None, attention_mask)
    logits = logits[:, :-1].astype(jnp.float32)
    target_logits = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logits


def final_hidden_states(model: nnx.Module, tokens: jax.Array, positions: jax.Array, attention_mask: jax.Array
                        ) -> jax.Array:
    """[B, L, D] final-normed hidden states, through the model's own ``__call__`` (which qwix wraps: calling the
    layers one by one would skip LoRA). The logits it also computes are unused, so XLA drops them under jit."""
    model(tokens, positions, None, attention_mask, output_hidden_states=True)
    return nnx.pop(model, nnx.Intermediate)["all_hidden_states"].get_value()[-1]


def chunked_nll_sum(model: nnx.Module, hidden: jax.Array, targets: jax.Array, weights: jax.Array, chunk: int
                    ) -> jax.Array:
    """sum(NLL x weight) over [B, T] positions, chunk positions of every row at a time, so that only one
    [B, chunk, vocab] block of logits ever exists, in the backward pass too (each chunk is recomputed there).

    Each row's weighted positions are moved to its front first, so chunks past the row with the most loss
    tokens hold none and are skipped (a ``cond``, both ways). Rows stay rows: a batch sharded over devices
    stays sharded. The LM head and the final soft-cap (Gemma2's; Gemma3 has none) are Gemma's own
    (``embedder.decode``, tanh(x/c)*c).
    """
    batch, length, dim = hidden.shape
    order = jnp.argsort(weights == 0, axis=1, stable=True)
    hidden = jnp.take_along_axis(hidden, order[..., None], axis=1)
    targets, weights = jnp.take_along_axis(targets, order, axis=1), jnp.take_along_axis(weights, order, axis=1)
    pad = -length % chunk
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets, weights = jnp.pad(targets, ((0, 0), (0, pad))), jnp.pad(weights, ((0, 0), (0, pad)))
    num_chunks = (length + pad) // chunk
    # [chunks, B, chunk, ...]: the scan runs over the first axis.
    hidden = hidden.reshape(batch, num_chunks, chunk, dim).swapaxes(0, 1)
    targets = targets.reshape(batch, num_chunks, chunk).swapaxes(0, 1)
    weights = weights.reshape(batch, num_chunks, chunk).swapaxes(0, 1)
    softcap = final_softcap(model)

    def weighted_nll(h: jax.Array, t: jax.Array, w: jax.Array) -> jax.Array:
        logits = model.embedder.decode(h)
        if softcap is not None:
            logits = jnp.tanh(logits / softcap) * softcap
        logits = logits.astype(jnp.float32)
        target_logits = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - target_logits) * w)

    @jax.checkpoint
    def chunk_sum(h: jax.Array, t: jax.Array, w: jax.Array) -> jax.Array:
        return jax.lax.cond(jnp.any(w != 0), weighted_nll, lambda *_: jnp.zeros((), jnp.float32), h, t, w)

    def step(total: jax.Array, xs: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        return total + chunk_sum(*xs), None

    total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32), (hidden, targets, weights))
    return total


def nll_sums(model: nnx.Module, tokens: jax.Array, loss_mask: jax.Array, positions: jax.Array,
             attention_mask: jax.Array, loss_chunk: int) -> tuple[jax.Array, jax.Array]:
    """(sum of the loss tokens' NLL, number of loss tokens). ``loss_chunk`` positions per row at a time
    (``chunked_nll_sum``), or 0 for the full [B, L, vocab] logits at once."""
    weights = loss_mask[:, 1:].astype(jnp.float32)
    if loss_chunk:
        hidden = final_hidden_states(model, tokens, positions, attention_mask)[:, :-1]
        nll_sum = chunked_nll_sum(model, hidden, tokens[:, 1:], weights, loss_chunk)
    else:
        nll_sum = jnp.sum(token_losses(model, tokens, positions, attention_mask) * weights)
    return nll_sum, jnp.sum(weights)


def loss_fn(model: nnx.Module, tokens: jax.Array, loss_mask: jax.Array, positions: jax.Array,
            attention_mask: jax.Array, loss_chunk: int = ModelConfig.loss_chunk
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean NLL over loss tokens (the completion), never over the prompt or padding."""
    nll_sum, loss_tokens = nll_sums(model, tokens, loss_mask, positions, attention_mask, loss_chunk)
    return nll_sum / jnp.maximum(loss_tokens, 1.0), {"loss_tokens": loss_tokens}


def make_loss_fn(loss_chunk: int) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
    """``loss_fn`` at a chunk size, for ``PeftTrainer.with_loss_fn(..., has_aux=True)``: a plain function of the
    loss's inputs (nnx's grad binds keyword arguments by signature, which a ``functools.partial`` hides)."""

    def chunked_loss_fn(model: nnx.Module, tokens: jax.Array, loss_mask: jax.Array, positions: jax.Array,
                        attention_mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        return loss_fn(model, tokens, loss_mask, positions, attention_mask, loss_chunk)

    return chunked_loss_fn


@functools.partial(nnx.jit, static_argnames="loss_chunk")
def _batch_nll_sums(model: nnx.Module, batch: dict[str, jax.Array], loss_chunk: int
                    ) -> tuple[jax.Array, jax.Array]:
    return nll_sums(model, **gen_model_input(batch), loss_chunk=loss_chunk)


def evaluate_loss(model: nnx.Module, batches: list[dict[str, np.ndarray]],
                  loss_chunk: int = ModelConfig.loss_chunk) -> dict[str, float]:
    """Token-weighted eval loss and perplexity over batches, without training."""
    total, count = 0.0, 0.0
    for batch in batches:
        nll_sum, weight_sum = _batch_nll_sums(model, batch, loss_chunk)
        total, count = total + float(nll_sum), count + float(weight_sum)
    loss = total / max(count, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "loss_tokens": int(count)}



# ----------------------------------------------------------------------------- generation


def padded_prompt_length(tokenizer: spm.SentencePieceProcessor, prompts: list[dict]) -> int:
    """One padded prompt length for every batch of these prompts, so a sampler compiles once (+1: the <bos>)."""
    return next_power_of_2(max(len(tokenizer.encode(build_prompt(p["prompt"]))) for p in prompts) + 1)


# Tunix's Sampler masks forbidden ids as a static tuple of Python ints (one pytree leaf each): fine for the 128
# embedding rows past Gemma's 256,000 pieces, but a tokenizer far smaller than the embedding (254,080 ids) made
# the decode step's compile exhaust 23 GB.
MAX_UNDECODABLE_IDS = 1024


def undecodable_ids(tokenizer: spm.SentencePieceProcessor, model: nnx.Module) -> range:
    """The embedding rows past the tokenizer's pieces: they cannot be decoded, so generation never samples them."""
    ids = range(tokenizer.get_piece_size(), model.config.num_embed)
    if len(ids) > MAX_UNDECODABLE_IDS:
        raise ConfigError(f"the tokenizer has {tokenizer.get_piece_size()} pieces but the model "
                          f"{model.config.num_embed} embedding rows, and Tunix's Sampler cannot mask {len(ids)} "
                          f"ids: generate with the tokenizer the model was built for (--model.tokenizer_path)")
    return ids


def build_sampler(model: nnx.Module, tokenizer: spm.SentencePieceProcessor, prompt_len: int, max_new_tokens: int
                  ) -> Sampler:
    """A Sampler over model's own variables: it generates with the weights as they are at each call, and it compiles
    its prefill and decode steps once for a batch shape, so a run that generates repeatedly builds one and reuses it.
    It refuses a tokenizer it could not generate with (undecodable_ids) before a training run starts."""
    undecodable_ids(tokenizer, model)
    mc = model.config
    return Sampler(model, tokenizer, CacheConfig(prompt_len + max_new_tokens, mc.num_layers, mc.num_kv_heads,
                                                 mc.head_dim))


def generate(model: nnx.Module, tokenizer: spm.SentencePieceProcessor, prompts: list[dict], ecfg: EvalConfig,
             name: str, sampler: Sampler | None = None, show_progress: bool = True) -> list[dict]:
    """Generates a completion per prompt in batches: one record per sample with its output, its length, whether it
    hit the budget, and its batch's speed (evaluation and the training probe check the format themselves).

    ``sampler`` (from build_sampler, with room for these prompts and ``ecfg.max_new_tokens``) is reused instead of
    building one, so repeated calls compile nothing new.
    """
    texts = [build_prompt(p["prompt"]) for p in prompts]
    prompt_len = padded_prompt_length(tokenizer, prompts)
    batch_size = min(ecfg.batch_size, len(texts))
    sampler = sampler or build_sampler(model, tokenizer, prompt_len, ecfg.max_new_tokens)
    stop_ids = [tokenizer.piece_to_id(END_OF_TURN), tokenizer.eos_id()]
    # Temperature 0 is the sampler's greedy mode; it takes top_p/top_k only for sampling.
    sampling = {} if ecfg.temperature <= 0 else dict(
        temperature=ecfg.temperature, top_p=ecfg.top_p, top_k=ecfg.top_k, seed=ecfg.seed)
    records = []
    for batch, start in enumerate(tqdm(range(0, len(texts), batch_size), desc=f"generate {name}", unit="batch",
                                       disable=not show_progress)):
        chunk = texts[start:start + batch_size]
        began = time.perf_counter()
        out = sampler(chunk + chunk[-1:] * (batch_size - len(chunk)), max_generation_steps=ecfg.max_new_tokens,
                      max_prompt_length=prompt_len, eos_tokens=stop_ids,
                      forbidden_tokens=undecodable_ids(tokenizer, model), **sampling)
        seconds = time.perf_counter() - began
        # The sampler cuts each output before its first stop token: a full-length output never stopped.
        lengths = [len(tokens) for tokens in out.tokens[:len(chunk)]]
        for prompt, text, length in zip(prompts[start:start + batch_size], out.text, lengths, strict=False):
            records.append({"model": name, "domain": prompt["domain"], "prompt": prompt["prompt"], "output": text,
                            "truncated": length >= ecfg.max_new_tokens, "generated_tokens": length,
                            "batch": batch, "tokens_per_s": sum(lengths) / seconds})
    return records


# ----------------------------------------------------------------------------- FLOPs


def flops_per_token(model_cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: forward 2N plus input gradients 2N through the frozen matmuls
    (no weight gradients), and attention's score/value matmuls forward plus twice that backward."""
    mc = gemma_config(model_cfg)
    attn = mc.num_layers * (mc.embed_dim * mc.head_dim * (2 * mc.num_heads + 2 * mc.num_kv_heads))
    mlp = mc.num_layers * 3 * mc.embed_dim * mc.hidden_dim
    matmul_params = attn + mlp + mc.num_embed * mc.embed_dim  # the embedding also projects to logits
    attention = 4 * mc.num_layers * mc.num_heads * mc.head_dim * seq_len
    return 4 * matmul_params + 3 * attention


def device_peak_flops(device_kind: str) -> float | None:
    """One device's peak from PEAK_FLOPS, by the longest key its device_kind starts with (None if unknown)."""
    known = [kind for kind in PEAK_FLOPS if device_kind.startswith(kind)]
    return PEAK_FLOPS[max(known, key=len)] if known else None


def peak_flops(cfg: Config) -> float | None:
    """Peak FLOP/s of all devices together: ``run.peak_flops_per_device`` if set, else looked up by device kind."""
    per_device = cfg.run.peak_flops_per_device or device_peak_flops(jax.devices()[0].device_kind)
    return per_device * jax.device_count() if per_device else None



# ----------------------------------------------------------------------------- LoRA weights of a run directory


def lock_run(run_dir: Path) -> None:
    """One run directory, one writer: an OS lock on ``run_dir/run.lock`` that this process holds until
    ``unlock_run`` or its death (the OS drops it even on SIGKILL, so a killed run never blocks its re-run).
    A second process stops at once with one line naming the holder."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _HELD_LOCKS:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = _try_lock(run_dir)
    if isinstance(handle, str):
        raise ConfigError(f"{run_dir} is being trained by {handle}: wait for it to finish or stop it, "
                          f"or pass another --out")
    _HELD_LOCKS[run_dir] = handle


def unlock_run(run_dir: Path) -> None:
    handle = _HELD_LOCKS.pop(Path(run_dir).resolve(), None)
    if handle is not None:
        handle.close()


def _try_lock(run_dir: Path) -> Any:
    """The locked, holder-stamped lock file, or the holder's description when another process has it."""
    handle = (run_dir / RUN_LOCK).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        return holder
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
    handle.flush()
    return handle


def _step_numbers(ckpt_dir: Path) -> list[int]:
    """Step directories, newest first (set-aside ``<step>.damaged-*`` and orbax temporaries are not steps)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((int(p.name) for p in ckpt_dir.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True)


def _checkpoint_manager(ckpt_dir: Path) -> ocp.CheckpointManager:
    """A manager that only reads (its default options neither save nor clean anything up)."""
    return ocp.CheckpointManager(ckpt_dir.resolve(), item_handlers={
        item: ocp.PyTreeCheckpointHandler() for item in CHECKPOINT_ITEMS})


# Checkpoints this process has read back whole, by (metadata path, its mtime): each is read once, not once per
# caller (evaluation asks for its step, then restores it).
_READ_BACK_WHOLE: set[tuple[Path, int]] = set()


def checkpoint_problem(ckpt_dir: Path, step: int) -> str | None:
    """Why checkpoint ``step`` cannot be resumed from, or None when all of it reads back: its metadata with the
    data position and step plan, and every array of the LoRA weights and the optimizer state."""
    metadata_path = ckpt_dir / str(step) / "_CHECKPOINT_METADATA"
    try:
        read_back = (metadata_path, metadata_path.stat().st_mtime_ns)
        if read_back in _READ_BACK_WHOLE:
            return None
        custom = json.loads(metadata_path.read_text())["custom_metadata"]
    except (OSError, ValueError, TypeError, KeyError) as err:
        return f"its _CHECKPOINT_METADATA does not read ({type(err).__name__})"
    if not isinstance(custom, dict) or any(key not in custom for key in RESUME_METADATA):
        return "its _CHECKPOINT_METADATA lacks the data position and step plan"
    try:
        with _checkpoint_manager(ckpt_dir) as mgr:
            saved = mgr.item_metadata(step)
            mgr.restore(step, args=ocp.args.Composite(**{item: ocp.args.PyTreeRestore(restore_args=jax.tree.map(
                lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved[item], is_leaf=lambda x: hasattr(x, "shape")))
                for item in CHECKPOINT_ITEMS}))
    except Exception as err:  # orbax and tensorstore fail in many ways; any of them means damage
        return f"it does not read back: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"
    _READ_BACK_WHOLE.add(read_back)
    return None


def _set_aside(run_dir: Path, step: int, reason: str) -> None:
    """Renames a damaged step directory out of the way (never deletes it), unless another process is writing
    the run; either way says so in one line."""
    run_dir = Path(run_dir)
    step_dir = run_dir / CHECKPOINT_SUBDIR / str(step)
    where = f"checkpoint {step_dir} cannot be restored ({reason})"
    held = run_dir.resolve() in _HELD_LOCKS
    handle = None if held else _try_lock(run_dir)
    if isinstance(handle, str):
        print(f"{where}: skipped; not set aside while {handle} trains into {run_dir}")
        return
    try:
        target = step_dir.with_name(f"{step}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
        step_dir.rename(target)
        print(f"{where}: set aside as {target}")
    finally:
        if handle is not None:
            handle.close()


def good_steps(run_dir: Path, newest_only: bool = True) -> list[int]:
    """Checkpoint steps of a run that read back whole, newest first (only the newest by default). Damaged
    ones met on the way are reported and set aside, so training, evaluation, export and --init-from all
    resume from the newest good checkpoint."""
    ckpt_dir, good = Path(run_dir) / CHECKPOINT_SUBDIR, []
    for step in _step_numbers(ckpt_dir):
        if (reason := checkpoint_problem(ckpt_dir, step)) is not None:
            _set_aside(run_dir, step, reason)
            continue
        good.append(step)
        if newest_only:
            break
    return good


def latest_step(run_dir: Path) -> int | None:
    """The newest checkpoint of a run that can be restored, or None."""
    return next(iter(good_steps(run_dir)), None)


def checkpoint_step(run_dir: str | Path, step: int | None = None) -> int:
    """The checkpoint step to load from a run directory (its newest good one by default), checked before any
    model is built: a missing run, checkpoint or step stops with one line."""
    run_dir = existing_run_dir(run_dir)
    steps = good_steps(run_dir, newest_only=step is None)
    if not steps:
        raise ConfigError(f"no checkpoint that can be restored in {run_dir / CHECKPOINT_SUBDIR}: train first "
                          f"with `python train_sft.py --out {run_dir}` or point at another run directory")
    if step is not None and step not in steps:
        raise ConfigError(f"{run_dir} has no checkpoint at step {step} that can be restored: it has steps "
                          f"{sorted(steps)}")
    return steps[0] if step is None else step


def restore_lora(model: nnx.Module, run_dir: str | Path, step: int | None = None) -> int:
    """Loads the LoRA weights of another run directory into model; returns the step it loaded.

    Stops with one line naming both sides when the checkpoint is missing or was trained for
    another model size or LoRA rank.
    """
    run_dir = Path(run_dir)
    step = checkpoint_step(run_dir, step)
    target = nnx.state(model, nnx.LoRAParam)
    with _checkpoint_manager(run_dir / CHECKPOINT_SUBDIR) as mgr:
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
    ours = json.loads((Path(data_dir) / "manifest.json").read_text())  # data_dir is prepared by now
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



# ----------------------------------------------------------------------------- LoRA merge

# Weights on the host by their NNX path, as export writes them.
Params = dict[tuple[str | int, ...], np.ndarray]



def lora_delta(module: nnx.Module, weight: str, lora_a: jax.Array, lora_b: jax.Array) -> jax.Array:
    """A @ B laid out like the module's weight (before the alpha/rank scale).

    qwix gives an ``Einsum`` A over the weight's axes the input shares (then rank) and B over
    rank then the remaining axes, both in the weight's axis order; an ``nnx.Linear`` kernel gets
    plain (in, rank) @ (rank, out).
    """
    if not hasattr(module, "einsum_str"):
        return (lora_a @ lora_b).reshape(getattr(module, weight).shape)
    lhs, rhs = module.einsum_str.split("->")[0].split(",")
    a_axes = "".join(c for c in rhs if c in lhs)
    b_axes = "".join(c for c in rhs if c not in lhs)
    return jnp.einsum(f"{a_axes}r,r{b_axes}->{rhs}", lora_a, lora_b)


def merged_params(model: nnx.Module, alpha: float, rank: int) -> Params:
    """Every base weight of a LoRA model, with its LoRA delta (scaled by alpha/rank) added, on the host.

    The sum is taken in float32 and stored in the base weight's dtype, so a bf16 model stays bf16.
    """
    base_weights = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))  # LoRAParam is a Param subclass
    params = {path: v.get_value() for path, v in nnx.state(model, base_weights).flat_state()}
    loras = {path: v.get_value() for path, v in nnx.state(model, nnx.LoRAParam).flat_state()}
    for path, lora_a in loras.items():
        if not str(path[-1]).endswith("_lora_a"):
            continue
        weight = str(path[-1]).removesuffix("_lora_a")
        target = (*path[:-1], weight)
        module = functools.reduce(lambda m, k: m[k] if isinstance(k, int) else getattr(m, k), path[:-1], model)
        delta = lora_delta(module, weight, lora_a.astype(jnp.float32), loras[(*path[:-1], f"{weight}_lora_b")]
                           .astype(jnp.float32))
        base = params[target]
        params[target] = (base.astype(jnp.float32) + delta * (alpha / rank)).astype(base.dtype)
    return {path: np.asarray(jax.device_get(value)) for path, value in params.items()}
