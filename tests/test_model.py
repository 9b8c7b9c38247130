"""The model stage: masks and loss, the Kaggle checkpoint loader and its cache, meshes, LoRA at real size."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import config
import export
import kaggle_weights
import model
import tunix_adapter

# ----------------------------------------------------------------------------- masks and loss


def test_packed_mask_keeps_rows_apart():
    segment_ids = jnp.array([[1, 1, 2, 2, 2, 0]])
    mask = np.asarray(model.packed_attention_mask(segment_ids))[0]
    expected = np.array([[1, 0, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0, 0],
                         [0, 0, 1, 0, 0, 0],
                         [0, 0, 1, 1, 0, 0],
                         [0, 0, 1, 1, 1, 0],
                         [0, 0, 0, 0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(mask, expected)


def test_packed_row_sees_nothing_of_its_neighbour(each_tiny_model):
    """The second row of a packed window gets exactly the logits it gets alone."""
    rng = np.random.default_rng(0)
    row_a, row_b = rng.integers(5, 2000, 7), rng.integers(5, 2000, 5)
    packed = np.concatenate([row_a, row_b, [0, 0]])[None].astype(np.int32)
    segments = np.array([[1] * 7 + [2] * 5 + [0, 0]], np.int32)
    positions = np.array([list(range(7)) + list(range(5)) + [0, 0]], np.int32)
    logits, _ = each_tiny_model(packed, positions, None, model.packed_attention_mask(segments))
    alone = row_b[None].astype(np.int32)
    alone_logits, _ = each_tiny_model(alone, np.arange(5)[None], None,
                                      model.packed_attention_mask(np.ones((1, 5), np.int32)))
    np.testing.assert_allclose(logits[0, 7:12], alone_logits[0], atol=1e-5)
    # and the neighbour matters when the mask lets it in: the check above can fail
    leaky = jnp.tril(jnp.ones((1, 14, 14), bool))
    leaky_logits, _ = each_tiny_model(packed, positions, None, leaky)
    assert not np.allclose(leaky_logits[0, 7:12], alone_logits[0], atol=1e-3)


def test_gemma3_rows_longer_than_the_sliding_window_stay_exact_when_packed(tiny_gemma3_model):
    """Tunix's Gemma3 builds its prefill band from absolute indices, so each packed row gets the logits it gets
    alone even where it is longer than the window (32 here, against 512 in a 2048 window at real size)."""
    window = config.get_config("cpu-tiny-gemma3").model.sliding_window
    rng = np.random.default_rng(4)
    lengths = [70, 90, 80]  # each longer than twice the window, 240 of a 256-token packed window
    assert min(lengths) > 2 * window
    rows = [rng.integers(5, 2000, n) for n in lengths]
    pad = 256 - sum(lengths)
    tokens = np.concatenate([*rows, np.zeros(pad, int)])[None].astype(np.int32)
    segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(pad, int)])[None]
    positions = np.concatenate([np.arange(n) for n in lengths] + [np.zeros(pad, int)])[None].astype(np.int32)
    forward = nnx.jit(lambda m, tokens, positions, mask: m(tokens, positions, None, mask)[0])  # compiles per shape
    logits = forward(tiny_gemma3_model, tokens, positions, model.packed_attention_mask(segments))

    def alone(row: np.ndarray) -> np.ndarray:
        mask = model.packed_attention_mask(np.ones((1, len(row)), np.int32))
        return np.asarray(forward(tiny_gemma3_model, row[None].astype(np.int32), np.arange(len(row))[None], mask)[0])

    starts = np.cumsum([0, *lengths])
    for row, start in zip(rows, starts, strict=False):
        np.testing.assert_allclose(logits[0, start:start + len(row)], alone(row), atol=1e-5)
    # the window is active at these lengths: with a window as long as the row, the same row's logits differ
    local = [layer.attn for layer in tiny_gemma3_model.layers if layer.attn.attn_type.name == "LOCAL_SLIDING"]
    assert 0 < len(local) < len(tiny_gemma3_model.layers)  # five local layers, one global
    for attn in local:
        attn.sliding_window_size = 256
    try:
        unwindowed = alone(rows[-1])
    finally:
        for attn in local:
            attn.sliding_window_size = window
    assert not np.allclose(unwindowed[window:], alone(rows[-1])[window:], atol=1e-3)


def test_gather_loss_equals_tunix_one_hot_loss(each_tiny_model):
    tiny_model = each_tiny_model
    rng = np.random.default_rng(1)
    tokens = rng.integers(5, 2000, (2, 16)).astype(np.int32)
    loss_mask = np.zeros((2, 16), np.int32)
    loss_mask[:, 6:14] = 1
    inputs = model.gen_model_input({"tokens": tokens, "loss_mask": loss_mask,
                                        "segment_ids": np.ones((2, 16), np.int32),
                                        "positions": np.tile(np.arange(16, dtype=np.int32), (2, 1))})
    loss, aux = model.loss_fn(tiny_model, **inputs)
    reference = tunix_adapter.default_loss_fn(tiny_model, tokens, loss_mask, inputs["positions"],
                                              inputs["attention_mask"])
    assert float(loss) == pytest.approx(float(reference), rel=1e-5)
    assert float(aux["loss_tokens"]) == 16  # positions 6..13 of both rows are targets
    evaluated = model.evaluate_loss(tiny_model, [{"tokens": tokens, "loss_mask": loss_mask,
                                                      "segment_ids": np.ones((2, 16), np.int32),
                                                      "positions": np.asarray(inputs["positions"])}])
    assert evaluated["loss"] == pytest.approx(float(reference), rel=1e-5)
    assert evaluated["loss_tokens"] == 16


def loss_batch(packed: bool, seed: int = 2) -> dict[str, np.ndarray]:
    """Two windows of 23 tokens: packed (rows of 9 + 8 tokens, then padding) or one row each."""
    rng = np.random.default_rng(seed)
    length = 23
    tokens = rng.integers(5, 2000, (2, length)).astype(np.int32)
    if packed:
        segment_ids = np.array([[1] * 9 + [2] * 8 + [0] * 6, [1] * 12 + [2] * 11], np.int32)
        positions = np.array([list(range(9)) + list(range(8)) + [0] * 6, list(range(12)) + list(range(11))],
                             np.int32)
        loss_mask = np.zeros((2, length), np.int32)
        loss_mask[0, 4:9] = loss_mask[0, 12:17] = loss_mask[1, 5:12] = loss_mask[1, 15:23] = 1
    else:
        segment_ids = np.ones((2, length), np.int32)
        positions = np.tile(np.arange(length, dtype=np.int32), (2, 1))
        loss_mask = np.zeros((2, length), np.int32)
        loss_mask[0, 6:] = loss_mask[1, 3:20] = 1
    return {"tokens": tokens, "loss_mask": loss_mask, "segment_ids": segment_ids, "positions": positions}


def loss_and_lora_grads(lora_model: nnx.Module, batch: dict[str, np.ndarray], loss_chunk: int):
    """The loss and its gradient w.r.t. the LoRA params, as the trainer takes it."""
    grad_fn = nnx.value_and_grad(lambda m, inputs: model.loss_fn(m, **inputs, loss_chunk=loss_chunk),
                                 argnums=nnx.DiffState(0, nnx.LoRAParam), has_aux=True)
    (loss, aux), grads = nnx.jit(grad_fn)(lora_model, model.gen_model_input(batch))
    return float(loss), float(aux["loss_tokens"]), {p: np.asarray(v.get_value()) for p, v in grads.flat_state()}


@pytest.fixture
def trained_lora_model(each_tiny_model):
    """Each tiny model with nonzero LoRA B (as after training), so LoRA changes the logits."""
    lora = nnx.state(each_tiny_model, nnx.LoRAParam)
    rng = np.random.default_rng(3)
    nnx.update(each_tiny_model, jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape) * 0.05, x.dtype),
                                             lora))
    yield each_tiny_model
    nnx.update(each_tiny_model, lora)


# 22 positions a row: neither 5 nor 7 divides it
@pytest.mark.parametrize(("packed", "chunk"), [(False, 5), (True, 7)], ids=["unpacked", "packed"])
def test_chunked_loss_equals_the_full_logits_loss_in_value_and_lora_gradient(trained_lora_model, packed, chunk):
    batch = loss_batch(packed)
    full_loss, full_tokens, full_grads = loss_and_lora_grads(trained_lora_model, batch, loss_chunk=0)
    assert full_tokens == batch["loss_mask"][:, 1:].sum()
    nonzero = [p for p, g in full_grads.items() if np.abs(g).max() > 1e-4]
    assert len(nonzero) == len(full_grads)  # every LoRA tensor (attention and MLP) gets a gradient to compare
    loss, tokens, grads = loss_and_lora_grads(trained_lora_model, batch, loss_chunk=chunk)
    assert tokens == full_tokens
    assert loss == pytest.approx(full_loss, rel=1e-5)
    for path, grad in grads.items():
        np.testing.assert_allclose(grad, full_grads[path], rtol=1e-5, atol=1e-5 * np.abs(full_grads[path]).max(),
                                   err_msg=str(path))


def test_chunked_loss_applies_lora_and_the_final_softcap(trained_lora_model, tiny_preset):
    """The chunked loss goes through LoRA (a different LoRA, a different loss) and Gemma2's logit soft-cap (Gemma3
    has none)."""
    batch = [loss_batch(packed=True)]
    chunked = model.evaluate_loss(trained_lora_model, batch, loss_chunk=5)["loss"]
    lora = nnx.state(trained_lora_model, nnx.LoRAParam)
    nnx.update(trained_lora_model, jax.tree.map(jnp.zeros_like, lora))
    without_lora = model.evaluate_loss(trained_lora_model, batch, loss_chunk=5)["loss"]
    nnx.update(trained_lora_model, lora)
    assert abs(chunked - without_lora) > 1e-3
    softcap = model.final_softcap(trained_lora_model)
    assert softcap == {"cpu-tiny": 30.0, "cpu-tiny-gemma3": None}[tiny_preset]
    if softcap is None:
        return
    trained_lora_model.final_logits_softcap = None
    uncapped = model.evaluate_loss(trained_lora_model, batch, loss_chunk=5)["loss"]
    uncapped_full = model.evaluate_loss(trained_lora_model, batch, loss_chunk=0)["loss"]
    trained_lora_model.final_logits_softcap = softcap
    assert uncapped == pytest.approx(uncapped_full, rel=1e-5) and abs(uncapped - chunked) > 1e-4


def test_chunked_eval_loss_skips_nothing_it_should_count(trained_lora_model):
    """evaluate_loss with chunks equals the full-logits value, on a batch whose second half has no loss tokens."""
    batch = loss_batch(packed=True)
    batch["loss_mask"][:, 12:] = 0
    full = model.evaluate_loss(trained_lora_model, [batch], loss_chunk=0)
    for chunk in (4, 512):  # 512: one chunk, mostly padding
        chunked = model.evaluate_loss(trained_lora_model, [batch], loss_chunk=chunk)
        assert chunked["loss"] == pytest.approx(full["loss"], rel=1e-5)
        assert chunked["loss_tokens"] == full["loss_tokens"] == 5 + 7


def test_mesh_must_match_the_devices():
    cfg = config.get_config("cpu-tiny", {"run.mesh_fsdp": "2", "run.micro_batch": "4"})
    with pytest.raises(config.ConfigError, match="needs 2 devices but 1 are present"):
        model.make_mesh(cfg)



# ----------------------------------------------------------------------------- the Kaggle checkpoint loader


def write_kaggle_checkpoint(state: nnx.State, folder: Path, family: str) -> None:
    """Writes weights in the Kaggle Flax layout of a Gemma2 or Gemma3 download, as export's orbax format does."""
    export.save_kaggle_checkpoint({path: np.asarray(v.get_value()) for path, v in state.flat_state()}, folder, family)


