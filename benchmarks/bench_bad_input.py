"""What bad input costs: a bad setting (seconds until the one-line error) and one huge row (seconds, peak memory).

Runs ``train_sft.py --preset cpu-tiny --lora.rank 0`` as a fresh process (the preflight stops it before JAX is
imported), then ``data_prep.prepare`` in a fresh process on a source of the sample's first rows plus one row
of about 50 MB (dropped as too_long by its byte count, never tokenized), and writes
``benchmarks/results_bad_input.md``.

    .venv/bin/python benchmarks/bench_bad_input.py [--row-mb 50]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_data_prep import cpu_model  # noqa: E402

import config  # noqa: E402
import data_prep  # noqa: E402

RESULTS_PATH = Path(__file__).with_name("results_bad_input.md")
PREPARE = """
import json, sys, time
import config, data_prep
cfg = config.get_config("cpu-tiny", {"data.source": sys.argv[1], "data.out_dir": sys.argv[2], "data.eval_rows": "2"})
start = time.perf_counter()
data_prep.prepare(cfg, show_progress=False)
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def timed_run(args: list[str], **kwargs: object) -> tuple[subprocess.CompletedProcess, float, float]:
    """A fresh process: its result, wall seconds and peak RSS in GB (of the largest child so far)."""
    start = time.perf_counter()
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, **kwargs)
    return done, time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row-mb", type=float, default=50.0, help="size of the huge row's response")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    bad_setting, bad_setting_s, _ = timed_run([sys.executable, "train_sft.py", "--preset", "cpu-tiny",
                                               "--lora.rank", "0"])
    with tempfile.TemporaryDirectory() as tmp:
        rows = [r for r in data_prep.read_jsonl(config.SAMPLE_PATH, 0, 60) if isinstance(r, dict)]
        huge = {"prompt": "q", "response": "<think>" + "many words " * int(args.row_mb * 1e6 / 11) + "</think>a"}
        source = Path(tmp) / "huge_row.jsonl"
        source.write_text("".join(json.dumps(r) + "\n" for r in [*rows[:30], huge, *rows[30:]]))
        prepared, _, peak_gb = timed_run([sys.executable, "-c", PREPARE, str(source), str(Path(tmp) / "out")],
                                         env=dict(os.environ, PYTHONPATH=str(REPO)))
        prepared.check_returncode()
        dropped = json.loads((Path(tmp) / "out" / "stats.json").read_text())["dropped_by_reason"]
        source_mb = source.stat().st_size / 1e6
    seconds = json.loads(prepared.stdout.splitlines()[-1])["seconds"]
    error_row = f"`{bad_setting.stderr.strip().splitlines()[-1]}` after {bad_setting_s:.2f} s (wall, whole process)"
    huge_row = f"{source_mb:.1f} MB source: {seconds:.1f} s, peak RSS {peak_gb:.2f} GB; dropped {dropped}"

    RESULTS_PATH.write_text(f"""# What bad input costs

Command: `.venv/bin/python benchmarks/bench_bad_input.py --row-mb {args.row_mb:g}`

Machine: {os.cpu_count()} CPUs, {cpu_model()}, Python {sys.version.split()[0]}; 1-minute load average
{load_before:.1f} before and {os.getloadavg()[0]:.1f} after (above about 1, other jobs shared the CPUs).

| case | result |
|---|---|
| `train_sft.py --preset cpu-tiny --lora.rank 0` | {error_row} |
| `data_prep.prepare`, cpu-tiny, {len(rows)} sample rows + one row of {args.row_mb:g} MB | {huge_row} |

Issue 10 measured, before the preflight and the byte bound: every configuration error waited 25-40 s for
the JAX/Tunix imports, and one 50 MB row took 272 s and 12.5 GB before it was dropped as too_long.
""")
    print(RESULTS_PATH.read_text())


if __name__ == "__main__":
    main()
