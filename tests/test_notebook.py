"""The Kaggle notebook: its .ipynb is generated from the .py, and it runs top to bottom with either tiny preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")

from judges_procedure import EVALUATE, MAKE_SAMPLER, SINGLE_SESSION  # noqa: E402

REPO_DIR = Path(__file__).resolve().parents[1]
SOURCE = REPO_DIR / "notebooks" / "kaggle_tunix_sft.py"
NOTEBOOK = SOURCE.with_suffix(".ipynb")


def cells(notebook: nbformat.NotebookNode) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in notebook.cells]


def test_ipynb_is_in_sync_with_the_py_source() -> None:
    assert cells(jupytext.read(NOTEBOOK)) == cells(jupytext.read(SOURCE)), (
        "notebooks/kaggle_tunix_sft.ipynb is stale: run `python notebooks/build_notebook.py`")


# Our cells around the judges' ones, in the same kernel: the questions (the notebook's own evaluation prompts), the
# final LoRA as the notebook left it, then lora_policy's LoRA overwritten, so that only the judges' restore can
# bring the final weights back; after them, what the test checks, written to judged.json.
BEFORE_THE_JUDGES = """
import numpy as np
JUDGE_QUESTIONS = [p["prompt"] for p in eval_samples.eval_prompts(cfg, data_dir)]
final_lora = {path: np.asarray(v.get_value()) for path, v in nnx.state(lora_policy, nnx.LoRAParam).flat_state()}
nnx.update(lora_policy, jax.tree.map(lambda x: x * 0 + 0.5, nnx.state(lora_policy, nnx.LoRAParam)))
"""
AFTER_THE_JUDGES = """
restored = {path: np.asarray(v.get_value()) for path, v in nnx.state(lora_policy, nnx.LoRAParam).flat_state()}
Path("judged.json").write_text(json.dumps({
    "latest_step": latest_step, "final_step": final_step,
    "lora_bit_for_bit": restored.keys() == final_lora.keys() and all(
        restored[p].dtype == final_lora[p].dtype and np.array_equal(restored[p], final_lora[p]) for p in final_lora),
    "lora_b_trained": all(np.abs(a).max() > 0 for p, a in final_lora.items() if str(p[-1]).endswith("_lora_b")),
    "texts": list(Result.text), "lengths": [len(t) for t in Result.tokens]}))
"""


# Gemma3's run of the notebook is slow-marked: the default run checks the same cells on Gemma2, CI both.
@pytest.mark.parametrize("preset, merged_folder", [
    ("cpu-tiny", "gemma2-2b-it"), pytest.param("cpu-tiny-gemma3", "gemma3-1b-it", marks=pytest.mark.slow)])
def test_notebook_runs_top_to_bottom_on_cpu_tiny_and_the_judges_cells_evaluate_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, preset: str, merged_folder: str) -> None:
    """Run all on each tiny model (PRESET picks it), then the submission template's evaluation cells
    (tests/judges_procedure.py) in the same kernel: they find the run's final step under CKPT_DIR/actor, restore its
    LoRA bit for bit into lora_policy, and a stand-in judge sampling with INF_*, SEED and MAX_GENERATION_STEPS gets
    what the notebook's evaluation got."""
    overrides = {"run.max_steps": "8", "run.micro_batch": "2", "run.eval_every": "100", "run.eval_batches": "1",
                 "eval.generate_every": "0",
                 "eval.num_prompts": "2", "eval.max_new_tokens": "16", "eval.batch_size": "2"}
    monkeypatch.setenv("TUNIX_SFT_PRESET", preset)
    monkeypatch.setenv("TUNIX_SFT_OVERRIDES", json.dumps(overrides))
    monkeypatch.setenv("TUNIX_SFT_REPO_DIR", str(REPO_DIR))
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    headings = [line for cell in notebook.cells if cell.cell_type == "markdown"
                for line in cell.source.splitlines() if line.startswith("## ")]
    assert headings == ["## Your overall training and evaluation strategy", "## How your finetuning dataset is created",
                        "## Your Tunix finetuning code", "## [Optional 15pts] unrestricted mode",
                        "## Other things you want the judges to know"]  # the template's sections, in its order
    notebook.cells += [nbformat.v4.new_code_cell(source) for source in
                       (BEFORE_THE_JUDGES, SINGLE_SESSION, MAKE_SAMPLER, EVALUATE, AFTER_THE_JUDGES)]
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    run_dir = tmp_path / "runs" / preset
    assert (run_dir / "actor" / "8" / "model_params").is_dir()
    assert json.loads((run_dir / "run_summary.json").read_text())["steps"] == 8
    assert (run_dir / "eval" / "report.md").is_file()
    samples = [json.loads(line) for line in (run_dir / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2
    variation = tmp_path / "exports" / preset
    assert (variation / merged_folder / "_CHECKPOINT_METADATA").is_file()
    assert (variation / "tokenizer.model").is_file() and (variation / "actor" / "8" / "model_params").is_dir()
    outputs = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert "final checkpoint:" in outputs
    # The declared budget comes from the configuration and the prepared data, not from a number in the notebook.
    assert "MAX_GENERATION_STEPS = 16 (kept completions: p50" in outputs and "MAX_PROMPT_LENGTH = 512" in outputs
    assert "generation budget" in outputs  # the data stage's summary line

    judged = json.loads((tmp_path / "judged.json").read_text())
    assert judged["latest_step"] == judged["final_step"] == 8
    assert judged["lora_bit_for_bit"] and judged["lora_b_trained"]
    for sample, text, length in zip(samples, judged["texts"], judged["lengths"], strict=True):
        # Our evaluation stops at <end_of_turn> (left out of its output); the judge's sampler runs on to EOS.
        assert text.split("<end_of_turn>")[0] == sample["output"]
        assert "<end_of_turn>" in text or length == sample["generated_tokens"]
