"""Kernel Inception Distance: the unbiased MMD^2 with the cubic kernel, its mean and spread over subsets."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.scoring import metrics
from pipeline.scoring.scores.base import Metric

if TYPE_CHECKING:
    from pipeline.params import EvaluateParams
    from pipeline.scoring.scorer import Reference


def feature_scale(reference: Reference) -> float:
    """The factor that gives the reference features a mean square of 1 per dimension."""
    features = reference.features.astype(np.float64)
    return float(1.0 / np.sqrt(np.mean(features**2)))


def kid(
    features: np.ndarray, probs: np.ndarray, reference: Reference, params: EvaluateParams
) -> dict[str, Any]:
    # KID's cubic kernel (x.y/d + 1)^3 assumes features of order 1 per dimension, as Inception's
    # are; raw classifier features are an order of magnitude larger and the estimate drowns in
    # its own variance. One fixed scale from the reference (unit mean square per dimension)
    # fixes that and keeps every score under one reference comparable.
    scale = feature_scale(reference)
    subsets, size = params.kid_subsets, params.kid_subset_size
    mean, std = metrics.kid(features * scale, reference.features * scale, subsets, size, params.seed)
    return {"kid_mean": mean, "kid_std": std}


METRIC = Metric(name="kid", scalars=("kid_mean", "kid_std"), compute=kid, order=20)
