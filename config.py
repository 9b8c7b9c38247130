"""Every setting of the pipeline: plain dataclasses, named presets, command-line overrides.

The presets share one code path and differ only in the model, sizes, devices and where the
weights come from:

- ``kaggle``: Gemma2-2B-it on a TPU v5e-8, 180k kept glaiveai rows (streamed from row 0), 4 epochs, lr 2e-5.
- ``kaggle-gemma3``: the same run with Gemma3-1B-it, the hackathon's other model (XLA's attention).
- ``gpu`` / ``gpu-gemma3``: the same runs on one NVIDIA GPU of the 80 GB class (A100, H100, H200), no time budget.
- ``unrestricted``: continues a ``kaggle`` (or, with ``--init-from runs/kaggle-gemma3``, a ``kaggle-gemma3``)
  run's LoRA on 100k kept rows that start where that run's preparation stopped reading, lr 5e-6; the model is
  the one that run trained.
- ``cpu-tiny`` / ``cpu-tiny-gemma3``: a tiny random Gemma2- / Gemma3-architecture model on the shipped sample,
  on a CPU.

Any field can be overridden as ``--section.field value`` (or ``--section.field=value``);
a few common ones have short flags (``--out``, ``--data``, ``--max-steps``, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_DIR = Path(__file__).resolve().parent
ASSETS_DIR = REPO_DIR / "assets"
SAMPLE_PATH = ASSETS_DIR / "glaiveai_sample.jsonl"
TINY_TOKENIZER_PATH = ASSETS_DIR / "tiny_tokenizer.model"

LORA_MODULES = ".*q_einsum|.*kv_einsum|.*gate_proj|.*down_proj|.*up_proj|.*attn_vec_einsum"
# Each model's architecture, i.e. Tunix's modelling code (tunix.models.gemma, tunix.models.gemma3): the two models
# the hackathon allows, and a tiny random model of each architecture (sizes from ModelConfig's fields).
MODEL_FAMILIES = {"gemma2-2b-it": "gemma2", "gemma3-1b-it": "gemma3", "tiny": "gemma2", "tiny-gemma3": "gemma3"}
# The real models' sizes that the settings are checked against (Tunix's ModelConfig.gemma2_2b_it() and
# gemma3_1b_it()); vocab_size is the embedding's rows (Tunix pads Gemma2's 256,000 pieces to 256,128).
REAL_MODEL_SIZES = {
    "gemma2-2b-it": {"num_layers": 26, "vocab_size": 256_128, "embed_dim": 2304, "num_heads": 8, "num_kv_heads": 4,
                     "sliding_window": 4096},
    "gemma3-1b-it": {"num_layers": 26, "vocab_size": 262_144, "embed_dim": 1152, "num_heads": 4, "num_kv_heads": 1,
                     "sliding_window": 512},
}
# Each architecture's Kaggle Flax weights (the tiny model of an architecture names its folders the same way).
KAGGLE_HANDLES = {"gemma2": "google/gemma-2/flax/gemma2-2b-it", "gemma3": "google/gemma-3/flax/gemma3-1b-it"}
EXPORT_FORMATS = ("orbax", "hf")


class ConfigError(ValueError):
    """A bad setting: stops the program before any heavy work, with one line naming the fix."""


@dataclass
class ModelConfig:
    """Which Gemma to build and where its weights and tokenizer come from."""

    # "gemma2-2b-it" or "gemma3-1b-it" (Kaggle weights), or "tiny" / "tiny-gemma3" (random init, sizes below).
    name: str = "gemma2-2b-it"
    # Empty means the model's own (KAGGLE_HANDLES).
    kaggle_handle: str = ""
    # A local copy of the Kaggle Flax download; empty means download with kagglehub.
    checkpoint_dir: str = ""
    # sentencepiece model; empty means the one in the Kaggle download.
    tokenizer_path: str = ""
    dtype: str = "bfloat16"
    # Where the Kaggle checkpoint, converted once to an NNX checkpoint, is cached.
    cache_dir: str = "~/.cache/tunix_sft"
    # Activation rematerialisation: "none", "block" or "decoder".
    remat: str = "none"
    # Positions of each row whose logits the loss computes at once (one [micro-batch, loss_chunk, vocab] block,
    # forward and backward, instead of the whole [micro-batch, max_len, vocab]); 0 = all at once (the old loss).
    # At most a quarter of a row is used (model.row_loss_chunk): a larger chunk costs as much as the full logits.
    loss_chunk: int = 512
    # Attention of the training and eval-loss forward passes: "xla" (Tunix's own, [B, heads, T, T] scores in HBM)
    # or "splash" (JAX's Pallas TPU splash kernel, fused; a TPU kernel, run interpreted on a CPU; model.py; Gemma2
    # only: its swapped attention block is Gemma2's).
    attention: str = "xla"
    # Query and key positions per splash kernel block (a multiple of 128 that divides max_len, or above it).
    attention_block: int = 512
    # Sizes of the tiny models (ignored for the real ones).
    num_layers: int = 4
    vocab_size: int = 2048
    embed_dim: int = 128
    hidden_dim: int = 512
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    sliding_window: int = 512
    init_seed: int = 0


def model_family(model_cfg: ModelConfig) -> str:
    """The model's architecture: "gemma2" or "gemma3" (MODEL_FAMILIES)."""
    return MODEL_FAMILIES[model_cfg.name]


