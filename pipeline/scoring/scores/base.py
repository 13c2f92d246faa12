"""What a score is: a name, the single-number keys it reports, and how to compute them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pipeline.params import EvaluateParams
    from pipeline.scoring.scorer import Reference


@dataclass(frozen=True)
class Metric:
    """One score of a sample set against the real reference.

    `compute(features, probs, reference, params)` takes the samples' classifier features (N, D)
    and class probabilities (N, K) and returns a dict holding every key of `scalars` (single
    numbers: eval.json, the printed report, MLflow, and the real-data floor `<key>_floor`) and
    any other JSON-ready values it reports (lists, such as class counts). `order` places its keys
    in eval.json and the report.
    """

    name: str
    scalars: tuple[str, ...]
    compute: Callable[[np.ndarray, np.ndarray, Reference, EvaluateParams], dict[str, Any]]
    order: int
