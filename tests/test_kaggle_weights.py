"""Where the weights come from: the kagglehub download (only the network call is replaced) or a local copy."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import config
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
    assert kaggle_weights.tokenizer_file(model_cfg) == tmp_path / "tokenizer.model"
    assert kaggle_weights.load_tokenizer(model_cfg).piece_to_id("<end_of_turn>") == 107
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


def test_load_tokenizer_rejects_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="does not exist"):
        kaggle_weights.load_tokenizer(config.ModelConfig(tokenizer_path=str(tmp_path / "none.model")))


def test_a_tokenizer_that_does_not_fit_the_models_embedding_is_refused() -> None:
    """The tokenizer must be the model's own by its size: as many pieces as embedding rows, or up to Tunix's 128
    padding rows fewer (Gemma2's 256,000 pieces on 256,128 rows). Gemma2's tokenizer on Gemma3's 262,144 rows, or
    Gemma3's on Gemma2's, is refused in one line."""
    tiny = config.get_config("cpu-tiny").model
    pieces = kaggle_weights.load_tokenizer(tiny).get_piece_size()
    for rows in (pieces, pieces + kaggle_weights.EMBEDDING_PADDING):
        assert kaggle_weights.load_tokenizer(dataclasses.replace(tiny, vocab_size=rows)).get_piece_size() == pieces
    for rows in (pieces - 1, pieces + kaggle_weights.EMBEDDING_PADDING + 1):
        with pytest.raises(config.ConfigError, match=rf"has {pieces} pieces but tiny's embedding has {rows} rows"):
            kaggle_weights.load_tokenizer(dataclasses.replace(tiny, vocab_size=rows))
    with pytest.raises(config.ConfigError, match=rf"^tokenizer \S+ has {pieces} pieces but gemma3-1b-it's embedding "
                                                 r"has 262144 rows: use gemma3-1b-it's own tokenizer"):
        kaggle_weights.load_tokenizer(config.ModelConfig(name="gemma3-1b-it", tokenizer_path=tiny.tokenizer_path))
