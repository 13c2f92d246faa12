"""The sample-quality scores, by name: every module here that defines `METRIC` (a base.Metric) is one.

`score` computes them all; eval.json, the printed report, MLflow and the real-data floors list
exactly the keys in SCALARS, and a class-conditional generator's eval.json, report and MLflow
add those of CONDITIONAL_SCALARS it has. Adding a score is adding a module (see
docs/architecture.md, "A metric").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.registry import discover
from pipeline.scoring.scores.base import Asked, Metric

if TYPE_CHECKING:
    from pipeline.params import EvaluateParams
    from pipeline.scoring.scorer import Reference

METRICS: dict[str, Metric] = dict(
    sorted(discover(__name__, "METRIC").items(), key=lambda item: item[1].order)
)
SCALARS: tuple[str, ...] = tuple(
    key for metric in METRICS.values() if not metric.conditional for key in metric.scalars
)
CONDITIONAL_SCALARS: tuple[str, ...] = tuple(
    key for metric in METRICS.values() if metric.conditional for key in metric.scalars
)


def score(
    features: np.ndarray,
    probs: np.ndarray,
    reference: Reference,
    params: EvaluateParams,
    asked: Asked | None = None,
) -> dict[str, Any]:
    """Every score of one sample set (features (N, D), class probabilities (N, K)) against the reference;
    with `asked` (the samples of a class-conditional generator), the conditional scores too."""
    out: dict[str, Any] = {}
    for metric in METRICS.values():
        if metric.conditional:
            if asked is not None:
                out |= metric.compute(features, probs, reference, params, asked)
            continue
        values = metric.compute(features, probs, reference, params)
        missing = set(metric.scalars) - set(values)
        if missing:  # a programming error in the metric's module
            raise RuntimeError(f"metric {metric.name} returned no {sorted(missing)}")
        out |= values
    return out
