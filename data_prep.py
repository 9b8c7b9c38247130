"""Data stage: glaiveai reasoning rows -> Gemma chat prompts + `<reasoning>/<answer>` completions -> packed windows.

Read top to bottom, the pipeline is:

1. rewrite  ``<think>R</think> A``  into  ``<reasoning>R</reasoning>\\n<answer>A</answer>`` (or drop the row),
2. render the question with Gemma's own chat template (instruction first: Gemma has no system role),
   both by ``chat_format.py``,
3. tokenize ``BOS + prompt + completion + <end_of_turn> + EOS`` with a loss mask on the completion only (EOS
   included: a caller that stops only on the tokenizer's EOS, as Tunix's Sampler does by default, stops there),
4. drop rows longer than ``max_len`` (truncating would cut the answer away; a row with more bytes than
   ``max_len`` tokens can hold is dropped before it is tokenized),
5. best-fit pack rows into ``max_len`` windows with per-row segment ids and positions,
6. store memory-mappable arrays + ``manifest.json`` + ``stats.json`` + a length histogram (a cache),
7. load them with grain: shuffled per epoch, fixed-shape batches, a resumable iterator state.

Reading stops once ``num_rows`` training rows plus ``eval_rows`` held-out rows are kept; the manifest
records the source rows read as ``source_rows: [first, next)``, so that a later preparation
(``data.continue_from``) starts at ``next`` and never shares a row. It also records the kept rows' token
lengths, from which evaluation derives its generation budget (``generation_budget``).

``python data_prep.py --preset cpu-tiny`` runs it on the shipped sample with no network.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import hashlib
import io
import itertools
import json
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from chat_format import (
    END_OF_TURN,
    PROMPT_TEMPLATE,
    TEMPLATE_MARKER_RE,
    build_prompt,
    is_blank,
    rewrite_response,
    rewrite_with_reason,
)
from config import Config, ConfigError, DataConfig
from kaggle_weights import load_tokenizer, tokenizer_file
from rundir import local_source, settings_from_argv

if __name__ == "__main__":  # settings and paths first: a bad one stops in about a second, before the imports below
    settings_from_argv(None, "data_prep", __doc__)

import datasets
import grain
import matplotlib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import sentencepiece as spm
from tqdm import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

# Control characters other than tab, newline and carriage return (NUL, escape, C1 controls ...).
CONTROL_CHAR_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
PROMPT_COLUMN, RESPONSE_COLUMN = "prompt", "response"
# Bump when the stored format or the row processing changes: older caches are then rebuilt.
PREP_VERSION = 3
SPLITS = ("train", "eval")
# Rows tokenized per sentencepiece batch call (threads split a batch).
TOKENIZE_BATCH = 256
# Percentiles of token lengths recorded in stats.json and the manifest (plus the maximum).
LENGTH_PERCENTILES = (1, 5, 10, 50, 90, 95, 99)
# The derived generation budget is the longest kept completion rounded up to a multiple of this.
GENERATION_BUDGET_STEP = 128


# ----------------------------------------------------------------------------- 3. tokenizer

# Gemma's ids 4..105 (<mask>, <2mass>, [@BOS@], <unused0..98>), so that the turn markers land on 106 and 107.
GEMMA_FILLER_PIECES = ["<mask>", "<2mass>", "[@BOS@]"] + [f"<unused{i}>" for i in range(99)]


def build_tiny_tokenizer(sample_path: Path, out_path: Path, vocab_size: int = 2048) -> None:
    """Trains a small BPE sentencepiece model on the sample's usable rows, with Gemma's special-token ids.

    pad=0, eos=1, bos=2, unk=3, ``<start_of_turn>``=106, ``<end_of_turn>``=107, and Gemma's normalisation
    (none: whitespace kept, no dummy prefix, digits split, unknown bytes as byte pieces). One thread and the
    whole input make the file reproducible byte for byte.
    """
    texts = []
    for record in read_jsonl(Path(sample_path), start=0, stop=0):
        fields = check_fields(record)
        completion = rewrite_response(fields[1]) if isinstance(fields, tuple) else None
        if completion is not None:
            texts.append(build_prompt(fields[0]) + completion + END_OF_TURN)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        hard_vocab_limit=False, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        user_defined_symbols=GEMMA_FILLER_PIECES + ["<start_of_turn>", END_OF_TURN],
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, character_coverage=1.0,
        max_sentence_length=1 << 20, num_threads=1, minloglevel=2)
    Path(out_path).write_bytes(model.getvalue())


# ----------------------------------------------------------------------------- 4. tokenize

# Tokens a row adds around its prompt and completion: BOS before, ``<end_of_turn>`` and EOS after.
ROW_EXTRA_TOKENS = 3


def example_from_ids(sp: spm.SentencePieceProcessor, prompt_ids: list[int], completion_ids: list[int],
                     max_len: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``BOS + prompt + completion + <end_of_turn> + EOS`` and its loss mask (1 on the completion and both closing
    tokens), or None if too long. The model learns to end its turn and then the sequence: the hackathon's judges
    sample with Tunix's Sampler, which stops only on the tokenizer's EOS unless told other stop tokens."""
    n_prompt, n = 1 + len(prompt_ids), len(prompt_ids) + len(completion_ids) + ROW_EXTRA_TOKENS
    if n > max_len:
        return None
    tokens = np.array([sp.bos_id(), *prompt_ids, *completion_ids, sp.piece_to_id(END_OF_TURN), sp.eos_id()],
                      dtype=np.int32)
    loss_mask = (np.arange(n) >= n_prompt).astype(np.int32)
    return tokens, loss_mask


