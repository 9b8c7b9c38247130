"""Tests of the data stage on the shipped sample and on small hand-made sources."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

import chat_format
import config
import data_prep
from assets import glaive_lengths

# The shipped sample: rows in the file, rows that pass the rewrite, rows within cpu-tiny's max_len 512.
SAMPLE_READ, SAMPLE_USABLE, SAMPLE_KEPT = 323, 300, 286
HELD_OUT = 24  # cpu-tiny's eval_rows


def tiny_config(out_dir: Path, **overrides: object) -> config.Config:
    return config.get_config("cpu-tiny", {"data.out_dir": str(out_dir)} | {k: str(v) for k, v in overrides.items()})


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(config.TINY_TOKENIZER_PATH))


def sample_rows(n: int, max_chars: int = 10**9) -> list[dict]:
    """The first n usable rows of the shipped sample (no longer than max_chars)."""
    rows = (r for r in data_prep.read_jsonl(config.SAMPLE_PATH, 0, 0) if isinstance(r, dict))
    usable = (r for r in rows if isinstance(data_prep.check_fields(r), tuple) and chat_format.rewrite_response(
        r["response"]) and len(r["prompt"] + r["response"]) <= max_chars)
    return [next(usable) for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict | bytes]) -> Path:
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- prompt

@pytest.mark.parametrize("question", ["What is 2 + 3?", "Fill in {x} and {{y}}: f'{a!r:>{w}}' }{ {question} {0}",
                                      "  Summarise:\n\nthe text...\n  "])
def test_the_judges_prompt_template_gives_the_very_tokens_training_uses(sp: spm.SentencePieceProcessor,
                                                                        question: str) -> None:
    """The judges fill the notebook's PROMPT_TEMPLATE with str.format; a prepared row of the same question starts
    with BOS and exactly those tokens (braces and surrounding whitespace of the question kept)."""
    judged = chat_format.PROMPT_TEMPLATE.format(question=question)
    assert judged.count(question) == 1 and judged.endswith("<start_of_turn>model\n")
    [row] = data_prep.process_rows(sp, [{"prompt": question, "response": "<think>r</think>a"}],
                                   config.get_config("cpu-tiny").data)
    tokens, loss_mask = row.example
    n_prompt = int(np.argmax(loss_mask))
    assert tokens[:n_prompt].tolist() == [sp.bos_id(), *sp.encode(judged)]
    assert row.prompt == question


# ----------------------------------------------------------------------------- tokenizer

def test_tiny_tokenizer_has_gemma_special_ids(sp: spm.SentencePieceProcessor) -> None:
    assert sp.vocab_size() <= config.ModelConfig().vocab_size
    assert (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sp.id_to_piece(106) == "<start_of_turn>" and sp.id_to_piece(107) == "<end_of_turn>"
    ids = sp.encode("<start_of_turn>user\n")
    assert ids[0] == 106 and sp.decode(ids[1:]) == "user\n"
    assert sp.encode("<end_of_turn>") == [107]
    assert sp.decode(sp.encode("naïve 🙂\r\n  x")) == "naïve 🙂\r\n  x"  # byte fallback, whitespace kept


def test_tiny_tokenizer_rebuilds_byte_for_byte(tmp_path: Path) -> None:
    data_prep.build_tiny_tokenizer(config.SAMPLE_PATH, tmp_path / "tok.model")
    assert (tmp_path / "tok.model").read_bytes() == config.TINY_TOKENIZER_PATH.read_bytes()


# ----------------------------------------------------------------------------- tokenize

def test_loss_mask_covers_exactly_the_completion(sp: spm.SentencePieceProcessor) -> None:
    prompt = chat_format.build_prompt("What is 2 + 3?")
    completion = "<reasoning>2 + 3 = 5</reasoning>\n<answer>5</answer>"
    tokens, loss_mask = data_prep.tokenize_example(sp, prompt, completion, max_len=512)
    n_prompt = 1 + len(sp.encode(prompt))
    assert tokens.dtype == loss_mask.dtype == np.int32 and len(tokens) == len(loss_mask)
    assert tokens[0] == 2 and tokens[-2:].tolist() == [107, 1]  # ... <end_of_turn> EOS: a default-stop Sampler stops
    assert not loss_mask[:n_prompt].any() and loss_mask[n_prompt:].all()
    assert tokens[n_prompt - 1] == sp.encode("\n")[-1]  # the prompt ends "<start_of_turn>model\n"
    assert sp.decode(tokens[1:n_prompt].tolist()) == prompt
    assert sp.decode(tokens[loss_mask == 1][:-1].tolist()) == completion + "<end_of_turn>"


def test_rows_over_max_len_are_dropped_not_truncated(sp: spm.SentencePieceProcessor) -> None:
    prompt, completion = chat_format.build_prompt("q"), "<reasoning>r</reasoning>\n<answer>a</answer>"
    n = len(data_prep.tokenize_example(sp, prompt, completion, max_len=10_000)[0])
    assert len(data_prep.tokenize_example(sp, prompt, completion, max_len=n)[0]) == n
    assert data_prep.tokenize_example(sp, prompt, completion, max_len=n - 1) is None


class RecordingTokenizer:
    """The tiny tokenizer, recording the length of every text it is asked to encode."""

    def __init__(self, sp: spm.SentencePieceProcessor):
        self.sp, self.encoded_lengths = sp, []

    def encode(self, texts: list[str], **kwargs: object) -> list[list[int]]:
        self.encoded_lengths += [len(text) for text in texts]
        return self.sp.encode(texts, **kwargs)

    def __getattr__(self, name: str) -> object:
        return getattr(self.sp, name)


def test_a_huge_row_is_dropped_as_too_long_without_being_tokenized(sp: spm.SentencePieceProcessor) -> None:
    cfg = tiny_config(Path("unused")).data
    bound = cfg.max_len * data_prep.bytes_per_token_bound(sp)
    huge = {"prompt": "q", "response": "<think>" + "many words " * 500_000 + "</think>a"}  # 5.5 MB
    good = sample_rows(2, max_chars=1000)
    tokenizer = RecordingTokenizer(sp)
    results = list(data_prep.process_rows(tokenizer, [good[0], huge, good[1]], cfg))
    dropped = [r for r in results if r.drop_reason]  # dropped before the batch is tokenized, so yielded first
    assert [(r.drop_reason, r.length) for r in dropped] == [("too_long", 0)]
    assert [r.prompt for r in results if r.example is not None] == [good[0]["prompt"], good[1]["prompt"]]
    assert len(tokenizer.encoded_lengths) == 4 and max(tokenizer.encoded_lengths) < bound < len(huge["response"])


def test_the_byte_bound_never_drops_a_row_that_could_fit(sp: spm.SentencePieceProcessor) -> None:
    """No text has more bytes than its tokens times the bound: not the sample, not runs of the longest piece."""
    bound = data_prep.bytes_per_token_bound(sp)
    assert bound == 33  # the tiny tokenizer's longest piece: 11 spaces, each stored as a 3-byte "▁"
    texts = [chat_format.build_prompt(r["prompt"]) + chat_format.rewrite_response(r["response"])
             for r in sample_rows(SAMPLE_USABLE)]
    texts += [" " * 11 * 1000, "▁" * 1000, "\U0001f642" * 1000, "<end_of_turn>" * 100]
    assert all(len(sp.encode(text)) * bound >= len(text.encode()) for text in texts)


def test_length_filter_on_the_sample(tiny_data_dir: Path, sp: spm.SentencePieceProcessor) -> None:
    rows = sample_rows(SAMPLE_USABLE)
    lengths = [len(data_prep.tokenize_example(sp, chat_format.build_prompt(r["prompt"]),
                                              chat_format.rewrite_response(r["response"]), 10_000)[0]) for r in rows]
    stats = json.loads((tiny_data_dir / "stats.json").read_text())
    assert stats["dropped_by_reason"]["too_long"] == sum(n > 512 for n in lengths) > 0
    row_offsets = np.load(tiny_data_dir / "train_row_offsets.npy")
    assert np.diff(row_offsets).max() <= 512


# ----------------------------------------------------------------------------- pack

def test_pack_rows_places_every_row_once_within_max_len() -> None:
    lengths = np.random.default_rng(0).integers(1, 100, size=500).tolist()
    windows = data_prep.pack_rows(lengths, max_len=100, buffer_rows=64)
    assert sorted(r for w in windows for r in w) == list(range(500))
    assert all(sum(lengths[r] for r in w) <= 100 for w in windows)
    assert sum(lengths) / (100 * len(windows)) > 0.9


def segments(window: dict[str, np.ndarray]) -> list[tuple[int, ...]]:
    """The rows of one window, as token tuples, checked for consistent segment ids and positions on the way."""
    ids, positions, tokens = window["segment_ids"], window["positions"], window["tokens"]
    n = int((ids > 0).sum())
    assert (ids[:n] > 0).all() and not ids[n:].any() and not positions[n:].any() and not tokens[n:].any()
    assert not window["loss_mask"][n:].any()
    rows = []
    for segment in range(1, int(ids.max()) + 1):
        where = np.flatnonzero(ids == segment)
        assert len(where) and (np.diff(where) == 1).all()  # contiguous: no row is split
        assert (positions[where] == np.arange(len(where))).all()  # positions restart per row
        assert tokens[where[0]] == 2 and tokens[where[-2:]].tolist() == [107, 1]  # BOS ... <end_of_turn> EOS: one row
        rows.append(tuple(tokens[where].tolist()))
    return rows


def stored_rows(data_dir: Path, split: str) -> Counter:
    tokens, offsets = np.load(data_dir / f"{split}_tokens.npy"), np.load(data_dir / f"{split}_row_offsets.npy")
    return Counter(tuple(tokens[a:b].tolist()) for a, b in zip(offsets[:-1], offsets[1:], strict=True))


def test_windows_hold_whole_rows_with_restarting_positions(tiny_data_dir: Path) -> None:
    source = data_prep.PackedWindows(tiny_data_dir, "train")
    rows = Counter(row for i in range(len(source)) for row in segments(source[i]))
    assert len(source) == data_prep.num_windows(tiny_data_dir) < sum(rows.values())  # packed: fewer windows
    assert rows == stored_rows(tiny_data_dir, "train")
    assert sum(rows.values()) == SAMPLE_KEPT - HELD_OUT


def test_every_row_appears_once_per_epoch_reshuffled(tiny_data_dir: Path, sp: spm.SentencePieceProcessor) -> None:
    n_windows, batch = data_prep.num_windows(tiny_data_dir), 4
    loader = data_prep.train_loader(tiny_data_dir, batch_size=batch, seed=3)
    windows = []
    while len(windows) < 2 * n_windows:
        b = next(loader)
        assert set(b) == {*data_prep.BATCH_FIELDS, *data_prep.GLOBAL_COUNTS}
        counts = [b.pop(name) for name in data_prep.GLOBAL_COUNTS]
        assert counts == [np.count_nonzero(b["segment_ids"]), np.count_nonzero(b["loss_mask"])]
        assert all(v.shape == (batch, 512) and v.dtype == np.int32 for v in b.values())
        windows += [{k: v[i] for k, v in b.items()} for i in range(batch)]
    epochs = [windows[:n_windows], windows[n_windows:2 * n_windows]]
    # Rows independently tokenized from the sample: every kept training row once per epoch.
    kept = [e for r in sample_rows(SAMPLE_USABLE) if (e := data_prep.tokenize_example(
        sp, chat_format.build_prompt(r["prompt"]), chat_format.rewrite_response(r["response"]), 512)) is not None]
    expected = Counter(tuple(tokens.tolist()) for tokens, _ in kept[:-HELD_OUT])
    for epoch in epochs:
        assert Counter(row for w in epoch for row in segments(w)) == expected
    assert [w["tokens"].tolist() for w in epochs[0]] != [w["tokens"].tolist() for w in epochs[1]]


def test_loader_state_restores_the_same_next_batches(tiny_data_dir: Path) -> None:
    loader = data_prep.train_loader(tiny_data_dir, batch_size=4, seed=0)
    for _ in range(30):  # past the end of the first epoch
        next(loader)
    state = json.loads(json.dumps(loader.get_state()))
    expected = [next(loader) for _ in range(3)]
    resumed = data_prep.train_loader(tiny_data_dir, batch_size=4, seed=0)
    resumed.set_state(state)
    for batch in expected:
        got = next(resumed)
        assert all(np.array_equal(batch[k], got[k]) for k in batch)
    other_seed = next(data_prep.train_loader(tiny_data_dir, batch_size=4, seed=1))
    assert not np.array_equal(other_seed["tokens"], next(data_prep.train_loader(tiny_data_dir, 4, seed=0))["tokens"])


def test_processes_read_their_own_rows_of_the_same_global_batches(tiny_data_dir: Path) -> None:
    """Two processes holding rows [0, 1, 4, 5] and [2, 3, 6, 7] of each global batch of 8 read together what one
    process reads, and both report the whole batch's counts."""
    whole = data_prep.train_loader(tiny_data_dir, batch_size=8, seed=0)
    halves = [data_prep.train_loader(tiny_data_dir, batch_size=8, seed=0, rows=rows) for rows in ([0, 1, 4, 5],
                                                                                                  [2, 3, 6, 7])]
    for _ in range(2 * data_prep.num_windows(tiny_data_dir) // 8):
        expected, (first, second) = next(whole), [next(half) for half in halves]
        for name in data_prep.BATCH_FIELDS:
            assert np.array_equal(np.concatenate([first[name][:2], second[name][:2], first[name][2:],
                                                  second[name][2:]]), expected[name])
        assert [first[c] for c in data_prep.GLOBAL_COUNTS] == [second[c] for c in data_prep.GLOBAL_COUNTS] == [
            expected[c] for c in data_prep.GLOBAL_COUNTS]
    split = data_prep.eval_batches(tiny_data_dir, 4, rows=[1, 3])
    assert all(np.array_equal(part["tokens"], batch["tokens"][[1, 3]])
               for part, batch in zip(split, data_prep.eval_batches(tiny_data_dir, 4), strict=True))


def test_eval_batches_pad_and_repeat(tiny_data_dir: Path) -> None:
    batches = data_prep.eval_batches(tiny_data_dir, batch_size=4)
    n_windows = data_prep.num_windows(tiny_data_dir, "eval")
    assert len(batches) == math.ceil(n_windows / 4) and all(b["tokens"].shape == (4, 512) for b in batches)
    rows = Counter(row for b in batches for i in range(4) for row in segments({k: v[i] for k, v in b.items()}))
    assert rows == stored_rows(tiny_data_dir, "eval") and sum(rows.values()) == HELD_OUT
    padding = batches[-1]["segment_ids"][n_windows % 4 or 4:]
    assert not padding.any() and not batches[-1]["loss_mask"][n_windows % 4 or 4:].any()
    again = data_prep.eval_batches(tiny_data_dir, batch_size=4)
    assert all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(batches, again, strict=True))


