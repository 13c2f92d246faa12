"""The classes the samples fall in: KL divergence from the real shares, classes covered, confidence, counts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.scoring import metrics
from pipeline.scoring.scores.base import Metric

if TYPE_CHECKING:
    from pipeline.params import EvaluateParams
    from pipeline.scoring.scorer import Reference


def classes(
    features: np.ndarray, probs: np.ndarray, reference: Reference, params: EvaluateParams
) -> dict[str, Any]:
    report = metrics.class_report(probs, reference.label_distribution)
    return {
        "class_kl": report["kl_divergence"],
        "classes_covered": report["classes_covered"],
        "mean_confidence": report["mean_confidence"],
        "class_counts": report["counts"],  # a list: in eval.json, not among the single-number scores
    }


METRIC = Metric(
    name="classes", scalars=("class_kl", "classes_covered", "mean_confidence"), compute=classes, order=40
)
