"""The ``kaggle`` preset's own code path at Gemma2-2B-it's real shapes (or ``kaggle-gemma3``'s at Gemma3-1B-it's),
end to end on the CPU, with random weights.

Writes a random bf16 Gemma2-2B-it checkpoint in the Kaggle Flax layout (every real key and shape, the MLP's
gate and up projections stacked as ``gating_einsum`` (2, 2304, 9216); Gemma3-1B-it's as (2, 6912, 1152)) plus
the tiny tokenizer (its ids are a subset of Gemma's) padded to Gemma's 256,000 pieces (Gemma3's 262,144) as a
fake download, then runs the real command-line
stages on it with the preset and only the overrides its size on this machine demands: data
preparation from the shipped sample, the conversion to the NNX cache, training with a checkpoint, a SIGKILL
and a resume, ``eval_samples.py --loss-only`` and a few generated tokens, and both exports. It then loads
the orbax export's merged weights exactly as the judges do (``params.load_and_format_params`` +
``Gemma.from_params(params, version="2-2b-it")``; Gemma3: ``gemma3.params.create_model_from_checkpoint``) and the
HF export with transformers' ``Gemma2ForCausalLM`` (``Gemma3ForCausalLM``), runs the submission template's
evaluation cells (``tests/judges_procedure.py``): the single-session restore of ``CKPT_DIR/actor/<step>/model_params``
into ``lora_policy`` with its Sampler and a stand-in judge, and the unrestricted restore from the export's folder with
and without ``actor/<step>/model_params``, compares every logits with the LoRA model's, and checks the HF
config.json against the published gemma-2-2b-it (gemma-3-1b-it) values.

    python benchmarks/real_shape_cpu.py --layers 2              # every real width, 2 layers: every stage
    python benchmarks/real_shape_cpu.py --layers 26 --base-only # Gemma2-2B-it itself: what needs no training
    python benchmarks/real_shape_cpu.py --preset kaggle-gemma3 --layers 26   # Gemma3-1B-it: every stage

Each stage is one subprocess whose wall time and peak RSS (wait4) are measured; the table is printed and
appended to benchmarks/results_real_shape_cpu.md. A re-run with the same ``--work`` continues after the
stages that passed. Run it alone (``flock /tmp/heavy.lock`` where other jobs share the machine): on a 2-core,
24 GiB machine ``--layers 2`` takes about 15 minutes and its training peaks at 10.6 GB RSS; at 26 layers
training needs more memory than such a machine has, so ``--base-only`` writes the checkpoint, converts it
and loads it with the judges' loader (about 4 minutes, peak 14 GB RSS).
Overrides beyond size: a learning rate of 1e-3 without warmup, so that three steps move the LoRA far
enough that the exports' logits visibly differ from the base model's (a merge that dropped the LoRA fails).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))
sys.path.insert(0, str(REPO_DIR / "tests"))  # judges_procedure: the template's evaluation cells, rebuilt

import config  # noqa: E402
import kaggle_weights  # noqa: E402
import rundir  # noqa: E402

RESULTS_PATH = REPO_DIR / "benchmarks" / "results_real_shape_cpu.md"
# A few token ids (all below the tiny tokenizer's 2048 pieces) whose logits the exports must reproduce.
PROBE_TOKENS = [2, 106, 1645, 108, 30, 40, 50, 107]
# bf16 everywhere: logits of two bf16 implementations of the same weights may differ by a few bf16 steps at
# the logit scale after 26 layers; we require max |difference| <= BF16_TOLERANCE * max |logit|, and that the
# difference is under a quarter of the trained LoRA's own effect on the logits.
BF16_TOLERANCE = 0.02
# The published gemma-2-2b-it config.json (huggingface.co/google/gemma-2-2b-it) values the HF export must carry.
PUBLISHED_GEMMA2_CONFIG = {
    "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26, "num_attention_heads": 8,
    "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 256000, "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0, "sliding_window": 4096, "query_pre_attn_scalar": 256,
    "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "max_position_embeddings": 8192, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
    "model_type": "gemma2", "tie_word_embeddings": True,
}
# The published gemma-3-1b-it config.json (huggingface.co/google/gemma-3-1b-it) values the HF export must carry.
PUBLISHED_GEMMA3_CONFIG = {
    "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4,
    "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144, "attn_logit_softcapping": None,
    "final_logit_softcapping": None, "sliding_window": 512, "sliding_window_pattern": 6, "query_pre_attn_scalar": 256,
    "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "rope_theta": 1_000_000,
    "rope_local_base_freq": 10000, "rope_scaling": None, "max_position_embeddings": 32768, "bos_token_id": 2,
    "pad_token_id": 0, "model_type": "gemma3_text", "tie_word_embeddings": True,
}
# Per preset: the real model, its widths (the tiny model of its architecture keeps them at fewer layers), the
# published HF config and the transformers class.
MODELS = {
    "kaggle": ("gemma2-2b-it", "tiny", {"vocab_size": 256128, "embed_dim": 2304, "hidden_dim": 9216, "num_heads": 8,
                                        "num_kv_heads": 4, "head_dim": 256, "sliding_window": 4096},
               PUBLISHED_GEMMA2_CONFIG, "Gemma2ForCausalLM"),
    "kaggle-gemma3": ("gemma3-1b-it", "tiny-gemma3", {"vocab_size": 262144, "embed_dim": 1152, "hidden_dim": 6912,
                                                      "num_heads": 4, "num_kv_heads": 1, "head_dim": 256,
                                                      "sliding_window": 512},
                      PUBLISHED_GEMMA3_CONFIG, "Gemma3ForCausalLM"),
}


def overrides(work: Path, layers: int, preset: str = "kaggle") -> list[str]:
    """The preset plus what size on one CPU demands; fewer layers keep every real width."""
    _, tiny, widths, _, _ = MODELS[preset]
    model = [] if layers == 26 else ["--model.name", tiny, "--model.num_layers", str(layers), *[
        text for name, value in widths.items() for text in (f"--model.{name}", str(value))]]
    return ["--preset", preset, *model,
            "--model.checkpoint_dir", str(work / "download"), "--model.cache_dir", str(work / "cache"),
            "--data.source", str(config.SAMPLE_PATH), "--data.start", "0", "--data.stop", "0",
            "--data.max_len", "256", "--data.eval_rows", "8", "--data.pack_buffer", "64",
            "--data.out_dir", str(work / "data"),
            "--run.mesh_fsdp", "1", "--run.micro_batch", "1", "--run.grad_accum", "1", "--run.eval_batches", "1",
            "--run.checkpoint_every_steps", "1",
            "--optim.learning_rate", "1e-3", "--optim.warmup_ratio", "0",
            "--eval.batch_size", "1", "--eval.num_prompts", "1", "--eval.max_new_tokens", "4"]


def cfg_of(args: argparse.Namespace) -> config.Config:
    flags = overrides(Path(args.work), args.layers, args.preset)
    return config.get_config(args.preset, config.parse_overrides(flags[2:]))


# ----------------------------------------------------------------------------- stages run in this script


def write_checkpoint(args: argparse.Namespace) -> str:
    """Random bf16 weights of every real shape, saved in the Kaggle Flax layout, plus a tokenizer."""
    import ml_dtypes
    from flax import nnx

    import export
    import model

    cfg = cfg_of(args)
    download = Path(args.work) / "download"
    download.mkdir(parents=True, exist_ok=True)
    _, abstract_state = nnx.split(model.abstract_model(cfg.model))
    state = model.random_tiny_state(abstract_state, seed=0, embed_dim=config.model_sizes(cfg.model)["embed_dim"],
                                    dtype=ml_dtypes.bfloat16)
    params = {path: v.get_value() for path, v in state.flat_state()}
    folder = download / kaggle_weights.checkpoint_folder_names(cfg.model)[0]
    export.save_kaggle_checkpoint(params, folder, config.model_family(cfg.model))
    pieces = export.HF_VOCAB_SIZES[type(model.gemma_config(cfg.model))]
    write_gemma_sized_tokenizer(download / "tokenizer.model", pieces)
    gating = params[("layers", 0, "mlp", "gate_proj", "kernel")].shape
    if config.model_family(cfg.model) == "gemma3":
        gating = gating[::-1]
    return f"{len(params)} tensors, gating_einsum (2, {gating[0]}, {gating[1]}), {du(download)}"


def write_gemma_sized_tokenizer(out_path: Path, pieces: int) -> None:
    """The tiny tokenizer padded with never-produced (UNUSED) pieces to Gemma's (Gemma2's 256,000), so that, as with
    Gemma's own, only the embedding's padding rows are undecodable (model.undecodable_ids); it encodes text as the
    tiny one does."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(config.TINY_TOKENIZER_PATH.read_bytes())
    unused = sentencepiece_model_pb2.ModelProto.SentencePiece.UNUSED  # never produced by encoding
    for index in range(len(proto.pieces), pieces):
        proto.pieces.add(piece=f"<padding{index}>", score=0.0, type=unused)
    out_path.write_bytes(proto.SerializeToString())


