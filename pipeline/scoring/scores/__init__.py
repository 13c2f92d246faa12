"""The sample-quality scores, by name: every module here that defines `METRIC` (a base.Metric) is one.

`score` computes them all; eval.json, the printed report, MLflow and the real-data floors list
exactly the keys in SCALARS. Adding a score is adding a module (see docs/architecture.md,
"Add a metric").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.registry import discover
from pipeline.scoring.scores.base import Metric

if TYPE_CHECKING:
    from pipeline.params import EvaluateParams
    from pipeline.scoring.scorer import Reference

METRICS: dict[str, Metric] = dict(
    sorted(discover(__name__, "METRIC").items(), key=lambda item: item[1].order)
)
SCALARS: tuple[str, ...] = tuple(key for metric in METRICS.values() for key in metric.scalars)


def score(
    features: np.ndarray, probs: np.ndarray, reference: Reference, params: EvaluateParams
) -> dict[str, Any]:
    """Every score of one sample set (features (N, D), class probabilities (N, K)) against the reference."""
    out: dict[str, Any] = {}
    for metric in METRICS.values():
        values = metric.compute(features, probs, reference, params)
        missing = set(metric.scalars) - set(values)
        if missing:  # a programming error in the metric's module
            raise RuntimeError(f"metric {metric.name} returned no {sorted(missing)}")
        out |= values
    return out