def test_kaggle_layout_checkpoint_loads_converts_once_and_caches(tmp_path, monkeypatch, tiny_preset):
    cfg = config.get_config(tiny_preset)
    mesh = model.make_mesh(cfg)
    with mesh:
        reference = model.load_base_model(cfg, mesh)
    folder = kaggle_weights.checkpoint_folder_names(cfg.model)[0]
    assert folder == {"cpu-tiny": "gemma2-2b-it", "cpu-tiny-gemma3": "gemma3-1b-it"}[tiny_preset]
    write_kaggle_checkpoint(nnx.state(reference), tmp_path / "kaggle" / folder, config.model_family(cfg.model))
    (tmp_path / "kaggle" / "tokenizer.model").write_bytes(config.TINY_TOKENIZER_PATH.read_bytes())
    # init_seed changes the random init: equal logits prove the weights came from the file.
    loaded_cfg = config.get_config(tiny_preset, {"model.checkpoint_dir": str(tmp_path / "kaggle"),
                                                 "model.cache_dir": str(tmp_path / "cache"), "model.init_seed": "9"})
    tokens = np.array([[2, 106, 30, 40, 50, 107]], np.int32)
    positions, mask = np.arange(6)[None], model.packed_attention_mask(np.ones((1, 6), np.int32))
    with mesh:
        want, _ = reference(tokens, positions, None, mask)
        first = model.load_base_model(loaded_cfg, mesh)
        cached = list((tmp_path / "cache").iterdir())
        assert len(cached) == 1 and cached[0].name.startswith(f"{cfg.model.name}-nnx-")
        monkeypatch.setattr(model, "_convert_kaggle_checkpoint",
                            lambda *a: pytest.fail("the cached conversion was not reused"))
        second = model.load_base_model(loaded_cfg, mesh)
        np.testing.assert_allclose(first(tokens, positions, None, mask)[0], want, atol=1e-6)
        np.testing.assert_allclose(second(tokens, positions, None, mask)[0], want, atol=1e-6)
        other_model = config.get_config(tiny_preset, {"model.checkpoint_dir": str(tmp_path / "kaggle"),
                                                      "model.cache_dir": str(tmp_path / "cache"),
                                                      "model.num_layers": "2"})
        monkeypatch.undo()
        with pytest.raises(config.ConfigError, match=f"does not fit --model.name {cfg.model.name}"):  # no stale cache
            model.load_base_model(other_model, mesh)


