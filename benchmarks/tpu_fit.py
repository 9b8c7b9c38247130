"""Does a preset's train step fit a TPU we do not have? Compile it ahead of time for the topology and read back
its memory per chip and its cost.

The step is the one ``PeftTrainer`` runs each micro-batch: the project's ``SFTTrainer`` with
``train_sft.make_optimizer`` (under ``optax.MultiSteps`` when the preset accumulates), ``model.gen_model_input``
and ``model.loss_fn``, jitted by ``trainer.jit_train_and_eval_step`` (without the Python-side graph cache,
which leaves the compiled program as it is). Every input is abstract: the model is ``model.abstract_model``
in the preset's dtype with ``model.apply_lora`` under ``nnx.eval_shape``; model, optimizer state and batch
are ``ShapeDtypeStruct``s with the ``NamedSharding``s that training gives them. No weight is allocated.

It needs ``libtpu`` (the TPU compiler) but no TPU; keep it out of the project's own venv:

    python3 -m venv /tmp/tpu-venv
    /tmp/tpu-venv/bin/pip install -r requirements.txt 'jax[tpu]==0.10.2'    # jax as in requirements.txt
    TPU_ACCELERATOR_TYPE=v5litepod-8 /tmp/tpu-venv/bin/python benchmarks/tpu_fit.py \
        [--preset kaggle] [--topology v5e:2x4] [--section.field value ...]

One compile of the Gemma2-2B step takes 10-20 minutes on 2 cores and about 16 GB of RAM. Each run prints a
row and appends it to ``benchmarks/results_tpu_fit.md``. ``--dry-run`` compiles the cpu-tiny preset's
step for this machine's CPU devices instead (seconds; the tests run it).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import resource
import shlex
import sys
import time
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jaxlib import _hlo, _jax  # noqa: E402  (private: no public API costs HLO text; tests/test_tunix_adapter.py)
from tunix.models.gemma import model as gemma_lib  # noqa: E402
from tunix.sft import sharding_utils  # noqa: E402
from tunix.utils import sharding_utils as model_sharding_utils  # noqa: E402  (Gemma3's shard())

import data_prep  # noqa: E402
import model  # noqa: E402
import train_sft  # noqa: E402
import tunix_adapter  # noqa: E402
from config import Config, ConfigError, get_config, parse_overrides  # noqa: E402

RESULTS_PATH = Path(__file__).with_name("results_tpu_fit.md")
GIB = 2**30


class Chip(NamedTuple):
    """Public per-chip figures: HBM bytes, HBM bytes/s, peak dense bf16 FLOP/s."""

    hbm_bytes: float
    hbm_bytes_per_s: float
    peak_flops: float


# By jax device_kind; peak FLOP/s as model.py uses them for MFU.
CHIPS = {kind: Chip(hbm, bandwidth, model.PEAK_FLOPS[kind]) for kind, hbm, bandwidth in (
    ("TPU v5 lite", 16 * GIB, 819e9), ("TPU v6 lite", 32 * GIB, 1640e9), ("TPU v5p", 95 * GIB, 2765e9),
    ("TPU v4", 32 * GIB, 1228e9))}


def topology_devices(topology: str) -> list[Any]:
    """The devices of a TPU slice, from libtpu alone: up to 8 chips on one host, e.g. ``v5e:2x4`` (Kaggle's
    v5e-8); larger v5e slices as pod slices lay them out, 4 chips (2x2) a host, e.g. ``v5e:4x4`` (v5e-16)."""
    from jax.experimental import topologies

    shape = topology.partition(":")[2].split("x")
    if not all(n.isdigit() for n in shape):
        raise ConfigError(f"--topology {topology!r} is not a slice's shape: use a name like v5e:2x4 or v5e:4x4")
    # One host's chips all on that host (a bare topology name lays a v5e:2x4 out over 2 hosts), no wrap-around.
    bounds = (*map(int, shape), 1, 1)[:3] if math.prod(map(int, shape)) <= 8 else (2, 2, 1)
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, chip_config_name="default",
                                            chips_per_host_bounds=bounds, num_slices=1, wrap=(False,) * 3)
    except (RuntimeError, ValueError) as err:  # no libtpu, or a name it does not know
        raise ConfigError(f"cannot describe TPU topology {topology!r} ({str(err).splitlines()[0]}): install "
                          "libtpu in a separate venv as this script's docstring says, or pass --dry-run") from None
    return list(desc.devices)


@contextlib.contextmanager
def sharding_constraints_kept() -> Iterator[None]:
    """Tunix's Gemma2 and Gemma3 ``shard()`` skip their constraints when ``jax.devices()`` is a CPU, as it always is
    in a process without a TPU: keep them, as on the TPU, while tracing here."""
    originals = [(gemma_lib, gemma_lib.shard), (model_sharding_utils, model_sharding_utils.shard)]

    def shard(x: jax.Array, s: tuple[str, ...], eager: bool = False) -> jax.Array:
        mesh = tunix_adapter.legacy_mesh()
        if mesh.empty:
            return x
        return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*s)))

    for module, _ in originals:
        module.shard = shard
    try:
        yield
    finally:
        for module, original in originals:
            module.shard = original


def make_abstract(module: nnx.Module, mesh: jax.sharding.Mesh) -> None:
    """Replaces every variable of module by a ShapeDtypeStruct placed as its sharding annotation says
    (as ``model.shard_model`` and the trainer's ``_shard_optimizer`` place the real ones)."""
    state = nnx.state(module)
    shardings = nnx.get_named_sharding(state, mesh)
    nnx.update(module, jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                    state, shardings))


