"""The splash attention path (``model.attention`` splash) against Tunix's own attention, on the CPU (the kernel in
interpret mode), float32: packed windows of several rows with a trailing pad, soft-cap 50, GQA 8/4, head_dim 256."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_RUN_STEPS, tiny_run_config
from flax import nnx
from test_train_sft import read_metrics
from tunix.models.gemma import model as gemma_lib

import config
import kaggle_weights
import model
import train_sft
import tunix_adapter

LENGTH = 128  # the splash kernel's blocks are multiples of 128 positions
# Rows per packed window: window 0 ends in padding.
ROWS = ((50, 45), (70, 58))


def splash_config(window: int, **overrides: str) -> config.Config:
    """cpu-tiny at Gemma2's attention shape (8 heads over 4 kv heads of 256, soft-cap 50), two layers (local,
    global), windows of LENGTH positions."""
    return config.get_config("cpu-tiny", {
        "model.num_layers": "2", "model.num_heads": "8", "model.num_kv_heads": "4", "model.head_dim": "256",
        "model.sliding_window": str(window), "data.max_len": str(LENGTH), "model.attention": "splash",
        "model.attention_block": "128"} | overrides)


def lora_model(cfg: config.Config) -> nnx.Module:
    """The cpu-tiny model at cfg's sizes with nonzero LoRA B (as after training), so every LoRA tensor has a
    gradient."""
    mesh = model.make_mesh(cfg)
    with mesh:
        built = model.build_model(cfg, mesh)
    rng = np.random.default_rng(3)
    lora = nnx.state(built, nnx.LoRAParam)
    nnx.update(built, jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape) * 0.05, x.dtype), lora))
    return built


def packed_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """Windows of ROWS, each row's positions from 0, segment ids from 1, padding 0; loss on most of each row."""
    rng = np.random.default_rng(seed)
    batch = {name: np.zeros((len(ROWS), LENGTH), np.int32) for name in ("segment_ids", "positions", "loss_mask")}
    batch["tokens"] = rng.integers(5, 2000, (len(ROWS), LENGTH)).astype(np.int32)
    for window, rows in enumerate(ROWS):
        start = 0
        for segment, length in enumerate(rows, 1):
            batch["segment_ids"][window, start:start + length] = segment
            batch["positions"][window, start:start + length] = np.arange(length)
            batch["loss_mask"][window, start + 10:start + length] = 1
            start += length
    batch["tokens"][batch["segment_ids"] == 0] = 0
    return batch


def loss_and_lora_grads(lora: nnx.Module, batch: dict[str, np.ndarray], attention: str):
    grad_fn = nnx.value_and_grad(lambda m, inputs: model.loss_fn(m, **inputs), argnums=nnx.DiffState(0, nnx.LoRAParam),
                                 has_aux=True)
    (loss, _), grads = nnx.jit(grad_fn)(lora, model.gen_model_input(batch, attention, 128))
    return float(loss), {p: np.asarray(v.get_value()) for p, v in grads.flat_state()}


def relative_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def full_window_model() -> nnx.Module:
    """Local layers' window covers the whole packed window: there Tunix's own mask is right."""
    return lora_model(splash_config(window=LENGTH))


def test_splash_loss_and_every_lora_gradient_equal_tunix_attention(full_window_model):
    batch = packed_batch()
    xla_loss, xla_grads = loss_and_lora_grads(full_window_model, batch, "xla")
    loss, grads = loss_and_lora_grads(full_window_model, batch, "splash")
    assert loss == pytest.approx(xla_loss, rel=1e-5)
    assert grads.keys() == xla_grads.keys() and len(grads) == 2 * 6 * 2  # A and B of 6 modules in 2 layers
    for path, grad in grads.items():
        assert np.abs(xla_grads[path]).max() > 1e-6, path  # every tensor has a gradient to compare
        assert relative_l2(grad, xla_grads[path]) < 1e-5, path
    evaluated = {attention: model.evaluate_loss(full_window_model, [batch], attention=attention,
                                                attention_block=128)["loss"] for attention in ("xla", "splash")}
    assert evaluated["splash"] == pytest.approx(evaluated["xla"], rel=1e-5)
    # The comparison can fail: rows that see each other change the loss.
    leaky = dict(batch, segment_ids=np.where(batch["segment_ids"] > 0, 1, 0).astype(np.int32))
    assert abs(loss_and_lora_grads(full_window_model, leaky, "splash")[0] - xla_loss) > 1e-3