@pytest.mark.parametrize("saved, loaded", [("cpu-tiny", "cpu-tiny-gemma3"), ("cpu-tiny-gemma3", "cpu-tiny")])
def test_a_download_of_the_other_architecture_is_refused(tmp_path, saved, loaded):
    """Gemma3's weights given as Gemma2's (or the reverse) stop with one line, whatever the folder is called."""
    cfg = config.get_config(saved)
    state = nnx.state(model.abstract_model(cfg.model))
    state = model.random_tiny_state(state, 0, cfg.model.embed_dim)
    write_kaggle_checkpoint(state, tmp_path / "gemma2-2b-it", config.model_family(cfg.model))
    (tmp_path / "gemma3-1b-it").symlink_to(tmp_path / "gemma2-2b-it")
    (tmp_path / "tokenizer.model").write_bytes(config.TINY_TOKENIZER_PATH.read_bytes())
    other = config.get_config(loaded, {"model.checkpoint_dir": str(tmp_path), "model.num_layers": "6"})
    with pytest.raises(config.ConfigError, match=rf"^checkpoint {tmp_path}/\S+ does not fit --model.name "
                                                 rf"{other.model.name} \(.*\): use the checkpoint of that model$"):
        model.load_base_model(other, model.make_mesh(other))


def test_wrong_size_checkpoint_names_both_shapes(tmp_path):
    cfg = config.get_config("cpu-tiny")
    mesh = model.make_mesh(cfg)
    with mesh:
        state = nnx.state(model.load_base_model(cfg, mesh))
    write_kaggle_checkpoint(state, tmp_path / "gemma2-2b-it", "gemma2")
    (tmp_path / "tokenizer.model").write_bytes(config.TINY_TOKENIZER_PATH.read_bytes())
    bigger = config.get_config("cpu-tiny", {"model.checkpoint_dir": str(tmp_path), "model.embed_dim": "256"})
    with pytest.raises(config.ConfigError, match=r"of shape \(2048, 128\) but --model.name tiny expects \(2048, 256\)"):
        model.load_base_model(bigger, mesh)


