"""The model: everything that describes Gemma + LoRA, apart from the training loop.

One code path for Gemma2 and Gemma3 (Tunix's ``tunix.models.gemma`` and ``gemma3``, chosen by ``model.name``):
config -> abstract Gemma (``nnx.eval_shape``) -> base weights restored straight into their shards
(the Kaggle Flax checkpoint, converted once to an NNX cache, or random weights for the tiny model)
-> qwix LoRA -> the forward pass with a packed-row attention mask -> the loss -> generation -> FLOPs
-> the LoRA merge that export writes (a run's LoRA weights are restored by ``rundir.restore_lora``).

Training (``train_sft.py``), evaluation (``eval_samples.py``) and export (``export.py``) all get their
model from here.
"""

from __future__ import annotations

import dataclasses
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
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from tqdm import tqdm
from tunix.generate.sampler import CacheConfig, Sampler
from tunix.generate.utils import next_power_of_2
from tunix.models.gemma import model as gemma_lib
from tunix.models.gemma import params as gemma_params
from tunix.models.gemma3 import model as gemma3_lib
from tunix.models.gemma3 import params as gemma3_params

import tunix_adapter
from chat_format import END_OF_TURN, build_prompt, tokens_after_answer
from config import (
    LORA_MODULES,
    REAL_MODEL_SIZES,
    Config,
    ConfigError,
    EvalConfig,
    ModelConfig,
    RunConfig,
    model_family,
)
from kaggle_weights import kaggle_checkpoint_dir

# Peak dense bf16 FLOP/s of one device, by the start of its jax device_kind (the longest match wins), for model
# FLOPs utilisation. NVIDIA's kinds carry the memory and form factor ("NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB
# HBM3"): the A100s all peak at 312e12; an H100 or H200 at 989e12 in SXM form, less as PCIe or NVL cards.
PEAK_FLOPS = {"TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v4": 275e12, "TPU v5p": 459e12,
              "TPU v6 lite": 918e12, "NVIDIA A100": 312e12, "NVIDIA H100": 989e12, "NVIDIA H100 PCIe": 756e12,
              "NVIDIA H100 NVL": 835e12, "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12}



# ----------------------------------------------------------------------------- mesh and model


def maybe_initialize_distributed(r: RunConfig) -> None:
    """Joins the other JAX processes of a multi-host run (before JAX touches a device): ``run.coordinator`` names
    process 0, or "auto" lets JAX find a TPU pod slice's hosts (GKE and Slurm also announce themselves in the
    environment). A process that stops answering for ``run.heartbeat_timeout_s`` ends every other one: the runtime
    aborts them with "Terminating process because the JAX distributed service detected fatal errors", naming the
    silent task (tests/test_multihost.py)."""
    coordinator = r.coordinator or ("auto" if os.environ.get("JAX_COORDINATOR_ADDRESS")
                                    or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") else "")
    if not coordinator:
        return
    timeouts = dict(initialization_timeout=r.join_timeout_s, heartbeat_timeout_seconds=r.heartbeat_timeout_s,
                    shutdown_timeout_seconds=r.join_timeout_s)
    if coordinator == "auto":
        jax.distributed.initialize(**timeouts)
    else:
        _check_coordinator(coordinator, r.process_id, r.join_timeout_s)
        jax.distributed.initialize(coordinator, r.num_processes, r.process_id, **timeouts)
    print(f"process {jax.process_index()} of {jax.process_count()} joined the run ({jax.local_device_count()} "
          f"local devices of {jax.device_count()})", flush=True)


def _check_coordinator(address: str, process_id: int, timeout_s: float) -> None:
    """The runtime aborts with a stack trace when it cannot reach the coordinator: check first, with one line.
    Process 0 must be able to listen on the port; the others wait up to timeout_s for it to listen."""
    host, port = address.rsplit(":", 1)
    if process_id == 0:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            try:
                probe.bind(("", int(port)))
            except OSError as err:
                raise ConfigError(f"process 0 cannot listen on port {port} of --run.coordinator {address} "
                                  f"({err.strerror}): pick a free port") from None
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=min(5.0, timeout_s)).close()
            return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise ConfigError(f"process {process_id} cannot reach the coordinator {address} (process 0) after "
                                  f"{timeout_s:.0f} s ({err.strerror or err}): start process 0 with the same "
                                  f"--run.coordinator, or fix the address") from None
            time.sleep(0.5)


def wait_for_all_processes(name: str, timeout_s: float, waiting_for: str) -> None:
    """A barrier of every process (nothing with one process); a wait longer than timeout_s stops with one line."""
    if jax.process_count() == 1:
        return
    try:
        ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=int(timeout_s * 1000))
    except jax.errors.JaxRuntimeError as err:
        raise ConfigError(f"process {jax.process_index()} waited {timeout_s:.0f} s for {waiting_for} in vain "
                          f"({str(err).splitlines()[0][:120]}): see process 0's output") from None


