"""benchmarks/tpu_fit.py's --dry-run: the same ahead-of-time compile of the trainer's step, on the tiny model."""

from __future__ import annotations

import importlib.util
import json
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from conftest import REPO
from flax import nnx
from tunix.models.gemma import model as gemma_lib

import model

SMALL = ["--data.max_len", "64", "--run.micro_batch", "2"]


def load_tpu_fit():
    spec = importlib.util.spec_from_file_location("tpu_fit", REPO / "benchmarks" / "tpu_fit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_compiles_the_trainer_step_and_appends_its_row(tmp_path):
    tpu_fit = load_tpu_fit()
    results = tmp_path / "results.md"
    results.write_text("# notes kept above the table\n")
    row = tpu_fit.main(["--dry-run", "--results", str(results), *SMALL])
    row_again = tpu_fit.main(["--dry-run", "--results", str(results), *SMALL, "--model.remat", "block"])

    cfg = tpu_fit.get_config("cpu-tiny", {"data.max_len": "64", "run.micro_batch": "2"})
    lora_model = nnx.eval_shape(lambda: model.apply_lora(model.abstract_model(cfg.model), cfg, None))
    lora_params = model.count_params(lora_model, nnx.LoRAParam)
    # The step's inputs hold at least the float32 LoRA weights and their two Adam moments.
    assert row["arguments"] >= 3 * 4 * lora_params
    assert row["temporaries"] > 0 and row["compiled_flops"] > 0 and row["bytes_accessed"] > 0
    assert row["total"] == row["arguments"] + row["outputs"] - row["aliased"] + row["temporaries"] + row["code"]
    assert row["model_flops"] == model.flops_per_token(cfg.model, 64) * 2 * 64
    assert "headroom" not in row  # no chip, no HBM to compare with
    # The model is donated with the optimizer: every output but the loss, its aux metrics and the gradient norm
    # (1.5 KiB) reuses an input's buffer; without it, the frozen weights (5.6 MB) were copied every step.
    assert row["outputs"] - row["aliased"] < 4096, (row["outputs"], row["aliased"])
    assert row_again["compiled_flops"] > row["compiled_flops"]  # remat recomputes the forward pass

    text = results.read_text()
    assert text.startswith("# notes kept above the table\n")
    assert text.count(tpu_fit.TABLE_HEAD) == 1
    rows = [line for line in text.splitlines() if "| cpu x1 | cpu-tiny |" in line]
    assert [r.split(" | ")[3] for r in rows] == ["none", "block"]
    assert all(f"| 2 x 64 x 1 | {tpu_fit.loss_name(cfg)} |" in r for r in rows)
    assert "`python benchmarks/tpu_fit.py --dry-run --results" in rows[0]


def test_a_step_the_compiler_finds_too_big_is_a_row_that_says_so():
    """XLA's refusal, as libtpu printed it for the kaggle step at micro-batch 32 without remat, is a row."""
    tpu_fit = load_tpu_fit()
    refusal = jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (27.63G) "
        "exceeds available HBM (15.75G).")
    too_big = tpu_fit.does_not_fit(refusal)
    assert too_big == (27.63 * tpu_fit.GIB, 15.75 * tpu_fit.GIB)
    assert tpu_fit.does_not_fit(jax.errors.JaxRuntimeError("INTERNAL: something else")) is None
    cfg = tpu_fit.get_config("kaggle", {"run.micro_batch": "32", "run.grad_accum": "1"})
    row = tpu_fit.fit_report(cfg, too_big, tpu_fit.CHIPS["TPU v5 lite"], 8)
    line = tpu_fit.markdown_row(cfg, "v5e:2x4", row, {"compile_s": 60.0}, "python benchmarks/tpu_fit.py")
    assert f"| 32 x 2048 x 1 | {tpu_fit.loss_name(cfg)} | - | - | - | 27.63 (needed) | - | **-** | " in line
    assert "**does not fit (15.75 available)**" in line


def test_tunix_shard_constraints_survive_on_cpu_inside_the_check_only():
    tpu_fit = load_tpu_fit()
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)

    def jaxpr() -> str:  # a new function each time: JAX caches traces by function
        return str(jax.make_jaxpr(lambda x: gemma_lib.shard(x, ("fsdp", None)))(np.zeros((2, 4))))

    with mesh:
        with tpu_fit.sharding_constraints_kept():
            kept = jaxpr()
        dropped = jaxpr()
    assert "sharding_constraint" in kept
    assert "sharding_constraint" not in dropped  # Tunix's own shard() on a CPU, restored after the check