@dataclass
class LoraConfig:
    rank: int = 64
    alpha: float = 64.0
    # Regex full-matched against module paths such as ``layers/0/attn/q_einsum``.
    module_path: str = LORA_MODULES


@dataclass
class DataConfig:
    """Where rows come from and how they become packed, tokenized training windows."""

    # A Hugging Face dataset name (streamed) or a local .jsonl / .parquet file.
    source: str = "glaiveai/reasoning-v1-20m"
    split: str = "train"
    # Row range [start, stop) of the source that may be read; stop 0 = to the end.
    start: int = 0
    stop: int = 0
    # Kept training rows wanted: reading stops once this many plus eval_rows are kept (0 = every usable row).
    num_rows: int = 180_000
    # Rows held out for eval loss and evaluation prompts, kept on top of num_rows.
    eval_rows: int = 256
    # A prepared data directory, or a run directory (its config.json records the data manifest): this
    # preparation starts at the row where that one stopped reading (its source_rows' next), instead of start.
    continue_from: str = ""
    max_len: int = 2048
    pack: bool = True
    # Rows the packer holds at once while it fills windows best-fit.
    pack_buffer: int = 2048
    # Prepared data directory (arrays + manifest.json + stats.json).
    out_dir: str = "data/kaggle"
    # Threads sentencepiece tokenizes each batch of rows with (0 = one).
    num_workers: int = 0
    seed: int = 0


@dataclass
class OptimConfig:
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.03
    # Cosine decay from learning_rate down to learning_rate * end_lr_ratio.
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    grad_clip: float = 1.0


@dataclass
class RunConfig:
    """The training run: batch, steps, time budget, mesh, checkpoints, logging."""

    out_dir: str = "runs/kaggle"
    micro_batch: int = 8
    grad_accum: int = 4
    epochs: float = 4.0
    # 0 = dynamic: ceil(epochs * packed rows / effective batch), capped by the time budget.
    max_steps: int = 0
    # Wall-clock minutes the training loop may use (0 = no limit); leaves margin in a 9 h session.
    time_budget_min: float = 480.0
    # Steps timed before the time-budget cap is estimated.
    budget_probe_steps: int = 5
    # False: one session; the plan (and its LR schedule) is cut to end inside the time budget. True: the plan
    # spans all the data whatever the budget; each session trains until its deadline and saves, and re-running
    # the same command continues until the plan is done.
    multi_session: bool = False
    # Seconds kept back for the final checkpoint until a save has been timed (then twice the slowest save).
    save_reserve_s: float = 60.0
    # Seconds between plain progress lines when stdout is not a terminal (logs, notebooks); 0 = none.
    log_every_s: float = 60.0
    eval_every: int = 200
    eval_batches: int = 8
    checkpoint_every_steps: int = 200
    checkpoint_every_min: float = 30.0
    checkpoints_to_keep: int = 2
    mesh_fsdp: int = 8
    mesh_tp: int = 1
    # Another run directory whose LoRA weights start this run (fresh optimizer).
    init_from: str = ""
    seed: int = 0
    # JAX's persistent compilation cache, so that a resumed session loads the compiled steps instead of
    # compiling them again; empty = <run.out_dir>/jax_cache.
    compile_cache_dir: str = ""
    # Peak bf16 FLOP/s of one device, for model FLOPs utilisation (0 = look it up).
    peak_flops_per_device: float = 0.0
    # Several JAX processes (the hosts of a TPU pod slice, or several processes on one machine): process 0's
    # "host:port", or "auto" for JAX's own detection (TPU pod slices, Slurm, Open MPI); empty = one process, unless
    # the environment announces several (JAX_COORDINATOR_ADDRESS, TPU_WORKER_HOSTNAMES).
    coordinator: str = ""
    num_processes: int = 1
    process_id: int = 0
    # Seconds for every process to join (and to leave at the end), and of silence after which a process counts as
    # dead and every other one stops (the distributed runtime's heartbeat).
    join_timeout_s: int = 300
    heartbeat_timeout_s: int = 100
    # Minutes the other processes wait for process 0 to prepare the data.
    data_wait_min: float = 120.0


