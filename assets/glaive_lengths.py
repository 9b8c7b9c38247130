"""Length-faithful synthetic glaiveai rows: token lengths that follow the real data's published distribution.

The shipped sample's responses are about 20 times shorter than real glaiveai/reasoning-v1-20m responses, so it
cannot show what the length filter, packing and the generation budget do at real size. This module samples
row lengths from a fit of the published distribution and writes rows in the glaiveai schema with those
lengths, relative to a chosen ``max_len``: at ``max_len`` 512 with the tiny tokenizer a row is as long,
as a share of 512, as the real row is of 2048 Gemma tokens. Broken rows of every kind the shipped sample
has are mixed in.

The fit. Published percentiles of response length in characters, rows 0..280000, measured by the hackathon
SFT write-up this pipeline follows (TheIllusionOfLife/tunix, ``docs/dataset_size_analysis.md``; also in
``../shared/NOTES.md``): ``RESPONSE_CHAR_PERCENTILES`` below, p98 and p99 at the middle of their published
ranges. Sampling inverts the CDF piecewise-linearly in log(characters) through those points. Beyond them
the tail is an assumption (not published): 2,000 characters at p0, 32,000 at p99.9 and 64,000 at p100,
continuing the steepening from p97 to p99. Prompt lengths are not published either: questions are
log-normal with a median of 60 Gemma tokens (sigma 0.9, at most 1,500), which puts a whole row
(BOS + templated prompt + completion) at about 1,850 tokens at p50, inside the ~1,800-2,000 derived from
the published figures. Characters become Gemma tokens at ``GEMMA_CHARS_PER_TOKEN`` = 4.0 characters per
token, the middle of the 3.8-4.3 the same write-up reports (no Gemma tokenizer is available offline here
to measure it).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import sentencepiece as spm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import chat_format  # noqa: E402
from assets import make_sample  # noqa: E402

# (percentile, response characters): published points, then the assumed ends of the distribution.
RESPONSE_CHAR_PERCENTILES = ((0, 2_000), (1, 4_020), (5, 4_880), (10, 5_343), (50, 7_078), (90, 9_398),
                             (95, 10_362), (96, 10_700), (97, 11_250), (98, 12_375), (99, 16_250),
                             (99.9, 32_000), (100, 64_000))
PUBLISHED_PERCENTILES = RESPONSE_CHAR_PERCENTILES[1:-2]
GEMMA_CHARS_PER_TOKEN = 4.0
# The max_len the distribution is stated against (the recipe's and the kaggle preset's).
REFERENCE_MAX_LEN = 2048
# Gemma tokens of the fixed parts of a row: BOS, the chat-template turn markers with the format instruction,
# the <reasoning>/<answer> tags and <end_of_turn> (the instruction alone is about 25 tokens).
GEMMA_FIXED_TOKENS = 50
QUESTION_TOKENS_MEDIAN, QUESTION_TOKENS_SIGMA, QUESTION_TOKENS_MAX = 60, 0.9, 1_500
# Share of a response's characters after </think> (the answer); the rest is the reasoning.
ANSWER_SHARE = 0.25
# One set of the sample's broken rows (23) per this many good rows: about 2.3% broken.
BROKEN_EVERY = 1_000

FILLER_SENTENCES = [s for sentences in make_sample.PASSAGE_TOPICS.values() for s in sentences] + [
    f"{fact.capitalize()}." for _, facts, _ in make_sample.SCIENCE for fact in facts]


def response_chars(n: int, rng: np.random.Generator) -> np.ndarray:
    """Response lengths in characters, drawn from the fitted distribution."""
    q, chars = np.array(RESPONSE_CHAR_PERCENTILES, dtype=np.float64).T
    return np.exp(np.interp(rng.uniform(0, 100, n), q, np.log(chars)))


def gemma_lengths(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(row tokens, completion tokens) of n rows in Gemma tokens, as the data stage counts them.

    A row is BOS + templated prompt + completion + <end_of_turn>; the completion counts its loss tokens.
    """
    rng = np.random.default_rng(seed)
    completion = np.ceil(response_chars(n, rng) / GEMMA_CHARS_PER_TOKEN).astype(np.int64) + 1
    question = np.minimum(rng.lognormal(np.log(QUESTION_TOKENS_MEDIAN), QUESTION_TOKENS_SIGMA, n),
                          QUESTION_TOKENS_MAX).astype(np.int64)
    return completion + question + GEMMA_FIXED_TOKENS, completion


def chars_per_token(sp: spm.SentencePieceProcessor | None) -> float:
    """Characters per token of the filler text under sp; Gemma's published figure when sp is None."""
    if sp is None:
        return GEMMA_CHARS_PER_TOKEN
    texts = [filler(300, random.Random(i)) for i in range(100)]  # row-sized pieces, as rows are written
    return sum(map(len, texts)) / sum(map(len, sp.encode(texts)))


def filler(chars: int, rng: random.Random) -> str:
    """About ``chars`` characters of plain sentences (at least one word)."""
    words: list[str] = []
    length = 0
    while length < chars:
        sentence = rng.choice(FILLER_SENTENCES)
        words.append(sentence)
        length += len(sentence) + 1
    text = " ".join(words)[:max(1, chars)]
    return text.rsplit(" ", 1)[0] if " " in text else text  # no half word at the end


def synthetic_rows(n: int, seed: int = 0, max_len: int = REFERENCE_MAX_LEN,
                   sp: spm.SentencePieceProcessor | None = None, broken_every: int = BROKEN_EVERY) -> list[bytes]:
    """n good JSONL rows whose tokenized lengths, as a share of max_len, follow the real rows' share of 2048.

    With sp (the tokenizer the data stage will use) each row's question and response are sized in that
    tokenizer's tokens, the fixed template counted as it tokenizes; without sp, rows get real glaiveai
    character lengths (Gemma at 4.0 characters per token). One set of the shipped sample's broken rows is
    inserted per ``broken_every`` good rows (0 = none).
    """
    rows, completions = gemma_lengths(n, seed)
    ratio = max_len / REFERENCE_MAX_LEN
    cpt = chars_per_token(sp)
    # Tokens of BOS + the templated empty prompt + the tags + <end_of_turn> under sp, which are not scaled.
    fixed = GEMMA_FIXED_TOKENS if sp is None else 2 + len(sp.encode(chat_format.build_prompt(""))) + len(
        sp.encode("<reasoning></reasoning>\n<answer></answer>"))
    rng = random.Random(seed)
    lines = []
    for row_tokens, completion_tokens in zip(rows * ratio, completions * ratio, strict=True):
        response_tokens = max(2.0, completion_tokens - 1)
        question_tokens = max(1.0, row_tokens - fixed - response_tokens)
        answer = filler(round(response_tokens * ANSWER_SHARE * cpt), rng)
        reasoning = filler(round(response_tokens * (1 - ANSWER_SHARE) * cpt), rng)
        record = {"prompt": filler(round(question_tokens * cpt), rng), "response": make_sample.response(reasoning,
                                                                                                          answer)}
        lines.append(json.dumps(record).encode())
    for position in reversed(range(broken_every, n + 1, broken_every) if broken_every else ()):
        lines[position - 1:position - 1] = make_sample.broken_lines(rng)
    return lines


def write_rows(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path