def bytes_per_token_bound(sp: spm.SentencePieceProcessor) -> int:
    """The most UTF-8 bytes of text one token can stand for: the tokenizer's longest piece, in bytes.

    With Gemma's tokenizer settings (identity normalisation, byte fallback) every token is one piece of the
    text or one byte of it, so a text of more than ``max_len * bound`` bytes has more than ``max_len`` tokens
    and cannot fit: it is dropped without being tokenized. The bound is generous: a piece's "▁" counts its 3
    bytes though it stands for a 1-byte space, a byte piece ``<0x41>`` counts 6 (the tiny tokenizer's longest
    piece, 11 spaces, counts 33 bytes; English runs at about 4 bytes a token).
    """
    return max(len(piece.encode()) for piece in sp.id_to_piece(list(range(sp.get_piece_size()))))


def tokenize_example(sp: spm.SentencePieceProcessor, prompt_text: str, completion_text: str,
                     max_len: int) -> tuple[np.ndarray, np.ndarray] | None:
    """One row's tokens and loss mask; None when it exceeds max_len (dropped, never truncated)."""
    return example_from_ids(sp, sp.encode(prompt_text), sp.encode(completion_text), max_len)


# ----------------------------------------------------------------------------- 5. sources
# Each reader yields the rows of [start, stop) of its source as dicts, or a drop reason for a row that
# cannot even be parsed.

def read_jsonl(path: Path, start: int, stop: int) -> Iterator[dict | str]:
    """Rows of a JSON-lines file; a bad line becomes "invalid_utf8" or "malformed_json", never an exception.

    A UTF-8 byte-order mark (as Windows tools write one) is skipped.
    """
    with open(path, "rb") as f:
        lines = (line for line in f if line.strip())
        for line in itertools.islice(lines, start, stop or None):
            try:
                record = json.loads(line.decode("utf-8-sig"))
            except UnicodeDecodeError:
                yield "invalid_utf8"
                continue
            except json.JSONDecodeError:
                yield "malformed_json"
                continue
            yield record if isinstance(record, dict) else "malformed_json"


def read_parquet(path: Path, start: int, stop: int) -> Iterator[dict | str]:
    """Rows of a Parquet file, read a record batch at a time; a file that cannot be read stops with one line."""
    try:
        parquet = pq.ParquetFile(path)
        _check_columns(parquet.schema_arrow.names, path)
        batches = parquet.iter_batches(columns=[PROMPT_COLUMN, RESPONSE_COLUMN])
        rows = (row for batch in batches for row in batch.to_pylist())
        yield from itertools.islice(rows, start, stop or None)
    except (pa.ArrowException, OSError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"source {path} cannot be read as Parquet ({message}): re-download or re-write it") from err


def read_hf(name: str, split: str, start: int, stop: int) -> Iterator[dict | str]:
    """Rows of a Hugging Face dataset, streamed: nothing is downloaded beyond what is read."""
    try:
        rows = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as err:  # network, auth or naming problems all end the run with one line
        raise ConfigError(f"cannot stream dataset {name!r} split {split!r}: {err}") from err
    if rows.column_names is not None:
        _check_columns(rows.column_names, name)
    rows = rows.skip(start)
    yield from (rows.take(stop - start) if stop else rows)


