#!/usr/bin/env bash
# The whole pipeline on the CPU (cpu-tiny preset): data prep, training, evaluation against the base.
# Another preset: PRESET=kaggle bash run_pipeline.sh (on a TPU VM). Extra --section.field overrides pass to every
# stage (short flags such as --max-steps belong to one stage, and the others refuse them).
set -euo pipefail
cd "$(dirname "$0")"
PRESET=${PRESET:-cpu-tiny}
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
.venv/bin/python data_prep.py --preset "$PRESET" "$@"
.venv/bin/python train_sft.py --preset "$PRESET" "$@"
.venv/bin/python eval_samples.py --preset "$PRESET" --run "runs/$PRESET" --compare-base "$@"