@dataclass
class EvalConfig:
    """Generation settings; the defaults are the hackathon template's evaluation decoding (INF_TEMPERATURE 0,
    INF_TOP_K 1, INF_TOP_P None, which here is 1.0: no nucleus cut, SEED 42)."""

    # Generation budget in new tokens; 0 = derived from the prepared data (its longest kept completion,
    # rounded up: data_prep.generation_budget), so that answers get the length they were trained on.
    max_new_tokens: int = 0
    temperature: float = 0.0
    top_k: int = 1
    top_p: float = 1.0
    seed: int = 42
    batch_size: int = 8
    # JSONL or text file of prompts; empty = the shipped prompt set (or held-out rows for tiny).
    prompts: str = ""
    # Use only the first N prompts (0 = all of them).
    num_prompts: int = 0
    # During training: greedy generations for held-out prompts every N steps, at step 0 and at the end, logged as
    # format compliance, truncation rate and mean length (0 = off).
    generate_every: int = 1000
    # How many held-out prompts (the first of the prepared data's eval_prompts.jsonl) those generations use.
    generate_prompts: int = 8


@dataclass
class Config:
    preset: str = "kaggle"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def effective_batch(self) -> int:
        return self.run.micro_batch * self.run.grad_accum

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _kaggle() -> Config:
    """Splash attention, no remat, loss chunks of 256 and micro-batch 16 x 2 accumulation (effective 32): the
    fastest setting measured at max_len 2048 that fits a v5e chip with at least 1.5 GiB to spare (compiled ahead of
    time, loops counted per trip; benchmarks/results_tpu_fit.md, section "Loops counted per trip")."""
    cfg = Config(preset="kaggle")
    cfg.model.remat = "none"
    cfg.model.attention = "splash"
    cfg.model.loss_chunk = 256
    cfg.run.micro_batch, cfg.run.grad_accum = 16, 2
    return cfg


def _kaggle_gemma3() -> Config:
    """kaggle with Gemma3-1B-it: the same data, batch, steps, schedule and loss chunks of 256 (faster than 512 with
    loops counted per trip, and smaller), with XLA's attention (splash runs Gemma2's attention block);
    benchmarks/results_tpu_fit.md, section "Gemma3-1B-it", has what it needs on a v5e chip."""
    cfg = _kaggle()
    cfg.preset = "kaggle-gemma3"
    cfg.model.name = "gemma3-1b-it"
    cfg.model.attention = "xla"
    cfg.data.out_dir = "data/kaggle-gemma3"
    cfg.run.out_dir = "runs/kaggle-gemma3"
    return cfg


def _gpu(base: Callable[[], Config] = _kaggle, preset: str = "gpu") -> Config:
    """kaggle on one 80 GB NVIDIA GPU: micro-batch 4 x 8 accumulation (effective 32) with block remat needs
    about 31 GiB by the estimate in benchmarks/results_real_size.md; no session limit, so no time budget."""
    cfg = base()
    cfg.preset = preset
    cfg.data.out_dir = f"data/{preset}"
    cfg.run.out_dir = f"runs/{preset}"
    cfg.run.mesh_fsdp, cfg.run.mesh_tp = 1, 1
    cfg.run.micro_batch, cfg.run.grad_accum = 4, 8
    cfg.model.remat = "block"  # what the memory estimate assumes; not yet measured on a GPU
    cfg.model.attention = "xla"  # splash is a TPU kernel; no fused GPU attention has Gemma2's soft-cap
    cfg.run.time_budget_min = 0.0
    return cfg


