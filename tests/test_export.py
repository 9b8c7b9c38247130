"""Export: a restored LoRA equals the trained one, and the merged orbax and HF exports give the same logits."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import logit_tokens, logits_of
from flax import nnx
from judges_procedure import UNRESTRICTED, UNRESTRICTED_WITH_SUFFIX, LocalKaggleHub, run_cells
from tunix.models.gemma import model as gemma_lib
from tunix.models.gemma import params as gemma_params
from tunix.models.gemma3 import model as gemma3_lib
from tunix.models.gemma3 import params as gemma3_params

import chat_format
import config
import export
import kaggle_weights
import tunix_adapter
from model import build_model, gemma_config, make_mesh, merged_params
from rundir import checkpoint_step, newest_good_step, restore_lora


@pytest.fixture(scope="module")
def tokens(tiny_data_dir: Path) -> np.ndarray:
    return logit_tokens(tiny_data_dir)


@pytest.fixture(scope="module")
def tiny_cfg(tiny_preset: str) -> config.Config:
    return config.get_config(tiny_preset)


@pytest.fixture(scope="module")
def restored(each_tiny_run_dir: Path, tiny_cfg: config.Config, tokens: np.ndarray) -> dict:
    """Each architecture's tiny run's final LoRA on the base model, as training builds it: its logits, base and
    merged weights."""
    mesh = make_mesh(tiny_cfg)
    with jax.set_mesh(mesh):
        model = build_model(tiny_cfg, mesh)
        restore_lora(model, each_tiny_run_dir, checkpoint_step(each_tiny_run_dir))
        return {"logits": logits_of(model, tokens),
                "base": {p: np.asarray(v.get_value()) for p, v in nnx.state(model, nnx.Param).flat_state()},
                "lora": lora_arrays(model),
                "merged": merged_params(model, tiny_cfg.lora.alpha, tiny_cfg.lora.rank)}


def lora_arrays(model: nnx.Module) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.state(model, nnx.LoRAParam).flat_state()}


@pytest.fixture(scope="module")
def variation(each_tiny_run_dir: Path, tiny_cfg: config.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each architecture's tiny run exported as the Kaggle model variation of the unrestricted mode."""
    return export.export(tiny_cfg, each_tiny_run_dir, "orbax", tmp_path_factory.mktemp("export") / "variation")


def test_restored_lora_matches_the_trained_model(each_tiny_run_dir: Path, tiny_cfg: config.Config, restored: dict,
                                                 tokens: np.ndarray) -> None:
    """Each architecture's run's final checkpoint, restored into a fresh model, gives the logits the model had in
    memory when training ended."""
    trained = np.load(each_tiny_run_dir.parent / "trained_logits.npy")
    np.testing.assert_array_equal(restored["logits"], trained)
    mesh = make_mesh(tiny_cfg)
    with jax.set_mesh(mesh):
        before = logits_of(build_model(tiny_cfg, mesh), tokens)
    assert np.abs(trained - before).max() > 1e-3  # training changed the model


def test_merge_changes_exactly_the_lora_targets(restored: dict) -> None:
    base, merged = restored["base"], restored["merged"]
    assert set(merged) == {p for p in base if not str(p[-1]).endswith(("_lora_a", "_lora_b"))}
    changed = {p[2:] for p in merged if not np.array_equal(merged[p], base[p])}
    assert changed == {("attn", m, "w") for m in ("q_einsum", "kv_einsum", "attn_vec_einsum")} | {
        ("mlp", m, "kernel") for m in ("gate_proj", "up_proj", "down_proj")}


