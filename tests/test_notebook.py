"""The Kaggle notebook: its .ipynb is generated from the .py, and it runs top to bottom with the cpu-tiny preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")

REPO_DIR = Path(__file__).resolve().parents[1]
SOURCE = REPO_DIR / "notebooks" / "kaggle_tunix_sft.py"
NOTEBOOK = SOURCE.with_suffix(".ipynb")


def cells(notebook: nbformat.NotebookNode) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in notebook.cells]


def test_ipynb_is_in_sync_with_the_py_source() -> None:
    assert cells(jupytext.read(NOTEBOOK)) == cells(jupytext.read(SOURCE)), (
        "notebooks/kaggle_tunix_sft.ipynb is stale: run `python notebooks/build_notebook.py`")


def test_notebook_runs_top_to_bottom_on_cpu_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    overrides = {"run.max_steps": "8", "run.eval_every": "100", "run.eval_batches": "1", "eval.generate_every": "0",
                 "eval.num_prompts": "2", "eval.max_new_tokens": "16", "eval.batch_size": "2"}
    monkeypatch.setenv("TUNIX_SFT_PRESET", "cpu-tiny")
    monkeypatch.setenv("TUNIX_SFT_OVERRIDES", json.dumps(overrides))
    monkeypatch.setenv("TUNIX_SFT_REPO_DIR", str(REPO_DIR))
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    run_dir = tmp_path / "runs" / "cpu-tiny"
    assert (run_dir / "checkpoints" / "8").is_dir()
    assert json.loads((run_dir / "run_summary.json").read_text())["steps"] == 8
    assert (run_dir / "eval" / "report.md").is_file()
    assert len((run_dir / "eval" / "samples.jsonl").read_text().splitlines()) == 2
    assert (tmp_path / "exports" / "cpu-tiny" / "gemma2-2b-it" / "_CHECKPOINT_METADATA").is_file()
    assert (tmp_path / "exports" / "cpu-tiny" / "tokenizer.model").is_file()
    outputs = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert "final checkpoint:" in outputs
    # The declared budget comes from the configuration and the prepared data, not from a number in the notebook.
    assert "MAX_GENERATION_STEPS = 16 (kept completions: p50" in outputs
    assert "generation budget" in outputs  # the data stage's summary line