def convert(args: argparse.Namespace) -> str:
    """Converts the download to the NNX cache as training's first load does, and keeps the converted model's
    logits on PROBE_TOKENS for load_download."""
    import jax

    import model

    cfg = cfg_of(args)
    mesh = model.make_mesh(cfg)
    with jax.set_mesh(mesh):
        base = model.load_base_model(cfg, mesh)
        np.save(Path(args.work) / "converted_logits.npy", logits_of(base))
    cache = next((Path(args.work) / "cache").iterdir())
    return f"{model.count_params(base) / 1e9:.3f}B params, cache {cache.name} {du(cache)}"


def lora_logits(args: argparse.Namespace) -> str:
    """The trained LoRA model's logits on PROBE_TOKENS, and the base model's (LoRA B set to zero)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import model

    cfg = cfg_of(args)
    step = rundir.checkpoint_step(Path(args.work) / "run")
    mesh = model.make_mesh(cfg)
    with jax.set_mesh(mesh):
        lora_model = model.build_model(cfg, mesh)
        rundir.restore_lora(lora_model, Path(args.work) / "run", step)
        lora = logits_of(lora_model)
        lora_state = nnx.state(lora_model, nnx.LoRAParam)
        nnx.update(lora_model, jax.tree.map(jnp.zeros_like, lora_state))
        base = logits_of(lora_model)
    np.save(Path(args.work) / "lora_logits.npy", lora)
    np.save(Path(args.work) / "base_logits.npy", base)
    return (f"step {step}, LoRA changes logits by max {np.abs(lora - base).max():.3g} "
            f"(max |logit| {np.abs(lora).max():.3g})")


def logits_of(gemma: object) -> np.ndarray:
    """float32 logits [L, vocab] of a Tunix Gemma on PROBE_TOKENS as one causal row."""
    import jax.numpy as jnp

    import model

    tokens = jnp.asarray([PROBE_TOKENS], jnp.int32)
    positions = jnp.arange(len(PROBE_TOKENS))[None]
    logits, _ = gemma(tokens, positions, None, model.packed_attention_mask(jnp.ones_like(tokens)))
    return np.asarray(logits.astype(jnp.float32))[0]


def compare(name: str, logits: np.ndarray, work: Path, reference: str = "lora") -> str:
    """Checks logits against the LoRA model's (or the converted base model's), to the bf16 tolerance; raises
    with the figures if they differ. Against the LoRA model, the difference must also be well under the LoRA's
    own effect, so that an export that dropped the LoRA fails."""
    wanted = np.load(work / f"{'lora' if reference == 'lora' else 'converted'}_logits.npy")
    vocab = min(logits.shape[-1], wanted.shape[-1])
    diff = np.abs(logits[:, :vocab] - wanted[:, :vocab]).max()
    scale = np.abs(wanted).max()
    same_argmax = float((logits[:, :vocab].argmax(-1) == wanted[:, :vocab].argmax(-1)).mean())
    lora_effect = np.abs(wanted - np.load(work / "base_logits.npy")).max() if reference == "lora" else np.inf
    text = (f"{name} vs {'LoRA' if reference == 'lora' else 'converted base'} model: max |diff| {diff:.3g} "
            f"(tolerance {BF16_TOLERANCE * scale:.3g}" + (f"; LoRA effect {lora_effect:.3g}" if reference == "lora"
                                                           else "") + f"), argmax agrees on {same_argmax:.0%}")
    if not (diff <= BF16_TOLERANCE * scale and diff < lora_effect / 4):
        raise AssertionError(text)
    return text


def judges_gemma(args: argparse.Namespace, checkpoint: Path) -> object:
    """A Kaggle-layout checkpoint loaded as the judges load it: ``load_and_format_params`` +
    ``Gemma.from_params(params, version="2-2b-it")``, with fewer layers the same call with the config's layer
    count cut; Gemma3: ``create_model_from_checkpoint`` with ``gemma3_1b_it()`` (or its layer count cut)."""
    import dataclasses

    import jax.numpy as jnp
    from tunix.models.gemma import model as gemma_lib
    from tunix.models.gemma import params as gemma_params
    from tunix.models.gemma3 import model as gemma3_lib
    from tunix.models.gemma3 import params as gemma3_params

    import model
    import tunix_adapter

    ours = model.gemma_config(cfg_of(args).model)
    if args.preset == "kaggle-gemma3":
        published = dataclasses.replace(gemma3_lib.ModelConfig.gemma3_1b_it(), num_layers=args.layers)
        same = dataclasses.replace(ours, remat_config=published.remat_config, param_dtype=published.param_dtype)
        assert same == published, f"the {args.layers}-layer model differs from gemma3-1b-it beyond its layer count"
        return gemma3_params.create_model_from_checkpoint(str(checkpoint), published, dtype=jnp.bfloat16)
    params = gemma_params.load_and_format_params(str(checkpoint))
    if args.layers == 26:
        return gemma_lib.Gemma.from_params(params, version="2-2b-it")
    # from_params knows only the published sizes: its body with the layer count cut
    published = gemma_lib.ModelConfig.gemma2_2b_it()
    cut = dataclasses.replace(published, num_layers=args.layers,
                              attention_types=published.attention_types[:args.layers])
    same = dataclasses.replace(ours, remat_config=cut.remat_config, attention_types=tuple(ours.attention_types))
    assert same == cut, f"the {args.layers}-layer model differs from gemma2-2b-it beyond its layer count"
    return gemma_lib.module_from_linen_variables(
        lambda: gemma_lib.Gemma(cut, rngs=gemma_lib.nnx.Rngs(params=0)), params["transformer"],
        tunix_adapter.map_linen_var_names, tunix_adapter.assign_linen_params_to_nnx_state)


def load_download(args: argparse.Namespace) -> str:
    """The judges' loader on the written download: it must read the layout as our conversion does."""
    folder = Path(args.work) / "download" / kaggle_weights.checkpoint_folder_names(cfg_of(args).model)[0]
    return compare("download via the judges' loader", logits_of(judges_gemma(args, folder)), Path(args.work),
                   reference="converted")


