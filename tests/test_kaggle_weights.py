"""Where the weights come from: the kagglehub download (only the network call is replaced) or a local copy."""

from __future__ import annotations

from pathlib import Path

import pytest

import config
import data_prep
import kaggle_weights


@pytest.mark.parametrize("name, handle, folder", [("tiny", "google/gemma-2/flax/gemma2-2b-it", "gemma2-2b-it"),
                                                  ("tiny-gemma3", "google/gemma-3/flax/gemma3-1b-it", "gemma3-1b-it")])
def test_kaggle_model_dir_uses_the_download_and_checks_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str,
                                                          handle: str, folder: str) -> None:
    """Each architecture downloads its own Kaggle Flax handle (the tiny models' stand for the real ones')."""
    downloaded = []
    monkeypatch.setattr("kagglehub.model_download", lambda h: downloaded.append(h) or str(tmp_path))
    model_cfg = config.ModelConfig(name=name)
    with pytest.raises(config.ConfigError, match=f"lacks tokenizer.model and {folder}/: .* download of {handle}$"):
        kaggle_weights.kaggle_model_dir(model_cfg)
    (tmp_path / folder).mkdir()
    (tmp_path / "tokenizer.model").write_bytes(config.TINY_TOKENIZER_PATH.read_bytes())
    assert kaggle_weights.kaggle_model_dir(model_cfg) == tmp_path
    assert data_prep.tokenizer_file(model_cfg) == tmp_path / "tokenizer.model"
    assert data_prep.load_tokenizer(model_cfg).piece_to_id("<end_of_turn>") == 107
    assert kaggle_weights.kaggle_checkpoint_dir(model_cfg) == tmp_path / folder
    assert set(downloaded) == {handle}


def test_an_uploaded_export_loads_by_its_own_handle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exports keep the gemma2-2b-it folder whatever variation they are published as."""
    monkeypatch.setattr("kagglehub.model_download", lambda handle: str(tmp_path))
    model_cfg = config.ModelConfig(kaggle_handle="someone/gemma2-2b-tunix-reasoning/jax/unrestricted/2")
    (tmp_path / "tokenizer.model").write_bytes(config.TINY_TOKENIZER_PATH.read_bytes())
    with pytest.raises(config.ConfigError, match="lacks unrestricted/ or gemma2-2b-it/"):
        kaggle_weights.kaggle_model_dir(model_cfg)
    (tmp_path / "gemma2-2b-it").mkdir()
    assert kaggle_weights.kaggle_checkpoint_dir(model_cfg) == tmp_path / "gemma2-2b-it"
    (tmp_path / "unrestricted").mkdir()
    assert kaggle_weights.kaggle_checkpoint_dir(model_cfg) == tmp_path / "unrestricted"