def _check_columns(names: Iterable[str], source: Any) -> None:
    missing = [c for c in (PROMPT_COLUMN, RESPONSE_COLUMN) if c not in names]
    if missing:
        raise ConfigError(f"{source} has no column {' or '.join(map(repr, missing))} (it has {list(names)})")


def read_source(data_cfg: DataConfig) -> Iterator[dict | str]:
    """Rows of the configured source: a local .jsonl / .parquet file, else a Hugging Face dataset name."""
    path = local_source(data_cfg)
    if path:
        reader = read_parquet if path.suffix == ".parquet" else read_jsonl
        return reader(path, data_cfg.start, data_cfg.stop)
    return read_hf(data_cfg.source, data_cfg.split, data_cfg.start, data_cfg.stop)


def check_fields(record: dict | str) -> tuple[str, str] | str:
    """(prompt, response) of a usable row, or the named reason it is not."""
    if isinstance(record, str):
        return record
    fields = []
    for column in (PROMPT_COLUMN, RESPONSE_COLUMN):
        if column not in record:
            return "missing_column"
        value = record[column]
        if value is None:
            return "null_field"
        if not isinstance(value, str):
            return "non_string_field"
        if is_blank(value):
            return "empty_field"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from a "\ud800" escape
            return "invalid_utf8"
        if CONTROL_CHAR_RE.search(value):
            return "control_chars"
        if TEMPLATE_MARKER_RE.search(value):
            return "template_marker"
        fields.append(value)
    return fields[0], fields[1]


# ----------------------------------------------------------------------------- 6. pack

