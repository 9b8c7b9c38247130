"""Regenerates kaggle_tunix_sft.ipynb from kaggle_tunix_sft.py, the reviewed source of truth.

    python notebooks/build_notebook.py      # same as: jupytext --to ipynb notebooks/kaggle_tunix_sft.py
"""

from pathlib import Path

import jupytext

SOURCE = Path(__file__).with_name("kaggle_tunix_sft.py")
NOTEBOOK = SOURCE.with_suffix(".ipynb")


def build() -> Path:
    jupytext.write(jupytext.read(SOURCE), NOTEBOOK, fmt="ipynb")
    return NOTEBOOK


if __name__ == "__main__":
    print(f"wrote {build()}")
