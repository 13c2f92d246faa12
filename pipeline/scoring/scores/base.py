"""What a score is: a name, the single-number keys it reports, and how to compute them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np


class Asked(NamedTuple):
    """Of a class-conditional generator: the class each sample was asked for, and the real labels of
    the reference images (the test split), in the reference's order."""

    labels: np.ndarray
    real_labels: np.ndarray


@dataclass(frozen=True)
class Metric:
    """One score of a sample set against the real reference.

    `compute(features, probs, reference, params)` takes the samples' classifier features (N, D)
    and class probabilities (N, K) and returns a dict holding every key of `scalars` (single
    numbers: eval.json, the printed report, MLflow, and the real-data floor `<key>_floor`) and
    any other JSON-ready values it reports (lists, such as class counts). `order` places its keys
    in eval.json and the report.

    A `conditional` metric scores a class-conditional generator: it runs only when the samples
    were asked for classes, `compute` takes the `Asked` labels as a fifth argument, and it leaves
    out a key of `scalars` it cannot compute (too few samples of a class, say).
    """

    name: str
    scalars: tuple[str, ...]
    compute: Callable[..., dict[str, Any]]  # (features, probs, reference, params[, asked]) -> values
    order: int
    conditional: bool = False