def pack_rows(lengths: list[int], max_len: int, buffer_rows: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing of row indices into windows of max_len tokens.

    Rows are taken ``buffer_rows`` at a time (a bounded buffer), longest first, each into the window with
    the least room that still fits it. A row is never split.
    """
    windows: list[list[int]] = []
    for chunk_start in range(0, len(lengths), buffer_rows):
        chunk = range(chunk_start, min(chunk_start + buffer_rows, len(lengths)))
        first_window = len(windows)
        room: list[tuple[int, int]] = []  # (free tokens, window index), sorted
        for row in sorted(chunk, key=lambda r: -lengths[r]):
            slot = bisect.bisect_left(room, (lengths[row], -1))
            if slot == len(room):
                windows.append([row])
                bisect.insort(room, (max_len - lengths[row], len(windows) - 1))
            else:
                free, window = room.pop(slot)
                windows[window].append(row)
                bisect.insort(room, (free - lengths[row], window))
        assert all(sum(lengths[r] for r in w) <= max_len for w in windows[first_window:])
    return windows


# ----------------------------------------------------------------------------- 7. store

def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def cache_key(cfg: Config, tokenizer_path: Path) -> dict[str, Any]:
    """Everything the prepared data depends on; a prepared directory is reused only if all of it matches."""
    d = cfg.data
    source_path = Path(d.source).expanduser()
    return {
        "version": PREP_VERSION,
        "source": d.source,
        "source_sha256": _sha256(source_path) if source_path.is_file() else None,
        "split": d.split, "start": d.start, "stop": d.stop, "num_rows": d.num_rows, "eval_rows": d.eval_rows,
        "max_len": d.max_len, "pack": d.pack, "pack_buffer": d.pack_buffer,
        "tokenizer": str(tokenizer_path),
        "tokenizer_sha256": _sha256(tokenizer_path),
        "prompt_format_sha256": hashlib.sha256(PROMPT_TEMPLATE.encode()).hexdigest(),
    }


def _array_path(data_dir: Path, split: str, name: str) -> Path:
    return data_dir / f"{split}_{name}.npy"


ARRAY_NAMES = ("tokens", "loss_mask", "row_offsets", "window_offsets")
# The arrays of one batch, each int32[batch, max_len].
BATCH_FIELDS = ("tokens", "loss_mask", "segment_ids", "positions")
# The counts a training batch also carries, of the whole global batch: tokens and loss tokens.
GLOBAL_COUNTS = ("tokens_total", "loss_tokens_total")


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise ConfigError(f"{data_dir} holds no prepared data (no manifest.json): run data_prep.py first")
    return json.loads(path.read_text())


def continued_manifest(path: Path) -> dict[str, Any]:
    """The data manifest of a prepared directory, or the one a run directory's config.json recorded."""
    if (path / "manifest.json").is_file():
        return json.loads((path / "manifest.json").read_text())
    run_config = path / "config.json"
    manifest = json.loads(run_config.read_text()).get("data_manifest") if run_config.is_file() else None
    if not manifest:
        raise ConfigError(f"--data.continue_from {path} holds no manifest.json (prepared data) and no config.json "
                          "with a data_manifest (a run): name the earlier preparation or run, or pass "
                          "--data.continue_from '' --data.start N (its first unread source row)")
    return manifest


def continued_start(d: DataConfig, tokenizer_path: Path) -> int:
    """The first source row that the preparation (or run) named by ``d.continue_from`` did not read.

    Checked before any row is read: the earlier preparation must exist and come from the same source and
    tokenizer, or continuing from its row count would mean nothing.
    """
    path = Path(d.continue_from).expanduser()
    fix = "or pass --data.continue_from '' --data.start N (the first source row it did not read)"
    if not path.is_dir():
        raise ConfigError(f"--data.continue_from {path} does not exist: name the earlier preparation or run, {fix}")
    manifest = continued_manifest(path)
    if (manifest.get("source"), manifest.get("split")) != (d.source, d.split):
        raise ConfigError(f"--data.continue_from {path} was prepared from {manifest.get('source')} split "
                          f"{manifest.get('split')}, not {d.source} split {d.split}: continue from a preparation "
                          f"of the same source, {fix}")
    if manifest.get("tokenizer_sha256") != _sha256(tokenizer_path):
        raise ConfigError(f"--data.continue_from {path} was tokenized with {manifest.get('tokenizer')}, not "
                          f"{tokenizer_path}: continue from a preparation with the same tokenizer, {fix}")
    if "source_rows" not in manifest:
        raise ConfigError(f"--data.continue_from {path} records no source_rows (prepared by an older version): {fix}")
    start = manifest["source_rows"][1]
    if d.stop and start >= d.stop:
        raise ConfigError(f"--data.continue_from {path} read up to row {start}, at or past --data.stop {d.stop}: "
                          "raise --data.stop (0 = to the end)")
    return start


def is_cached(data_dir: Path, key: dict[str, Any]) -> bool:
    """True if data_dir holds a complete preparation made from the same inputs."""
    manifest_path = data_dir / "manifest.json"
    if not manifest_path.is_file():
        return False
    manifest = json.loads(manifest_path.read_text())
    arrays = [_array_path(data_dir, split, name) for split in SPLITS for name in ARRAY_NAMES]
    return {name: manifest.get(name) for name in key} == key and all(p.is_file() for p in arrays)


def write_split(data_dir: Path, split: str, rows: list[tuple[np.ndarray, np.ndarray]], windows: list[list[int]]
                ) -> None:
    """Rows in window order as flat arrays: window w holds rows window_offsets[w]..window_offsets[w+1]."""
    ordered = [rows[r] for window in windows for r in window]
    row_offsets = np.cumsum([0] + [len(tokens) for tokens, _ in ordered], dtype=np.int64)
    window_offsets = np.cumsum([0] + [len(window) for window in windows], dtype=np.int64)
    arrays = {
        "tokens": np.concatenate([t for t, _ in ordered] or [np.zeros(0, np.int32)]).astype(np.int32),
        "loss_mask": np.concatenate([m for _, m in ordered] or [np.zeros(0, np.int32)]).astype(np.uint8),
        "row_offsets": row_offsets,
        "window_offsets": window_offsets,
    }
    for name, array in arrays.items():
        np.save(_array_path(data_dir, split, name), array)


def percentiles(values: Iterable[int]) -> dict[str, int]:
    """LENGTH_PERCENTILES of values (rounded up: lengths are budgets) and their maximum; {} for no values."""
    values = np.asarray(list(values))
    if not len(values):
        return {}
    return {**{f"p{q}": int(np.ceil(np.percentile(values, q))) for q in LENGTH_PERCENTILES}, "max": int(values.max())}


def kept_lengths(rows: list[tuple[np.ndarray, np.ndarray]], tokenized_lengths: list[int], max_len: int
                 ) -> dict[str, Any]:
    """Token lengths of the kept rows (all splits) and of every tokenized row before the max_len filter.

    Completion lengths count the loss tokens, ``<end_of_turn>`` and EOS included: what generation must have room for.
    """
    return {
        "row_tokens": percentiles(len(tokens) for tokens, _ in rows),
        "completion_tokens": percentiles(int(mask.sum()) for _, mask in rows),
        "tokenized_row_tokens": percentiles(tokenized_lengths),
        "share_within_max_len": sum(n <= max_len for n in tokenized_lengths) / max(1, len(tokenized_lengths)),
    }


def length_stats(rows: list[tuple[np.ndarray, np.ndarray]], num_windows: int, max_len: int) -> dict[str, Any]:
    """Token-length percentiles, packing efficiency (non-pad / all tokens) and the share of loss tokens."""
    row_lengths = np.array([len(tokens) for tokens, _ in rows])
    completion_lengths = np.array([int(mask.sum()) for _, mask in rows])
    prompt_lengths = row_lengths - completion_lengths
    total = int(row_lengths.sum())
    return {
        "rows": len(rows), "windows": num_windows, "tokens": total,
        "prompt_tokens": percentiles(prompt_lengths), "completion_tokens": percentiles(completion_lengths),
        "packing_efficiency": total / max(1, num_windows * max_len),
        "efficiency_without_packing": total / max(1, len(rows) * max_len),
        "loss_token_share": int(completion_lengths.sum()) / max(1, total),
    }


def plot_lengths(path: Path, row_lengths: list[int], max_len: int) -> None:
    """Histogram of tokenized row lengths, the max_len cut marked: what the length filter drops is visible."""
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(row_lengths, bins=50, color="tab:blue")
    ax.axvline(max_len, color="tab:red", linestyle="--", label=f"max_len {max_len}")
    ax.set(xlabel="tokens per row (BOS + prompt + completion)", ylabel="rows", title="Row lengths before the filter")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- 8. prepare

def kept_rows_wanted(d: DataConfig) -> int:
    """Rows to keep before reading stops: the training rows wanted plus the held-out rows (0 = read everything)."""
    return d.num_rows + d.eval_rows if d.num_rows else 0


class RowResult(NamedTuple):
    """What became of one source row."""

    example: tuple[np.ndarray, np.ndarray] | None  # (tokens, loss_mask), None if dropped
    drop_reason: str = ""
    prompt: str = ""
    completion: str = ""
    length: int = 0  # tokens before the length filter; 0 if never tokenized


def process_rows(sp: spm.SentencePieceProcessor, rows: Iterable[dict | str], cfg: DataConfig) -> Iterator[RowResult]:
    """One RowResult per row read: checked, rewritten, rendered, tokenized and length-filtered.

    Rows are tokenized in batches so sentencepiece can spread a batch over ``cfg.num_workers`` threads.
    A row with more bytes than ``max_len`` tokens can hold (bytes_per_token_bound) is dropped as too_long
    without being tokenized. Stops once ``kept_rows_wanted(cfg)`` rows are kept, without reading further.
    """
    kept, pending, kept_wanted = 0, [], kept_rows_wanted(cfg)
    threads = max(1, cfg.num_workers)
    max_bytes = cfg.max_len * bytes_per_token_bound(sp)
    rows = iter(rows)
    while True:
        wanted = kept_wanted - kept if kept_wanted else TOKENIZE_BATCH
        for record in rows:
            fields = check_fields(record)
            completion, reason = rewrite_with_reason(fields[1]) if isinstance(fields, tuple) else (None, fields)
            if completion is None:
                yield RowResult(None, reason)
                continue
            rendered = build_prompt(fields[0])  # rendered once: measured here, tokenized below
            if len(rendered.encode()) + len(completion.encode()) > max_bytes:
                yield RowResult(None, "too_long")
            else:
                pending.append((fields[0], rendered, completion))
                if len(pending) >= min(wanted, TOKENIZE_BATCH):
                    break
        if not pending:
            return
        prompt_ids = sp.encode([rendered for _, rendered, _ in pending], num_threads=threads)
        completion_ids = sp.encode([completion for _, _, completion in pending], num_threads=threads)
        for (prompt, _, completion), p_ids, c_ids in zip(pending, prompt_ids, completion_ids, strict=True):
            example = example_from_ids(sp, p_ids, c_ids, cfg.max_len)
            kept += example is not None
            yield RowResult(example, "" if example else "too_long", prompt, completion,
                            len(p_ids) + len(c_ids) + ROW_EXTRA_TOKENS)
        pending = []
        if kept_wanted and kept >= kept_wanted:
            return


@dataclasses.dataclass
class RowsRead:
    """What one pass over the source gave: rows read, drops by reason, the kept rows (tokens, loss mask), every
    tokenized row's length, and the prompts and completions of the last ``eval_rows`` kept rows (held out)."""

    held_out: collections.deque[tuple[str, str]]
    count: int = 0
    drops: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    kept: list[tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=list)
    lengths: list[int] = dataclasses.field(default_factory=list)


def prepare(cfg: Config, show_progress: bool = True) -> Path:
    """Runs the data stage into ``cfg.data.out_dir`` (or reuses a valid preparation there) and returns it."""
    d = cfg.data
    data_dir = Path(d.out_dir).expanduser()
    sp = load_tokenizer(cfg.model)
    tokenizer_path = tokenizer_file(cfg.model)
    if d.continue_from:  # begin where the earlier preparation stopped reading; checked before any row is read
        d = dataclasses.replace(d, start=continued_start(d, tokenizer_path))
        cfg = dataclasses.replace(cfg, data=d)
    key = cache_key(cfg, tokenizer_path)
    if is_cached(data_dir, key):
        if show_progress:
            print(f"reusing the prepared data in {data_dir} (same source, tokenizer, max_len and packing)")
        return data_dir
    kept_wanted = kept_rows_wanted(d)
    read = read_rows(sp, d, kept_wanted, show_progress)
    if len(read.kept) <= d.eval_rows:
        reasons = ", ".join(f"{n} {r}" for r, n in read.drops.most_common()) or "none"
        raise ConfigError(f"{d.source} gave {len(read.kept)} usable rows of {read.count} read (dropped: {reasons}); "
                          f"need more than --data.eval_rows {d.eval_rows}")
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "manifest.json").unlink(missing_ok=True)  # written last: its presence marks a complete directory
    split_stats = write_splits(data_dir, d, read)
    write_stats_and_manifest(data_dir, d, key, read, kept_wanted, split_stats)
    return data_dir