# Each real model's sizes, counted independently of Tunix: layers, vocab (embedding rows), width, MLP, heads, kv
# heads, head_dim, and whether the attention has query/key norms (Gemma3).
REAL_SHAPES = {"kaggle": (26, 256_128, 2304, 9216, 8, 4, 256, False),
               "kaggle-gemma3": (26, 262_144, 1152, 6912, 4, 1, 256, True)}


@pytest.mark.parametrize("preset, base_params, lora_params", [("kaggle", 2_614_636_800, 79_233_024),
                                                              ("kaggle-gemma3", 999_885_952, 50_266_112)])
def test_real_model_lora_and_sharding_build_abstractly_on_8_devices(eight_devices, preset, base_params, lora_params):
    """Each real model with the preset's LoRA, built abstractly on 8 devices: its parameter counts, LoRA on exactly
    the q, kv, attention-output, gate, up and down projections of every layer (what the regex is meant to match
    on the model's real module paths), and its shardings."""
    out = eight_devices(f"""
        import json, jax, psutil
        from flax import nnx
        import config, model
        cfg = config.get_config({preset!r})
        mesh = model.make_mesh(cfg)
        arrays, rss = len(jax.live_arrays()), psutil.Process().memory_info().rss
        with mesh:
            abstract = model.abstract_model(cfg.model)
            lora_model = nnx.eval_shape(lambda: model.apply_lora(model.abstract_model(cfg.model), cfg, None))
        shardings = nnx.get_named_sharding(nnx.state(lora_model), mesh)
        specs = {{str(p): list(s.spec) for p, s in shardings.flat_state()}}
        lora = ["/".join(map(str, p[:-1])) for p, _ in nnx.state(lora_model, nnx.LoRAParam).flat_state()]
        print(json.dumps({{"total": model.count_params(lora_model),
                          "lora": model.count_params(lora_model, nnx.LoRAParam),
                          "lora_modules": sorted(set(lora)),
                          "targets": model.lora_targets(abstract, cfg.lora.module_path),
                          "new_arrays": len(jax.live_arrays()) - arrays,
                          "rss_growth_gb": (psutil.Process().memory_info().rss - rss) / 1e9,
                          "embedding": specs["('embedder', 'input_embedding')"],
                          "gate": specs["('layers', 0, 'mlp', 'gate_proj', 'kernel')"]}}))
    """)
    result = json.loads(out.strip().splitlines()[-1])
    layers, vocab, d, f, n, k, h, qk_norms = REAL_SHAPES[preset]
    base = vocab * d + d + layers * (n * d * h + 2 * k * d * h + n * h * d + 3 * d * f + 4 * d + 2 * h * qk_norms)
    assert base == base_params
    # rank 64 on q, kv, attn_vec, gate, up, down: r * (fan_in + fan_out) each
    lora = layers * 64 * ((d + n * h) + (d + 2 * k * h) + (n * h + d) + 2 * (d + f) + (f + d))
    assert result["lora"] == lora == lora_params
    assert result["total"] == base + lora
    projections = ("attn/attn_vec_einsum", "attn/kv_einsum", "attn/q_einsum", "mlp/down_proj", "mlp/gate_proj",
                   "mlp/up_proj")
    wanted = sorted(f"layers/{i}/{name}" for i in range(layers) for name in projections)
    assert result["lora_modules"] == wanted
    assert sorted(result["targets"]) == wanted
    assert result["new_arrays"] == 0 and result["rss_growth_gb"] < 1  # nothing of the real model (2-5 GB) allocated
    assert result["embedding"] == ["tp", "fsdp"] and result["gate"] == ["fsdp", "tp"]