def test_each_packed_row_gets_its_own_logits_with_a_window_shorter_than_the_rows():
    """Local layers see 32 positions back, fewer than every row holds: each row of a packed window gets the logits
    it gets alone (by Tunix's attention, right for a row that starts a window), where Tunix's own mask (key
    indices of the window against positions within the row) gets the later rows wrong."""
    short = lora_model(splash_config(window=32))
    batch = packed_batch(seed=1)
    forward = nnx.jit(lambda m, tokens, positions, mask: m(tokens, positions, None, mask)[0])  # compiles per shape
    packed = forward(short, batch["tokens"], batch["positions"],
                     model.PackedSegments(jnp.asarray(batch["segment_ids"]), 128))
    tunix_packed = forward(short, batch["tokens"], batch["positions"],
                           model.packed_attention_mask(batch["segment_ids"]))
    for window, rows in enumerate(ROWS):
        start = 0
        for length in rows:
            tokens = np.zeros((1, LENGTH), np.int32)
            tokens[0, :length] = batch["tokens"][window, start:start + length]
            segment_ids = (np.arange(LENGTH) < length).astype(np.int32)[None]
            positions = np.where(segment_ids > 0, np.arange(LENGTH), 0).astype(np.int32)
            alone = forward(short, tokens, positions, model.packed_attention_mask(segment_ids))[0, :length]
            got = np.asarray(packed[window, start:start + length])
            np.testing.assert_allclose(got, alone, atol=2e-5 * np.abs(alone).max(), err_msg=f"{window=} {start=}")
            tunix_error = np.abs(np.asarray(tunix_packed[window, start:start + length]) - alone).max()
            assert (tunix_error > 1e-2) == (start > 0), (window, start, tunix_error)
            start += length


def test_splash_runs_sharded_over_an_fsdp8_mesh_as_tunix_attention_does(eight_devices):
    """Under the trainer's mesh the kernel runs per device on its own rows (shard_map over fsdp)."""
    out = eight_devices("""
        import json, sys
        import numpy as np
        sys.path.insert(0, "tests")
        import model
        from test_attention import loss_and_lora_grads, lora_model, packed_batch, relative_l2, splash_config
        cfg = splash_config(window=128, **{"run.mesh_fsdp": "8", "run.micro_batch": "8"})
        lora = lora_model(cfg)
        batch = {name: np.concatenate([rows] * 4) for name, rows in packed_batch().items()}
        with model.make_mesh(cfg):
            xla_loss, xla_grads = loss_and_lora_grads(lora, batch, "xla")
            loss, grads = loss_and_lora_grads(lora, batch, "splash")
        print(json.dumps({"loss": loss, "xla_loss": xla_loss, "devices": len(lora.embedder.input_embedding
                          .get_value().sharding.device_set),
                          "worst": max(relative_l2(grads[p], xla_grads[p]) for p in grads)}))
    """)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["devices"] == 8
    assert result["loss"] == pytest.approx(result["xla_loss"], rel=1e-5)
    assert result["worst"] < 1e-5


def test_decoding_with_a_cache_is_tunix_own_attention(full_window_model, monkeypatch):
    """The sampler (prefill and decode steps, with a KV cache) generates the same tokens with the swapped method
    as with Tunix's own."""
    cfg = splash_config(window=LENGTH, **{"eval.max_new_tokens": "12", "eval.batch_size": "2"})
    tokenizer = kaggle_weights.load_tokenizer(cfg.model)
    prompts = [{"domain": "math", "prompt": "What is 2 + 2?"}, {"domain": "other", "prompt": "Say hello."}]

    def outputs() -> list[str]:
        return [r["output"] for r in model.generate(full_window_model, tokenizer, prompts, cfg.eval, "tuned",
                                                   show_progress=False)]

    swapped = outputs()
    monkeypatch.setattr(gemma_lib.Attention, "block", tunix_adapter.ATTENTION_BLOCK)
    assert outputs() == swapped and any(swapped)


@pytest.mark.slow  # a whole short run with the kernel interpreted; the exactness tests above run by default
def test_cpu_tiny_learns_with_splash_as_with_tunix_attention(tiny_run_dir, tiny_data_dir, tmp_path):
    """The short cpu-tiny run (windows of 512 = its sliding window, so Tunix's attention is exact there) gives the
    same loss curve with the splash kernel."""
    run_dir = tmp_path / "splash"
    train_sft.train(tiny_run_config(run_dir, tiny_data_dir, **{"model.attention": "splash"}), tiny_data_dir)
    xla, splash = read_metrics(tiny_run_dir), read_metrics(run_dir)
    for key in ("loss", "eval_loss"):
        want = [r[key] for r in xla if r.get(key) is not None]
        got = [r[key] for r in splash if r.get(key) is not None]
        assert len(got) == len(want) >= 4 and len([r for r in splash if r.get("loss") is not None]) == TINY_RUN_STEPS
        np.testing.assert_allclose(got, want, rtol=1e-3, err_msg=key)


def test_the_tpu_presets_use_splash_and_splash_lifts_the_window_cap_on_packed_windows():
    assert [config.get_config(p).model.attention for p in ("kaggle", "unrestricted", "gpu", "cpu-tiny")] == [
        "splash", "splash", "xla", "xla"]
    assert config.get_config("kaggle", {"data.max_len": "8192"}).data.max_len == 8192  # window applied per row
    with pytest.raises(config.ConfigError, match="exceeds the sliding window 4096"):
        config.get_config("kaggle", {"data.max_len": "8192", "model.attention": "xla"})
    with pytest.raises(config.ConfigError, match="multiple of 128"):
        config.get_config("kaggle", {"data.max_len": "2000"})
    with pytest.raises(config.ConfigError, match="unknown: use xla or splash"):
        config.get_config("kaggle", {"model.attention": "flash"})