def abstract_trainer(cfg: Config, mesh: jax.sharding.Mesh) -> train_sft.SFTTrainer:
    """The training run's trainer over an abstract LoRA model and optimizer state, placed on mesh."""
    graphdef, state = nnx.split(model.abstract_model(cfg.model))
    dtype = jnp.dtype(cfg.model.dtype)
    base = nnx.merge(graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), state))
    lora_model = nnx.eval_shape(lambda b: model.apply_lora(b, cfg, None), base)
    plan = train_sft.StepPlan(1, cfg.optim.learning_rate, cfg.optim.warmup_ratio, cfg.optim.end_lr_ratio)
    trainer = train_sft.make_trainer(lora_model, cfg, plan, eval_every_n_steps=10**9, max_steps=1)
    make_abstract(trainer.model, mesh)
    make_abstract(trainer.optimizer, mesh)  # its LoRA-sized zeros from the constructor are dropped here
    return trainer


def abstract_batch(cfg: Config, mesh: jax.sharding.Mesh, trainer: train_sft.SFTTrainer
                   ) -> dict[str, jax.ShapeDtypeStruct]:
    """One micro-batch of the loader's arrays, sharded as the trainer's ``shard_input`` shards it."""
    pspec = jax.sharding.PartitionSpec(*trainer.config.data_sharding_axis)
    window = np.zeros((cfg.run.micro_batch, cfg.data.max_len), np.int32)
    sharding = sharding_utils.get_sharding(window, mesh, pspec)
    return {name: jax.ShapeDtypeStruct(window.shape, window.dtype, sharding=sharding)
            for name in data_prep.BATCH_FIELDS}


class DoesNotFit(NamedTuple):
    """The compiler's refusal of a step too big for the chip (RESOURCE_EXHAUSTED): its temporaries alone, and
    the HBM it had for them, in bytes."""

    temporaries: float
    available: float


def does_not_fit(err: Exception) -> DoesNotFit | None:
    """The figures of XLA's "Ran out of memory on HBM" compile error (its G are GiB), or None for another error."""
    found = re.search(r"HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", str(err))
    return DoesNotFit(float(found[1]) * GIB, float(found[2]) * GIB) if found else None


def compile_train_step(cfg: Config, devices: list[Any]) -> tuple[Any, dict[str, float]]:
    """The trainer's jitted train step, traced, lowered and compiled for devices (or DoesNotFit, when the
    compiler finds it too big for the chip); and the seconds of each."""
    auto = jax.sharding.AxisType.Auto
    mesh = jax.make_mesh((cfg.run.mesh_fsdp, cfg.run.mesh_tp), ("fsdp", "tp"), axis_types=(auto, auto),
                         devices=devices)
    seconds = {}
    began = time.perf_counter()
    trainer = abstract_trainer(cfg, mesh)
    # Outside the mesh, so that the trainer does not try to re-place the (abstract) optimizer state itself.
    train_step, _ = trainer.jit_train_and_eval_step(cache_nnx_graph=False)
    batch = abstract_batch(cfg, mesh, trainer)
    seconds["build_s"] = time.perf_counter() - began
    with mesh, sharding_constraints_kept():
        began = time.perf_counter()
        traced = train_step.func.trace(*train_step.args, batch)
        seconds["trace_s"] = time.perf_counter() - began
        began = time.perf_counter()
        lowered = traced.lower()
        seconds["lower_s"] = time.perf_counter() - began
        began = time.perf_counter()
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as err:
            compiled = does_not_fit(err)
            if compiled is None:
                raise
        seconds["compile_s"] = time.perf_counter() - began
    trainer.close()
    return compiled, seconds