def test_dry_run_shards_over_8_cpu_devices(tmp_path, eight_devices):
    out = eight_devices(f"""
        import importlib.util, json
        spec = importlib.util.spec_from_file_location("tpu_fit", "benchmarks/tpu_fit.py")
        tpu_fit = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tpu_fit)
        row = tpu_fit.main(["--dry-run", "--results", "{tmp_path / 'results.md'}", "--data.max_len", "64",
                            "--run.micro_batch", "8", "--run.mesh_fsdp", "8"])
        print(json.dumps(row))
    """)
    row = json.loads(out.strip().splitlines()[-1])
    cfg = load_tpu_fit().get_config("cpu-tiny", {"data.max_len": "64", "run.micro_batch": "8"})
    lora_model = nnx.eval_shape(lambda: model.apply_lora(model.abstract_model(cfg.model), cfg, None))
    # fsdp 8 splits the weights over the chips: each holds well under half of the float32 model.
    assert row["arguments"] < 4 * model.count_params(lora_model) / 2
    assert row["model_flops"] == model.flops_per_token(cfg.model, 64) * 8 * 64 / 8
    assert "| cpu x8 | cpu-tiny |" in (tmp_path / "results.md").read_text()


def scan_of(trips: int, inner: int = 0):
    """A compiled scan whose body is a [64, 256] x [256, 256] matmul (after inner trips of its own, if any)."""

    def step(x, w):
        def body(c, _):
            if inner:
                c = jax.lax.scan(lambda d, _: (jnp.tanh(d @ w), None), c, None, length=inner)[0]
            return jnp.tanh(c @ w), None

        return jax.lax.scan(body, x, None, length=trips)[0].sum()

    return jax.jit(step).lower(jnp.ones((64, 256)), jnp.ones((256, 256))).compile()


def test_the_bound_counts_a_loop_body_once_per_trip():
    """XLA's cost_analysis() counts a while body once: a scan of 16 and one of 4 cost the same to it."""
    tpu_fit = load_tpu_fit()
    cfg = tpu_fit.get_config("cpu-tiny", {"data.max_len": "16", "run.micro_batch": "1"})
    chip = tpu_fit.CHIPS["TPU v5 lite"]
    short, long = (tpu_fit.fit_report(cfg, scan_of(trips), chip, 1) for trips in (4, 16))
    assert 3.5 < long["step_s"] / short["step_s"] < 4.0  # the body dominates; the rest runs once
    assert short["once_bytes"] == long["once_bytes"]  # what the bound used to read
    assert long["step_s"] == long["memory_s"] and short["step_s"] == short["memory_s"]
    assert 3.9 < long["compiled_flops"] / short["compiled_flops"] < 4.0
    matmul = 2 * 64 * 256 * 256
    nested = tpu_fit.cost_with_loop_trips(scan_of(3, inner=5))
    assert 18 * matmul <= nested["flops"] < 18.1 * matmul  # 3 x (5 + 1) matmuls
    assert nested["unknown_loops"] == 0


def test_trip_counts_are_read_where_xla_does_not_annotate_them():
    """The TPU's optimized HLO drops known_trip_count: the counter, its start, step and limit give the trips."""
    tpu_fit = load_tpu_fit()
    compiled = scan_of(3, inner=5)

    class Unannotated(NamedTuple):
        cost_analysis: Any
        as_text: Any

    text = re.sub(r',"known_trip_count":\{"n":"\d+"\}', "", compiled.as_text())
    assert "known_trip_count" not in text
    read = tpu_fit.cost_with_loop_trips(Unannotated(compiled.cost_analysis, lambda: text))
    assert read == tpu_fit.cost_with_loop_trips(compiled)
    computations = tpu_fit.parse_hlo(text)
    loops = [(name, loop) for name, comp in computations.items() for loop in comp.instructions.values()
             if loop.opcode == "while"]
    assert sorted(tpu_fit.loop_trips(computations, name, loop) for name, loop in loops) == [3, 5]
    # A loop whose limit is not a constant is counted once and said to be.
    unknown = re.sub(r"constant\(5\)", "parameter(1)", text, count=1)
    assert tpu_fit.cost_with_loop_trips(Unannotated(compiled.cost_analysis, lambda: unknown))["unknown_loops"] == 1