def load_orbax(args: argparse.Namespace) -> str:
    """The orbax export loaded exactly as the judges load it."""
    folder = Path(args.work) / "export-orbax" / kaggle_weights.checkpoint_folder_names(cfg_of(args).model)[0]
    return compare("orbax export via the judges' loader", logits_of(judges_gemma(args, folder)), Path(args.work))


def judges_kernel(args: argparse.Namespace) -> dict:
    """The names the notebook's kernel holds for the judges' cells (tests/judges_procedure.py), at these shapes:
    lora_policy built as the notebook builds it but with fresh LoRA (only the cells' restore can bring the trained
    one), CKPT_DIR = the run directory, the settings' prompt and generation budgets and one question."""
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx
    from tunix.generate import sampler as sampler_lib

    import data_prep
    import model
    from chat_format import PROMPT_TEMPLATE

    cfg = cfg_of(args)
    mesh = model.make_mesh(cfg)
    with jax.set_mesh(mesh):
        lora_policy = model.build_model(cfg, mesh)
    return {"os": os, "jax": jax, "nnx": nnx, "ocp": ocp, "sampler_lib": sampler_lib, "lora_policy": lora_policy,
            "CKPT_DIR": str((Path(args.work) / "run").resolve()), "tokenizer": kaggle_weights.load_tokenizer(cfg.model),
            "model_config": lora_policy.config, "MAX_PROMPT_LENGTH": data_prep.prompt_budget(cfg.data),
            "MAX_GENERATION_STEPS": cfg.eval.max_new_tokens, "PROMPT_TEMPLATE": PROMPT_TEMPLATE,
            "INF_TEMPERATURE": 0, "INF_TOP_K": 1, "INF_TOP_P": None, "SEED": 42,
            "JUDGE_QUESTIONS": ["Summarise: the sky is blue because air scatters short wavelengths most."]}


