"""Inception Score on the frozen classifier's class probabilities: mean and spread over splits."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.scoring import metrics
from pipeline.scoring.scores.base import Metric

if TYPE_CHECKING:
    from pipeline.params import EvaluateParams
    from pipeline.scoring.scorer import Reference


def inception(
    features: np.ndarray, probs: np.ndarray, reference: Reference, params: EvaluateParams
) -> dict[str, Any]:
    mean, std = metrics.inception_score(probs, params.is_splits)
    return {"is_mean": mean, "is_std": std}


METRIC = Metric(name="inception", scalars=("is_mean", "is_std"), compute=inception, order=30)
