"""Every setting of the pipeline: plain dataclasses, named presets, command-line overrides.

Three presets share one code path and differ only in sizes, devices and where the
weights come from:

- ``kaggle``: Gemma2-2B-it on a TPU v5e-8, 180k glaiveai rows, 4 epochs, lr 2e-5.
- ``unrestricted``: continues a ``kaggle`` run's LoRA on rows 180000..280000, lr 5e-6.
- ``cpu-tiny``: a tiny random Gemma2-architecture model on the shipped sample, on a CPU.

Any field can be overridden as ``--section.field value`` (or ``--section.field=value``);
a few common ones have short flags (``--out``, ``--data``, ``--max-steps``, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_DIR = Path(__file__).resolve().parent
ASSETS_DIR = REPO_DIR / "assets"
SAMPLE_PATH = ASSETS_DIR / "glaiveai_sample.jsonl"
TINY_TOKENIZER_PATH = ASSETS_DIR / "tiny_tokenizer.model"

LORA_MODULES = ".*q_einsum|.*kv_einsum|.*gate_proj|.*down_proj|.*up_proj|.*attn_vec_einsum"


class ConfigError(ValueError):
    """A bad setting: stops the program before any heavy work, with one line naming the fix."""


@dataclass
class ModelConfig:
    """Which Gemma2 to build and where its weights and tokenizer come from."""

    # "gemma2-2b-it" (Kaggle weights) or "tiny" (random init, sizes below).
    name: str = "gemma2-2b-it"
    kaggle_handle: str = "google/gemma-2/flax/gemma2-2b-it"
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
    loss_chunk: int = 512
    # Sizes of the "tiny" model (ignored for gemma2-2b-it).
    num_layers: int = 4
    vocab_size: int = 2048
    embed_dim: int = 128
    hidden_dim: int = 512
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    sliding_window: int = 512
    init_seed: int = 0


# ----------------------------------------------------------------------------- where the weights live


def checkpoint_folder_names(model_cfg: ModelConfig) -> list[str]:
    """Names the orbax params folder of a Kaggle Flax download may have: the handle's variation (handles read
    owner/model/framework/variation, as Google's uploads are laid out), or gemma2-2b-it (this project's
    exports, whatever variation they are uploaded as). Exports are written under the first name."""
    return list(dict.fromkeys([model_cfg.kaggle_handle.rstrip("/").split("/")[3], "gemma2-2b-it"]))


def kaggle_model_dir(model_cfg: ModelConfig) -> Path:
    """The Kaggle Flax download (or its local copy): the only network call of the pipeline."""
    if model_cfg.checkpoint_dir:
        model_dir = Path(model_cfg.checkpoint_dir).expanduser()
    else:
        import kagglehub  # only here: the pipeline's one download

        model_dir = Path(kagglehub.model_download(model_cfg.kaggle_handle))
    folders = checkpoint_folder_names(model_cfg)
    missing = [name for name in ("tokenizer.model",) if not (model_dir / name).exists()]
    if not any((model_dir / name).is_dir() for name in folders):
        missing.append(" or ".join(f"{name}/" for name in folders))
    if missing:
        raise ConfigError(f"{model_dir} lacks {' and '.join(missing)}: set --model.checkpoint_dir to the "
                          f"Kaggle Flax download of {model_cfg.kaggle_handle}")
    return model_dir


def kaggle_checkpoint_dir(model_cfg: ModelConfig) -> Path:
    """The orbax params folder inside the Kaggle Flax download."""
    model_dir = kaggle_model_dir(model_cfg)
    return next(model_dir / name for name in checkpoint_folder_names(model_cfg) if (model_dir / name).is_dir())


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
    stop: int = 180_000
    # Kept rows wanted (training + held-out); 0 = every usable row of the range.
    num_rows: int = 0
    # Rows held out for eval loss and evaluation prompts.
    eval_rows: int = 256
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
    # Peak bf16 FLOP/s of one device, for model FLOPs utilisation (0 = look it up).
    peak_flops_per_device: float = 0.0


@dataclass
class EvalConfig:
    """Generation settings; the defaults are the hackathon's declared inference settings."""

    max_new_tokens: int = 768
    temperature: float = 0.0
    top_k: int = 1
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8
    # JSONL or text file of prompts; empty = the shipped prompt set (or held-out rows for tiny).
    prompts: str = ""
    # Use only the first N prompts (0 = all of them).
    num_prompts: int = 0


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
    cfg = Config(preset="kaggle")
    cfg.model.remat = "block"
    return cfg


def _unrestricted() -> Config:
    cfg = _kaggle()
    cfg.preset = "unrestricted"
    cfg.data.start, cfg.data.stop = 180_000, 280_000
    cfg.data.out_dir = "data/unrestricted"
    cfg.optim.learning_rate = 5e-6
    cfg.run.out_dir = "runs/unrestricted"
    cfg.run.init_from = "runs/kaggle"
    return cfg