def splash_kernel_cost(cfg: Config, n_chips: int) -> tuple[float, float]:
    """(FLOPs, HBM bytes) per chip per micro-step of the splash kernels, which XLA's cost analysis does not see
    into. Per layer, row and query head, over the (query block, key block) pairs the mask visits (causal, and the
    window on local layers): the forward pass runs 2 matmuls per pair, the dq kernel 3 and the dkv kernel 4, of
    2 x block^2 x head_dim FLOPs each; each pair streams a block of two [block, head_dim] tensors per kernel (k, v
    forward and for dq; q, do for dkv), and each kernel reads or writes its whole [T, head_dim] tensors once per
    head (q, o forward; q, do, dq for dq; k, v, dk, dv for dkv: 9 in all)."""
    mc = model.gemma_config(cfg.model)
    length = cfg.data.max_len
    block = min(cfg.model.attention_block, length)
    blocks = length // block
    itemsize = jnp.dtype(cfg.model.dtype).itemsize

    def pairs(window: int | None) -> int:
        return sum(j <= i and (window is None or (i - j - 1) * block + 1 <= window - 1)
                   for i in range(blocks) for j in range(blocks))

    windows = [mc.sliding_window_size if kind == gemma_lib.AttentionType.LOCAL_SLIDING else None
               for kind in list(mc.attention_types)[:mc.num_layers]]
    visited = sum(pairs(w) for w in windows)  # over the layers
    rows_heads = cfg.run.micro_batch / n_chips * mc.num_heads
    flops = rows_heads * visited * 9 * 2 * block * block * mc.head_dim
    elements = rows_heads * mc.head_dim * (9 * length * mc.num_layers + 3 * 2 * visited * block)
    return flops, elements * itemsize


