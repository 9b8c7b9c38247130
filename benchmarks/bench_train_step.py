"""LoRA SFT training-step throughput on CPU: this project's Tunix step vs the PyTorch/PEFT/TRL peer.

The JAX side builds the project's model through its own code (``config.get_config("cpu-tiny", ...)`` at the
peer's exact shape, ``model.build_model``), wraps it in the project's ``SFTTrainer`` (Tunix PeftTrainer)
with ``train_sft.make_optimizer``, ``loss_fn`` and ``gen_model_input``, and times the trainer's own jitted
train step (``trainer.jit_train_and_eval_step(cache_nnx_graph=True)``, what ``PeftTrainer.train`` calls each
step) on fixed-shape random batches: ``shard_input`` + step + ``jax.block_until_ready`` on the loss. The peer is
``/work/shared/bench/peer_trl_lora.py`` (plain torch loop and/or TRL SFTTrainer) in its own venv. Every
measurement runs in a fresh subprocess (clean peak RSS), one after the other, and prints one JSON line;
``benchmarks/results_train_step.md`` gets the table (between the markers; the notes around them are kept).

    .venv/bin/python benchmarks/bench_train_step.py [--shapes b4s512,b2s1024] [--skip-peer]
        [--peer-modes loop,trl] [--allocators glibc,jemalloc]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_DIR = Path(__file__).resolve().parents[1]
RESULTS_PATH = Path(__file__).with_name("results_train_step.md")
PEER_SCRIPT = REPO_DIR.parent / "shared" / "bench" / "peer_trl_lora.py"  # ../shared beside the checkout
PEER_PYTHON = Path("/tmp/peer-venv/bin/python")
JEMALLOC = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
# The peer README's jemalloc settings (retain memory: no page faults from re-mmapping big tensors every step).
JEMALLOC_CONF = "oversize_threshold:1,background_thread:true,metadata_thp:auto,dirty_decay_ms:-1,muzzy_decay_ms:-1"
BEGIN, END = "<!-- bench_train_step:begin -->", "<!-- bench_train_step:end -->"

# The peer's model (peer_trl_lora.py defaults), as the project's config overrides.
PEER_SHAPE = {"model.vocab_size": "16384", "model.embed_dim": "512", "model.hidden_dim": "2048",
              "model.num_layers": "4", "model.num_heads": "8", "model.num_kv_heads": "4", "model.head_dim": "64",
              "model.sliding_window": "4096", "model.dtype": "float32", "lora.rank": "16", "lora.alpha": "16"}
PEER_LR = 1e-4


def parse_shape(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"b(\d+)s(\d+)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not like b4s512")
    return int(match[1]), int(match[2])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def loss_tokens(batch: int, seq: int) -> int:
    """Targets that carry the loss in one step, on both sides: the first half of each row is masked (the peer's
    labels -100, our loss_mask 0), so the shifted loss predicts the last seq - seq // 2 tokens of each row."""
    return batch * (seq - seq // 2)


def random_batches(n: int, batch: int, seq: int, vocab: int, seed: int) -> list[dict]:
    """Fixed-shape rows of random ids (>= 4, like the peer), the second half of each row as the loss tokens."""
    import numpy as np

    rng = np.random.default_rng(seed)
    positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()
    loss_mask = np.zeros((batch, seq), np.int32)
    loss_mask[:, seq // 2:] = 1
    return [{"tokens": rng.integers(4, vocab, (batch, seq), dtype=np.int32), "loss_mask": loss_mask.copy(),
             "segment_ids": np.ones((batch, seq), np.int32), "positions": positions.copy()} for _ in range(n)]


def jax_worker(batch: int, seq: int, warmup: int, steps: int, seed: int) -> dict:
    """One JAX measurement in this process: build, compile (first warmup step), then timed steps."""
    sys.path.insert(0, str(REPO_DIR))
    import jax
    import jaxlib
    from flax import nnx

    import config
    import train_sft
    from model import build_model, count_params, make_mesh

    cfg = config.get_config("cpu-tiny", {**PEER_SHAPE, "data.max_len": str(seq), "run.micro_batch": str(batch),
                                         "optim.learning_rate": str(PEER_LR)})
    mesh = make_mesh(cfg)
    with mesh:
        t0 = time.perf_counter()
        model = build_model(cfg, mesh)
        build_s = time.perf_counter() - t0
        trainable = count_params(model, nnx.LoRAParam)
        with_lora = count_params(model)
        plan = train_sft.StepPlan(total_steps=warmup + steps, peak_lr=cfg.optim.learning_rate, warmup_ratio=0.0,
                                  end_lr_ratio=1.0)  # constant lr, like the peer
        trainer = train_sft.make_trainer(model, cfg, plan, eval_every_n_steps=10**9, max_steps=warmup + steps,
                                         pbar_description=None)
        batches = random_batches(warmup + steps, batch, seq, cfg.model.vocab_size, seed + 1)
        assert all(int(b["loss_mask"][:, 1:].sum()) == loss_tokens(batch, seq) for b in batches)
        losses, times, cpu0, cpu1 = timed_steps(trainer, batches, warmup)
        trainer.close()
    first_s, times = times[0], times[warmup:]
    med = statistics.median(times)
    return {
        "impl": "jax-tunix-peft", "mode": "jitted_train_step",
        "tokens_per_s": batch * seq / med, "step_s_median": med, "peak_rss_mb": round(peak_rss_mb(), 1),
        "trainable_params": trainable, "total_params": with_lora - trainable,
        "config": {"batch": batch, "seq": seq, "warmup": warmup, "steps": steps, "seed": seed, "dtype": "float32",
                   "lr": PEER_LR, "optimizer": "train_sft.make_optimizer (clip_by_global_norm 1.0 + adamw, wd 0)",
                   "total_params_with_lora": with_lora, "overrides": PEER_SHAPE,
                   "lora_modules": cfg.lora.module_path, "remat": cfg.model.remat,
                   "devices": [str(d) for d in jax.devices()],
                   "versions": {"python": platform.python_version(), "jax": jax.__version__,
                                "jaxlib": jaxlib.__version__, "flax": _version("flax"),
                                "tunix": _version("google-tunix"), "qwix": _version("qwix"),
                                "optax": _version("optax")}},
        "build_s": round(build_s, 2), "first_step_s_incl_compile": round(first_s, 2),
        "loss_first": losses[0], "loss_last": losses[-1], "step_s_all": [round(t, 4) for t in times],
        "timed_user_s": round(cpu1.ru_utime - cpu0.ru_utime, 3), "timed_sys_s": round(cpu1.ru_stime - cpu0.ru_stime, 3),
    }


def timed_steps(trainer: Any, batches: list[dict], warmup: int) -> tuple[list[float], list[float], Any, Any]:
    """Runs the trainer's jitted train step (as PeftTrainer.train does) on each batch: the losses, every step's
    seconds (the first includes the compile), and the process's CPU times from the first timed step and at the end."""
    import jax
    from tunix.sft import sharding_utils

    train_step, _ = trainer.jit_train_and_eval_step(cache_nnx_graph=True)
    losses, times, cpu0 = [], [], resource.getrusage(resource.RUSAGE_SELF)
    for i, example in enumerate(batches):
        if i == warmup:
            cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        loss, _aux, _grad_norm = train_step(sharding_utils.shard_input(example, trainer.config.data_sharding_axis))
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
        print(f"[jax] step {i} loss {losses[-1]:.4f} {times[-1]:.3f}s", file=sys.stderr, flush=True)
    return losses, times, cpu0, resource.getrusage(resource.RUSAGE_SELF)


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def wait_for_load(max_load: float, wait_s: float) -> None:
    deadline = time.time() + wait_s
    while os.getloadavg()[0] >= max_load and time.time() < deadline:
        time.sleep(5)


def run_measurement(cmd: list[str], allocator: str, timeout_s: float) -> dict:
    env = dict(os.environ)
    if allocator == "jemalloc":
        env["LD_PRELOAD"] = str(JEMALLOC)
        env["MALLOC_CONF"] = JEMALLOC_CONF
    load_before = os.getloadavg()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s} s", "cmd": cmd}
    load_after = os.getloadavg()
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return {"error": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-2000:], "cmd": cmd}
    result = json.loads(lines[-1])
    result.update(allocator=allocator, load_1m_before=load_before[0], load_1m_after=load_after[0],
                  load_5m_after=load_after[1])
    return result


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def markdown(results: list[dict], command: str, started: str) -> str:
    ok = [r for r in results if "error" not in r]
    jax_r = next((r for r in ok if r["impl"].startswith("jax")), None)
    peer_r = next((r for r in ok if r["impl"].startswith("pytorch")), None)
    loads = [r["load_1m_before"] for r in ok] + [r["load_1m_after"] for r in ok]
    lines = [BEGIN, "", f"Generated by `{command}` ({started}).", "",
             f"* Machine: {os.cpu_count()} CPUs (nproc), `{cpu_model()}`, "
             f"{round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB RAM, no GPU. "
             f"1-minute load average around the measurements: {min(loads, default=0):.2f}–{max(loads, default=0):.2f} "
             "(before/after each; the machine was shared with other work).",
             "* Threads: 2 on both sides (XLA CPU's default intra-op pool = the 2 cores; the peer calls "
             "`torch.set_num_threads(2)`).",
             "* Allocator: `glibc` = the default malloc; `jemalloc` = `LD_PRELOAD` of "
             f"`{JEMALLOC}` with `MALLOC_CONF={JEMALLOC_CONF}` (the peer README's setting), both sides."]
    if jax_r:
        v = jax_r["config"]["versions"]
        lines.append(f"* JAX side: python {v['python']}, jax/jaxlib {v['jax']}/{v['jaxlib']}, flax {v['flax']}, "
                     f"tunix {v['tunix']}, qwix {v['qwix']}, optax {v['optax']}; "
                     f"{jax_r['trainable_params']:,} trainable / {jax_r['total_params']:,} base params.")
    if peer_r:
        v = peer_r["config"]["versions"]
        extra = f", trl {v['trl']}" if "trl" in v else ""
        lines.append(f"* Peer: python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, "
                     f"peft {v['peft']}{extra}; {peer_r['trainable_params']:,} trainable / "
                     f"{peer_r['total_params']:,} base params.")
    lines += ["", "Median of 10 timed steps after 3 warmup steps; tokens/s counts every token (b × s / median step), "
              "as the peer does; loss-bearing tokens/s counts the targets of the loss (the last half of each row, "
              "on both sides). Ratio = JAX tokens/s ÷ that row's tokens/s (> 1: JAX faster).", "",
              "| shape (tokens/step) | allocator | impl | step_s median | tokens/s | loss-bearing tokens/s | "
              "JAX/this | peak RSS MB | step_s min–max | load 1m before→after |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| | | error: {r['error']} `{' '.join(r['cmd'][-6:])}` | | | | | | | |")
            continue
        c = r["config"]
        ref = next((j for j in ok if j["impl"].startswith("jax") and j["allocator"] == r["allocator"]
                    and j["config"]["batch"] == c["batch"] and j["config"]["seq"] == c["seq"]), None)
        ratio = f"{ref['tokens_per_s'] / r['tokens_per_s']:.2f}" if ref else "–"
        impl = r["impl"] if r["impl"].startswith("jax") else f"{r['impl']} ({r['mode']})"
        lines.append(f"| b{c['batch']} × s{c['seq']} ({c['batch'] * c['seq']}) | {r['allocator']} | {impl} | "
                     f"{r['step_s_median']:.3f} | {r['tokens_per_s']:.0f} | "
                     f"{loss_tokens(c['batch'], c['seq']) / r['step_s_median']:.0f} | {ratio} | "
                     f"{r['peak_rss_mb']:.0f} | "
                     f"{min(r['step_s_all']):.3f}–{max(r['step_s_all']):.3f} | "
                     f"{r['load_1m_before']:.2f}→{r['load_1m_after']:.2f} |")
    lines += ["", END]
    return "\n".join(lines)