def _cpu_tiny() -> Config:
    cfg = Config(preset="cpu-tiny")
    cfg.model.name = "tiny"
    cfg.model.dtype = "float32"
    cfg.model.tokenizer_path = str(TINY_TOKENIZER_PATH)
    cfg.model.cache_dir = ""
    cfg.lora.rank, cfg.lora.alpha = 16, 16.0
    cfg.data.source = str(SAMPLE_PATH)
    cfg.data.start, cfg.data.stop = 0, 0
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
    cfg.run.eval_every = 25
    cfg.run.eval_batches = 2
    cfg.run.checkpoint_every_steps = 50
    cfg.run.checkpoint_every_min = 5.0
    cfg.run.mesh_fsdp, cfg.run.mesh_tp = 1, 1
    cfg.eval.max_new_tokens = 256
    return cfg


PRESETS = {"kaggle": _kaggle, "unrestricted": _unrestricted, "cpu-tiny": _cpu_tiny}

# Short flags for the overrides people use most.
SHORT_FLAGS = {
    "--out": "run.out_dir",
    "--data": "data.out_dir",
    "--max-steps": "run.max_steps",
    "--time-budget-min": "run.time_budget_min",
    "--init-from": "run.init_from",
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
    validate(cfg)
    return cfg


def parse_overrides(args: list[str]) -> dict[str, str]:
    """Turns ``--a.b 1 --c.d=2 --out X`` into ``{"a.b": "1", "c.d": "2", "run.out_dir": "X"}``."""
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
        overrides[SHORT_FLAGS.get(name, name[2:])] = value
    return overrides


def config_from_argv(argv: list[str] | None, description: str, extra: argparse.ArgumentParser | None = None
                     ) -> tuple[Config, argparse.Namespace]:
    """Parses ``--preset`` and the script's own flags, then every override; exits with one line on error.

    ``extra`` holds a script's own flags (``--run``, ``--step`` ...); whatever it does not
    know is read as a config override.
    """
    parser = argparse.ArgumentParser(description=description, parents=[extra] if extra else [])
    parser.add_argument("--preset", default="cpu-tiny", help=f"one of {', '.join(PRESETS)}")
    args, rest = parser.parse_known_args(argv)
    try:
        cfg = get_config(args.preset, parse_overrides(rest))
    except ConfigError as err:
        sys.exit(f"error: {err}")
    return cfg, args


def validate(cfg: Config) -> None:
    """Rejects settings that cannot work, before anything heavy runs."""
    m, d, r, lo = cfg.model, cfg.data, cfg.run, cfg.lora
    if m.name not in ("gemma2-2b-it", "tiny"):
        raise ConfigError(f"--model.name {m.name!r} is unknown: use gemma2-2b-it or tiny")
    if m.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"--model.dtype {m.dtype!r} is unknown: use float32 or bfloat16")
    if m.remat not in ("none", "block", "decoder"):
        raise ConfigError(f"--model.remat {m.remat!r} is unknown: use none, block or decoder")
    if m.loss_chunk < 0:
        raise ConfigError(f"--model.loss_chunk {m.loss_chunk} must not be negative: use 0 (full logits) or more")
    num_heads, num_kv_heads, window = (8, 4, 4096) if m.name == "gemma2-2b-it" else (
        m.num_heads, m.num_kv_heads, m.sliding_window)
    if r.mesh_fsdp < 1 or r.mesh_tp < 1:
        raise ConfigError("--run.mesh_fsdp and --run.mesh_tp must be at least 1")
    if num_kv_heads % r.mesh_tp or num_heads % r.mesh_tp:
        raise ConfigError(f"--run.mesh_tp {r.mesh_tp} does not divide the model's {num_kv_heads} kv heads "
                          f"and {num_heads} heads: use a tp of {_divisors(num_kv_heads)}")
    if r.micro_batch < 1 or r.grad_accum < 1:
        raise ConfigError("--run.micro_batch and --run.grad_accum must be at least 1")
    if r.micro_batch % r.mesh_fsdp:
        raise ConfigError(f"--run.micro_batch {r.micro_batch} is not divisible by the data-parallel size "
                          f"--run.mesh_fsdp {r.mesh_fsdp}: use a multiple of {r.mesh_fsdp}")
    if d.max_len < 16:
        raise ConfigError(f"--data.max_len {d.max_len} is too small: use at least 16")
    if d.pack and d.max_len > window:
        raise ConfigError(f"--data.max_len {d.max_len} exceeds the sliding window {window}: packed rows "
                          f"would see keys outside their window; lower max_len or set --data.pack false")
    if d.start < 0 or (d.stop and d.stop <= d.start):
        raise ConfigError(f"row range {d.start}..{d.stop} is empty: "
                          "--data.stop must exceed --data.start (0 = to the end)")
    if d.eval_rows < 0 or d.num_rows < 0:
        raise ConfigError("--data.eval_rows and --data.num_rows must not be negative")
    if lo.rank < 1:
        raise ConfigError(f"--lora.rank {lo.rank} must be at least 1")
    if r.epochs <= 0:
        raise ConfigError(f"--run.epochs {r.epochs} must be positive")
    if r.max_steps < 0 or r.time_budget_min < 0:
        raise ConfigError("--run.max_steps and --run.time_budget_min must not be negative")
    if r.eval_every < 1 or r.checkpoint_every_steps < 1:
        raise ConfigError("--run.eval_every and --run.checkpoint_every_steps must be at least 1")


def _divisors(n: int) -> str:
    return ", ".join(str(k) for k in range(1, n + 1) if n % k == 0)
