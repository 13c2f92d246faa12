"""Stage `prepare`: fetch and verify the four MNIST files, save the prepared arrays."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.data import Mnist, class_counts, fetch_mnist, save_prepared
from pipeline.params import PrepareParams, load_params
from pipeline.runtime import remove_stale_temps, write_json

RAW_DIR = Path("data/raw/mnist")
PREPARED = Path("data/prepared/mnist.npz")
METRICS = Path("metrics/data.json")


def prepare(params: PrepareParams, raw_dir: Path, mirror: str | None) -> tuple[Mnist, dict[str, object]]:
    """Fetch and verify MNIST; return the dataset and its per-digit counts."""
    mnist = fetch_mnist(raw_dir, mirror, params.mirrors, params.timeout_s)
    summary = {
        split: {"count": int(labels.size), "per_digit": class_counts(labels)}
        for split, labels in (("train", mnist.train_labels), ("test", mnist.test_labels))
    }
    return mnist, summary


def main(params_path: Path = Path("params.yaml")) -> None:
    params = load_params(params_path)
    remove_stale_temps(PREPARED, METRICS, RAW_DIR)
    mnist, summary = prepare(params.prepare, RAW_DIR, os.environ.get("MNIST_MIRROR") or None)
    save_prepared(mnist, PREPARED)
    write_json(METRICS, summary)
    print(f"prepared {summary['train']['count']} train and {summary['test']['count']} test images -> {PREPARED}")