def _gpu_gemma3() -> Config:
    """gpu with Gemma3-1B-it: its step needs less memory than Gemma2-2B's (11.6 against 14.1 GiB per v5e chip at
    the kaggle shapes, benchmarks/results_tpu_fit.md), so gpu's batch and remat are kept; not measured on a GPU."""
    return _gpu(_kaggle_gemma3, "gpu-gemma3")


def _unrestricted() -> Config:
    """Continues the run named by --init-from (runs/kaggle by default) with its model (``follow_init_from``)."""
    cfg = _kaggle()
    cfg.preset = "unrestricted"
    cfg.data.num_rows = 100_000
    cfg.data.continue_from = "runs/kaggle"  # the kaggle run records its preparation's source rows
    cfg.data.out_dir = "data/unrestricted"
    cfg.optim.learning_rate = 5e-6
    cfg.run.out_dir = "runs/unrestricted"
    cfg.run.init_from = "runs/kaggle"
    cfg.run.multi_session = True
    return cfg


def _cpu_tiny() -> Config:
    cfg = Config(preset="cpu-tiny")
    cfg.model.name = "tiny"
    cfg.model.dtype = "float32"
    cfg.model.tokenizer_path = str(TINY_TOKENIZER_PATH)
    cfg.model.cache_dir = ""
    cfg.lora.rank, cfg.lora.alpha = 16, 16.0
    cfg.data.source = str(SAMPLE_PATH)
    cfg.data.num_rows = 0
    cfg.data.eval_rows = 24
    cfg.data.max_len = 512
    cfg.data.pack_buffer = 256
    cfg.data.out_dir = "data/cpu-tiny"
    cfg.optim.learning_rate = 1e-2
    cfg.optim.warmup_ratio = 0.05
    cfg.run.out_dir = "runs/cpu-tiny"
    cfg.run.micro_batch, cfg.run.grad_accum = 4, 1
    cfg.run.epochs = 12.0
    cfg.run.time_budget_min = 30.0
    cfg.run.save_reserve_s = 5.0
    cfg.run.log_every_s = 10.0
    cfg.run.eval_every = 25
    cfg.run.eval_batches = 2
    cfg.run.checkpoint_every_steps = 50
    cfg.run.checkpoint_every_min = 5.0
    cfg.run.mesh_fsdp, cfg.run.mesh_tp = 1, 1
    cfg.eval.generate_every = 25
    return cfg


def _cpu_tiny_gemma3() -> Config:
    """cpu-tiny with Gemma3's architecture: six layers (its five local : one global pattern), one kv head (as
    Gemma3-1B) and a sliding window shorter than most rows, so that every Gemma3 feature runs at tiny size."""
    cfg = _cpu_tiny()
    cfg.preset = "cpu-tiny-gemma3"
    cfg.model.name = "tiny-gemma3"
    cfg.model.num_layers, cfg.model.num_kv_heads, cfg.model.sliding_window = 6, 1, 32
    cfg.data.out_dir = "data/cpu-tiny-gemma3"
    cfg.run.out_dir = "runs/cpu-tiny-gemma3"
    return cfg


PRESETS = {"kaggle": _kaggle, "kaggle-gemma3": _kaggle_gemma3, "gpu": _gpu, "gpu-gemma3": _gpu_gemma3,
           "unrestricted": _unrestricted, "cpu-tiny": _cpu_tiny, "cpu-tiny-gemma3": _cpu_tiny_gemma3}
# Presets that continue another run: the model is that run's, and the data starts where that run's stopped.
FOLLOW_INIT_FROM = ("unrestricted",)

# Short flags for the overrides people use most.
SHORT_FLAGS = {
    "--out": "run.out_dir",
    "--data": "data.out_dir",
    "--max-steps": "run.max_steps",
    "--time-budget-min": "run.time_budget_min",
    "--init-from": "run.init_from",
    "--prompts": "eval.prompts",
}
# The short flags each stage script reads: any other is an error there, never silently ignored. (The long
# ``--section.field`` overrides are the shared configuration: every stage takes them, so the same overrides
# can be passed to every stage.) eval_samples.py's and export.py's own --out is their output (stage_flags).
STAGE_SHORT_FLAGS = {
    "data_prep": ("--data",),
    "train_sft": ("--out", "--data", "--max-steps", "--time-budget-min", "--init-from"),
    "eval_samples": ("--data", "--prompts"),
    "export": (),
}


