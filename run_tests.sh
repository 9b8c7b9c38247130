#!/usr/bin/env bash
# Installs the pipeline and test dependencies into .venv (once) and runs ruff and the tests.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt -r requirements-test.txt
.venv/bin/ruff check .
.venv/bin/python -m pytest -q -W ignore::DeprecationWarning "$@"
