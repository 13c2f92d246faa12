"""Precision, recall, density and coverage (Naeem et al. 2020) on k-nearest-neighbour balls of the features."""

from __future__ import annotations

from pipeline.scoring import metrics
from pipeline.scoring.scores.base import Metric

METRIC = Metric(
    name="prdc",
    scalars=("precision", "recall", "density", "coverage"),
    compute=lambda features, probs, reference, params: metrics.prdc(
        reference.features, features, params.prdc_k
    ),
    order=50,
)