def tunix_loader_model(cfg: config.Config, variation: Path) -> nnx.Module:
    """The merged orbax export loaded by Tunix's own loader of the architecture (in float32, for an exact
    comparison). Gemma2: load_and_format_params, then from_params' own body (it knows only the published sizes;
    benchmarks/real_shape_cpu.py calls from_params itself at Gemma2-2B's widths); Gemma3:
    create_model_from_checkpoint."""
    folder = variation / kaggle_weights.checkpoint_folder_names(cfg.model)[0]
    assert folder.name == {"gemma2": "gemma2-2b-it", "gemma3": "gemma3-1b-it"}[config.model_family(cfg.model)]
    if config.model_family(cfg.model) == "gemma3":
        return gemma3_params.create_model_from_checkpoint(str(folder), gemma_config(cfg.model), dtype=jnp.float32)
    params = gemma_params.load_and_format_params(str(folder))
    return gemma_lib.module_from_linen_variables(
        module_factory=lambda: gemma_lib.Gemma(gemma_config(cfg.model), rngs=nnx.Rngs(params=0)),
        variables=params["transformer"], map_key_fn=tunix_adapter.map_linen_var_names,
        assign_val_fn=tunix_adapter.assign_linen_params_to_nnx_state)


def test_orbax_export_loads_in_train_sft_and_tunix(variation: Path, tiny_cfg: config.Config, restored: dict,
                                                   tokens: np.ndarray) -> None:
    assert (variation / "tokenizer.model").is_file()
    cfg = config.get_config(tiny_cfg.preset, {"model.checkpoint_dir": str(variation)})
    mesh = make_mesh(cfg)
    with jax.set_mesh(mesh):
        merged = build_model(cfg, mesh, with_lora=False)
        np.testing.assert_allclose(logits_of(merged, tokens), restored["logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits_of(tunix_loader_model(cfg, variation), tokens), restored["logits"],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cell", [UNRESTRICTED, UNRESTRICTED_WITH_SUFFIX], ids=["as-is", "actor-step-suffix"])
def test_the_judges_unrestricted_cells_restore_the_final_lora_from_the_export(
        variation: Path, each_tiny_run_dir: Path, tiny_cfg: config.Config, restored: dict, tokens: np.ndarray,
        cell: str) -> None:
    """The template's unrestricted cell on each architecture's export, only kagglehub's download replaced by the
    folder: with and without the appended actor/<step>/model_params it puts the run's final LoRA into a fresh
    lora_policy."""
    mesh = make_mesh(tiny_cfg)
    with jax.set_mesh(mesh):
        lora_policy = build_model(tiny_cfg, mesh)
    assert not all(np.array_equal(a, restored["lora"][p]) for p, a in lora_arrays(lora_policy).items())
    kernel = {"os": os, "jax": jax, "nnx": nnx, "ocp": ocp, "lora_policy": lora_policy,
              "unrestricted_kaggle_model": "me/gemma-tunix", "latest_step": checkpoint_step(each_tiny_run_dir),
              "kagglehub": LocalKaggleHub({"me/gemma-tunix/jax/size": str(variation)})}
    run_cells(kernel, cell)
    got = lora_arrays(lora_policy)
    assert got.keys() == restored["lora"].keys()
    for path, value in got.items():
        assert value.dtype == restored["lora"][path].dtype and np.array_equal(value, restored["lora"][path]), path
    np.testing.assert_array_equal(logits_of(lora_policy, tokens), restored["logits"])


def test_hf_export_matches_in_transformers(each_tiny_run_dir: Path, tiny_cfg: config.Config, restored: dict,
                                           tokens: np.ndarray, tmp_path: Path) -> None:
    """Gemma2's export loads as Gemma2ForCausalLM, Gemma3's as (text-only) Gemma3ForCausalLM, to the same logits:
    on 48 tokens, longer than the tiny Gemma3's sliding window."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = export.main(["--preset", tiny_cfg.preset, "--run", str(each_tiny_run_dir), "--format", "hf", "--out",
                       str(tmp_path / "hf")])
    assert json.loads((out / "export.json").read_text())["step"] == newest_good_step(each_tiny_run_dir)
    assert tokens.shape[1] > tiny_cfg.model.sliding_window or config.model_family(tiny_cfg.model) == "gemma2"
    architecture = {"gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}[config.model_family(tiny_cfg.model)]
    model = getattr(transformers, architecture).from_pretrained(out, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(logits, restored["logits"], rtol=1e-4, atol=1e-4)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Why is the sky blue?"}], tokenize=False,
                                         add_generation_prompt=True)
    sp = kaggle_weights.load_tokenizer(tiny_cfg.model)
    assert text == tokenizer.bos_token + chat_format.build_prompt("Why is the sky blue?").replace(
        f"{chat_format.INSTRUCTION}\n\n", "")
    assert tokenizer(text, add_special_tokens=False).input_ids == [sp.bos_id(), *sp.encode(text.removeprefix(
        tokenizer.bos_token))]


def test_upload_without_credentials_prints_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path))
    assert not export.upload(tmp_path, "me/model", "notes")
    out = capsys.readouterr().out
    assert f"kagglehub.model_upload('me/model/jax/size', '{tmp_path.resolve()}'" in out


def test_upload_with_credentials_goes_where_the_template_downloads(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import kagglehub

    calls = []
    monkeypatch.setenv("KAGGLE_USERNAME", "me")
    monkeypatch.setenv("KAGGLE_KEY", "secret")
    monkeypatch.setattr(kagglehub, "model_upload", lambda *a, **k: calls.append((a, k)))
    assert export.upload(tmp_path, "me/model", "notes")
    assert calls == [(("me/model/jax/size", str(tmp_path.resolve())),
                      {"license_name": export.LICENSE_NAME, "version_notes": "notes"})]
    for handle in ("me/model/jax/size", "me", "me/"):  # the notebook names USER/MODEL; the template adds /jax/size
        with pytest.raises(config.ConfigError, match="pass OWNER/MODEL"):
            export.upload(tmp_path, handle, "notes")


def test_an_export_replaces_only_an_earlier_export(each_tiny_run_dir: Path, tiny_cfg: config.Config, tmp_path: Path
                                                   ) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(config.ConfigError, match="not an export"):
        export.export(tiny_cfg, each_tiny_run_dir, "orbax", tmp_path)
    with pytest.raises(config.ConfigError, match="drop --upload"):
        export.export(tiny_cfg, each_tiny_run_dir, "hf", tmp_path / "hf", upload_model="me/model")
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "hf").exists()


def test_hf_export_drops_tunix_embedding_padding_to_the_published_vocabulary() -> None:
    """Tunix's gemma2-2b-it embedding has 256,128 rows; the published HF gemma-2-2b-it config says 256,000."""
    mc = gemma_lib.ModelConfig.gemma2_2b_it()
    assert mc.num_embed == 256_128
    assert export.hf_config(mc, "bfloat16", {"bos": 2})["vocab_size"] == 256_000
    embedding = np.arange(mc.num_embed, dtype=np.float32)[:, None]  # row i holds i
    params = {("embedder", "input_embedding"): embedding, ("final_norm", "scale"): np.zeros(1, np.float32)}
    sd = export.hf_state_dict(params, vocab_size=256_000)
    assert sd["model.embed_tokens.weight"].shape == (256_000, 1)
    assert sd["model.embed_tokens.weight"][-1, 0] == 255_999


# The published google/gemma-3-1b-it config.json values (huggingface.co/google/gemma-3-1b-it) the export must carry.
PUBLISHED_GEMMA3_1B_CONFIG = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 262_144, "hidden_size": 1152,
    "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4, "num_key_value_heads": 1,
    "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "rope_theta": 1_000_000, "rope_local_base_freq": 10000, "rope_scaling": None,
    "query_pre_attn_scalar": 256, "sliding_window": 512, "sliding_window_pattern": 6,
    "attn_logit_softcapping": None, "final_logit_softcapping": None, "attention_bias": False,
    "tie_word_embeddings": True, "bos_token_id": 2, "pad_token_id": 0,
}


def test_hf_config_of_gemma3_1b_it_carries_the_published_values() -> None:
    """Tunix's gemma3_1b_it() written as HF config.json: every value the published config has, and the layer
    pattern transformers derives from sliding_window_pattern 6 (every sixth layer global)."""
    written = export.hf_config(gemma3_lib.ModelConfig.gemma3_1b_it(), "bfloat16", {"bos": 2, "pad": 0})
    assert {key: written[key] for key in PUBLISHED_GEMMA3_1B_CONFIG} == PUBLISHED_GEMMA3_1B_CONFIG
    assert written["layer_types"] == ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                      for i in range(26)]