def process_rows(sharding: jax.sharding.Sharding, batch_size: int) -> np.ndarray:
    """The rows of a [batch_size, ...] global batch that this process's devices hold, in the order
    ``jax.make_array_from_process_local_data`` expects this process's rows (by their first global row)."""
    shard_rows = sharding.shard_shape((batch_size,))[0]
    starts = sorted({index[0].start or 0 for index in sharding.addressable_devices_indices_map((batch_size,)).values()})
    return np.concatenate([np.arange(start, start + shard_rows) for start in starts])


def global_batch(local: dict[str, np.ndarray], sharding: jax.sharding.Sharding, batch_size: int
                 ) -> dict[str, jax.Array]:
    """One global batch from every process's own rows (``process_rows``). Tunix's own helper infers the global
    shape from the local one and replicates a batch whose local rows do not divide by the mesh (4 rows on fsdp 8)."""
    return {name: jax.make_array_from_process_local_data(sharding, rows, (batch_size, *rows.shape[1:]))
            for name, rows in local.items()}


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
            map_key_fn=tunix_adapter.map_linen_var_names,  # from_params knows only the published sizes
            assign_val_fn=tunix_adapter.assign_linen_params_to_nnx_state)
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


# ----------------------------------------------------------------------------- fused attention (splash)
# Everything that changes Tunix's Gemma2 attention lives in this section. Tunix 0.1.7's ``Attention.block`` computes
# [batch, heads, T, S] scores, their soft-cap, mask and softmax in HBM; with ``model.attention`` "splash" the
# training and eval-loss forward passes (no KV cache) hand that part to JAX's Pallas TPU splash kernel instead.
# The model gets the packed rows' segment ids (a ``PackedSegments``) where Tunix takes its [B, T, S] mask; with a
# cache (decoding) or a mask (the "xla" setting) the swapped method is Tunix's own, unchanged.
# tunix_adapter.py pins the Tunix version and the source of the method replaced here (its ``ATTENTION_BLOCK``).


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedSegments:
    """Segment ids [B, T] of packed rows (0 = padding), given to the model in place of an attention mask: it runs
    the splash kernel with blocks of ``block`` positions (fewer when the window is shorter)."""

    ids: jax.Array
    block: int = dataclasses.field(metadata={"static": True})


def _context_mesh() -> Any:
    """The mesh the step runs under: Tunix's legacy ``with mesh:`` (the trainer) or ``jax.set_mesh``; None outside."""
    mesh = tunix_adapter.legacy_mesh()
    mesh = jax.sharding.get_abstract_mesh() if mesh.empty else mesh
    return None if mesh.empty else mesh


