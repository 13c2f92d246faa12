"""Stage `reference`: classifier features of the dataset's real test set, and the real-vs-real floor.

The floor scores `evaluate.n_samples` real training images against the reference exactly as
generated samples are scored, so it is the best any generator can hope for at that N.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from pipeline import data
from pipeline.data import Dataset, load_prepared
from pipeline.errors import UserError
from pipeline.files import atomic_files, remove_stale_temps, write_json
from pipeline.layout import Layout
from pipeline.machine import keep_freed_memory, pick_device
from pipeline.params import EvaluateParams, load_params
from pipeline.scoring.frozen_classifier import Classifier, classify, load_classifier
from pipeline.scoring.scorer import Reference, compute_reference, save_reference, score, scoring_metadata


def build_reference(
    model: Classifier,
    classifier_sha256: str,
    dataset: Dataset,
    params: EvaluateParams,
    device: torch.device,
    n_classes: int = 10,
) -> tuple[Reference, dict[str, float | int | list[int]]]:
    """The test-set reference and the scores of n_samples training images (seeded draw) against it."""
    n_train = dataset.train_images.shape[0]
    if params.n_samples > n_train:
        raise UserError(f"evaluate.n_samples={params.n_samples} exceeds the {n_train} real training images.")
    features, _ = classify(model, dataset.test_images, params.batch_size, device)
    reference = compute_reference(features, dataset.test_labels, classifier_sha256, n_classes)
    pick = np.sort(np.random.default_rng(params.seed).choice(n_train, params.n_samples, replace=False))
    real_features, real_probs = classify(model, dataset.train_images[pick], params.batch_size, device)
    return reference, score(real_features, real_probs, reference, params)


def main(params_path: Path = Path("params.yaml")) -> None:
    params = load_params(params_path)
    paths = Layout(dataset=params.data.dataset)
    remove_stale_temps(*paths.outputs("reference"))  # what a killed earlier run's atomic writes left
    n_classes = len(data.class_names(params.data))
    dataset = load_prepared(paths.prepared, n_classes)
    device = pick_device("auto")
    keep_freed_memory()  # the classifier's activations and PRDC's distance blocks, reused
    model, sha = load_classifier(paths.classifier, params.classifier.feature_dim, device)
    start = time.perf_counter()
    reference, floor = build_reference(model, sha, dataset, params.evaluate, device, n_classes)
    seconds = round(time.perf_counter() - start, 1)
    meta = scoring_metadata(sha, params.classifier.feature_dim, params.evaluate)
    n_reference = int(reference.features.shape[0])
    with atomic_files():  # both or (a full disk) neither: never new features beside old floors
        save_reference(reference, paths.reference)
        write_json(paths.floors, {**floor, **meta, "n_reference": n_reference, "seconds": seconds})
    print(f"real-vs-real floor: {params.evaluate.n_samples} training images vs {n_reference} test images")
    for key, value in floor.items():
        if not isinstance(value, list):
            print(f"  {key:<16}{value:>12.5g}")
    print(f"in {seconds} s -> {paths.reference}, {paths.floors}")
