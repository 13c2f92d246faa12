"""Fréchet distance between the Gaussians of the samples' and the real images' features (the FID recipe),
and its 95 % interval over `evaluate.fid_resamples` bootstrap draws of the samples (metrics.fid_with_interval)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.scoring import metrics
from pipeline.scoring.scores.base import Metric

if TYPE_CHECKING:
    from pipeline.params import EvaluateParams
    from pipeline.scoring.scorer import Reference


def fid(
    features: np.ndarray, probs: np.ndarray, reference: Reference, params: EvaluateParams
) -> dict[str, Any]:
    value, low, high = metrics.fid_with_interval(
        features, reference.mean, reference.cov, params.fid_resamples, params.seed
    )
    return {"fid": value, "fid_low": low, "fid_high": high}


METRIC = Metric(name="fid", scalars=("fid", "fid_low", "fid_high"), compute=fid, order=10)
