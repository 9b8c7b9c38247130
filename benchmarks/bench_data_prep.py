"""Prep throughput (rows read per second) of data_prep.prepare on the shipped sample, repeated.

Times the whole stage (read, check, rewrite, render, tokenize, filter, pack, write) with one tokenizer
thread and with several (``--data.num_workers``), the median of a few runs each, and writes
``benchmarks/results_data_prep.md``. ``throughput`` times any source: ``bench_lengths.py`` runs it on
length-faithful rows of real glaiveai length (results in ``benchmarks/results_lengths.md``).

    .venv/bin/python benchmarks/bench_data_prep.py [--copies 13] [--runs 3] [--workers 0 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import config  # noqa: E402
import data_prep  # noqa: E402

RESULTS_PATH = Path(__file__).with_name("results_data_prep.md")


def cpu_model() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    names = [line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")]
    return names[0] if names else platform.processor()


def time_prepare(source: Path, workers: int, work_dir: Path, overrides: dict[str, str] | None = None
                 ) -> tuple[float, float, int]:
    """Wall-clock and CPU seconds (all threads) of one uncached prepare of source, and the rows it read."""
    out_dir = work_dir / f"out_{workers}"
    (out_dir / "manifest.json").unlink(missing_ok=True)  # defeat the cache
    cfg = config.get_config("cpu-tiny", {"data.source": str(source), "data.out_dir": str(out_dir),
                                         "data.num_workers": str(workers)} | (overrides or {}))
    start, cpu_start = time.perf_counter(), time.process_time()
    data_prep.prepare(cfg, show_progress=False)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return seconds, cpu_seconds, json.loads((out_dir / "stats.json").read_text())["rows_read"]


def throughput(source: Path, workers: list[int], runs: int, work_dir: Path, overrides: dict[str, str] | None = None
               ) -> list[dict[str, float]]:
    """Per --data.num_workers: rows read, median wall-clock and CPU seconds of ``runs`` uncached prepares, rows/s and
    MB of JSONL/s by the wall clock, and MB/s per CPU-second (what one idle core would do, on a busy machine)."""
    time_prepare(source, workers[0], work_dir, overrides)  # warm-up: imports, page cache
    results = []
    for n in workers:
        timings = [time_prepare(source, n, work_dir, overrides) for _ in range(runs)]
        seconds = statistics.median(t for t, _, _ in timings)
        cpu_seconds = statistics.median(c for _, c, _ in timings)
        rows_read, megabytes = timings[0][2], source.stat().st_size / 1e6
        results.append({"workers": n, "rows": rows_read, "seconds": seconds, "cpu_seconds": cpu_seconds,
                        "rows_per_s": rows_read / seconds, "mb_per_s": megabytes / seconds,
                        "rows_per_cpu_s": rows_read / cpu_seconds, "mb_per_cpu_s": megabytes / cpu_seconds})
        print(f"num_workers={n}: {rows_read} rows in {seconds:.2f} s = {rows_read / seconds:,.0f} rows/s")
    return results


def table(results: list[dict[str, float]]) -> str:
    lines = ["| --data.num_workers | rows read | seconds | rows/s | MB of JSONL/s | CPU seconds "
             "| MB/s per CPU-second |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['workers']} ({max(1, r['workers'])} tokenizer thread{'s' if r['workers'] > 1 else ''}) | "
              f"{r['rows']} | {r['seconds']:.2f} | {r['rows_per_s']:,.0f} | {r['mb_per_s']:.2f} | "
              f"{r['cpu_seconds']:.2f} | {r['mb_per_cpu_s']:.2f} |" for r in results]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=13, help="times the sample is repeated")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = Path(tmp)
        source = work_dir / "sample_repeated.jsonl"
        source.write_bytes(config.SAMPLE_PATH.read_bytes() * args.copies)
        results = throughput(source, args.workers, args.runs, work_dir)

    RESULTS_PATH.write_text(f"""# data_prep throughput

Command: `.venv/bin/python benchmarks/bench_data_prep.py --copies {args.copies} --runs {args.runs} \
--workers {' '.join(map(str, args.workers))}`

Machine: {os.cpu_count()} CPUs (`nproc` {os.cpu_count()}), {cpu_model()}, Python {platform.python_version()};
1-minute load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after (it counts this benchmark too:
above about 1, other jobs were using the same CPUs and the figures are noisy).

Input: the shipped sample (`assets/glaiveai_sample.jsonl`, {config.SAMPLE_PATH.stat().st_size:,} bytes)
repeated {args.copies} times, cpu-tiny preset (tiny tokenizer, max_len 512, packing on). Each figure is the
median of {args.runs} uncached runs of `data_prep.prepare` (read, check, rewrite, render, tokenize, filter,
pack, write arrays, stats and histogram).

{table(results)}

Tokenization is most of the time (sentencepiece's batch encode). glaiveai rows are about twenty times longer
than the sample's (median response about 7.1k characters): rows/s falls by about that factor on real data,
MB/s is the figure that carries over. `benchmarks/bench_lengths.py` measures the same stage on length-faithful
rows of real character length (`assets/glaive_lengths.py`) and projects the kaggle preparation's time
(`benchmarks/results_lengths.md`).
""")
    print(f"wrote {RESULTS_PATH}")


if __name__ == "__main__":
    main()
