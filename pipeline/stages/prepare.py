"""Stage `prepare`: the dataset of `data.dataset`, verified and saved as the prepared arrays.

A published dataset (MNIST, Fashion-MNIST) comes from data/raw/<dataset>/, then its offline
mirror variable (MNIST_MIRROR, FASHION_MNIST_MIRROR), then its official mirrors, every file
checked; your own (`own`) is read from `data.path` and checked image by image.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pipeline import data, own_data
from pipeline.data import Dataset, class_counts, save_prepared
from pipeline.files import atomic_files, remove_stale_temps, write_json
from pipeline.layout import Layout
from pipeline.params import Params, load_params

# Every class needs this many images in each split: the classifier learns it, and the class
# histogram, per-class counts and the floors mean something.
MIN_PER_CLASS = 10


def prepare(params: Params, raw_dir: Path, env: Mapping[str, str]) -> tuple[Dataset, dict[str, object]]:
    """Fetch and verify the dataset; return it and its images per class."""
    if params.data.dataset == data.OWN:
        own = params.data
        own_data.check_own_path(Path(own.path or ""), Layout().own)
        dataset = own_data.load_own(
            Path(own.path or ""), list(own.classes or ()), own.test_fraction, own.split_seed, MIN_PER_CLASS
        )
    else:
        spec = data.DATASETS[params.data.dataset]
        dataset = data.fetch_dataset(
            spec, raw_dir, env.get(spec.mirror_env) or None, params.prepare.mirrors, params.prepare.timeout_s
        )
    names = data.class_names(params.data)
    summary = {
        split: {"count": int(labels.size), "per_class": class_counts(labels, names)}
        for split, labels in (("train", dataset.train_labels), ("test", dataset.test_labels))
    }
    return dataset, {"dataset": params.data.dataset, **summary}


def main(params_path: Path = Path("params.yaml")) -> None:
    params = load_params(params_path)
    paths = Layout(dataset=params.data.dataset)
    remove_stale_temps(*paths.outputs("prepare"), paths.raw)
    dataset, summary = prepare(params, paths.raw, os.environ)
    with atomic_files():  # both or (a full disk) neither: never new arrays beside an old summary
        save_prepared(dataset, paths.prepared)
        write_json(paths.data_metrics, summary)
    counts = {split: summary[split]["count"] for split in ("train", "test")}  # type: ignore[index]
    print(
        f"prepared {counts['train']} train and {counts['test']} test images of {params.data.dataset} -> {paths.prepared}"
    )
