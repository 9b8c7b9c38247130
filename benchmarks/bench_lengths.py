"""What max_len costs and keeps on real glaiveai lengths, and how fast the data stage prepares such rows.

Item 4 of issue 8: for each max_len, on the length-faithful distribution of ``assets/glaive_lengths.py``
(Gemma tokens at 4.0 characters per token), the share of rows kept, source rows read for 180k kept
training rows, packing efficiency with and without packing (``data_prep.pack_rows``), tokens per epoch,
the attention share of a step's FLOPs (``model.flops_per_token``) and TPU v5e-8 hours for 4 epochs, for each model
(Gemma2-2B-it and Gemma3-1B-it: the same token lengths, see the results file on characters per token).
Item 5: data-stage throughput on length-faithful rows of real character length
(``bench_data_prep.throughput``). Writes ``benchmarks/results_lengths.md``.

    .venv/bin/python benchmarks/bench_lengths.py [--rows 200000] [--prep-rows 1500] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_data_prep  # noqa: E402

import config  # noqa: E402
import data_prep  # noqa: E402
from assets import glaive_lengths  # noqa: E402
from model import flops_per_token  # noqa: E402

RESULTS_PATH = Path(__file__).with_name("results_lengths.md")
MAX_LENS = (2048, 3072, 4096)
KEPT_TRAINING_ROWS = 180_000
EPOCHS = 4
V5E_8_PEAK = 8 * 197e12  # bf16 FLOP/s of a TPU v5e-8 (../shared/NOTES.md)
MFUS = (0.35, 0.50)
TRAIN_BUDGET_HOURS = 8.0  # run.time_budget_min 480
# The models whose FLOPs per token and hours the table shows, by their kaggle presets.
MODELS = {"Gemma2-2B-it": config.get_config("kaggle").model, "Gemma3-1B-it": config.get_config("kaggle-gemma3").model}
# kaggle's projected source rows (issue 8: ~250-330k) for the preparation-time projection.
PROJECTED_SOURCE_ROWS = (250_000, 330_000)


def max_len_row(rows: np.ndarray, completions: np.ndarray, max_len: int, pack_rows: int) -> dict[str, float]:
    """The figures of one max_len on sampled row and completion lengths (Gemma tokens)."""
    kept = rows[rows <= max_len]
    kept_completions = completions[rows <= max_len]
    share = len(kept) / len(rows)
    sample = kept[:pack_rows].tolist()
    windows = data_prep.pack_rows(sample, max_len, buffer_rows=config.DataConfig().pack_buffer)
    packing = sum(sample) / (len(windows) * max_len)
    without = sum(sample) / (len(sample) * max_len)
    tokens_per_epoch = KEPT_TRAINING_ROWS * kept.mean()
    flops = {name: flops_per_token(m, max_len) for name, m in MODELS.items()}
    attention = {name: 1 - flops_per_token(m, 0) / flops[name] for name, m in MODELS.items()}
    # MFU as train_sft measures it: non-padding tokens x flops_per_token(max_len) per second / peak.
    hours = {(name, mfu): EPOCHS * tokens_per_epoch * flops[name] / (V5E_8_PEAK * mfu) / 3600
             for name in MODELS for mfu in MFUS}
    return {"max_len": max_len, "share": share, "source_rows": (KEPT_TRAINING_ROWS + config.DataConfig().eval_rows)
            / share, "packing": packing, "without": without, "tokens": tokens_per_epoch,
            "window_tokens": tokens_per_epoch / packing, "steps": EPOCHS * KEPT_TRAINING_ROWS * without / packing / 32,
            "attention": attention, "hours": hours,
            "completion_p50": float(np.percentile(kept_completions, 50)), "longest": int(kept_completions.max())}


def length_table(results: list[dict]) -> str:
    names = " / ".join(MODELS)
    lines = ["| max_len | rows kept | source rows read for 180k kept | packing efficiency, packed / unpacked | "
             f"tokens per epoch (non-pad / in windows) | optimizer steps, 4 epochs at 32 windows | attention share "
             f"of step FLOPs, {names} | " + " | ".join(f"{name} v5e-8 hours, 4 epochs, 35% / 50% MFU"
                                                      for name in MODELS) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(MODELS)]
    for r in results:
        attention = " / ".join(f"{r['attention'][name]:.1%}" for name in MODELS)
        hours = " | ".join(" / ".join(f"{r['hours'][name, m]:.1f}" for m in MFUS) for name in MODELS)
        lines.append(f"| {r['max_len']} | {r['share']:.1%} | {r['source_rows']:,.0f} | {r['packing']:.1%} / "
                     f"{r['without']:.1%} | {r['tokens'] / 1e6:,.0f}M / {r['window_tokens'] / 1e6:,.0f}M | "
                     f"{r['steps']:,.0f} | {attention} | {hours} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows sampled from the fitted distribution")
    parser.add_argument("--pack-rows", type=int, default=50_000, help="kept rows packed per max_len")
    parser.add_argument("--prep-rows", type=int, default=1_500, help="length-faithful rows for the throughput")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()

    rows, completions = glaive_lengths.gemma_lengths(args.rows, seed=0)
    results = [max_len_row(rows, completions, max_len, args.pack_rows) for max_len in MAX_LENS]
    for r in results:
        print(r)

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        source = glaive_lengths.write_rows(Path(tmp) / "real_lengths.jsonl",
                                           glaive_lengths.synthetic_rows(args.prep_rows, seed=0))
        # The tiny tokenizer stands in for Gemma's (not available offline); max_len 2048 as kaggle, so the
        # tiny model's window is raised only to pass the packing check (no model is built here).
        overrides = {"data.max_len": "2048", "model.sliding_window": "4096", "data.pack_buffer": "2048"}
        throughput = bench_data_prep.throughput(source, args.workers, args.runs, Path(tmp), overrides)
        bytes_per_row = source.stat().st_size / args.prep_rows
    load_after = os.getloadavg()[0]
    one_thread = throughput[0]  # CPU-time rate of one tokenizer thread: one idle core, whatever the load here
    projection = ", ".join(f"{n:,} rows ({n * bytes_per_row / 1e9:.1f} GB of JSONL): "
                           f"{n / one_thread['rows_per_cpu_s'] / 60:.0f} min" for n in PROJECTED_SOURCE_ROWS)
    at_2048 = results[0]
    RESULTS_PATH.write_text(f"""# Real glaiveai lengths: what max_len keeps and costs, and how fast preparation is