def test_eval_prompts_are_the_held_out_rows(tiny_data_dir: Path) -> None:
    held_out = [json.loads(line) for line in (tiny_data_dir / "eval_prompts.jsonl").read_text().splitlines()]
    kept = [r for r in sample_rows(SAMPLE_USABLE) if len(data_prep.tokenize_example(
        spm.SentencePieceProcessor(model_file=str(config.TINY_TOKENIZER_PATH)),
        chat_format.build_prompt(r["prompt"]), chat_format.rewrite_response(r["response"]), 10_000)[0]) <= 512]
    assert held_out == [{"prompt": r["prompt"], "reference": chat_format.rewrite_response(r["response"])}
                        for r in kept[-HELD_OUT:]]


# ----------------------------------------------------------------------------- store and cache

def test_stats_and_manifest_on_the_sample(tiny_data_dir: Path) -> None:
    stats = json.loads((tiny_data_dir / "stats.json").read_text())
    manifest = json.loads((tiny_data_dir / "manifest.json").read_text())
    assert (stats["rows_read"], stats["rows_kept"], stats["stopped_because"]) == (SAMPLE_READ, SAMPLE_KEPT,
                                                                                 "source ended")
    assert stats["source_rows"] == manifest["source_rows"] == [0, SAMPLE_READ] and stats["source_ran_out"]
    assert stats["rows_read"] == stats["rows_kept"] + stats["rows_dropped"] == SAMPLE_KEPT + sum(
        stats["dropped_by_reason"].values())
    train = stats["train"]
    assert 0.85 < train["packing_efficiency"] <= 1 and train["efficiency_without_packing"] < 0.5
    assert 0 < train["loss_token_share"] < 1 and train["completion_tokens"]["p50"] > 0
    assert manifest["max_len"] == 512 and manifest["pack"] is True
    assert manifest["counts"]["train_windows"] == train["windows"]
    assert (tiny_data_dir / "row_lengths.png").read_bytes()[:4] == b"\x89PNG"


