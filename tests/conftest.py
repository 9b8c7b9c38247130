"""Shared fixtures: the cpu-tiny data prepared once per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import config  # noqa: E402
import data_prep  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped sample prepared with the cpu-tiny preset into a temporary directory."""
    cfg = config.get_config("cpu-tiny", {"data.out_dir": str(tmp_path_factory.mktemp("cpu_tiny_data"))})
    return data_prep.prepare(cfg, show_progress=False)
