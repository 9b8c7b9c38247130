"""The real training step and generation at real size, on whatever accelerator JAX sees, with no download.

Builds Gemma2-2B with random weights drawn on the device, each tensor straight into the shard training gives it,
adds the preset's LoRA (``model.apply_lora``), and times the project's trainer step (``train_sft.SFTTrainer``, the
jitted step ``PeftTrainer.train`` calls, with ``make_optimizer``, ``gen_model_input`` and ``loss_fn``) on random
packed windows of the preset's shape: warm-up steps, then timed optimizer steps (``run.grad_accum`` micro-steps
each, ``block_until_ready`` at the end). Then it times the Sampler (``model.generate`` with one prebuilt sampler, as
the in-training format probe uses it) generating ``eval.max_new_tokens`` tokens (0: ``data.max_len``, the most a
kept row's completion can need) for a batch of ``eval.batch_size`` prompts. Prints one JSON line
and adds a row to ``benchmarks/results_real_size.md``.

    python benchmarks/real_size.py --preset gpu [--warmup 2] [--steps 10] [--section.field value ...]
    python benchmarks/real_size.py --dry-run     # the cpu-tiny model on the CPU: checks the code path in seconds

The sampler needs a tokenizer: ``--model.tokenizer_path`` (Gemma's, if you have it), else the shipped tiny one,
whose ids are valid Gemma ids (the ids it cannot decode are forbidden, as ``model.generate`` always does).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tunix.sft import sharding_utils

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))

import config  # noqa: E402
import data_prep  # noqa: E402
import kaggle_weights  # noqa: E402
import model  # noqa: E402
import train_sft  # noqa: E402

RESULTS_PATH = Path(__file__).with_name("results_real_size.md")
SHIPPED_PROMPTS = config.ASSETS_DIR / "eval_prompts.jsonl"
BEGIN, END = "<!-- real_size:begin -->", "<!-- real_size:end -->"
GIB = 2**30


def random_base_model(cfg: config.Config, mesh: jax.sharding.Mesh) -> nnx.Module:
    """Gemma2 with random weights (``model.init_std``) drawn on the device, each tensor created in its shard."""
    graphdef, abstract_state = nnx.split(model.abstract_model(cfg.model))
    shardings = nnx.get_named_sharding(abstract_state, mesh)
    dtype, embed_dim = jnp.dtype(cfg.model.dtype), model.gemma_config(cfg.model).embed_dim
    keys = iter(jax.random.split(jax.random.key(cfg.model.init_seed), len(jax.tree.leaves(abstract_state))))

    def draw(path: Any, leaf: jax.ShapeDtypeStruct, sharding: jax.sharding.NamedSharding) -> jax.Array:
        std = model.init_std(jax.tree_util.keystr(path), leaf.shape, embed_dim)
        return _normal(tuple(leaf.shape), dtype, sharding)(next(keys), std)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, abstract_state, shardings))


@functools.cache
def _normal(shape: tuple[int, ...], dtype: jnp.dtype, sharding: jax.sharding.NamedSharding):
    """One small compiled draw per shape and sharding (one module for every tensor compiles for minutes)."""
    return jax.jit(lambda key, std: jax.random.normal(key, shape, dtype) * std.astype(dtype), out_shardings=sharding)


def random_windows(count: int, batch: int, max_len: int, vocab: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Packed windows like the loader's: rows of max_len/4..max_len tokens packed while they fit (the rest is
    padding, segment 0), positions restarting per row, the loss on each row's last three quarters."""
    rng = np.random.default_rng(seed)
    windows = []
    for _ in range(count):
        fields = {name: np.zeros((batch, max_len), np.int32) for name in data_prep.BATCH_FIELDS}
        for row in range(batch):
            start, segment = 0, 1
            while start < max_len:
                length = int(rng.integers(max_len // 4, max_len + 1))
                if length > max_len - start:
                    break  # the rest of the window is padding (the first row always fits)
                span = slice(start, start + length)
                fields["tokens"][row, span] = rng.integers(4, vocab, length)
                fields["segment_ids"][row, span] = segment
                fields["positions"][row, span] = np.arange(length)
                fields["loss_mask"][row, start + length // 4:start + length] = 1
                start, segment = start + length, segment + 1
        windows.append(fields)
    return windows


class CompileClock:
    """Sums the durations of XLA backend compiles while registered."""

    def __init__(self):
        self.seconds = 0.0

    def __call__(self, event: str, duration: float, **_: object) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.seconds += duration


def peak_device_memory() -> float | None:
    """The most bytes any local device has held so far (None where ``memory_stats`` is not available, as on CPU)."""
    stats = [d.memory_stats() for d in jax.local_devices()]
    peaks = [s["peak_bytes_in_use"] for s in stats if s and "peak_bytes_in_use" in s]
    return max(peaks) if peaks else None


def time_train_step(cfg: config.Config, mesh: jax.sharding.Mesh, warmup: int, steps: int) -> tuple[nnx.Module, dict]:
    """Builds the model and the trainer and times the trainer's own jitted step."""
    began = time.perf_counter()
    lora_model = model.apply_lora(random_base_model(cfg, mesh), cfg, mesh)
    jax.block_until_ready(nnx.state(lora_model))
    build_s = time.perf_counter() - began
    plan = train_sft.StepPlan(warmup + steps, cfg.optim.learning_rate, cfg.optim.warmup_ratio, cfg.optim.end_lr_ratio)
    trainer = train_sft.make_trainer(lora_model, cfg, plan, eval_every_n_steps=10**9, max_steps=warmup + steps,
                                     pbar_description=None)
    train_step, _ = trainer.jit_train_and_eval_step(cache_nnx_graph=True)  # as PeftTrainer.train does
    windows = random_windows(min(4, cfg.run.grad_accum * (warmup + steps)), cfg.run.micro_batch, cfg.data.max_len,
                             model.gemma_config(cfg.model).num_embed, cfg.data.seed)
    step_tokens = sum(int(np.count_nonzero(w["segment_ids"])) for w in windows) * cfg.run.grad_accum / len(windows)
    times, losses, calls = [], [], 0
    compiles = CompileClock()
    jax.monitoring.register_event_duration_secs_listener(compiles)
    for step in range(warmup + steps):
        start = time.perf_counter()
        for _ in range(cfg.run.grad_accum):
            loss, _aux, _grad_norm = train_step(sharding_utils.shard_input(
                windows[calls % len(windows)], trainer.config.data_sharding_axis))
            calls += 1
        losses.append(float(jax.block_until_ready(loss)))
        seconds = time.perf_counter() - start
        if step == 0:
            first_step_s, compile_s = seconds, compiles.seconds
            jax.monitoring.unregister_event_duration_listener(compiles)
        if step >= warmup:
            times.append(seconds)
        print(f"step {step}: loss {losses[-1]:.3f}, {seconds:.3f} s", file=sys.stderr, flush=True)
    step_s = statistics.median(times)
    tokens_per_s = step_tokens / step_s
    peak = model.peak_flops(cfg)
    return lora_model, {
        "build_s": round(build_s, 2), "compile_s": round(compile_s, 2), "first_step_s": round(first_step_s, 2),
        "step_s": step_s, "step_s_min": min(times), "step_s_max": max(times), "tokens_per_step": step_tokens,
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * model.flops_per_token(cfg.model, cfg.data.max_len) / peak if peak else None,
        "loss_first": losses[0], "loss_last": losses[-1],
        "peak_device_memory_gib": (peak_device_memory() or 0) / GIB or None,
        "trainable_params": model.count_params(lora_model, nnx.LoRAParam), "params": model.count_params(lora_model),
    }


def time_sampler(cfg: config.Config, lora_model: nnx.Module) -> dict:
    """One sampler, built once; the first call compiles, the second is timed."""
    tokenizer_path = cfg.model.tokenizer_path or str(config.TINY_TOKENIZER_PATH)
    tokenizer = kaggle_weights.load_tokenizer(dataclasses.replace(cfg.model, tokenizer_path=tokenizer_path))
    rows = [json.loads(line) for line in SHIPPED_PROMPTS.read_text().splitlines() if line.strip()]
    prompts = [{"domain": row["domain"], "prompt": row["prompt"]} for row in rows[:cfg.eval.batch_size]]
    # No prepared data here: the derived budget is at most max_len (a kept row's completion is shorter).
    ecfg = dataclasses.replace(cfg.eval, max_new_tokens=cfg.eval.max_new_tokens or cfg.data.max_len)
    sampler = model.build_sampler(lora_model, tokenizer, model.padded_prompt_length(tokenizer, prompts),
                                  ecfg.max_new_tokens)
    began = time.perf_counter()
    model.generate(lora_model, tokenizer, prompts, ecfg, "compile", sampler=sampler, show_progress=False)
    first_s = time.perf_counter() - began
    began = time.perf_counter()
    records = model.generate(lora_model, tokenizer, prompts, ecfg, "timed", sampler=sampler, show_progress=False)
    seconds = time.perf_counter() - began
    generated = [r["generated_tokens"] for r in records]
    return {"generate_batch": len(prompts), "generate_max_new_tokens": ecfg.max_new_tokens,
            "generate_s": seconds, "generate_first_call_s": round(first_s, 2),
            "generated_tokens_mean": statistics.fmean(generated), "generate_tokens_per_s": sum(generated) / seconds,
            "tokenizer": Path(tokenizer_path).name,
            "peak_device_memory_with_sampler_gib": (peak_device_memory() or 0) / GIB or None}


def measure(cfg: config.Config, warmup: int, steps: int) -> dict:
    mesh = model.make_mesh(cfg)
    with mesh:
        lora_model, result = time_train_step(cfg, mesh, warmup, steps)
        result.update(time_sampler(cfg, lora_model))
    interval = cfg.eval.generate_every
    return {
        "preset": cfg.preset, "model": cfg.model.name, "device_kind": jax.devices()[0].device_kind,
        "devices": jax.device_count(), "micro_batch": cfg.run.micro_batch, "grad_accum": cfg.run.grad_accum,
        "max_len": cfg.data.max_len, "remat": cfg.model.remat, "dtype": cfg.model.dtype, "lora_rank": cfg.lora.rank,
        **result,
        # What the in-training format probe adds at the preset's interval: one generation per `interval` steps.
        "probe_overhead": result["generate_s"] / (interval * result["step_s"]) if interval else None,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "jax": jax.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def table_row(r: dict, command: str) -> str:
    cells = [r["date"], f"`{r['preset']}` ({r['model']})", f"{r['device_kind']} × {r['devices']}",
             f"{r['micro_batch']} × {r['grad_accum']} × {r['max_len']}, remat {r['remat']}",
             f"{r['step_s']:.3f}", f"{r['tokens_per_s']:,.0f}", _fmt(r["mfu"], ".1%"),
             _fmt(r["peak_device_memory_gib"], ".1f"), f"{r['compile_s']:.1f}",
             f"{r['generate_batch']} × {r['generate_max_new_tokens']}: {r['generate_s']:.2f} s "
             f"({r['generated_tokens_mean']:.0f} tokens each)", _fmt(r["probe_overhead"], ".1%"), f"`{command}`"]
    return "| " + " | ".join(cells) + " |"


TABLE_HEADER = ("| date | preset | device × count | micro-batch × accum × len | step s | tokens/s | MFU | "
                "peak memory GiB | compile s | generate | probe | command |\n" + "|---" * 12 + "|")


def add_row(path: Path, row: str) -> None:
    """Appends row to the table between the markers (the notes around it are kept; a missing file is started)."""
    text = path.read_text() if path.exists() else f"# Real-size training step and generation\n\n{BEGIN}\n" \
        f"{TABLE_HEADER}\n{END}\n"
    head, rest = text.split(END, 1)
    path.write_text(head.rstrip("\n") + "\n" + row + "\n" + END + rest)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpu", help=f"one of {', '.join(config.PRESETS)}")
    parser.add_argument("--dry-run", action="store_true", help="the cpu-tiny preset on the CPU, a few steps")
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps before timing (the first compiles)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--md", default=str(RESULTS_PATH), help="results markdown to add the row to ('' = none)")
    command = " ".join(["python benchmarks/real_size.py", *argv])
    if "--dry-run" in argv:
        jax.config.update("jax_platforms", "cpu")
        argv = ["--preset", "cpu-tiny", "--warmup", "1", "--steps", "2", *argv]
    args, rest = parser.parse_known_args(argv)
    try:
        cfg = config.get_config(args.preset, config.parse_overrides(rest))
    except config.ConfigError as err:
        sys.exit(f"error: {err}")
    result = measure(cfg, args.warmup, args.steps)
    print(json.dumps(result), flush=True)
    if args.md:
        add_row(Path(args.md), table_row(result, command))
    return result


if __name__ == "__main__":
    main()
