"""Scoring: the frozen classifier, the real-data reference and every metric of a sample set."""

RECOMPUTE = "run `dvc repro reference` (or `python -m pipeline reference`) to compute it again"
