"""Stage 4: a run's LoRA, for the hackathon's judges and for Tunix, or merged for Hugging Face.

    python export.py --preset kaggle --run runs/kaggle --format orbax --out exports/kaggle
    python export.py --preset kaggle --run runs/kaggle --format hf --out exports/kaggle-hf
    python export.py --preset unrestricted --run runs/unrestricted --out exports/unrestricted --upload USER/MODEL

``orbax`` writes one Kaggle model variation, the unrestricted-mode submission, laid out for the submission
template's cells: they download ``USER/MODEL/jax/size`` (``--upload USER/MODEL`` publishes there) and restore the
LoRA weights from the folder itself with ``ocp.StandardCheckpointer`` into ``lora_policy``, or from
``actor/<step>/model_params`` below it (the template's "may need to append"): both hold the run's LoRA
checkpoint (its ``model_params``, byte for byte). Beside them: the LoRA merged into the base model in the Kaggle
Flax layout that Tunix's loaders read (OUT/gemma2-2b-it/ for ``tunix.models.gemma.params.load_and_format_params``
+ ``Gemma.from_params(params, version="2-2b-it")``; OUT/gemma3-1b-it/ for ``tunix.models.gemma3.params.
create_model_from_checkpoint``), and OUT/tokenizer.model, so OUT also works as ``--model.checkpoint_dir``. ``hf``
writes a merged ``Gemma2ForCausalLM`` (or, for Gemma3-1B, text-only ``Gemma3ForCausalLM``) directory
(config.json, model.safetensors, tokenizer files) for transformers and vLLM.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from config import EXPORT_FORMATS, Config, ConfigError, model_family
from rundir import check_export_dir, checkpoint_dir, checkpoint_step, restore_lora, settings_from_argv, upload_handle

if __name__ == "__main__":  # settings and paths first: a bad one stops in about a second, before the imports below
    settings_from_argv(None, "export", __doc__)

import jax
import numpy as np
import orbax.checkpoint as ocp
from safetensors.numpy import save_file
from tunix.models.gemma import model as gemma_lib
from tunix.models.gemma3 import model as gemma3_lib

from chat_format import END_OF_TURN, GEMMA_CHAT_TEMPLATE
from kaggle_weights import checkpoint_folder_names, load_tokenizer, tokenizer_file
from model import Params, build_model, gemma_config, make_mesh, merged_params

# Gemma derivatives are published under the Gemma terms.
LICENSE_NAME = "Gemma"
# NNX module names whose Kaggle (linen) checkpoint name differs: the inverse of Tunix's _map_linen_var_names.
LINEN_NAMES = {"post_attn_norm": "post_attention_norm", "gate_proj": "gating_einsum", "down_proj": "linear"}
# Gemma's tokenizer pieces, the published HF models' vocab_size: Tunix pads Gemma2's embedding to 256,128 rows
# (HF gemma-2-2b-it has 256,000); Gemma3-1B's 262,144 rows are its pieces (HF gemma-3-1b-it has 262,144).
HF_VOCAB_SIZES = {gemma_lib.ModelConfig: 256_000, gemma3_lib.ModelConfig: 262_144}
# NNX weight paths inside a layer -> Hugging Face names (Gemma2 calls the post-attention norm post_attn_norm,
# Gemma3 post_attention_norm; only Gemma3 has the query and key norms). The q/kv/o einsums are reshaped.
HF_LAYER_NAMES = {
    ("mlp", "gate_proj", "kernel"): "mlp.gate_proj", ("mlp", "up_proj", "kernel"): "mlp.up_proj",
    ("mlp", "down_proj", "kernel"): "mlp.down_proj", ("pre_attention_norm", "scale"): "input_layernorm",
    ("post_attn_norm", "scale"): "post_attention_layernorm",
    ("post_attention_norm", "scale"): "post_attention_layernorm",
    ("pre_ffw_norm", "scale"): "pre_feedforward_layernorm",
    ("post_ffw_norm", "scale"): "post_feedforward_layernorm",
    ("attn", "_query_norm", "scale"): "self_attn.q_norm", ("attn", "_key_norm", "scale"): "self_attn.k_norm",
}

# ----------------------------------------------------------------------------- merge


def load_merged(cfg: Config, run_dir: Path, step: int) -> Params:
    """Builds the base model and LoRA as training does, restores the run's LoRA at step and merges it."""
    mesh = make_mesh(cfg)
    with jax.set_mesh(mesh):
        model = build_model(cfg, mesh)
        restore_lora(model, run_dir, step)
        return merged_params(model, cfg.lora.alpha, cfg.lora.rank)