def splash_attention(query: jax.Array, key: jax.Array, value: jax.Array, segments: PackedSegments,
                     window: int | None, soft_cap: float | None, spec: tuple[str | None, ...]) -> jax.Array:
    """Causal attention of packed rows, [B, T, N, H] pre-scaled queries over [B, T, K, H] keys and values (GQA:
    N a multiple of K), within each row only, and within ``window`` positions of the query when it is set.

    Under a mesh each device runs the kernel on its own rows (and heads), sharded as ``spec`` ([B, T, N, H])
    says. The kernel is built per trace: one kept across traces holds its mask as arrays of another trace. It
    runs in interpret mode where the devices are CPUs (the tests), and refuses GPUs (it is a TPU kernel)."""
    mesh = _context_mesh()
    platform = mesh.abstract_mesh.abstract_device.platform if mesh is not None else jax.default_backend()
    if platform not in ("tpu", "cpu"):
        raise ConfigError(f"--model.attention splash is a TPU kernel and cannot run on {platform}: use "
                          "--model.attention xla")
    length = query.shape[1]
    block = min(segments.block, length)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)

    def attend(q: jax.Array, k: jax.Array, v: jax.Array, ids: jax.Array) -> jax.Array:
        shape = (length, length)
        mask = splash_mask.LocalMask(shape, (window - 1, 0), 0) if window else splash_mask.CausalMask(shape)
        kernel = splash.make_splash_mha(splash_mask.MultiHeadMask([mask] * q.shape[2]), block_sizes=sizes,
                                        attn_logits_soft_cap=soft_cap, head_shards=1, q_seq_shards=1,
                                        interpret=platform == "cpu")

        def one_row(q: jax.Array, k: jax.Array, v: jax.Array, ids: jax.Array) -> jax.Array:
            out = kernel(q.swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1), segment_ids=splash.SegmentIds(ids, ids))
            return out.swapaxes(0, 1)

        return jax.vmap(one_row)(q, k, v, ids)

    if mesh is None:
        return attend(query, key, value, segments.ids)
    spec = tuple(axis if axis in mesh.axis_names else None for axis in spec)
    heads, rows = jax.sharding.PartitionSpec(*spec), jax.sharding.PartitionSpec(*spec[:2])
    return jax.shard_map(attend, mesh=mesh, in_specs=(heads, heads, heads, rows), out_specs=heads,
                         check_vma=False)(query, key, value, segments.ids)


def _attention_block(self: gemma_lib.Attention, x: jax.Array, segment_pos: jax.Array, cache: Any,
                     attn_mask: jax.Array | PackedSegments) -> tuple[Any, jax.Array]:
    """Tunix's ``Attention.block`` with its scores, soft-cap, mask, softmax and value sum done by
    ``splash_attention`` when given ``PackedSegments`` without a cache; Tunix's own method otherwise."""
    if not isinstance(attn_mask, PackedSegments):
        return tunix_adapter.ATTENTION_BLOCK(self, x, segment_pos, cache, attn_mask)
    if cache is not None:
        raise ValueError("packed segment ids are for cache-free forward passes: decode with Tunix's mask")
    # As Tunix 0.1.7 computes them: projections (qwix adds LoRA to these einsums), RoPE, the query scale.
    if self.use_qkv_einsum:
        query_proj, key_proj, value_proj = self.qkv_einsum(x)
    else:
        query_proj = self.q_einsum(x)
        key_proj, value_proj = self.kv_einsum(x)
    query_proj = gemma_lib.shard(query_proj, self.shd_config.act_btnh)
    key_proj = gemma_lib.shard(key_proj, self.shd_config.act_btnh)
    value_proj = gemma_lib.shard(value_proj, self.shd_config.act_btnh)
    query_scaled = gemma_lib.apply_rope(query_proj, segment_pos, head_dim=self.head_dim) * self.head_dim**-0.5
    key_proj = gemma_lib.apply_rope(key_proj, segment_pos, head_dim=self.head_dim)
    window = self.sliding_window_size if self.attn_type == gemma_lib.AttentionType.LOCAL_SLIDING else None
    encoded = splash_attention(query_scaled, key_proj, value_proj, attn_mask, window, self.attn_logits_soft_cap,
                               self.shd_config.act_btnh)
    attn_output = self.attn_vec_einsum(encoded)
    return None, gemma_lib.shard(attn_output, self.shd_config.act_btd)


gemma_lib.Attention.block = _attention_block


# ----------------------------------------------------------------------------- loss