Command: `.venv/bin/python benchmarks/bench_lengths.py --rows {args.rows} --pack-rows {args.pack_rows} \
--prep-rows {args.prep_rows} --runs {args.runs} --workers {' '.join(map(str, args.workers))}`

Machine: {os.cpu_count()} CPUs, {bench_data_prep.cpu_model()}, Python {platform.python_version()};
1-minute load average {load_before:.1f} before the throughput runs and {load_after:.1f} after (shared machine:
above about 1 other jobs used the same CPUs and the throughput is pessimistic). The length table is
computed, not timed.

## Length distribution and characters per token

Rows are drawn from `assets/glaive_lengths.py`'s fit of the published response-length percentiles of
`glaiveai/reasoning-v1-20m` rows 0..280000 (TheIllusionOfLife/tunix, `docs/dataset_size_analysis.md`;
`../shared/NOTES.md`): inverse CDF piecewise log-linear through p1 4,020 ... p99 ~16,250 characters, an
assumed tail to 32,000 at p99.9. Characters become Gemma tokens at **4.0 characters per token**, the middle
of the 3.8-4.3 reported by the same write-up (no Gemma tokenizer is available offline to measure it), for
Gemma3-1B-it as for Gemma2-2B-it: Gemma3's tokenizer (262,144 pieces, Gemini 2.0's) differs from Gemma2's
(256,000) mainly in non-English coverage, by the Gemma 3 report, and this data is English prose, so the same
rows are taken to be the same number of tokens; only the FLOPs per token (and so the hours) differ; a
row adds BOS, the templated prompt with the format instruction, the tags and `<end_of_turn>` (50 tokens) and
a question (log-normal, median 60 tokens). Sampled rows (BOS + prompt + completion): p10
{np.percentile(rows, 10):,.0f}, p50 {np.percentile(rows, 50):,.0f}, p90 {np.percentile(rows, 90):,.0f},
p99 {np.percentile(rows, 99):,.0f} tokens; completions p50 {np.percentile(completions, 50):,.0f}.

## max_len: {args.rows:,} sampled rows

{length_table(results)}

- *Rows kept*: share within max_len (longer rows are dropped, never truncated). Broken rows (a few
  percent on the sample; unknown on the real data) come on top of the source rows read.
- *Packing*: `data_prep.pack_rows` (best-fit, buffer 2048 rows) over the first {args.pack_rows:,} kept rows;
  *unpacked* is one row per window.