def test_a_lora_regex_that_matches_no_projection_stops_before_the_build(monkeypatch):
    cfg = config.get_config("cpu-tiny-gemma3", {"lora.module_path": ".*q_proj|.*o_proj"})  # HF's names, not Tunix's
    monkeypatch.setattr(model, "load_base_model", lambda *a: pytest.fail("weights were loaded"))
    with pytest.raises(config.ConfigError, match=r"^--lora.module_path '\.\*q_proj\|\.\*o_proj' matches no "
                                                 r"projection of tiny-gemma3 .*: fix the regex"):
        model.build_model(cfg, model.make_mesh(cfg))
    assert model.lora_targets(model.abstract_model(cfg.model), ".*mlp/up_proj") == [
        f"layers/{i}/mlp/up_proj" for i in range(cfg.model.num_layers)]


def test_generation_masks_the_embedding_rows_past_the_tokenizer_and_refuses_a_tokenizer_far_too_small():
    """Gemma's 128 padding rows are masked; a 2,048-piece tokenizer on the 256,128-row embedding is refused at
    once (Tunix's Sampler would spend its compile on 254,080 forbidden ids and run out of memory)."""
    tokenizer = kaggle_weights.load_tokenizer(config.get_config("cpu-tiny").model)
    pieces = tokenizer.get_piece_size()

    def ids(vocab: int) -> range:
        shapes = config.get_config("cpu-tiny", {"model.vocab_size": str(vocab)}).model
        return model.undecodable_ids(tokenizer, model.abstract_model(shapes))

    assert ids(pieces) == range(0)
    assert ids(pieces + 128) == range(pieces, pieces + 128)
    with pytest.raises(config.ConfigError, match="--model.tokenizer_path"):
        ids(pieces + model.MAX_UNDECODABLE_IDS + 1)


@pytest.mark.parametrize("kind, peak", [
    ("TPU v5 lite", 197e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12), ("cpu", None)])
def test_peak_flops_by_device_kind(kind, peak):
    assert model.device_peak_flops(kind) == peak