def packed_attention_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, L, L] causal mask that keeps each packed row to itself; padding (segment 0) attends to nothing."""
    same_row = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = jnp.tril(jnp.ones((segment_ids.shape[1],) * 2, dtype=jnp.bool_))
    return same_row & causal[None] & (segment_ids > 0)[:, :, None]


def gen_model_input(batch: dict[str, Any], attention: str = ModelConfig.attention,
                    attention_block: int = ModelConfig.attention_block) -> dict[str, Any]:
    """Batch from the loader -> keyword arguments of the loss (runs inside the jitted step). The attention mask
    is Tunix's [B, L, L] one ("xla") or the segment ids themselves for the splash kernel ("splash")."""
    segment_ids = batch["segment_ids"]
    mask = (PackedSegments(segment_ids, attention_block) if attention == "splash"
            else packed_attention_mask(segment_ids))
    return {"tokens": batch["tokens"], "loss_mask": batch["loss_mask"], "positions": batch["positions"],
            "attention_mask": mask}


def make_gen_model_input(model_cfg: ModelConfig) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """``gen_model_input`` with the configured attention, for ``PeftTrainer.with_gen_model_input_fn``."""
    return functools.partial(gen_model_input, attention=model_cfg.attention,
                             attention_block=model_cfg.attention_block)


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


def row_loss_chunk(loss_chunk: int, positions: int) -> int:
    """The chunk the loss takes on rows of ``positions`` predicted positions: ``loss_chunk``, but at most a
    quarter of a row; 0 (the full logits) when ``loss_chunk`` is 0 or one chunk would cover the row. A chunk's
    backward holds about five [chunk, vocab] blocks against under three row-sized ones for the full loss, so a
    chunk of half a row or more costs as much as the full logits (benchmarks/results_loss_memory.md)."""
    chunk = min(loss_chunk, -(-positions // 4))
    return chunk if 0 < chunk < positions else 0


def nll_sums(model: nnx.Module, tokens: jax.Array, loss_mask: jax.Array, positions: jax.Array,
             attention_mask: jax.Array, loss_chunk: int) -> tuple[jax.Array, jax.Array]:
    """(sum of the loss tokens' NLL, number of loss tokens). ``loss_chunk`` positions per row at a time
    (``chunked_nll_sum``, as ``row_loss_chunk`` fits it to the row), or 0 for the full [B, L, vocab] logits."""
    weights = loss_mask[:, 1:].astype(jnp.float32)
    loss_chunk = row_loss_chunk(loss_chunk, weights.shape[1])
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


@functools.partial(nnx.jit, static_argnames=("loss_chunk", "attention", "attention_block"))
def _batch_nll_sums(model: nnx.Module, batch: dict[str, jax.Array], loss_chunk: int, attention: str,
                    attention_block: int) -> tuple[jax.Array, jax.Array]:
    return nll_sums(model, **gen_model_input(batch, attention, attention_block), loss_chunk=loss_chunk)


def evaluate_loss(model: nnx.Module, batches: list[dict[str, np.ndarray]],
                  loss_chunk: int = ModelConfig.loss_chunk, attention: str = ModelConfig.attention,
                  attention_block: int = ModelConfig.attention_block) -> dict[str, float]:
    """Token-weighted eval loss and perplexity over batches, without training."""
    total, count = 0.0, 0.0
    for batch in batches:
        nll_sum, weight_sum = _batch_nll_sums(model, batch, loss_chunk, attention, attention_block)
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
        outputs = [[int(t) for t in tokens] for tokens in out.tokens[:len(chunk)]]
        lengths = [len(tokens) for tokens in outputs]
        for prompt, text, tokens in zip(prompts[start:start + batch_size], out.text, outputs, strict=False):
            records.append({"model": name, "domain": prompt["domain"], "prompt": prompt["prompt"], "output": text,
                            "truncated": len(tokens) >= ecfg.max_new_tokens, "generated_tokens": len(tokens),
                            "tokens_after_answer": tokens_after_answer(tokens, tokenizer.decode),
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