# ----------------------------------------------------------------------------- Kaggle Flax (orbax) layout


def kaggle_layout(params: Params, family: str) -> dict[str, dict[str, np.ndarray]]:
    """NNX paths -> the Kaggle checkpoint's flat keys (``transformer/layer_0/attn/q_einsum`` -> {"w": ...}),
    with gate and up projections stacked into ``mlp/gating_einsum`` as Kaggle ships them: (2, D, F) for Gemma2,
    (2, F, D) for Gemma3 (Tunix's loaders take ``[0]`` and ``[1]``, Gemma3's transposed)."""
    tree: dict[str, dict[str, np.ndarray]] = {}
    for path, value in params.items():
        *module, leaf = path
        if module[-1] == "up_proj":
            continue  # stacked under gate_proj
        if module[-1] == "gate_proj":
            value = np.stack([value, params[(*module[:-1], "up_proj", leaf)]])
            if family == "gemma3":
                value = value.transpose(0, 2, 1)
        names: list[str] = ["transformer"]
        for key in module:
            if isinstance(key, int):
                names[-1] = f"layer_{key}"  # ("layers", 3) -> "layer_3"
            else:
                names.append(LINEN_NAMES.get(key, key))
        tree["/".join(names)] = {"w" if leaf == "kernel" else leaf: value}
    return tree


def save_kaggle_checkpoint(params: Params, path: Path, family: str) -> None:
    """Writes params as a Kaggle Flax checkpoint folder (orbax, Kaggle layout), as Google's download holds it."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path.resolve(), kaggle_layout(params, family), force=True)


def write_orbax(params: Params, cfg: Config, run_dir: Path, step: int, out_dir: Path) -> Path:
    """The Kaggle model variation the template reads: the run's LoRA checkpoint at OUT itself and at
    OUT/actor/<step>/model_params, the merged weights at OUT/<variation>/ (orbax, Kaggle layout) and
    OUT/tokenizer.model; returns the merged checkpoint's folder. OUT must be new, empty or an earlier export."""
    lora = checkpoint_dir(run_dir) / str(step) / "model_params"
    out_dir.mkdir(parents=True, exist_ok=True)
    for entry in lora.iterdir():  # the folder itself is a StandardCheckpointer checkpoint of the LoRA
        (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, out_dir / entry.name)
    shutil.copytree(lora, out_dir / "actor" / str(step) / "model_params")
    path = (out_dir / checkpoint_folder_names(cfg.model)[0]).resolve()
    save_kaggle_checkpoint(params, path, model_family(cfg.model))
    shutil.copy(tokenizer_file(cfg.model), out_dir / "tokenizer.model")
    return path


# ----------------------------------------------------------------------------- Hugging Face layout


def hf_state_dict(params: Params, vocab_size: int) -> dict[str, np.ndarray]:
    """NNX weights -> ``Gemma2ForCausalLM`` / ``Gemma3ForCausalLM`` names and (out, in) layouts; HF's RMSNorm also
    scales by 1 + weight. The embedding keeps its first vocab_size rows (no padding rows). Every weight is written
    under a name, or the export stops: none is silently left out."""

    def heads(w: np.ndarray) -> np.ndarray:  # (heads, D, H) -> (heads * H, D)
        return w.transpose(0, 2, 1).reshape(-1, w.shape[1])

    sd = {}
    for path, value in params.items():
        if path == ("embedder", "input_embedding"):
            sd["model.embed_tokens.weight"] = value[:vocab_size]
        elif path == ("final_norm", "scale"):
            sd["model.norm.weight"] = value
        elif path[0] != "layers":
            raise ValueError(f"no Hugging Face name for {path}")
        else:
            prefix, key = f"model.layers.{path[1]}.", path[2:]
            if key == ("attn", "q_einsum", "w"):
                sd[prefix + "self_attn.q_proj.weight"] = heads(value)
            elif key == ("attn", "kv_einsum", "w"):
                sd[prefix + "self_attn.k_proj.weight"], sd[prefix + "self_attn.v_proj.weight"] = map(heads, value)
            elif key == ("attn", "attn_vec_einsum", "w"):
                sd[prefix + "self_attn.o_proj.weight"] = value.reshape(-1, value.shape[-1]).T
            elif key in HF_LAYER_NAMES:
                sd[prefix + HF_LAYER_NAMES[key] + ".weight"] = value.T if key[-1] == "kernel" else value
            else:
                raise ValueError(f"no Hugging Face name for {path}")
    return {name: np.ascontiguousarray(value) for name, value in sd.items()}