def test_cache_is_reused_and_invalidated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config(tmp_path)
    data_prep.prepare(cfg, show_progress=False)
    reads = []
    read_source = data_prep.read_source
    monkeypatch.setattr(data_prep, "read_source", lambda d: reads.append(d) or read_source(d))
    data_prep.prepare(cfg, show_progress=False)
    assert reads == []  # reused
    data_prep.prepare(tiny_config(tmp_path, **{"data.max_len": 384}), show_progress=False)
    assert len(reads) == 1 and json.loads((tmp_path / "manifest.json").read_text())["max_len"] == 384
    unpacked = tiny_config(tmp_path, **{"data.pack": "false"})
    data_prep.prepare(unpacked, show_progress=False)
    assert len(reads) == 2 and data_prep.num_windows(tmp_path) == SAMPLE_KEPT - HELD_OUT  # one row per window
    tokenizer = tmp_path / "tok.model"
    data_prep.build_tiny_tokenizer(config.SAMPLE_PATH, tokenizer, vocab_size=1024)
    unpacked.model.tokenizer_path, unpacked.model.vocab_size = str(tokenizer), 1024  # the embedding fits it
    data_prep.prepare(unpacked, show_progress=False)
    assert len(reads) == 3


def test_workers_give_the_same_data(tmp_path: Path, tiny_data_dir: Path) -> None:
    data_dir = data_prep.prepare(tiny_config(tmp_path, **{"data.num_workers": 2}), show_progress=False)
    for name in ("train_tokens", "train_loss_mask", "train_row_offsets", "train_window_offsets"):
        assert np.array_equal(np.load(data_dir / f"{name}.npy"), np.load(tiny_data_dir / f"{name}.npy"))