# An optimized module's text: computations, each a header line ending in "{" and one instruction a line.
COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \([^\n]*\{\n(.*?)^\}$", re.M | re.S)
INSTRUCTION = re.compile(r"^\s*(ROOT )?%?([\w.\-]+) = .*? ([a-z][\w\-]*)\((.*?)\)(.*)$", re.M)


class Instruction(NamedTuple):
    opcode: str
    operands: list[str]
    attributes: str


class Computation(NamedTuple):
    root: str
    instructions: dict[str, Instruction]


def parse_hlo(text: str) -> dict[str, Computation]:
    """The computations of an optimized module's text, with what loop_trips needs of their instructions."""
    computations = {}
    for name, lines in COMPUTATION.findall(text):
        found = INSTRUCTION.findall(lines)
        computations[name] = Computation(next(n for root, n, *_ in found if root), {
            n: Instruction(op, re.findall(r"%?([\w.\-]+)", operands), attrs) for _, n, op, operands, attrs in found})
    return computations


def called(loop: Instruction, key: str) -> str:
    return re.search(rf"\b{key}=%?([\w.\-]+)", loop.attributes)[1]


def loop_trips(computations: dict[str, Computation], parent: str, loop: Instruction) -> int | None:
    """A while loop's trip count: XLA's ``known_trip_count`` where it is annotated (the CPU's HLO), else read from
    the loop as the TPU's HLO leaves it: a counter, started at a constant and stepped by a constant, that the
    condition compares with a constant (``<``). None for any other loop."""
    if known := re.search(r'"known_trip_count":\{"n":"(\d+)"\}', loop.attributes):
        return int(known[1])
    condition, body = computations[called(loop, "condition")], computations[called(loop, "body")]

    def op(comp: Computation, name: str) -> Instruction:
        """The instruction, with the CPU's one-op fusions (``wrapped_add``) seen through and copies skipped."""
        found = comp.instructions[name]
        if found.opcode == "copy":
            return op(comp, found.operands[0])
        if found.opcode != "fusion":
            return found
        inner = computations[called(found, "calls")]
        params = {n: int(i.operands[0]) for n, i in inner.instructions.items() if i.opcode == "parameter"}
        root = inner.instructions[inner.root]
        if not all(n in params for n in root.operands):
            return found
        return Instruction(root.opcode, [found.operands[params[n]] for n in root.operands], root.attributes)

    def constant(comp: Computation, name: str) -> int | None:
        found = op(comp, name)
        return int(found.operands[0]) if found.opcode == "constant" and re.fullmatch(r"-?\d+", found.operands[0]) \
            else None

    def counter(comp: Computation, name: str) -> int | None:
        found = op(comp, name)
        return int(re.search(r"index=(\d+)", found.attributes)[1]) if found.opcode == "get-tuple-element" else None

    compare = op(condition, condition.root)
    if compare.opcode != "compare" or "direction=LT" not in compare.attributes:
        return None
    index, limit = counter(condition, compare.operands[0]), constant(condition, compare.operands[1])
    init = op(computations[parent], loop.operands[0])
    if index is None or init.opcode != "tuple":
        return None
    start = constant(computations[parent], init.operands[index])
    step = op(body, op(body, body.root).operands[index])
    by = constant(body, step.operands[1]) if step.opcode == "add" and counter(body, step.operands[0]) == index \
        else None
    if None in (limit, start, by) or by <= 0:
        return None
    return max(0, -(-(limit - start) // by))


def cost_with_loop_trips(compiled: Any) -> dict[str, float]:
    """FLOPs and bytes accessed of the compiled step with every while loop's body counted once per trip (the
    chunked loss's scans, the windowed einsums' all-gather loops): XLA's ``cost_analysis()`` counts a body once
    whatever its trips. Each body is costed by XLA's own ``HloCostAnalysis``, run (with the CPU client) on the
    optimized module with that body as its entry. A loop whose trip count cannot be read stays counted once;
    ``unknown_loops`` says how many."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    once = np.array([float(cost.get(k, 0.0)) for k in ("flops", "bytes accessed")])
    text = compiled.as_text()
    computations = parse_hlo(text)
    client = jax.devices("cpu")[0].client
    unknown = 0
    # The body's module keeps only the computations the body calls (the whole step's text is tens of MB).
    blocks = {m[1]: m[0].removeprefix("ENTRY ") for m in COMPUTATION.finditer(text)}
    calls = {name: set(re.findall(r"%([\w.\-]+)", block)) & blocks.keys() - {name} for name, block in blocks.items()}
    header = re.sub(r"^HloModule [^\n]*", "HloModule loop_body", text[:COMPUTATION.search(text).start()], count=1)

    def cost_of(body: str) -> np.ndarray:
        keep, todo = set(), [body]
        while todo:
            keep.add(name := todo.pop())
            todo.extend(calls[name] - keep)
        module = header + "\n".join(("ENTRY " if name == body else "") + block
                                     for name, block in blocks.items() if name in keep)
        body_cost = _jax.hlo_module_cost_analysis(client, _hlo.hlo_module_from_text(module))
        return np.array([float(body_cost.get(k, 0.0)) for k in ("flops", "bytes accessed")])

    def beyond_once(parent: str) -> np.ndarray:
        """(FLOPs, bytes) that parent's loops, nested ones included, run beyond the one trip counted of each."""
        nonlocal unknown
        total = np.zeros(2)
        for loop in computations[parent].instructions.values():
            if loop.opcode != "while":
                continue
            trips = loop_trips(computations, parent, loop)
            if trips is None:
                unknown += 1
                continue
            body, body_once = called(loop, "body"), cost_of(called(loop, "body"))
            total += trips * (body_once + beyond_once(body)) - body_once
        return total

    bodies = {called(loop, "body") for comp in computations.values() for loop in comp.instructions.values()
              if loop.opcode == "while"}
    flops, bytes_accessed = once + sum((beyond_once(name) for name in computations if name not in bodies), np.zeros(2))
    return {"flops": flops, "bytes accessed": bytes_accessed, "once_flops": once[0], "once_bytes": once[1],
            "unknown_loops": unknown}


def fit_report(cfg: Config, compiled: Any, chip: Chip | None, n_chips: int) -> dict[str, float]:
    """Per chip: memory of the compiled step, its cost, and the lower bounds on its time at the chip's peak; of
    a step that does not fit, the temporaries it needed and the HBM available."""
    tokens = cfg.run.micro_batch * cfg.data.max_len
    # Useful work, without remat's recomputed forward.
    model_flops = model.flops_per_token(cfg.model, cfg.data.max_len) * tokens / n_chips
    if isinstance(compiled, DoesNotFit):
        return {"temporaries": compiled.temporaries, "available": compiled.available, "model_flops": model_flops}
    mem = compiled.memory_analysis()
    cost = cost_with_loop_trips(compiled)
    row = {
        "arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
        "aliased": mem.alias_size_in_bytes, "temporaries": mem.temp_size_in_bytes,
        "code": mem.generated_code_size_in_bytes,
        "compiled_flops": cost["flops"], "bytes_accessed": cost["bytes accessed"], "once_bytes": cost["once_bytes"],
        "unknown_loops": cost["unknown_loops"], "model_flops": model_flops,
    }
    row["total"] = row["arguments"] + row["outputs"] - row["aliased"] + row["temporaries"] + row["code"]
    if cfg.model.attention == "splash":
        row["kernel_flops"], row["kernel_bytes"] = splash_kernel_cost(cfg, n_chips)
    if chip:
        row["headroom"] = chip.hbm_bytes - row["total"]
        compiled_flops = row["compiled_flops"] + row.get("kernel_flops", 0.0)
        row["compute_s"] = max(row["model_flops"], compiled_flops) / chip.peak_flops
        row["memory_s"] = (row["bytes_accessed"] + row.get("kernel_bytes", 0.0)) / chip.hbm_bytes_per_s
        row["step_s"] = max(row["compute_s"], row["memory_s"]) * cfg.run.grad_accum
        row["tokens_per_s"] = tokens * cfg.run.grad_accum / row["step_s"]
    return row


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "-"


def markdown_row(cfg: Config, target: str, row: dict[str, float], seconds: dict[str, float], command: str) -> str:
    gib = {k: f"{row[k] / GIB:.2f}" if k in row else "-" for k in
           ("arguments", "outputs", "aliased", "temporaries", "code", "total", "headroom")}
    if "available" in row:
        gib["temporaries"] = f"{gib['temporaries']} (needed)"
        gib["headroom"] = f"does not fit ({row['available'] / GIB:.2f} available)"
    tera = {k: f"{row[k] / 1e12:.2f}" if k in row else "-" for k in ("compiled_flops", "model_flops")}
    gb_accessed = "-" if "bytes_accessed" not in row else \
        f"{row['bytes_accessed'] / 1e9:.1f} ({row['once_bytes'] / 1e9:.1f} with loop bodies once" + \
        (f", {row['unknown_loops']} loops of unknown trips once)" if row["unknown_loops"] else ")")
    if "kernel_flops" in row and "bytes_accessed" in row:  # the splash kernels' own, analytic (splash_kernel_cost)
        tera["compiled_flops"] += f" + {row['kernel_flops'] / 1e12:.2f} kernel"
        gb_accessed += f" + {row['kernel_bytes'] / 1e9:.1f} kernel"
    timing = (f"{row['compute_s'] * 1e3:.0f} / {row['memory_s'] * 1e3:.0f} / {row['step_s']:.2f}"
              if "step_s" in row else "-")
    tokens_per_s = f"{row['tokens_per_s']:,.0f}" if "tokens_per_s" in row else "-"
    remat = cfg.model.remat if cfg.model.attention == "xla" else \
        f"{cfg.model.remat}, splash {min(cfg.model.attention_block, cfg.data.max_len)}"
    return (f"| {time.strftime('%Y-%m-%d %H:%M')} | {target} | {cfg.preset} | {remat} | "
            f"{cfg.run.micro_batch} x {cfg.data.max_len} x {cfg.run.grad_accum} | {loss_name(cfg)} | "
            f"{gib['arguments']} | {gib['outputs']} | {gib['aliased']} | {gib['temporaries']} | {gib['code']} | "
            f"**{gib['total']}** | **{gib['headroom']}** | {tera['compiled_flops']} | {tera['model_flops']} | "
            f"{gb_accessed} | {timing} | {tokens_per_s} | "
            f"jax {jax.__version__}, libtpu {_version('libtpu')} | "
            f"{seconds['compile_s']:.0f} s, {peak_rss_gib():.1f} GiB | `{command}` |")


def loss_name(cfg: Config) -> str:
    return f"chunks of {cfg.model.loss_chunk}" if cfg.model.loss_chunk else "full logits"


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # KiB on Linux


TABLE_HEAD = (
    "| when (UTC) | target | preset | remat | micro-batch x len x accum | loss | arguments | outputs | aliased | "
    "temporaries | code | total | headroom | compiled TFLOP | model TFLOP | GB accessed | "
    "compute ms / memory ms / optimizer step s | tokens/s bound | versions | compile, peak RSS | command |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def append_row(path: Path, line: str) -> None:
    """Appends a row to the table that ends the file; a file without the table gets its header first."""
    text = path.read_text() if path.exists() else "# Ahead-of-time fit of the train step per TPU chip\n"
    if TABLE_HEAD not in text:
        text = text.rstrip("\n") + "\n\n" + TABLE_HEAD + "\n"
    path.write_text(text.rstrip("\n") + "\n" + line + "\n")


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", help="kaggle by default; cpu-tiny with --dry-run")
    parser.add_argument("--topology", default="v5e:2x4", help="TPU slice to compile for (v5e:4x4: v5e-16)")
    parser.add_argument("--dry-run", action="store_true", help="the tiny model on this machine's CPU devices")
    parser.add_argument("--results", type=Path, default=RESULTS_PATH, help="markdown to append the row to")
    args, rest = parser.parse_known_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "benchmarks/tpu_fit.py", *argv])
    try:
        cfg = get_config(args.preset or ("cpu-tiny" if args.dry_run else "kaggle"), parse_overrides(rest))
        n_chips = cfg.run.mesh_fsdp * cfg.run.mesh_tp
        if args.dry_run:
            devices, target, chip = jax.devices("cpu"), f"cpu x{n_chips}", None
            if len(devices) < n_chips:
                raise ConfigError(f"the mesh needs {n_chips} CPU devices but {len(devices)} are present: set "
                                  f"XLA_FLAGS=--xla_force_host_platform_device_count={n_chips}")
            devices = devices[:n_chips]
        else:
            devices, target = topology_devices(args.topology), args.topology
            chip = CHIPS.get(devices[0].device_kind)
            if len(devices) != n_chips:
                raise ConfigError(f"{args.topology} has {len(devices)} chips but the mesh is --run.mesh_fsdp "
                                  f"{cfg.run.mesh_fsdp} x --run.mesh_tp {cfg.run.mesh_tp}: make their product "
                                  f"{len(devices)}")
    except ConfigError as err:
        sys.exit(f"error: {err}")
    print(f"compiling the {cfg.preset} train step for {target} ...", flush=True)
    compiled, seconds = compile_train_step(cfg, devices)
    row = fit_report(cfg, compiled, chip, n_chips)
    line = markdown_row(cfg, target, row, seconds, command)
    print("\n".join(f"{k:>15}: {v / GIB:8.2f} GiB" for k, v in row.items()
                    if k in ("arguments", "outputs", "aliased", "temporaries", "code", "total", "headroom",
                             "available")))
    if "available" in row:
        print(f"does not fit: its temporaries alone need {row['temporaries'] / GIB:.2f} GiB of the "
              f"{row['available'] / GIB:.2f} GiB the chip has for them")
    else:
        print(f"compiled {row['compiled_flops']:.3e} FLOP, model {row['model_flops']:.3e} FLOP, "
              f"{row['bytes_accessed']:.3e} bytes accessed per chip per micro-step, loops counted per trip "
              f"({row['once_bytes']:.3e} with each body once; {row['unknown_loops']} loops of unknown trips); "
              + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    if "kernel_flops" in row:
        print(f"splash kernels (analytic, not in XLA's count): {row['kernel_flops']:.3e} FLOP, "
              f"{row['kernel_bytes']:.3e} bytes per chip per micro-step")
    if "step_s" in row:
        print(f"lower bound per micro-step: compute {row['compute_s'] * 1e3:.0f} ms, memory "
              f"{row['memory_s'] * 1e3:.0f} ms; per optimizer step {row['step_s']:.2f} s, "
              f"<= {row['tokens_per_s']:,.0f} tokens/s")
    if str(args.results):
        append_row(args.results, line)
        print(f"appended to {args.results}")
    return row


if __name__ == "__main__":
    main()