- *Tokens per epoch*: 180,000 kept training rows; in windows = the tokens the steps compute, padding
  included. *Steps*: 4 epochs of windows at the effective batch of 32.
- *Attention share*: `model.flops_per_token(model, max_len)`'s attention term over the whole
  (score and value matmuls; 4N for the frozen matmuls), for the kaggle and kaggle-gemma3 presets' models.
- *Hours*: 4 epochs x non-padding tokens x `flops_per_token(max_len)` / (8 x 197 TFLOP/s x MFU): MFU as
  `train_sft` measures it (non-padding tokens), so padding is part of what keeps MFU low. The kaggle
  preset's training budget is {TRAIN_BUDGET_HOURS:.0f} hours (`run.time_budget_min` 480); runs that need more
  are cut to what fits, with the LR schedule re-planned.

**Decision: keep max_len 2048 for `kaggle`.** At 2048 the 180k kept rows need about
{at_2048['source_rows']:,.0f} source rows ({at_2048['share']:.0%} kept) and 4 epochs of Gemma2-2B-it take
{at_2048['hours']['Gemma2-2B-it', 0.35]:.1f} h at 35% MFU ({at_2048['hours']['Gemma2-2B-it', 0.5]:.1f} h at
50%): within the 8-hour training budget at either MFU (Gemma3-1B-it:
{at_2048['hours']['Gemma3-1B-it', 0.35]:.1f} h / {at_2048['hours']['Gemma3-1B-it', 0.5]:.1f} h). 3072 and 4096
keep nearly every row (4096 also packs two rows a window), but each
epoch then carries
{results[1]['tokens'] / at_2048['tokens']:.2f}x and {results[2]['tokens'] / at_2048['tokens']:.2f}x the
tokens at a higher FLOPs per token (attention {results[1]['attention']['Gemma2-2B-it']:.1%} and
{results[2]['attention']['Gemma2-2B-it']:.1%} of the step against {at_2048['attention']['Gemma2-2B-it']:.1%}), so
4 epochs of Gemma2-2B-it would need {results[1]['hours']['Gemma2-2B-it', 0.35]:.1f} h and
{results[2]['hours']['Gemma2-2B-it', 0.35]:.1f} h at 35% MFU: the time budget would cut
them to fewer epochs, and a 4096-token window doubles the per-chip activations and logits that already take
most of the 16 GB (../shared/NOTES.md: 9.7 GiB at 8 x 2048 with block remat). 2048 is also the recipe's
choice. The price is visible: rows over 2048 tokens (the longest reasoning) are never seen, so the model
learns completions of at most {at_2048['longest']:,} tokens (kept completions' p50
{at_2048['completion_p50']:,.0f}, against {results[2]['completion_p50']:,.0f} over nearly all rows at 4096),
and generation must be given that budget (`data_prep.generation_budget`: the longest kept completion rounded
up, {-(-at_2048['longest'] // 128) * 128} at this max_len), not the 768 the notebook used to declare. With more time
(the unrestricted preset's further sessions) 3072 is the next step: {results[1]['share']:.0%} of rows kept.

## Preparation throughput at real lengths

Input: {args.prep_rows:,} length-faithful rows of real character length (`glaive_lengths.synthetic_rows`,
{bytes_per_row:,.0f} bytes of JSONL a row on average, broken rows mixed in), prepared by `data_prep.prepare`
with the cpu-tiny tokenizer standing in for Gemma's, max_len 2048, packing on; median of {args.runs} uncached
runs each (`bench_data_prep.throughput`).

{bench_data_prep.table(throughput)}

The machine was shared and heavily loaded, so wall-clock figures understate it; the CPU-second column
(`time.process_time`, all threads of the process) is what the stage costs. Projected preparation of the
kaggle preset's source rows at one tokenizer thread's rate per CPU-second, that is on one idle core
({one_thread['rows_per_cpu_s']:,.0f} rows/s, {one_thread['mb_per_cpu_s']:.2f} MB/s; the Hugging Face stream's
download is not included): {projection}. That is a small part of the 9-hour session (training is capped at 8 h
and the rest of the session holds preparation, samples and export); Kaggle's TPU VM host has many more cores,
over which `--data.num_workers` spreads each 256-row tokenizer batch (`data_prep.TOKENIZE_BATCH`), so no
faster path (a process pool) is needed.
""")
    print(f"wrote {RESULTS_PATH}")


if __name__ == "__main__":
    main()