def test_num_rows_counts_kept_training_rows_and_stops_reading(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                               sp: spm.SentencePieceProcessor) -> None:
    data_dir = data_prep.prepare(tiny_config(tmp_path, **{"data.num_rows": 45, "data.eval_rows": 5}))
    stats = json.loads((data_dir / "stats.json").read_text())
    assert stats["rows_kept"] == stats["kept_rows_wanted"] == 50 and stats["stopped_because"] == "kept rows wanted"
    assert stats["train"]["rows"] == 45 and stats["eval"]["rows"] == 5 and not stats["source_ran_out"]
    # Reading stopped at the row that made the 50th kept one, and source_rows says so.
    kept = rows_read = 0
    for record in data_prep.read_jsonl(config.SAMPLE_PATH, 0, 0):
        rows_read += 1
        fields = data_prep.check_fields(record)
        completion = chat_format.rewrite_response(fields[1]) if isinstance(fields, tuple) else None
        kept += bool(completion and data_prep.tokenize_example(sp, chat_format.build_prompt(fields[0]), completion,
                                                               512))
        if kept == 50:
            break
    assert stats["source_rows"] == [0, rows_read] and stats["rows_read"] == rows_read
    assert stats["rows_read_per_kept_row"] == rows_read / 50
    progress = capsys.readouterr().err
    assert "50/50" in progress and f"read={rows_read}" in progress