def judges_single_session(args: argparse.Namespace) -> str:
    """The template's single-session cells on the trained run: the latest step under CKPT_DIR/actor restored into
    lora_policy (its logits must be the LoRA model's), then its Sampler and a stand-in judge's greedy call."""
    from judges_procedure import EVALUATE, MAKE_SAMPLER, SINGLE_SESSION, run_cells

    kernel = run_cells(judges_kernel(args), SINGLE_SESSION)
    restored = compare(f"step {kernel['latest_step']} restored by the judges' cell", logits_of(kernel["lora_policy"]),
                       Path(args.work))
    result = run_cells(kernel, MAKE_SAMPLER, EVALUATE)["Result"]
    return f"{restored}; the judge's Sampler generated {[len(t) for t in result.tokens]} tokens"


def judges_unrestricted(args: argparse.Namespace) -> str:
    """The template's unrestricted cell on the orbax export, kagglehub's download replaced by the folder, with
    and without actor/<step>/model_params appended: each must give the LoRA model's logits."""
    from judges_procedure import UNRESTRICTED, UNRESTRICTED_WITH_SUFFIX, LocalKaggleHub, run_cells

    variation = Path(args.work) / "export-orbax"
    step = json.loads((variation / "export.json").read_text())["step"]
    results = []
    for name, cell in (("as is", UNRESTRICTED), (f"+ actor/{step}/model_params", UNRESTRICTED_WITH_SUFFIX)):
        kernel = {**judges_kernel(args), "unrestricted_kaggle_model": "me/gemma2-tunix", "latest_step": step,
                  "kagglehub": LocalKaggleHub({"me/gemma2-tunix/jax/size": str(variation.resolve())})}
        run_cells(kernel, cell)
        results.append(compare(f"download {name}", logits_of(kernel["lora_policy"]), Path(args.work)))
    return "; ".join(results)


