"""Stage `prepare`: fetch and verify the four MNIST files, save the prepared arrays."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.data import Mnist, class_counts, fetch_mnist, save_prepared
from pipeline.layout import Layout
from pipeline.params import PrepareParams, load_params
from pipeline.runtime import remove_stale_temps, write_json


def prepare(params: PrepareParams, raw_dir: Path, mirror: str | None) -> tuple[Mnist, dict[str, object]]:
    """Fetch and verify MNIST; return the dataset and its per-digit counts."""
    mnist = fetch_mnist(raw_dir, mirror, params.mirrors, params.timeout_s)
    summary = {
        split: {"count": int(labels.size), "per_digit": class_counts(labels)}
        for split, labels in (("train", mnist.train_labels), ("test", mnist.test_labels))
    }
    return mnist, summary


def main(params_path: Path = Path("params.yaml")) -> None:
    params, paths = load_params(params_path), Layout()
    remove_stale_temps(*paths.outputs("prepare"), paths.raw)
    mnist, summary = prepare(params.prepare, paths.raw, os.environ.get("MNIST_MIRROR") or None)
    save_prepared(mnist, paths.prepared)
    write_json(paths.data_metrics, summary)
    print(f"prepared {summary['train']['count']} train and {summary['test']['count']} test images -> {paths.prepared}")
