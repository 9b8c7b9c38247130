"""Loss memory on CPU at Gemma's vocabulary: peak memory of one LoRA training step above the model's own.

A small Gemma2 body (the cpu-tiny sizes) with Gemma2's 256,128-token vocabulary, rank-16 LoRA, micro-batch
2 x 512, the second half of each row carrying the loss. One jitted value-and-grad step (w.r.t. the LoRA params,
as PeftTrainer takes it) per loss, each in a fresh subprocess, one after the other:

- ``tunix``: Tunix's default loss (``tunix_adapter.default_loss_fn``: log_softmax and a one-hot);
- ``full``: this project's loss with ``--model.loss_chunk 0`` (all logits at once, logsumexp minus the target);
- ``chunk=N``: the chunked loss of ``model.py`` (``--model.loss_chunk N``), which takes at most a quarter of a
  row per chunk and the full logits when one chunk would cover the row (``model.row_loss_chunk``).

"Model" is the resident memory once the model (with LoRA) is built; "peak" is the process's peak resident
memory (the kernel's high-water mark) after compiling and running three steps; the table gives their difference
(compiling this small step adds a similar, small amount to each). Results go into
``benchmarks/results_loss_memory.md``. It uses up to ~8 GB: run it alone,

    flock /tmp/heavy.lock .venv/bin/python benchmarks/bench_loss_memory.py [--chunks 128,256,512]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]
RESULTS_PATH = Path(__file__).with_name("results_loss_memory.md")
VOCAB, BATCH, SEQ = 256_128, 2, 512


def rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"/proc/self/status has no {field}")


def worker(loss: str, dtype: str) -> dict:
    """One loss in this process: build, compile, then the peak of two steps above the resident model."""
    sys.path.insert(0, str(REPO_DIR))
    import jax
    import numpy as np
    from flax import nnx

    import config
    import model as model_lib
    import tunix_adapter

    chunk = int(loss.removeprefix("chunk=")) if loss.startswith("chunk=") else 0
    cfg = config.get_config("cpu-tiny", {"model.vocab_size": str(VOCAB), "model.dtype": dtype,
                                         "data.max_len": str(SEQ), "run.micro_batch": str(BATCH),
                                         "model.loss_chunk": str(chunk)})
    loss_fn = tunix_adapter.default_loss_fn if loss == "tunix" else model_lib.make_loss_fn(chunk)
    rng = np.random.default_rng(0)
    loss_mask = np.zeros((BATCH, SEQ), np.int32)
    loss_mask[:, SEQ // 2:] = 1
    batch = {"tokens": rng.integers(4, VOCAB, (BATCH, SEQ), dtype=np.int32), "loss_mask": loss_mask,
             "segment_ids": np.ones((BATCH, SEQ), np.int32),
             "positions": np.tile(np.arange(SEQ, dtype=np.int32), (BATCH, 1))}
    mesh = model_lib.make_mesh(cfg)
    with mesh:
        lora_model = model_lib.build_model(cfg, mesh)
        grad_fn = nnx.value_and_grad(lambda m, i: loss_fn(m, i["tokens"], i["loss_mask"], i["positions"],
                                                          i["attention_mask"]),
                                     argnums=nnx.DiffState(0, nnx.LoRAParam), has_aux=loss != "tunix")

        @nnx.jit
        def step(m, b):
            out, grads = grad_fn(m, model_lib.gen_model_input(b))
            return (out[0] if isinstance(out, tuple) else out), grads

        model_mb = rss_mb("VmRSS")
        times = []
        for _ in range(3):  # the first call compiles
            started = time.perf_counter()
            value, grads = jax.block_until_ready(step(lora_model, batch))
            times.append(time.perf_counter() - started)
        peak_mb = rss_mb("VmHWM")

        graphdef, lora_state, rest = nnx.split(lora_model, nnx.LoRAParam, ...)

        def pure_step(lora_state, rest, b):  # the same step as a plain jax.jit, for XLA's memory analysis
            return step(nnx.merge(graphdef, lora_state, rest), b)

        analysis = jax.jit(pure_step).lower(lora_state, rest, batch).compile().memory_analysis()
    grad_norm = float(np.sqrt(sum(np.sum(np.square(np.asarray(g))) for g in jax.tree.leaves(grads))))
    return {"loss": loss, "dtype": dtype, "chunk_used": model_lib.row_loss_chunk(chunk, SEQ - 1) if chunk else 0,
            "model_mb": model_mb, "peak_mb": peak_mb,
            "above_model_mb": peak_mb - model_mb, "temp_mb": analysis.temp_size_in_bytes / 2**20,
            "step_s": min(times[1:]), "first_call_s": times[0],
            "value": float(value), "lora_grad_norm": grad_norm,
            "versions": {"python": platform.python_version(), "jax": jax.__version__}}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def markdown(results: list[dict], command: str, started: str, loads: tuple[float, float]) -> str:
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    full = next((r for r in results if r["loss"] == "full"), None)
    lines = ["# Loss memory at Gemma's vocabulary (CPU)", "",
             f"Generated by `{command}` ({started}).", "",
             f"* Machine: {os.cpu_count()} CPUs (nproc), `{cpu_model()}`, {mem_gib:.0f} GiB RAM, no accelerator; "
             f"1-minute load average {loads[0]:.1f} before, {loads[1]:.1f} after (shared with other work: step "
             "times are noisy, memory is not).",
             f"* python {results[0]['versions']['python']}, jax {results[0]['versions']['jax']}.",
             f"* Model: cpu-tiny body (4 layers, d 128, MLP 512, 4 heads / 2 kv heads, head_dim 32) with vocab "
             f"{VOCAB:,}, {results[0]['dtype']}, LoRA rank 16; micro-batch {BATCH} x {SEQ}, loss on the second half "
             "of each row. One jitted value-and-grad w.r.t. the LoRA params per loss, each in its own process.",
             f"* Full logits of the batch: [{BATCH}, {SEQ}, {VOCAB:,}] = "
             f"{BATCH * SEQ * VOCAB * 4 / 2**20:,.0f} MiB in float32.", "",
             "* XLA temp MB: the compiled step's temporary buffers (`compiled.memory_analysis()`), exact and "
             "independent of the allocator.", "",
             "| loss | chunk used | XLA temp MB | model MB | peak MB | above model MB | vs full | step s (min of 2) | "
             "loss value | LoRA grad norm |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = f"{r['above_model_mb'] / full['above_model_mb']:.2f}" if full else "-"
        used = (f"{r['chunk_used']}" if r["chunk_used"] else "full logits") if r["loss"].startswith("chunk") else "-"
        lines.append(f"| {r['loss']} | {used} | {r['temp_mb']:,.0f} | {r['model_mb']:,.0f} | {r['peak_mb']:,.0f} | "
                     f"{r['above_model_mb']:,.0f} | "
                     f"{ratio} | {r['step_s']:.2f} | {r['value']:.6f} | {r['lora_grad_norm']:.6f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", default="128,256,512", help="chunk sizes of the chunked loss")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.dtype)))
        return
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_before = os.getloadavg()[0]
    results = []
    for loss in ["tunix", "full"] + [f"chunk={c}" for c in args.chunks.split(",")]:
        done = subprocess.run([sys.executable, __file__, "--worker", loss, "--dtype", args.dtype], cwd=REPO_DIR,
                              capture_output=True, text=True, timeout=1800)
        if done.returncode:
            sys.exit(f"{loss} failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    command = "python benchmarks/bench_loss_memory.py " + " ".join(sys.argv[1:])
    RESULTS_PATH.write_text(markdown(results, command.strip(), started, (load_before, os.getloadavg()[0])))
    print(f"wrote {RESULTS_PATH}")


if __name__ == "__main__":
    main()