def load_hf(args: argparse.Namespace) -> str:
    """transformers' Gemma2ForCausalLM (Gemma3ForCausalLM) on the HF export (bf16, eager attention), and its
    config.json."""
    import torch
    import transformers

    out = Path(args.work) / "export-hf"
    written = json.loads((out / "config.json").read_text())
    name, _, _, published, architecture = MODELS[args.preset]
    want = {**published, "num_hidden_layers": args.layers}
    wrong = {k: (written.get(k), v) for k, v in want.items() if written.get(k) != v}
    if wrong:
        raise AssertionError(f"config.json differs from the published {name} (written, published): {wrong}")
    hf = getattr(transformers, architecture).from_pretrained(out, attn_implementation="eager", dtype=torch.bfloat16)
    with torch.no_grad():
        logits = hf(torch.as_tensor([PROBE_TOKENS])).logits[0].float().numpy()
    return "config.json = published values; " + compare(f"HF export in {architecture}", logits, Path(args.work))


STAGES = {"write-checkpoint": write_checkpoint, "convert": convert, "load-download": load_download,
          "lora-logits": lora_logits, "load-orbax": load_orbax, "load-hf": load_hf,
          "judges-single-session": judges_single_session, "judges-unrestricted": judges_unrestricted}


# ----------------------------------------------------------------------------- the driver


