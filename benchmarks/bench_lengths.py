"""What max_len costs and keeps on real glaiveai lengths, and how fast the data stage prepares such rows.

Item 4 of issue 8: for each max_len, on the length-faithful distribution of ``assets/glaive_lengths.py``
(Gemma tokens at 4.0 characters per token), the share of rows kept, source rows read for 180k kept
training rows, packing efficiency with and without packing (``data_prep.pack_rows``), tokens per epoch,
the attention share of a step's FLOPs (``model.flops_per_token``) and TPU v5e-8 hours for 4 epochs, for each model
(Gemma2-2B-it and Gemma3-1B-it: the same token lengths, see the results file on characters per token).
With ``--step-s 2048=0.83 ...`` (the lower bound per optimizer step of 32 windows at each max_len, from
``benchmarks/results_tpu_fit.md``; ``--step-s-gemma3`` for kaggle-gemma3's) it also gives the hours of 4 epochs at
that bound and at 50% of it.
Item 5: data-stage throughput on length-faithful rows of real character length
(``bench_data_prep.throughput``). Writes ``benchmarks/results_lengths.md``.

    .venv/bin/python benchmarks/bench_lengths.py [--rows 200000] [--prep-rows 1500] [--runs 3] [--step-s 2048=0.83]
        [--step-s-gemma3 2048=0.54]
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
# The models whose FLOPs per token and hours the table shows, by their kaggle presets, and the flag of each one's
# bound per optimizer step.
MODELS = {"Gemma2-2B-it": config.get_config("kaggle").model, "Gemma3-1B-it": config.get_config("kaggle-gemma3").model}
STEP_FLAGS = {"Gemma2-2B-it": "--step-s", "Gemma3-1B-it": "--step-s-gemma3"}
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


def length_table(results: list[dict], step_s: dict[str, dict[int, float]]) -> str:
    """One row per max_len; the attention share for both models, then each model's hours at 35% / 50% MFU, then
    each model's bound per optimizer step and the hours at it."""
    per_model = [f"{name} v5e-8 hours, 4 epochs, 35% / 50% MFU" for name in MODELS] + [
        f"{name} bound per optimizer step | {name} v5e-8 hours, 4 epochs, at the bound / at 50% of it"
        for name in MODELS]
    lines = ["| max_len | rows kept | source rows read for 180k kept | packing efficiency, packed / unpacked | "
             "tokens per epoch (non-pad / in windows) | optimizer steps, 4 epochs at 32 windows | attention share "
             f"of step FLOPs, {' / '.join(MODELS)} | " + " | ".join(per_model) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * 3 * len(MODELS)]
    for r in results:
        attention = " / ".join(f"{r['attention'][name]:.1%}" for name in MODELS)
        hours = " | ".join(" / ".join(f"{r['hours'][name, m]:.1f}" for m in MFUS) for name in MODELS)
        bounds = [step_s[name].get(r["max_len"]) for name in MODELS]
        at_bound = " | ".join(f"{b:.2f} s | {r['steps'] * b / 3600:.1f} / {2 * r['steps'] * b / 3600:.1f}"
                              if b else "- | -" for b in bounds)
        lines.append(f"| {r['max_len']} | {r['share']:.1%} | {r['source_rows']:,.0f} | {r['packing']:.1%} / "
                     f"{r['without']:.1%} | {r['tokens'] / 1e6:,.0f}M / {r['window_tokens'] / 1e6:,.0f}M | "
                     f"{r['steps']:,.0f} | {attention} | {hours} | {at_bound} |")
    return "\n".join(lines)


def header_section(args: argparse.Namespace, given: dict[str, list[str]], load_before: float,
                   load_after: float) -> str:
    return f"""# Real glaiveai lengths: what max_len keeps and costs, and how fast preparation is

Command: `.venv/bin/python benchmarks/bench_lengths.py --rows {args.rows} --pack-rows {args.pack_rows} \
--prep-rows {args.prep_rows} --runs {args.runs} --workers {' '.join(map(str, args.workers))}\
{''.join(f' {STEP_FLAGS[name]} ' + ' '.join(items) for name, items in given.items() if items)}`

Machine: {os.cpu_count()} CPUs, {bench_data_prep.cpu_model()}, Python {platform.python_version()};
1-minute load average {load_before:.1f} before the throughput runs and {load_after:.1f} after (shared machine:
above about 1 other jobs used the same CPUs and the throughput is pessimistic). The length table is
computed, not timed.

"""


def lengths_section(args: argparse.Namespace, rows: np.ndarray, completions: np.ndarray, results: list[dict],
                    step_s: dict[str, dict[int, float]]) -> str:
    return f"""## Length distribution and characters per token

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

{length_table(results, step_s)}

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

{length_decision(results, step_s)}"""