# ----------------------------------------------------------------------------- bad input and other sources

def test_each_bad_row_is_counted_under_its_reason(tmp_path: Path) -> None:
    good = sample_rows(3)
    q, r = good[0]["prompt"], good[0]["response"]
    cases = {
        "no_think": {"prompt": q, "response": "no tags"},
        "unclosed_think": {"prompt": q, "response": "<think>r"},
        "multiple_think": {"prompt": q, "response": "<think>r</think>a<think>r</think>a"},
        "text_before_think": {"prompt": q, "response": "x" + r},
        "empty_answer": {"prompt": q, "response": "<think>r</think> "},
        "empty_reasoning": {"prompt": q, "response": "<think></think>a"},
        "nested_tags": {"prompt": q, "response": "<think>r</think><answer>a</answer>"},
        "null_field": {"prompt": None, "response": r},
        "non_string_field": {"prompt": q, "response": ["r"]},
        "missing_column": {"response": r},
        "empty_field": {"prompt": q, "response": ""},
        "malformed_json": b'{"prompt": "q", "response": ',
        "invalid_utf8": b'{"prompt": "\xff\xfe", "response": "<think>r</think>a"}',
        "control_chars": {"prompt": q, "response": "<think>r\x00</think>a"},
        "template_marker": {"prompt": q, "response": "<think>r</think>a<end_of_turn>\n<start_of_turn>user\nmore"},
    }
    lone_surrogate = b'{"prompt": "\\ud800", "response": "<think>r</think>a"}'
    source = write_jsonl(tmp_path / "bad.jsonl", [*good, *cases.values(), lone_surrogate, b'[1, 2]'])
    data_dir = data_prep.prepare(tiny_config(tmp_path / "out", **{"data.source": source, "data.eval_rows": 1}),
                                 show_progress=False)
    stats = json.loads((data_dir / "stats.json").read_text())
    assert stats["dropped_by_reason"] == {reason: 1 for reason in cases} | {"invalid_utf8": 2, "malformed_json": 2}
    assert stats["rows_kept"] == 3 and stats["rows_read"] == 3 + len(cases) + 2


@pytest.mark.parametrize("text", ["\x00", "a\x1b[31m", "\x7f", "\x85", "\x0b"])
@pytest.mark.parametrize("column", ["prompt", "response"])
def test_control_characters_drop_a_row(column: str, text: str) -> None:
    row = {"prompt": "question\t1\r\n", "response": "<think>r\n\tr</think>a"}
    assert data_prep.check_fields(row) == (row["prompt"], row["response"])  # tab, newline, CR are text
    assert data_prep.check_fields(row | {column: row[column] + text}) == "control_chars"


@pytest.mark.parametrize("marker", ["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>"])
@pytest.mark.parametrize("column", ["prompt", "response"])
def test_chat_template_markers_drop_a_row(column: str, marker: str, sp: spm.SentencePieceProcessor) -> None:
    row = {"prompt": "question", "response": "<think>r</think>a"}
    assert data_prep.check_fields(row | {column: f"{row[column]} {marker}"}) == "template_marker"
    if marker in ("<start_of_turn>", "<end_of_turn>"):  # why: the tokenizer turns the text into turn tokens
        assert len(sp.encode(marker)) == 1


def test_a_byte_order_mark_keeps_the_first_row(tmp_path: Path) -> None:
    rows = sample_rows(2)
    source = tmp_path / "bom.jsonl"
    source.write_bytes(b"\xef\xbb\xbf" + write_jsonl(tmp_path / "plain.jsonl", rows).read_bytes())
    assert list(data_prep.read_jsonl(source, 0, 0)) == rows