def du(path: Path) -> str:
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return f"{size / 1e9:.2f} GB on disk"


def run_stage(name: str, command: list[str], log_path: Path, kill_after: Path | None = None) -> dict:
    """Runs command, measuring wall time and its peak RSS (wait4); with kill_after, SIGKILLs it once that
    path exists. The result is the stage's last output line that starts with 'result:' (or its last line)."""
    print(f"\n=== {name}: {shlex.join(command)}", flush=True)
    began = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=REPO_DIR, stdout=log, stderr=subprocess.STDOUT)
        killed = False
        if kill_after is not None:
            while proc.poll() is None and not kill_after.exists():
                time.sleep(0.5)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                killed = True
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - began
    lines = log_path.read_text().splitlines()
    print("\n".join(lines[-15:]), flush=True)
    rc = os.waitstatus_to_exitcode(status)
    results = [line.removeprefix("result: ") for line in lines if line.startswith("result: ")]
    note = results[-1] if results else (lines[-1] if lines else "")
    ok = rc == -signal.SIGKILL if kill_after is not None else rc == 0
    if kill_after is not None:
        note = f"SIGKILLed once {kill_after.name} existed" if killed else "finished before the kill: " + note
        ok = ok and killed
    return {"stage": name, "wall_s": seconds, "peak_rss_gb": usage.ru_maxrss / 1e6, "ok": ok, "result": note}