def read_rows(sp: spm.SentencePieceProcessor, d: DataConfig, kept_wanted: int, show_progress: bool) -> RowsRead:
    """One pass over the source (until enough rows are kept), with a progress bar of rows kept."""
    read = RowsRead(held_out=collections.deque(maxlen=d.eval_rows or None))
    with tqdm(total=kept_wanted or None, desc="rows kept", unit="row", disable=not show_progress) as progress:
        for row in process_rows(sp, read_source(d), d):
            read.count += 1
            if row.drop_reason:
                read.drops[row.drop_reason] += 1
            if row.length:
                read.lengths.append(row.length)
            if row.example is not None:
                read.kept.append(row.example)
                read.held_out.append((row.prompt, row.completion))
                progress.update()
            if read.count % 100 == 0:
                progress.set_postfix(read=read.count, refresh=False)
        progress.set_postfix(read=read.count)
    return read


def write_splits(data_dir: Path, d: DataConfig, read: RowsRead) -> dict[str, dict]:
    """The train and eval windows (the last ``eval_rows`` kept rows are held out), the held-out prompts and the
    length plot; returns each split's length statistics."""
    split_rows = {"train": read.kept[:len(read.kept) - d.eval_rows], "eval": read.kept[len(read.kept) - d.eval_rows:]}
    split_stats = {}
    for split, rows in split_rows.items():
        lengths = [len(tokens) for tokens, _ in rows]
        windows = pack_rows(lengths, d.max_len, d.pack_buffer) if d.pack else [[r] for r in range(len(rows))]
        write_split(data_dir, split, rows, windows)
        split_stats[split] = length_stats(rows, len(windows), d.max_len)
    with open(data_dir / "eval_prompts.jsonl", "w") as f:
        for prompt, reference in read.held_out if d.eval_rows else ():
            f.write(json.dumps({"prompt": prompt, "reference": reference}, ensure_ascii=False) + "\n")
    plot_lengths(data_dir / "row_lengths.png", read.lengths, d.max_len)
    return split_stats