@pytest.mark.parametrize("name, content, message", [
    ("a_directory", None, r"source .*a_directory is a directory, not a .jsonl/.parquet file"),
    ("lines.parquet", b'{"prompt": "q", "response": "r"}\n', r"source .*lines.parquet is not a Parquet file"),
    ("empty.parquet", b"", r"source .*empty.parquet is not a Parquet file"),
    ("damaged.parquet", "damaged", r"source .*damaged.parquet cannot be read as Parquet \("),
])
def test_unreadable_sources_stop_with_one_line(name: str, content: bytes | str | None, message: str,
                                               tmp_path: Path) -> None:
    source = tmp_path / name
    if content is None:
        source.mkdir()
    elif content == "damaged":  # the Parquet markers intact, everything between them overwritten
        pq.write_table(pa.table({"prompt": ["q" * 1000] * 50, "response": ["<think>r</think>a"] * 50}), source)
        data = bytearray(source.read_bytes())
        data[100:-100] = b"A" * (len(data) - 200)
        source.write_bytes(bytes(data))
    else:
        source.write_bytes(content)
    with pytest.raises(config.ConfigError, match=message) as err:
        data_prep.prepare(tiny_config(tmp_path / "out", **{"data.source": source}), show_progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(SystemExit, match=f"^error: {message}"):
        data_prep.main(["--preset", "cpu-tiny", "--data.source", str(source), "--data", str(tmp_path / "out")])


def test_unusable_sources_stop_with_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(config.ConfigError, match="does not exist"):
        data_prep.prepare(tiny_config(tmp_path, **{"data.source": tmp_path / "missing.jsonl"}), show_progress=False)
    broken = write_jsonl(tmp_path / "broken.jsonl", [{"prompt": "q", "response": "no think"}, b"{"])
    with pytest.raises(config.ConfigError, match=r"gave 0 usable rows of 2 read \(dropped: 1 no_think, 1 malformed"):
        data_prep.prepare(tiny_config(tmp_path, **{"data.source": broken}), show_progress=False)
    wrong_columns = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"question": ["q"], "response": ["<think>r</think>a"]}), wrong_columns)
    with pytest.raises(config.ConfigError, match="has no column 'prompt'"):
        data_prep.prepare(tiny_config(tmp_path, **{"data.source": wrong_columns}), show_progress=False)
    with pytest.raises(SystemExit, match="^error: .*does not exist"):
        data_prep.main(["--preset", "cpu-tiny", "--data.source", str(tmp_path / "missing.jsonl"),
                        "--data", str(tmp_path / "out")])


def test_parquet_source_with_row_range(tmp_path: Path) -> None:
    rows = sample_rows(40, max_chars=1000)  # all well within max_len
    table = pa.table({"prompt": [r["prompt"] for r in rows] + [None],
                      "response": [r["response"] for r in rows] + ["<think>r</think>a"]})
    pq.write_table(table, tmp_path / "rows.parquet", row_group_size=16)
    cfg = tiny_config(tmp_path / "out", **{"data.source": tmp_path / "rows.parquet", "data.start": 30,
                                           "data.eval_rows": 2})
    stats = json.loads((data_prep.prepare(cfg, show_progress=False) / "stats.json").read_text())
    assert stats["rows_read"] == 11 and stats["rows_kept"] == 10 and stats["dropped_by_reason"] == {"null_field": 1}
    held_out = (tmp_path / "out" / "eval_prompts.jsonl").read_text().splitlines()
    assert [json.loads(line)["prompt"] for line in held_out] == [r["prompt"] for r in rows[38:40]]


