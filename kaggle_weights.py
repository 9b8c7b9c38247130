"""Where Gemma's weights and tokenizer come from: a local copy (``--model.checkpoint_dir``) or the kagglehub
download of ``--model.kaggle_handle`` (by default the model's own, config.KAGGLE_HANDLES), a Kaggle Flax folder
holding ``tokenizer.model`` and an orbax params folder."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from chat_format import END_OF_TURN
from config import KAGGLE_HANDLES, ConfigError, ModelConfig, model_family, model_sizes

if TYPE_CHECKING:
    import sentencepiece as spm


def kaggle_handle(model_cfg: ModelConfig) -> str:
    """``--model.kaggle_handle``, else the Kaggle Flax handle of the model's architecture."""
    return model_cfg.kaggle_handle or KAGGLE_HANDLES[model_family(model_cfg)]


def checkpoint_folder_names(model_cfg: ModelConfig) -> list[str]:
    """Names the orbax params folder of a Kaggle Flax download may have: the handle's variation (handles read
    owner/model/framework/variation, as Google's uploads are laid out), or the architecture's own variation
    (gemma2-2b-it, gemma3-1b-it: this project's exports, whatever variation they are uploaded as). Exports are
    written under the first name."""
    own = KAGGLE_HANDLES[model_family(model_cfg)].split("/")[3]
    return list(dict.fromkeys([kaggle_handle(model_cfg).rstrip("/").split("/")[3], own]))


def kaggle_model_dir(model_cfg: ModelConfig) -> Path:
    """The Kaggle Flax download (or its local copy), checked to hold the tokenizer and a params folder."""
    if model_cfg.checkpoint_dir:
        model_dir = Path(model_cfg.checkpoint_dir).expanduser()
    else:
        import kagglehub  # only when the weights are not given locally

        model_dir = Path(kagglehub.model_download(kaggle_handle(model_cfg)))
    folders = checkpoint_folder_names(model_cfg)
    missing = [name for name in ("tokenizer.model",) if not (model_dir / name).exists()]
    if not any((model_dir / name).is_dir() for name in folders):
        missing.append(" or ".join(f"{name}/" for name in folders))
    if missing:
        raise ConfigError(f"{model_dir} lacks {' and '.join(missing)}: set --model.checkpoint_dir to the "
                          f"Kaggle Flax download of {kaggle_handle(model_cfg)}")
    return model_dir


def kaggle_checkpoint_dir(model_cfg: ModelConfig) -> Path:
    """The orbax params folder inside the Kaggle Flax download."""
    model_dir = kaggle_model_dir(model_cfg)
    return next(model_dir / name for name in checkpoint_folder_names(model_cfg) if (model_dir / name).is_dir())


def tokenizer_file(model_cfg: ModelConfig) -> Path:
    """``--model.tokenizer_path`` if set, else the sentencepiece model of the Kaggle download."""
    if model_cfg.tokenizer_path:
        return Path(model_cfg.tokenizer_path).expanduser()
    return kaggle_model_dir(model_cfg) / "tokenizer.model"


# Embedding rows past the tokenizer's pieces that a model's own tokenizer leaves: Tunix pads Gemma2's 256,000
# pieces to 256,128 rows; Gemma3's 262,144 pieces fill its rows exactly.
EMBEDDING_PADDING = 128


def load_tokenizer(model_cfg: ModelConfig) -> spm.SentencePieceProcessor:
    """Gemma's sentencepiece model, checked for the `<end_of_turn>` piece every completion ends with and to be the
    model's own by its size (Gemma2's 256,000 pieces, Gemma3's 262,144, or the tiny model's vocab_size)."""
    import sentencepiece as spm  # the stages' settings are checked before their heavy imports

    path = tokenizer_file(model_cfg)
    if not path.is_file():
        raise ConfigError(f"tokenizer {path} does not exist: set --model.tokenizer_path")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    if sp.piece_to_id(END_OF_TURN) == sp.unk_id():
        raise ConfigError(f"tokenizer {path} has no {END_OF_TURN} piece: use a Gemma tokenizer")
    pieces, rows = sp.get_piece_size(), model_sizes(model_cfg)["vocab_size"]
    if not 0 <= rows - pieces <= EMBEDDING_PADDING:
        raise ConfigError(f"tokenizer {path} has {pieces} pieces but {model_cfg.name}'s embedding has {rows} rows: "
                          f"use {model_cfg.name}'s own tokenizer (--model.tokenizer_path, or leave it empty for the "
                          f"one in its Kaggle download)")
    return sp
