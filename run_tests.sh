#!/usr/bin/env bash
# Installs the pipeline and test dependencies into .venv (once) and runs ruff and the tests.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt -r requirements-test.txt
.venv/bin/ruff check .
# Two workers, each taking whole files (their session fixtures are built once per worker), longest first (conftest.py).
.venv/bin/python -m pytest -q -n 2 --dist loadfile -W ignore::DeprecationWarning "$@"