def test_hf_streaming_source_with_only_the_network_call_replaced(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    rows = sample_rows(30, max_chars=1000)
    calls = []

    def fake_load_dataset(name: str, **kwargs: object) -> datasets.IterableDataset:
        calls.append((name, kwargs))
        return datasets.IterableDataset.from_generator(lambda: iter(rows))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = tiny_config(tmp_path, **{"data.source": "glaiveai/reasoning-v1-20m", "data.start": 5, "data.stop": 25,
                                   "data.eval_rows": 4})
    stats = json.loads((data_prep.prepare(cfg, show_progress=False) / "stats.json").read_text())
    assert calls == [("glaiveai/reasoning-v1-20m", {"split": "train", "streaming": True})]
    assert stats["rows_read"] == 20 and stats["rows_kept"] == 20
    held_out = [json.loads(line)["prompt"] for line in (tmp_path / "eval_prompts.jsonl").read_text().splitlines()]
    assert held_out == [r["prompt"] for r in rows[21:25]]


def test_main_runs_the_tiny_preset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data_prep.main(["--preset", "cpu-tiny", "--data", str(tmp_path)])
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line.startswith(f"kept {SAMPLE_KEPT} of {SAMPLE_READ} rows read")
    assert f"{SAMPLE_USABLE - SAMPLE_KEPT} too_long" in last_line
    assert last_line.endswith(f"wrote {tmp_path}")


# ----------------------------------------------------------------------------- real lengths, continuation, budget

def test_length_faithful_generator_follows_the_published_percentiles() -> None:
    chars = glaive_lengths.response_chars(200_000, np.random.default_rng(0))
    for q, published in glaive_lengths.PUBLISHED_PERCENTILES:  # p98 and p99 were published as ranges of +-3.4%
        assert abs(np.percentile(chars, q) / published - 1) < (0.02 if q < 98 else 0.04), q
    assert chars.max() > 20_000  # the long tail past p99
    rows, completions = glaive_lengths.gemma_lengths(50_000)
    assert 1_350 < np.percentile(rows, 10) < 1_500 and 1_800 < np.percentile(rows, 50) < 2_000
    assert 2_350 < np.percentile(rows, 90) < 2_650 and 0.54 < (rows <= 2048).mean() < 0.74
    assert (completions < rows).all()


@pytest.fixture(scope="module")
def real_length_source(tmp_path_factory: pytest.TempPathFactory, sp: spm.SentencePieceProcessor) -> Path:
    """1,500 length-faithful rows (broken ones mixed in) sized for max_len 512 under the tiny tokenizer."""
    lines = glaive_lengths.synthetic_rows(1_500, seed=1, max_len=512, sp=sp, broken_every=500)
    return glaive_lengths.write_rows(tmp_path_factory.mktemp("real_lengths") / "rows.jsonl", lines)


def test_the_real_regime_at_a_small_max_len(tmp_path: Path, real_length_source: Path) -> None:
    """At max_len 512 the rows are as long, relative to it, as real rows are to 2048: the kaggle preset's regime."""
    gemma_rows, _ = glaive_lengths.gemma_lengths(50_000)
    share_within = (gemma_rows <= 2048).mean()
    cfg = tiny_config(tmp_path, **{"data.source": real_length_source, "data.num_rows": 400, "data.eval_rows": 24})
    stats = json.loads((data_prep.prepare(cfg, show_progress=False) / "stats.json").read_text())
    lengths = stats["lengths"]
    assert abs(lengths["tokenized_row_tokens"]["p50"] / 512 - np.percentile(gemma_rows, 50) / 2048) < 0.05
    assert abs(lengths["share_within_max_len"] - share_within) < 0.06
    assert stats["rows_kept"] == 424 and stats["stopped_because"] == "kept rows wanted"
    assert stats["dropped_by_reason"]["too_long"] > 0.25 * stats["rows_read"]
    assert 1.3 < stats["rows_read_per_kept_row"] < 1.9 and stats["source_rows"] == [0, stats["rows_read"]]
    train = stats["train"]
    assert train["packing_efficiency"] - train["efficiency_without_packing"] < 0.03  # two rows rarely share a window
    assert 0.7 < train["efficiency_without_packing"] < 0.9
    budget = data_prep.generation_budget(tmp_path)
    longest = max(data_prep.completion_lengths(tmp_path, split).max() for split in data_prep.SPLITS)
    assert longest == lengths["completion_tokens"]["max"] <= budget < longest + data_prep.GENERATION_BUDGET_STEP
    assert budget % data_prep.GENERATION_BUDGET_STEP == 0 and budget > 0.8 * 512


def test_derived_and_explicit_generation_budget(tiny_data_dir: Path) -> None:
    cfg = config.get_config("cpu-tiny")
    assert cfg.eval.max_new_tokens == 0 == config.get_config("kaggle").eval.max_new_tokens
    longest = max(data_prep.completion_lengths(tiny_data_dir, split).max() for split in data_prep.SPLITS)
    assert data_prep.resolve_max_new_tokens(cfg, tiny_data_dir) == data_prep.generation_budget(tiny_data_dir) == -(
        -longest // 128) * 128
    cfg.eval.max_new_tokens = 40
    assert data_prep.resolve_max_new_tokens(cfg, tiny_data_dir) == 40
    assert "generation budget" in data_prep.summary_line(tiny_data_dir)


def numbered_source(path: Path, n: int) -> Path:
    """n short usable rows whose prompts carry their source row number."""
    rows = sample_rows(40, max_chars=1000)
    return write_jsonl(path, [{"prompt": f"Row {i}: {rows[i % 40]['prompt']}", "response": rows[i % 40]["response"]}
                              for i in range(n)])


def prompt_numbers(data_dir: Path, sp: spm.SentencePieceProcessor) -> set[int]:
    """Source row numbers of every stored row, training and held-out."""
    numbers = set()
    for split in data_prep.SPLITS:
        for row in stored_rows(data_dir, split):
            numbers.add(int(sp.decode(list(row)).split("Row ", 1)[1].split(":")[0]))
    return numbers


def test_continuation_reads_fresh_rows_from_a_data_or_run_directory(tmp_path: Path,
                                                                      sp: spm.SentencePieceProcessor) -> None:
    source = numbered_source(tmp_path / "rows.jsonl", 200)
    first = data_prep.prepare(tiny_config(tmp_path / "first", **{"data.source": source, "data.num_rows": 60,
                                                                  "data.eval_rows": 4}), show_progress=False)
    first_rows = json.loads((first / "manifest.json").read_text())["source_rows"]
    assert first_rows == [0, 64] and prompt_numbers(first, sp) == set(range(64))
    later = data_prep.prepare(tiny_config(tmp_path / "later", **{
        "data.source": source, "data.num_rows": 50, "data.eval_rows": 4, "data.continue_from": first}),
        show_progress=False)
    later_rows = json.loads((later / "manifest.json").read_text())["source_rows"]
    assert later_rows == [64, 118] and prompt_numbers(later, sp) == set(range(64, 118))
    # A run directory records its data manifest in config.json: continuing from it starts at the same row.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"data_manifest": data_prep.read_manifest(first)}))
    from_run = data_prep.prepare(tiny_config(tmp_path / "from_run", **{
        "data.source": source, "data.num_rows": 50, "data.eval_rows": 4, "data.continue_from": run_dir}),
        show_progress=False)
    assert json.loads((from_run / "manifest.json").read_text())["source_rows"] == [64, 118]


def test_presets_take_180k_kept_rows_then_100k_fresh_ones(tmp_path: Path, sp: spm.SentencePieceProcessor) -> None:
    kaggle, unrestricted = config.get_config("kaggle"), config.get_config("unrestricted")
    assert (kaggle.data.start, kaggle.data.stop, kaggle.data.num_rows, kaggle.data.continue_from) == (0, 0, 180_000, "")
    assert data_prep.kept_rows_wanted(kaggle.data) == 180_000 + kaggle.data.eval_rows
    assert (unrestricted.data.start, unrestricted.data.num_rows) == (0, 100_000)
    assert unrestricted.data.continue_from == unrestricted.run.init_from == kaggle.run.out_dir
    # The two presets as they are, on a local source with the tiny tokenizer (and the tiny model, whose embedding
    # fits it) and fewer rows: the unrestricted preparation continues from the kaggle run directory (what a later
    # Kaggle session has) and shares no row.
    source = numbered_source(tmp_path / "rows.jsonl", 150)
    local = {"data.source": str(source), "model.tokenizer_path": str(config.TINY_TOKENIZER_PATH), "data.eval_rows": "4",
             "model.name": "tiny", "model.sliding_window": "4096"}
    kaggle_data = data_prep.prepare(config.get_config("kaggle", local | {
        "data.num_rows": "60", "data.out_dir": str(tmp_path / "data_kaggle")}), show_progress=False)
    run_dir = tmp_path / "runs_kaggle"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"data_manifest": data_prep.read_manifest(kaggle_data)}))
    later = data_prep.prepare(config.get_config("unrestricted", local | {
        "data.num_rows": "50", "data.out_dir": str(tmp_path / "data_unrestricted"),
        "data.continue_from": str(run_dir)}), show_progress=False)
    assert data_prep.read_manifest(later)["source_rows"] == [64, 118] == [
        data_prep.read_manifest(kaggle_data)["source_rows"][1], 64 + 54]
    assert not prompt_numbers(kaggle_data, sp) & prompt_numbers(later, sp)
    with pytest.raises(config.ConfigError, match=r"pass one of them \(--data.continue_from '' --data.start N\)"):
        config.get_config("unrestricted", {"data.start": "250000"})
    assert config.get_config("unrestricted", {"data.start": "250000", "data.continue_from": ""}).data.start == 250_000