def length_decision(results: list[dict], step_s: dict[str, dict[int, float]]) -> str:
    """Which max_len the presets keep, and why, from the rows and the per-step bounds."""
    at_2048 = results[0]
    gemma2 = step_s["Gemma2-2B-it"]
    per_token = ", ".join(f"{gemma2[n] * 2048 / n:.2f} s at {n}" for n in MAX_LENS if n in gemma2) or "not given"
    # Hours of 4 epochs at the bound, and at half of it, by model and max_len (where the bound was given).
    at = {(name, r["max_len"]): r["steps"] * step_s[name][r["max_len"]] / 3600 for name in MODELS for r in results
          if r["max_len"] in step_s[name]}
    gemma2_2048 = (f"{at['Gemma2-2B-it', 2048]:.1f} h at the bound and {2 * at['Gemma2-2B-it', 2048]:.1f} h at 50% "
                   f"of it" if ("Gemma2-2B-it", 2048) in at else "the hours at the bound (not given)")
    return f"""**Decision: keep max_len 2048 for `kaggle` and `unrestricted`.**
With splash attention (issue 17) and every loop counted per trip (`benchmarks/results_tpu_fit.md`, "Loops counted
per trip" and "Per-trip bounds of the other settings"), the bound per token hardly depends on the window: per 32 x
2048 tokens {per_token}, all without remat (4096 fits with 2.84 GiB headroom). At 3072 and 4096 these are with
`--model.loss_chunk 512`: at one row a chip it takes 512 positions a chunk, as the preset's 256 does at two, and the
preset's own 256 costs 1.58 s at 3072 and 2.00 s at 4096 (each chunk gathers the LM head again). The sliding-window
cap on packed windows is gone for splash. So 4096 would see nearly every row ({results[2]['share']:.0%}) and pack at
{results[2]['packing']:.0%}, in about the same hours at the bound as 2048 (last columns); 3072 costs more (it packs
worst). What keeps 2048 is the output length, not the cost: the judges generate with a budget of 768 tokens ("under
1K is fine", ../shared/NOTES.md), and at 2048 the model already learns completions up to {at_2048['longest']:,}
tokens (kept completions' p50 {at_2048['completion_p50']:,.0f}); at 4096 it would learn the longest reasoning (p50
{results[2]['completion_p50']:,.0f}, longest {results[2]['longest']:,}), which such a budget truncates before the
answer, and every evaluation generation budget (`data_prep.generation_budget`) doubles. 2048 also needs
{at_2048['source_rows']:,.0f} source rows against {results[2]['source_rows']:,.0f} at 4096 (only
{at_2048['share']:.0%} kept), a preparation cost of minutes, and is the recipe's choice. 4096 is one flag away
(`--data.max_len 4096 --run.micro_batch 8 --run.grad_accum 4 --model.loss_chunk 512`, effective 32 windows; or
`--run.grad_accum 2` for about 32 rows a step) for a run judged without that budget.

**The budget.** 4 epochs of `kaggle` at 2048 take {gemma2_2048}, against the {TRAIN_BUDGET_HOURS:.0f}-hour training
budget: a real chip must run at about {at.get(("Gemma2-2B-it", 2048), 0) / TRAIN_BUDGET_HOURS:.0%} of the bound's
speed or better to finish them; below that the run is cut to what fits, its LR schedule re-planned (fewer epochs,
not a failure).

The same holds for `kaggle-gemma3`, whose cost is lower still: 4 epochs of Gemma3-1B-it at 2048 take
{at_2048['hours']['Gemma3-1B-it', 0.35]:.1f} h at 35% MFU ({at_2048['hours']['Gemma3-1B-it', 0.5]:.1f} h at 50%)
against {at_2048['hours']['Gemma2-2B-it', 0.35]:.1f} h / {at_2048['hours']['Gemma2-2B-it', 0.5]:.1f} h for
Gemma2-2B-it, and its XLA attention packs rows past its 512-token window exactly (Tunix's Gemma3 bands by index).

"""


def throughput_section(args: argparse.Namespace, throughput: list[dict], bytes_per_row: float) -> str:
    one_thread = throughput[0]  # CPU-time rate of one tokenizer thread: one idle core, whatever the load here
    projection = ", ".join(f"{n:,} rows ({n * bytes_per_row / 1e9:.1f} GB of JSONL): "
                           f"{n / one_thread['rows_per_cpu_s'] / 60:.0f} min" for n in PROJECTED_SOURCE_ROWS)
    return f"""## Preparation throughput at real lengths

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
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows sampled from the fitted distribution")
    parser.add_argument("--pack-rows", type=int, default=50_000, help="kept rows packed per max_len")
    parser.add_argument("--prep-rows", type=int, default=1_500, help="length-faithful rows for the throughput")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    for name, flag in STEP_FLAGS.items():
        parser.add_argument(flag, nargs="*", default=[], metavar="MAX_LEN=SECONDS",
                            help=f"{name}'s lower bound per optimizer step of 32 windows "
                                 "(benchmarks/results_tpu_fit.md)")
    args = parser.parse_args()
    given = {name: getattr(args, flag[2:].replace("-", "_")) for name, flag in STEP_FLAGS.items()}
    step_s = {name: {int(k): float(v) for k, v in (item.split("=") for item in items)} for name, items in given.items()}

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
    RESULTS_PATH.write_text(header_section(args, given, load_before, load_after)
                            + lengths_section(args, rows, completions, results, step_s)
                            + throughput_section(args, throughput, bytes_per_row))
    print(f"wrote {RESULTS_PATH}")


if __name__ == "__main__":
    main()
