"""Fréchet distance between the Gaussians of the samples' and the real images' features (the FID recipe)."""

from __future__ import annotations

from pipeline.scoring import metrics
from pipeline.scoring.scores.base import Metric

METRIC = Metric(
    name="fid",
    scalars=("fid",),
    compute=lambda features, probs, reference, params: {
        "fid": metrics.frechet_distance(*metrics.feature_stats(features), reference.mean, reference.cov)
    },
    order=10,
)