def _parse_value(text: str, current: Any, name: str) -> Any:
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{name} takes true or false, not {text!r}")
    for kind in (int, float):
        if isinstance(current, kind):
            try:
                return kind(text)
            except ValueError:
                raise ConfigError(f"--{name} takes a {kind.__name__}, not {text!r}") from None
    return text


def apply_override(cfg: Config, name: str, text: str) -> None:
    """Sets ``section.field`` of cfg from its command-line text, typed like the default."""
    section_name, _, field_name = name.partition(".")
    section = getattr(cfg, section_name, None)
    if not dataclasses.is_dataclass(section) or field_name not in {f.name for f in dataclasses.fields(section)}:
        known = ", ".join(f"--{f.name}.*" for f in dataclasses.fields(cfg) if f.name != "preset")
        raise ConfigError(f"unknown setting --{name}: use {known} or one of {', '.join(SHORT_FLAGS)}")
    setattr(section, field_name, _parse_value(text, getattr(section, field_name), name))


def get_config(preset: str, overrides: dict[str, str] | None = None) -> Config:
    """The named preset with ``{"section.field": "text"}`` overrides applied and validated."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[preset]()
    for name, text in (overrides or {}).items():
        apply_override(cfg, name, text)
    if preset in FOLLOW_INIT_FROM:
        follow_init_from(cfg, overrides or {})
    validate(cfg)
    return cfg


def follow_init_from(cfg: Config, overrides: dict[str, str]) -> None:
    """A run that continues another takes that run's model (from its config.json, when it has one) and reads the
    data after that run's, unless --model.name or --data.continue_from say otherwise: ``--init-from
    runs/kaggle-gemma3`` alone continues a Gemma3 run (with XLA's attention, as kaggle-gemma3 trains)."""
    if "data.continue_from" not in overrides and "data.start" not in overrides:
        cfg.data.continue_from = cfg.run.init_from
    path = Path(cfg.run.init_from).expanduser() / "config.json"
    if "model.name" in overrides or not path.is_file():
        return
    try:
        name = json.loads(path.read_text())["model"]["name"]
    except (ValueError, KeyError, TypeError):
        return  # check_saved_run names the unreadable config.json
    if name in REAL_MODEL_SIZES:
        cfg.model.name = name
        if model_family(cfg.model) != "gemma2" and "model.attention" not in overrides:
            cfg.model.attention = "xla"  # splash runs Gemma2's attention block only


def parse_overrides(args: list[str], stage: str | None = None) -> dict[str, str]:
    """Turns ``--a.b 1 --c.d=2 --out X`` into ``{"a.b": "1", "c.d": "2", "run.out_dir": "X"}``.

    With a stage, a short flag that stage does not read stops with one line naming what it means.
    """
    overrides: dict[str, str] = {}
    i = 0
    while i < len(args):
        flag = args[i]
        if not flag.startswith("--"):
            raise ConfigError(f"unexpected argument {flag!r}: settings look like --section.field value")
        name, eq, value = flag.partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"{flag} needs a value")
            value = args[i + 1]
            i += 1
        i += 1
        if stage and name in SHORT_FLAGS and name not in STAGE_SHORT_FLAGS[stage]:
            raise ConfigError(_unused_flag_message(stage, name, value))
        overrides[SHORT_FLAGS.get(name, name[2:])] = value
    return overrides


def _unused_flag_message(stage: str, flag: str, value: str) -> str:
    if stage == "data_prep" and flag == "--out":
        return (f"data_prep.py writes the prepared data to --data DIR; --out is train_sft.py's run directory: "
                f"use --data {value}")
    readers = " and ".join(f"{name}.py" for name, flags in STAGE_SHORT_FLAGS.items() if flag in flags)
    return f"{stage}.py does not use {flag} (--{SHORT_FLAGS[flag]}, read by {readers}): leave it out"