def write_markdown(path: Path, block: str) -> None:
    title = "# Training step throughput: JAX/Tunix vs the PyTorch peer"
    old = path.read_text() if path.exists() else f"{title}\n\n{BEGIN}\n{END}\n"
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        new = head + block + rest.split(END, 1)[1]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="b4s512,b2s1024", help="comma-separated bBsS")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--peer-modes", default="loop", help="comma-separated: loop, trl")
    parser.add_argument("--allocators", default="glibc", help="comma-separated: glibc, jemalloc")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peer-python", type=Path, default=PEER_PYTHON)
    parser.add_argument("--peer-script", type=Path, default=PEER_SCRIPT)
    parser.add_argument("--max-load", type=float, default=1.5, help="wait for a 1-minute load below this ...")
    parser.add_argument("--load-wait-s", type=float, default=60.0, help="... for at most this long per measurement")
    parser.add_argument("--timeout-s", type=float, default=1200.0, help="per measurement")
    parser.add_argument("--md", default=str(RESULTS_PATH), help="markdown to update ('' = none)")
    parser.add_argument("--worker", choices=["jax"], help=argparse.SUPPRESS)
    parser.add_argument("--shape", type=parse_shape, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker == "jax":
        print(json.dumps(jax_worker(*args.shape, args.warmup, args.steps, args.seed)), flush=True)
        return

    shapes = [parse_shape(s) for s in args.shapes.split(",") if s.strip()]
    allocators = [a.strip() for a in args.allocators.split(",") if a.strip()]
    if "jemalloc" in allocators and not JEMALLOC.exists():
        sys.exit(f"error: {JEMALLOC} is missing: apt-get install -y libjemalloc2, or drop jemalloc from --allocators")
    if not args.skip_peer and not (args.peer_python.exists() and args.peer_script.exists()):
        sys.exit(f"error: no peer at {args.peer_python} / {args.peer_script}: set it up as "
                 f"{args.peer_script.parent}/README.md says, or pass --skip-peer")
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    command = " ".join(["python benchmarks/bench_train_step.py", *sys.argv[1:]])
    results = []
    for allocator in allocators:
        for batch, seq in shapes:
            common = ["--batch", str(batch), "--seq", str(seq), "--warmup", str(args.warmup),
                      "--steps", str(args.steps)]
            cmds = [[sys.executable, str(Path(__file__).resolve()), "--worker", "jax", "--shape", f"b{batch}s{seq}",
                     "--warmup", str(args.warmup), "--steps", str(args.steps), "--seed", str(args.seed)]]
            if not args.skip_peer:
                cmds += [[str(args.peer_python), str(args.peer_script), "--mode", mode, *common, "--threads", "2",
                          "--seed", str(args.seed)] for mode in args.peer_modes.split(",") if mode.strip()]
            for cmd in cmds:
                wait_for_load(args.max_load, args.load_wait_s)
                result = run_measurement(cmd, allocator, args.timeout_s)
                results.append(result)
                print(json.dumps(result), flush=True)
                if args.md:  # after every measurement, so an interrupted run keeps what it has
                    write_markdown(Path(args.md), markdown(results, command, started))


if __name__ == "__main__":
    main()
