"""benchmarks/real_size.py: its dry run (the tiny model on the CPU) and its random packed windows."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "real_size.py"


def load_script():
    spec = importlib.util.spec_from_file_location("real_size", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_random_windows_are_packed_like_the_loaders():
    windows = load_script().random_windows(3, 4, 64, 100, seed=0)
    assert len(windows) == 3 and all(w["tokens"].shape == (4, 64) for w in windows)
    for w in windows:
        for row in range(4):
            segments = w["segment_ids"][row]
            used = int(np.count_nonzero(segments))
            assert used >= 16 and (segments[used:] == 0).all()  # rows first, padding at the end
            assert np.all(np.diff(segments[:used]) >= 0)
            for segment in range(1, segments.max() + 1):
                where = np.flatnonzero(segments == segment)
                np.testing.assert_array_equal(w["positions"][row, where], np.arange(len(where)))
                loss = w["loss_mask"][row, where]
                assert loss[0] == 0 and loss[-1] == 1  # the loss on the row's completion, not its prompt
            assert (w["loss_mask"][row, used:] == 0).all() and (w["tokens"][row, :used] >= 4).all()


@pytest.mark.slow  # the benchmark script end to end; the pipeline's own step and sampler are tested by default
def test_dry_run_times_the_train_step_and_the_sampler_and_adds_a_row(tmp_path):
    md = tmp_path / "results.md"
    result = load_script().main(["--dry-run", "--md", str(md), "--eval.max_new_tokens", "16"])
    assert (result["preset"], result["model"], result["devices"]) == ("cpu-tiny", "tiny", 1)
    assert result["step_s"] > 0 and result["tokens_per_s"] > 0 and result["compile_s"] > 0
    assert 0 < result["tokens_per_step"] <= 4 * 512 and np.isfinite(result["loss_last"])
    assert result["mfu"] is None and result["peak_device_memory_gib"] is None  # no known peak, no memory_stats on CPU
    assert result["generate_batch"] == 8 and 0 < result["generated_tokens_mean"] <= 16 and result["generate_s"] > 0
    assert 0 < result["trainable_params"] < result["params"]
    rows = [line for line in md.read_text().splitlines() if line.startswith("| 20")]
    assert len(rows) == 1 and "`cpu-tiny` (tiny)" in rows[0] and "--dry-run" in rows[0]