def layer_types(mc: gemma_lib.ModelConfig | gemma3_lib.ModelConfig) -> list[str]:
    """Each layer's attention as HF names it: Gemma2's from its config, Gemma3's from Tunix's fixed pattern."""
    types = getattr(mc, "attention_types", None) or [
        t for _, t in zip(range(mc.num_layers), itertools.cycle(gemma3_lib.GEMMA3_ATTENTION_PATTERN))]
    return ["sliding_attention" if t.name == "LOCAL_SLIDING" else "full_attention" for t in types]


def hf_config(mc: gemma_lib.ModelConfig | gemma3_lib.ModelConfig, dtype: str, special_ids: dict[str, int]
              ) -> dict[str, Any]:
    """config.json of Gemma2ForCausalLM or (text-only) Gemma3ForCausalLM for Tunix's model config: same sizes,
    soft-caps, query scale, RoPE bases and layer pattern.

    Tunix scales queries by head_dim**-0.5 (Gemma3 may say (embed_dim / heads)**-0.5), hence
    query_pre_attn_scalar. Gemma3's RoPE keys are given as its published config.json has them (transformers 5
    reads them into rope_parameters)."""
    common = {
        "vocab_size": min(mc.num_embed, HF_VOCAB_SIZES[type(mc)]), "hidden_size": mc.embed_dim,
        "intermediate_size": mc.hidden_dim, "num_hidden_layers": mc.num_layers, "num_attention_heads": mc.num_heads,
        "num_key_value_heads": mc.num_kv_heads, "head_dim": mc.head_dim,
        "hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6,
        "attention_bias": False, "attention_dropout": 0.0, "layer_types": layer_types(mc),
        "tie_word_embeddings": True, "use_cache": True, "torch_dtype": dtype, "dtype": dtype,
        **{f"{name}_token_id": i for name, i in special_ids.items()},
    }
    if isinstance(mc, gemma_lib.ModelConfig):
        return {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", **common,
                "max_position_embeddings": 8192, "rope_theta": 10000.0, "query_pre_attn_scalar": mc.head_dim,
                "sliding_window": mc.sliding_window_size, "final_logit_softcapping": mc.final_logit_softcap,
                "attn_logit_softcapping": mc.attn_logits_soft_cap}
    by_head_dim = mc.query_pre_attn_norm == gemma3_lib.QueryPreAttentionNormalisation.BY_ONE_OVER_SQRT_HEAD_DIM
    return {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", **common,
            "max_position_embeddings": 32768, "rope_theta": float(mc.global_base_frequency),
            "rope_local_base_freq": float(mc.local_base_frequency),
            "rope_scaling": None if mc.global_scale_factor == 1.0 else {"rope_type": "linear",
                                                                        "factor": mc.global_scale_factor},
            "query_pre_attn_scalar": mc.head_dim if by_head_dim else mc.embed_dim // mc.num_heads,
            "sliding_window": mc.sliding_window_size,
            "sliding_window_pattern": len(gemma3_lib.GEMMA3_ATTENTION_PATTERN),
            "final_logit_softcapping": None, "attn_logit_softcapping": None}


