"""Of a class-conditional generator: does it draw the class asked for, and how well, class by class.

`label_accuracy`: the share of samples the frozen classifier puts in the class they were asked
for. `fid_per_class[c]`: FID of the samples asked for class c against the reference features of
the real images of class c (None where either side has fewer than 2 x D); `fid_class_mean`: their
mean, given only when every class was scored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import UserError
from pipeline.scoring import metrics
from pipeline.scoring.scores.base import Asked, Metric

if TYPE_CHECKING:
    from pipeline.params import EvaluateParams
    from pipeline.scoring.scorer import Reference


def asked_class(
    features: np.ndarray, probs: np.ndarray, reference: Reference, params: EvaluateParams, asked: Asked
) -> dict[str, Any]:
    if len(asked.real_labels) != len(reference.features):
        from pipeline.scoring.scorer import RECOMPUTE  # (not at the top: scorer imports this registry)

        raise UserError(
            f"the reference holds {len(reference.features)} images, the test split {len(asked.real_labels)}: "
            f"{RECOMPUTE}."
        )
    need = 2 * reference.features.shape[1]
    per_class: list[float | None] = []
    for c in range(len(reference.label_distribution)):
        fake, real = features[asked.labels == c], reference.features[asked.real_labels == c]
        per_class.append(metrics.fid(fake, real) if min(len(fake), len(real)) >= need else None)
    out: dict[str, Any] = {"label_accuracy": float(np.mean(probs.argmax(axis=1) == asked.labels))}
    if all(f is not None for f in per_class):
        out["fid_class_mean"] = float(np.mean(per_class))
    return out | {"fid_per_class": per_class}


METRIC = Metric(
    name="asked_class",
    scalars=("label_accuracy", "fid_class_mean"),
    compute=asked_class,
    order=90,
    conditional=True,
)