def drive(args: argparse.Namespace) -> tuple[list[dict], int]:
    """Runs the stages not yet passed in args.work; returns their rows and how many stages there are."""
    work = Path(args.work)
    py = [sys.executable]
    me = [*py, str(Path(__file__).resolve()), "--work", str(work), "--layers", str(args.layers), "--preset",
          args.preset, "--stage"]
    flags = overrides(work, args.layers, args.preset)
    run = work / "run"
    ckpt = rundir.checkpoint_dir(run)
    train = [*py, "train_sft.py", *flags, "--out", str(run), "--data", str(work / "data"), "--max-steps", "3"]
    stages = [
        ("write Kaggle checkpoint", [*me, "write-checkpoint"], None),
        ("data_prep", [*py, "data_prep.py", *flags], None),
        ("convert to NNX cache", [*me, "convert"], None),
        ("load the download (judges' loader)", [*me, "load-download"], None),
        ("train (SIGKILL after step 1)", train, ckpt / "1" / "_CHECKPOINT_METADATA"),
        ("train (resume to step 3)", train, None),
        ("eval --loss-only", [*py, "eval_samples.py", *flags, "--run", str(run), "--loss-only"], None),
        ("eval generate", [*py, "eval_samples.py", *flags, "--run", str(run), "--out", str(work / "eval-gen")],
         None),
        ("export orbax", [*py, "export.py", *flags, "--run", str(run), "--format", "orbax", "--out",
                          str(work / "export-orbax")], None),
        ("export hf", [*py, "export.py", *flags, "--run", str(run), "--format", "hf", "--out",
                       str(work / "export-hf")], None),
        ("LoRA model logits", [*me, "lora-logits"], None),
        ("load orbax export (judges' loader)", [*me, "load-orbax"], None),
        ("judges' single-session cells", [*me, "judges-single-session"], None),
        ("judges' unrestricted cell", [*me, "judges-unrestricted"], None),
        ("load HF export (transformers)", [*me, "load-hf"], None),
    ]
    if args.base_only:  # what needs no training: the layout, the conversion and the judges' loader agree
        stages = [stage for stage in stages if stage[0].startswith(("write", "convert", "load the download"))]
    done_path = work / "stages.jsonl"  # passed stages: a re-run with the same --work continues after them
    done = [json.loads(line) for line in done_path.read_text().splitlines()] if done_path.exists() else []
    rows = []
    for name, command, kill_after in stages:
        log_path = work / f"stage{len(rows) + 1}.log"
        if len(rows) < len(done) and done[len(rows)]["stage"] == name:
            rows.append(done[len(rows)])
            print(f"--> {name}: passed in an earlier run with this --work", flush=True)
            continue
        row = run_stage(name, command, log_path, kill_after)
        if name.startswith("train (resume") and row["ok"]:
            summary = json.loads((run / "run_summary.json").read_text())
            resumed = "resuming" in log_path.read_text()
            row["ok"] = row["ok"] and resumed and summary["steps"] == 3
            row["result"] = (f"{'resumed' if resumed else 'did NOT resume'}, {summary['steps']} steps, "
                             f"final loss {summary['final_loss']:.3f}")
        rows.append(row)
        if row["ok"]:
            with open(done_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        print(f"--> {'ok' if row['ok'] else 'FAILED'} in {row['wall_s']:.0f} s, peak RSS "
              f"{row['peak_rss_gb']:.2f} GB: {row['result']}", flush=True)
        if not row["ok"] and not args.keep_going:
            break
    return rows, len(stages)


def table(rows: list[dict]) -> str:
    lines = ["| stage | wall s | peak RSS GB | ok | result |", "|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['wall_s']:.0f} | {r['peak_rss_gb']:.2f} | {'yes' if r['ok'] else 'NO'} | "
              f"{r['result'].replace('|', '/')} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=MODELS, default="kaggle", help="kaggle (Gemma2-2B-it) or kaggle-gemma3")
    parser.add_argument("--layers", type=int, default=26, help="26 = the real model; fewer keep every real width")
    parser.add_argument("--work", help="working directory (default: a temporary one, removed at the end)")
    parser.add_argument("--keep-going", action="store_true", help="run the later stages after a failure")
    parser.add_argument("--base-only", action="store_true",
                        help="only write, convert and load the download with the judges' loader (no training)")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # one stage, in a subprocess
    args = parser.parse_args()
    if args.stage:
        print(f"result: {STAGES[args.stage](args)}")
        return
    temporary = args.work is None
    args.work = args.work or tempfile.mkdtemp(prefix="real_shape_")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    began = time.time()
    try:
        rows, stage_count = drive(args)
    finally:
        if temporary:
            shutil.rmtree(args.work, ignore_errors=True)
    text = table(rows)
    print("\n" + text)
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    passed = all(r["ok"] for r in rows) and len(rows) == stage_count
    header = (f"\n## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(began))}: {args.preset}, {args.layers} layers, "
              f"{'all stages pass' if passed else 'NOT all stages pass'}"
              f", {(time.time() - began) / 60:.0f} min\n\n"
              f"Command: `python benchmarks/real_shape_cpu.py --preset {args.preset} --layers {args.layers}"
              f"{' --base-only' if args.base_only else ''}`\n"
              f"Machine: {platform.machine()}, {os.cpu_count()} cores, {mem_gb:.0f} GiB RAM, load average "
              f"{os.getloadavg()[0]:.1f} at the end (shared), Python {platform.python_version()}\n\n")
    if not RESULTS_PATH.exists():
        RESULTS_PATH.write_text("# The kaggle code path at real Gemma2-2B shapes on the CPU\n\n"
                                "Written by benchmarks/real_shape_cpu.py (see its docstring).\n")
    with open(RESULTS_PATH, "a") as results:
        results.write(header + text + "\n")
    print(f"appended to {RESULTS_PATH}")


if __name__ == "__main__":
    main()