def write_stats_and_manifest(data_dir: Path, d: DataConfig, key: dict, read: RowsRead, kept_wanted: int,
                             split_stats: dict[str, dict]) -> None:
    """stats.json (what was read, kept and dropped, and why reading stopped), then manifest.json, which marks the
    directory complete."""
    source_rows = [d.start, d.start + read.count]
    enough = bool(kept_wanted) and len(read.kept) >= kept_wanted
    ran_out = not enough and not (d.stop and source_rows[1] >= d.stop)
    lengths = kept_lengths(read.kept, read.lengths, d.max_len)
    stats = {
        "rows_read": read.count, "rows_kept": len(read.kept), "rows_dropped": sum(read.drops.values()),
        "kept_rows_wanted": kept_wanted, "source_rows": source_rows, "source_ran_out": ran_out,
        "rows_read_per_kept_row": read.count / len(read.kept),
        "dropped_by_reason": dict(sorted(read.drops.items())),
        "stopped_because": "kept rows wanted" if enough else "source ended" if ran_out else "row range ended",
        "lengths": lengths,
        **split_stats,
    }
    (data_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    counts = {f"{split}_{what}": split_stats[split][what] for split in SPLITS for what in ("rows", "windows", "tokens")}
    manifest = {**key, "source_rows": source_rows, "counts": counts, "lengths": lengths}
    (data_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def generation_budget(data_dir: str | Path) -> int:
    """New tokens generation needs for the longest completion the model was trained on, rounded up.

    Training teaches completions up to this long; a smaller budget cuts them before ``</answer>``.
    """
    lengths = read_manifest(data_dir).get("lengths")
    if not lengths:
        raise ConfigError(f"{data_dir} records no token lengths (prepared by an older version): "
                          "run data_prep.py again, or set --eval.max_new_tokens")
    longest = lengths["completion_tokens"]["max"]
    return -(-longest // GENERATION_BUDGET_STEP) * GENERATION_BUDGET_STEP


def prompt_budget(d: DataConfig) -> int:
    """The notebook's MAX_PROMPT_LENGTH: the longest row trained on (``max_len``) rounded up to a power of two.

    The judges' Sampler cache holds MAX_PROMPT_LENGTH + MAX_GENERATION_STEPS + 256 tokens, and Tunix's Sampler
    pads a batch of prompts to the next power of two of the longest: a power of two here lets every prompt of up
    to this many tokens (long texts to summarise included) fit with the whole generation budget.
    """
    return 1 << (d.max_len - 1).bit_length()


def resolve_max_new_tokens(cfg: Config, data_dir: str | Path) -> int:
    """``eval.max_new_tokens`` if set, else the budget derived from the prepared data (generation_budget)."""
    return cfg.eval.max_new_tokens or generation_budget(data_dir)


# ----------------------------------------------------------------------------- 9. load

def padding_window(max_len: int) -> dict[str, np.ndarray]:
    """A window of padding only: no tokens, no loss, segment id 0."""
    return {name: np.zeros(max_len, np.int32) for name in BATCH_FIELDS}


class PackedWindows:
    """Random access to the packed windows of one split, as fixed-length arrays (a grain data source).

    Arrays are memory-mapped, so a window costs only its own tokens to read.
    """

    def __init__(self, data_dir: str | Path, split: str):
        self.max_len = read_manifest(data_dir)["max_len"]
        self.arrays = {name: np.load(_array_path(Path(data_dir), split, name), mmap_mode="r") for name in ARRAY_NAMES}

    def __len__(self) -> int:
        return len(self.arrays["window_offsets"]) - 1

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        first_row, end_row = self.arrays["window_offsets"][index:index + 2]
        row_starts = np.asarray(self.arrays["row_offsets"][first_row:end_row + 1])
        begin, end = row_starts[0], row_starts[-1]
        n, row_lengths = end - begin, np.diff(row_starts)
        window = padding_window(self.max_len)
        window["tokens"][:n] = self.arrays["tokens"][begin:end]
        window["loss_mask"][:n] = self.arrays["loss_mask"][begin:end]
        window["segment_ids"][:n] = np.repeat(np.arange(1, len(row_lengths) + 1), row_lengths)
        window["positions"][:n] = np.arange(n) - np.repeat(row_starts[:-1] - begin, row_lengths)
        return window

    def counts(self, index: int) -> tuple[int, int]:
        """Tokens and loss tokens of a window, reading only its loss mask."""
        first_row, end_row = self.arrays["window_offsets"][index:index + 2]
        begin, end = self.arrays["row_offsets"][first_row], self.arrays["row_offsets"][end_row]
        return int(end - begin), int(np.count_nonzero(self.arrays["loss_mask"][begin:end]))


def num_windows(data_dir: str | Path, split: str = "train") -> int:
    """Packed windows (training rows after packing) in a split: one epoch is this many rows."""
    return read_manifest(data_dir)["counts"][f"{split}_windows"]


def train_loader(data_dir: str | Path, batch_size: int, seed: int, rows: Sequence[int] | None = None
                 ) -> grain.DatasetIterator:
    """Endless global batches of ``batch_size`` training windows, reshuffled each epoch (an epoch may end inside a
    batch: none is dropped); ``get_state()``/``set_state()`` resume it.

    Every process walks the same global order and reads only its own ``rows`` of each batch (all by default), so
    the global batches are the same whatever the number of processes. Each batch also carries the token and loss
    token counts of the whole global batch (``GLOBAL_COUNTS``), for the rates every process reports alike.
    """
    source = PackedWindows(data_dir, "train")
    if len(source) < batch_size:
        raise ConfigError(f"{data_dir} has {len(source)} training windows, fewer than one batch of {batch_size}: "
                          f"prepare more rows or lower the batch")
    rows = np.arange(batch_size) if rows is None else np.asarray(rows)

    def read(indices: np.ndarray) -> dict[str, Any]:
        windows = [source[int(i)] for i in indices[rows]]
        batch: dict[str, Any] = {name: np.stack([w[name] for w in windows]) for name in BATCH_FIELDS}
        batch.update(zip(GLOBAL_COUNTS, np.sum([source.counts(int(i)) for i in indices], axis=0).tolist(), strict=True))
        return batch

    order = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat().batch(batch_size).map(read)
    # A window is a few memory-mapped slices: two threads and a short read-ahead keep up with any step
    # without grain's default 16 threads competing with the trainer for the host's cores.
    return iter(order.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=16)))


def eval_batches(data_dir: str | Path, batch_size: int, rows: Sequence[int] | None = None
                 ) -> list[dict[str, np.ndarray]]:
    """Every eval window once, in stored order, in global batches of which this process holds ``rows`` (all by
    default); the last batch is filled with all-padding windows (loss_mask 0)."""
    source = PackedWindows(data_dir, "eval")
    windows = [source[i] for i in range(len(source))]
    windows += [padding_window(source.max_len)] * (-len(windows) % batch_size)
    rows = np.arange(batch_size) if rows is None else np.asarray(rows)
    return [{name: np.stack([windows[i + r][name] for r in rows]) for name in BATCH_FIELDS}
            for i in range(0, len(windows), batch_size)]


def completion_lengths(data_dir: str | Path, split: str = "train") -> np.ndarray:
    """Loss tokens (completion + ``<end_of_turn>`` + EOS) of every stored row of a split."""
    mask = np.load(_array_path(Path(data_dir), split, "loss_mask"), mmap_mode="r")
    row_offsets = np.load(_array_path(Path(data_dir), split, "row_offsets"))
    return np.add.reduceat(np.asarray(mask, np.int64), row_offsets[:-1]) if len(row_offsets) > 1 else np.zeros(0)


def summary_line(data_dir: Path) -> str:
    """The stage's last line: rows read and kept, why reading stopped, drops, windows and the generation budget."""
    stats = json.loads((data_dir / "stats.json").read_text())
    reasons = ", ".join(f"{n} {r}" for r, n in stats["dropped_by_reason"].items()) or "none"
    first, end = stats["source_rows"]
    wanted = stats["kept_rows_wanted"]
    why = (f"the source ended before the {wanted} rows wanted (training + held-out)"
           if stats["source_ran_out"] and wanted else stats["stopped_because"])
    completions = stats["lengths"]["completion_tokens"]
    return (f"kept {stats['rows_kept']} of {stats['rows_read']} rows read (source rows {first}..{end}; {why}), "
            f"dropped {stats['rows_dropped']} ({reasons}); {stats['train']['windows']} train + "
            f"{stats['eval']['windows']} eval windows, packing efficiency {stats['train']['packing_efficiency']:.1%}; "
            f"completions p50 {completions['p50']} / max {completions['max']} tokens, generation budget "
            f"{generation_budget(data_dir)}; wrote {data_dir}")


def main(argv: list[str] | None = None) -> None:
    cfg, _ = settings_from_argv(argv, "data_prep", __doc__)
    try:
        data_dir = prepare(cfg)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    print(summary_line(data_dir))


if __name__ == "__main__":
    main()