def test_bad_continue_from_stops_before_any_row_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        tiny_data_dir: Path) -> None:
    reads = []
    monkeypatch.setattr(data_prep, "read_source", lambda d: reads.append(d) or iter(()))
    other_source = numbered_source(tmp_path / "other.jsonl", 10)
    (tmp_path / "empty").mkdir()
    tokenizer = tmp_path / "tok.model"
    data_prep.build_tiny_tokenizer(config.SAMPLE_PATH, tokenizer, vocab_size=1024)
    cases = [
        ({"data.continue_from": tmp_path / "missing"}, r"missing does not exist: .* --data.start N"),
        ({"data.continue_from": tmp_path / "empty"}, r"holds no manifest.json .* --data.start N"),
        ({"data.continue_from": tiny_data_dir, "data.source": other_source}, r"was prepared from .*glaiveai_sample"),
        ({"data.continue_from": tiny_data_dir, "model.tokenizer_path": tokenizer, "model.vocab_size": 1024},
         "was tokenized with"),
    ]
    for overrides, message in cases:
        with pytest.raises(config.ConfigError, match=message):
            data_prep.prepare(tiny_config(tmp_path / "out", **overrides), show_progress=False)
    with pytest.raises(SystemExit, match="^error: --data.continue_from .*missing does not exist"):
        data_prep.main(["--preset", "cpu-tiny", "--data.continue_from", str(tmp_path / "missing"),
                        "--data", str(tmp_path / "out")])
    assert reads == []


def test_a_source_that_ends_early_finishes_with_what_it_has(tmp_path: Path) -> None:
    source = numbered_source(tmp_path / "rows.jsonl", 30)
    data_dir = data_prep.prepare(tiny_config(tmp_path / "out", **{"data.source": source, "data.num_rows": 100,
                                                                   "data.eval_rows": 4}), show_progress=False)
    stats = json.loads((data_dir / "stats.json").read_text())
    assert stats["source_ran_out"] and stats["stopped_because"] == "source ended"
    assert (stats["rows_kept"], stats["kept_rows_wanted"], stats["source_rows"]) == (30, 104, [0, 30])
    assert "the source ended before the 104 rows wanted" in data_prep.summary_line(data_dir)