def stage_flags(stage: str) -> argparse.ArgumentParser:
    """A stage's own flags beside --preset and the overrides: evaluation and export read a run directory."""
    parser = argparse.ArgumentParser(add_help=False)
    if stage in ("eval_samples", "export"):
        parser.add_argument("--run", required=True, help="run directory written by train_sft.py --out DIR")
        parser.add_argument("--step", type=int, help="checkpoint step to load (default: the latest)")
    if stage == "eval_samples":
        parser.add_argument("--out", help="output directory (default: RUN/eval)")
        parser.add_argument("--compare-base", action="store_true", help="also evaluate the base model, side by side")
        parser.add_argument("--loss-only", action="store_true", help="only the held-out loss and perplexity")
    if stage == "export":
        parser.add_argument("--format", choices=EXPORT_FORMATS, default="orbax",
                            help="orbax: Kaggle Flax layout for Tunix; hf: Hugging Face Gemma2ForCausalLM "
                                 "(Gemma3ForCausalLM)")
        parser.add_argument("--out", required=True, help="output directory")
        parser.add_argument("--upload", default="", metavar="OWNER/MODEL",
                            help="publish the orbax export to OWNER/MODEL/jax/size, where the "
                                 "hackathon's template downloads unrestricted_kaggle_model = 'OWNER/MODEL'")
    return parser


def parse_argv(argv: list[str] | None, stage: str, doc: str) -> tuple[Config, argparse.Namespace]:
    """A stage's settings from its command line (``--preset``, its own flags, every override), validated;
    ``args.overrides`` holds the overrides as given. rundir.settings_from_argv adds the checks of paths."""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0], parents=[stage_flags(stage)])
    parser.add_argument("--preset", default="cpu-tiny", help=f"one of {', '.join(PRESETS)}")
    args, rest = parser.parse_known_args(argv)
    args.overrides = parse_overrides(rest, stage)
    return get_config(args.preset, args.overrides), args


def model_sizes(m: ModelConfig) -> dict[str, int]:
    """Layers, embedding rows, width, heads and sliding window of the model that ``m`` builds."""
    if m.name in REAL_MODEL_SIZES:
        return REAL_MODEL_SIZES[m.name]
    return {name: getattr(m, name) for name in REAL_MODEL_SIZES["gemma2-2b-it"]}


def validate(cfg: Config) -> None:
    """Rejects settings that cannot work, before anything heavy runs: one line that names the fix."""
    _check_finite(cfg)
    _check_model(cfg.model)
    _check_mesh_and_processes(cfg.model, cfg.run)
    _check_attention(cfg.model, cfg.data)
    _check_data_and_schedule(cfg)


def _check_finite(cfg: Config) -> None:
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values) if dataclasses.is_dataclass(values) else ():
            value = getattr(values, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{section.name}.{f.name} {value} is not a finite number: give a finite value")


def _check_model(m: ModelConfig) -> None:
    if m.name not in MODEL_FAMILIES:
        raise ConfigError(f"--model.name {m.name!r} is unknown: use {', '.join(MODEL_FAMILIES)}")
    if m.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"--model.dtype {m.dtype!r} is unknown: use float32 or bfloat16")
    if m.remat not in ("none", "block", "decoder"):
        raise ConfigError(f"--model.remat {m.remat!r} is unknown: use none, block or decoder")
    if m.loss_chunk < 0:
        raise ConfigError(f"--model.loss_chunk {m.loss_chunk} must not be negative: use 0 (full logits) or more")


def _check_mesh_and_processes(m: ModelConfig, r: RunConfig) -> None:
    sizes = model_sizes(m)
    num_heads, num_kv_heads = sizes["num_heads"], sizes["num_kv_heads"]
    if r.mesh_fsdp < 1 or r.mesh_tp < 1:
        raise ConfigError("--run.mesh_fsdp and --run.mesh_tp must be at least 1")
    if num_kv_heads % r.mesh_tp or num_heads % r.mesh_tp:
        raise ConfigError(f"--run.mesh_tp {r.mesh_tp} does not divide the model's {num_kv_heads} kv heads "
                          f"and {num_heads} heads: use a tp of {_divisors(num_kv_heads)}")
    if r.num_processes < 1 or not 0 <= r.process_id < r.num_processes:
        raise ConfigError(f"--run.process_id {r.process_id} is not one of the {r.num_processes} processes of "
                          f"--run.num_processes: number the processes 0..{max(r.num_processes, 1) - 1}")
    if r.num_processes > 1 and r.coordinator in ("", "auto"):
        raise ConfigError(f"--run.num_processes {r.num_processes} needs --run.coordinator HOST:PORT (process 0's "
                          f"address, the same on every process)")
    host, _, port = r.coordinator.rpartition(":")
    if r.coordinator not in ("", "auto") and not (host and port.isdigit()):
        raise ConfigError(f"--run.coordinator {r.coordinator!r} is not HOST:PORT: give process 0's address, "
                          "e.g. 10.0.0.2:8476, or auto on a TPU pod slice")
    if r.join_timeout_s < 1 or r.heartbeat_timeout_s < 1 or r.data_wait_min <= 0:
        raise ConfigError("--run.join_timeout_s, --run.heartbeat_timeout_s and --run.data_wait_min must be positive")
    if r.micro_batch < 1 or r.grad_accum < 1:
        raise ConfigError("--run.micro_batch and --run.grad_accum must be at least 1")
    if r.micro_batch % r.mesh_fsdp:
        raise ConfigError(f"--run.micro_batch {r.micro_batch} is not divisible by the data-parallel size "
                          f"--run.mesh_fsdp {r.mesh_fsdp}: use a multiple of {r.mesh_fsdp}")


