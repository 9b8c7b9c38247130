"""``model.remat`` "dots": the decoder layer rematerialised under a checkpoint policy that keeps matmul and splash
outputs. On the CPU, float32, at Gemma2's attention shape with the splash kernel (interpret mode), two layers."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from test_attention import lora_model, loss_and_lora_grads, packed_batch, relative_l2, splash_config

import config
import model


def residuals(lora: nnx.Module, batch: dict[str, np.ndarray]) -> tuple[int, int]:
    """(bytes the backward pass keeps from the forward pass, splash kernel calls in the gradient's program)."""
    graphdef, params, rest = nnx.split(lora, nnx.LoRAParam, ...)
    inputs = model.gen_model_input(batch, "splash", 128)

    def loss(lora_params: dict) -> jax.Array:
        state = nnx.clone(params)  # variables of this trace: nnx.remat inside refuses those of another
        nnx.replace_by_pure_dict(state, lora_params)
        return model.loss_fn(nnx.merge(graphdef, state, nnx.clone(rest)), **inputs)[0]

    lora_params = nnx.to_pure_dict(params)
    backward = jax.eval_shape(lambda p: jax.vjp(loss, p)[1], lora_params)  # its leaves are the residuals
    kept = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(backward))
    program = str(jax.make_jaxpr(jax.grad(loss))(lora_params))
    return kept, program.count("pallas_call")


@pytest.fixture(scope="module")
def models() -> dict[str, nnx.Module]:
    """The same weights and LoRA under each remat setting; projections wide enough to be saved
    (model.MIN_SAVED_CONTRACTION)."""
    sizes = {"model.embed_dim": "512", "model.hidden_dim": "1024"}
    return {remat: lora_model(splash_config(window=64, **sizes, **{"model.remat": remat}))
            for remat in ("none", "dots", "decoder")}


def test_dots_remat_gives_the_gradients_of_no_remat(models):
    batch = packed_batch()
    loss, grads = loss_and_lora_grads(models["none"], batch, "splash")
    dots_loss, dots_grads = loss_and_lora_grads(models["dots"], batch, "splash")
    assert dots_loss == pytest.approx(loss, rel=1e-6)
    assert dots_grads.keys() == grads.keys() and len(grads) == 2 * 6 * 2  # A and B of 6 modules in 2 layers
    for path, grad in dots_grads.items():
        assert np.abs(grads[path]).max() > 1e-6, path
        assert relative_l2(grad, grads[path]) < 1e-6, path


def test_dots_remat_keeps_less_than_no_remat_and_more_than_full_remat_without_rerunning_the_kernel(models):
    batch = packed_batch()
    kept = {remat: residuals(lora, batch) for remat, lora in models.items()}
    # Full remat keeps the weights and each layer's input: what the others keep beyond it is activations.
    activations = {remat: kept[remat][0] - kept["decoder"][0] for remat in ("none", "dots")}
    assert 0 < activations["dots"] < activations["none"] / 2  # LoRA's B outputs (rank-wide) are not kept
    # Forward, dq and dkv kernels per layer; full remat runs the forward kernel again in the backward pass.
    assert kept["dots"][1] == kept["none"][1] == 3 * 2 < kept["decoder"][1]


def test_an_unknown_remat_is_refused_in_one_line():
    with pytest.raises(config.ConfigError, match="use none, block, decoder or dots"):
        config.get_config("cpu-tiny", {"model.remat": "dot"})