def write_hf(params: Params, cfg: Config, out_dir: Path) -> Path:
    """config.json, generation_config.json, model.safetensors and the tokenizer files with Gemma's chat template."""
    mc = gemma_config(cfg.model)
    sp = load_tokenizer(cfg.model)
    ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id()}
    out_dir.mkdir(parents=True, exist_ok=True)
    config_json = hf_config(mc, cfg.model.dtype, ids)
    save_file(hf_state_dict(params, config_json["vocab_size"]), str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    # Greedy by default, as declared for the hackathon; a turn ends at <end_of_turn>.
    generation = {"bos_token_id": ids["bos"], "pad_token_id": ids["pad"], "do_sample": False,
                  "eos_token_id": [ids["eos"], sp.piece_to_id(END_OF_TURN)]}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    shutil.copy(tokenizer_file(cfg.model), out_dir / "tokenizer.model")
    # The tokenizer's own piece names (<bos>, <eos>, ... in Gemma's), so the template's text maps to their ids.
    special = {f"{name}_token": sp.id_to_piece(i) for name, i in {**ids, "unk": sp.unk_id()}.items()}
    tokenizer_config = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
                        "model_max_length": config_json["max_position_embeddings"],
                        "chat_template": GEMMA_CHAT_TEMPLATE,
                        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"], **special}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return out_dir


# ----------------------------------------------------------------------------- upload


def has_kaggle_credentials() -> bool:
    """KAGGLE_USERNAME/KAGGLE_KEY in the environment, or ~/.kaggle/kaggle.json (KAGGLE_CONFIG_DIR if set)."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return True
    return (Path(os.environ.get("KAGGLE_CONFIG_DIR", "~/.kaggle")).expanduser() / "kaggle.json").is_file()


def upload(out_dir: Path, model: str, notes: str) -> bool:
    """Publishes out_dir as a new version of USER/MODEL/jax/size; without credentials prints how to."""
    handle = upload_handle(model)
    if not has_kaggle_credentials():
        print("no Kaggle credentials (KAGGLE_USERNAME and KAGGLE_KEY, or ~/.kaggle/kaggle.json): to publish, "
              "set them and run\n"
              f"  python -c \"import kagglehub; kagglehub.model_upload({handle!r}, {str(out_dir.resolve())!r}, "
              f"license_name={LICENSE_NAME!r}, version_notes={notes!r})\"")
        return False
    import kagglehub

    kagglehub.model_upload(handle, str(out_dir.resolve()), license_name=LICENSE_NAME, version_notes=notes)
    print(f"uploaded {out_dir} to https://www.kaggle.com/models/{model}: set unrestricted_kaggle_model = {model!r}")
    return True


# ----------------------------------------------------------------------------- command line


def export(cfg: Config, run_dir: Path, fmt: str, out_dir: Path, step: int | None = None,
           upload_model: str = "") -> Path:
    """Exports the LoRA of run_dir at step (default: the latest) to out_dir as fmt, and with ``upload_model``
    (USER/MODEL, orbax only) publishes it to USER/MODEL/jax/size; returns out_dir."""
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format {fmt!r} is unknown: use {' or '.join(EXPORT_FORMATS)}")
    check_export_dir(out_dir, fmt, upload_model)
    step = checkpoint_step(run_dir, step)  # resolved once, before any heavy work
    load_tokenizer(cfg.model)  # the tokenizer the export ships must fit the model: checked before the build
    params = load_merged(cfg, run_dir, step)
    if out_dir.exists():
        shutil.rmtree(out_dir)  # an earlier export (check_export_dir): no file of it is left to mix with this one
    if fmt == "orbax":
        where = write_orbax(params, cfg, run_dir, step, out_dir)
        print(f"wrote {out_dir}: the LoRA of step {step} (restorable from the folder and from "
              f"actor/{step}/model_params), and {where} merged (Kaggle Flax layout) with tokenizer.model: load it "
              f"with --model.checkpoint_dir {out_dir}")
    else:
        write_hf(params, cfg, out_dir)
        architecture = json.loads((out_dir / "config.json").read_text())["architectures"][0]
        print(f"wrote {out_dir} (Hugging Face {architecture}, {cfg.model.dtype})")
    (out_dir / "export.json").write_text(json.dumps(
        {"run": str(run_dir), "step": step, "format": fmt, "preset": cfg.preset, "model": cfg.model.name,
         "lora": {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha}}, indent=2) + "\n")
    if upload_model:
        upload(out_dir, upload_model, f"{cfg.preset} run {run_dir.name}, step {step}: LoRA + merged weights")
    return out_dir


def main(argv: list[str] | None = None) -> Path:
    cfg, args = settings_from_argv(argv, "export", __doc__)
    try:
        return export(cfg, Path(args.run), args.format, Path(args.out), args.step, args.upload)
    except ConfigError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
