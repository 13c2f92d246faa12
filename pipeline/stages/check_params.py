"""Command and first DVC stage `check-params`: validate all of params.yaml, then stamp it.

DVC deletes a stage's outputs before it runs the stage's command; our stages validate params
first, but by then their old outputs are gone (a bad `-S` value would cost the trained
generator). So the pipeline's first stage validates: it depends on params.yaml as a whole,
every other stage is downstream of it (through prepare), and a mistake ends `dvc repro` or
`dvc exp run` in its one sentence before any other stage is touched. Its one output is a stamp
whose content never changes, so passing it never makes a later stage run again.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.files import atomic_path
from pipeline.layout import Layout
from pipeline.params import load_params

STAMP = "params.yaml passed `python -m pipeline check-params`; DVC's first stage writes this file.\n"


def main(params_path: Path = Path("params.yaml")) -> None:
    load_params(params_path)
    stamp = Layout().params_checked
    if not stamp.is_file() or stamp.read_text() != STAMP:
        with atomic_path(stamp) as tmp:
            tmp.write_text(STAMP)
    print(f"{params_path} is valid")
