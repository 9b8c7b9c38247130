"""The chunked loss is fitted to the row length, so that it never costs more memory than the full logits."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

import config
import model


def test_the_chunk_is_at_most_a_quarter_of_a_row_and_never_the_whole_row():
    assert model.row_loss_chunk(512, 2047) == 512  # the kaggle rows: a quarter already
    assert model.row_loss_chunk(512, 511) == 128  # the cpu-tiny rows: one chunk would be the whole row
    assert model.row_loss_chunk(100, 511) == 100
    assert model.row_loss_chunk(0, 511) == 0  # asked for the full logits
    assert model.row_loss_chunk(512, 1) == 0  # a row too short to split


def loss_step_temp_bytes(cfg: config.Config, loss_chunk: int) -> int:
    """XLA's temporary buffers of the jitted value-and-grad step w.r.t. the LoRA params, at cfg's shape."""
    mesh = model.make_mesh(cfg)
    with mesh:
        lora = model.build_model(cfg, mesh)
    graphdef, lora_state, rest = nnx.split(lora, nnx.LoRAParam, ...)
    length, batch = cfg.data.max_len, cfg.run.micro_batch
    inputs = model.gen_model_input({"tokens": np.ones((batch, length), np.int32),
                                    "loss_mask": np.ones((batch, length), np.int32),
                                    "segment_ids": np.ones((batch, length), np.int32),
                                    "positions": np.tile(np.arange(length, dtype=np.int32), (batch, 1))})

    def step(lora_state, rest, inputs):
        def loss(lora_state):
            return model.loss_fn(nnx.merge(graphdef, lora_state, rest), **inputs, loss_chunk=loss_chunk)[0]
        return jax.value_and_grad(loss)(lora_state)

    return jax.jit(step).lower(lora_state, rest, inputs).compile().memory_analysis().temp_size_in_bytes


def test_a_chunk_as_long_as_the_row_costs_no_more_than_the_full_logits():
    """Rows of 256 positions and a large vocabulary, so that the logits dominate the step's temporaries."""
    cfg = config.get_config("cpu-tiny", {"model.vocab_size": "32768", "model.num_layers": "1",
                                         "data.max_len": "256", "run.micro_batch": "2"})
    full = loss_step_temp_bytes(cfg, loss_chunk=0)
    assert loss_step_temp_bytes(cfg, loss_chunk=256) <= full
    assert loss_step_temp_bytes(cfg, loss_chunk=64) < 0.75 * full  # a quarter-row chunk saves memory