def _check_attention(m: ModelConfig, d: DataConfig) -> None:
    window = model_sizes(m)["sliding_window"]
    if d.max_len < 16:
        raise ConfigError(f"--data.max_len {d.max_len} is too small: use at least 16")
    if m.attention not in ("xla", "splash"):
        raise ConfigError(f"--model.attention {m.attention!r} is unknown: use xla or splash")
    if m.attention == "splash" and model_family(m) != "gemma2":
        raise ConfigError(f"--model.attention splash runs Gemma2's attention block, not {m.name}'s: use "
                          "--model.attention xla")
    if m.attention == "splash" and (d.max_len % 128 or m.attention_block % 128
                                    or d.max_len % min(m.attention_block, d.max_len)):
        raise ConfigError(f"--model.attention splash needs --data.max_len ({d.max_len}) a multiple of 128 and "
                          f"--model.attention_block ({m.attention_block}) a multiple of 128 that divides it (or "
                          "exceeds it): use e.g. --model.attention_block 512 and --data.max_len 2048")
    # Tunix's own Gemma2 sliding mask compares key indices of the packed window with positions within the row
    # (splash applies the window per row); Tunix's Gemma3 builds its band from indices alone, exact per row.
    if d.pack and d.max_len > window and m.attention == "xla" and model_family(m) == "gemma2":
        raise ConfigError(f"--data.max_len {d.max_len} exceeds the sliding window {window}: packed rows "
                          f"would see keys outside their window; lower max_len, set --data.pack false or use "
                          f"--model.attention splash")


def _check_data_and_schedule(cfg: Config) -> None:
    d, r = cfg.data, cfg.run
    if d.start < 0 or (d.stop and d.stop <= d.start):
        raise ConfigError(f"row range {d.start}..{d.stop} is empty: "
                          "--data.stop must exceed --data.start (0 = to the end)")
    if d.eval_rows < 0 or d.num_rows < 0:
        raise ConfigError("--data.eval_rows and --data.num_rows must not be negative")
    if d.continue_from and d.start:
        raise ConfigError(f"--data.start {d.start} and --data.continue_from {d.continue_from} both set where to "
                          "begin: pass one of them (--data.continue_from '' --data.start N)")
    if cfg.eval.max_new_tokens < 0:
        raise ConfigError("--eval.max_new_tokens must not be negative (0 = derived from the prepared data)")
    if cfg.lora.rank < 1:
        raise ConfigError(f"--lora.rank {cfg.lora.rank} must be at least 1")
    if r.epochs <= 0:
        raise ConfigError(f"--run.epochs {r.epochs} must be positive")
    if r.max_steps < 0 or r.time_budget_min < 0:
        raise ConfigError("--run.max_steps and --run.time_budget_min must not be negative")
    if r.checkpoints_to_keep < 1:
        raise ConfigError(f"--run.checkpoints_to_keep {r.checkpoints_to_keep} keeps no checkpoint, not even the "
                          "final one: use at least 1")
    if r.eval_every < 1 or r.checkpoint_every_steps < 1:
        raise ConfigError("--run.eval_every and --run.checkpoint_every_steps must be at least 1")
    if cfg.eval.generate_every < 0 or cfg.eval.generate_prompts < 1:
        raise ConfigError("--eval.generate_every must not be negative (0 = off) and --eval.generate_prompts must be "
                          "at least 1")
    if cfg.eval.generate_every and not d.eval_rows:
        raise ConfigError("--eval.generate_every needs held-out prompts: raise --data.eval_rows above 0 or set "
                          "--eval.generate_every 0")


def _divisors(n: int) -> str:
    return ", ".join(str(k) for k in range(1, n + 1) if n % k == 0)
