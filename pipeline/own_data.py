"""Your own images (`data.dataset: own`): the .npz in data/own/, checked and split into train and test.

The file holds `images` (N, 28, 28) uint8 and `labels` (N,) in 0..K-1 (then `data.test_fraction`
of each class is held out, seeded by `data.split_seed`), or train_*/test_* arrays of its own split.
It is read only from data/own/ (the prepare stage's DVC dependency), never through a symlink out.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from pipeline.data import IMAGE_SIZE, Dataset
from pipeline.errors import UserError


def check_own_path(path: Path, folder: Path) -> None:
    """Refuse a `data.path` that leads out of `folder` (your own data's: the prepare stage's DVC
    dependency) through a symlink; params validation has already refused one that says so in words."""
    try:
        real, home = path.resolve(), folder.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop: RuntimeError up to Python 3.12
        raise UserError(f"data.path {path} cannot be followed ({exc}).") from None
    if not real.is_relative_to(home):
        raise UserError(
            f"data.path {path} leads out of {folder}/ through a symlink (to {real}); your own data is "
            f"read only from {folder}/, so that DVC sees it change: copy the file there."
        )


NPZ_MAGIC = (
    b"PK\x03\x04",
    b"PK\x05\x06",
)  # what numpy.savez writes: a zip archive (the second: an empty one)


def load_own(
    path: Path, class_names: list[str], test_fraction: float, seed: int, min_per_class: int
) -> Dataset:
    """Your own data: an .npz of `images` (N, 28, 28) uint8 and `labels` (N,) integers 0..K-1 (split here,
    seeded, `test_fraction` held out), or of train_images/train_labels/test_images/test_labels."""
    if path.is_dir():
        raise UserError(f"data.path {path} is a folder, not an .npz file.")
    if not path.is_file():
        raise UserError(f"data.path {path} does not exist.")
    not_npz = f"data.path {path} is not an .npz file (a zip of arrays, as numpy.savez writes)"
    try:
        with open(path, "rb") as fh:
            if fh.read(4) not in NPZ_MAGIC:  # else numpy tries the file as a pickle, and says so
                raise UserError(f"{not_npz}.")
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        reason = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "pickle" in reason:  # an object array: never unpickled, whatever numpy suggests
            raise UserError(
                f"data.path {path} holds Python objects, which are never unpickled; save numeric arrays."
            ) from None
        raise UserError(f"{not_npz}: {reason}.") from None
    if {"images", "labels"} <= arrays.keys():
        images, labels = _own_split(path, "", arrays["images"], arrays["labels"], class_names)
        test = np.zeros(len(labels), bool)
        rng = np.random.default_rng(seed)
        for k in range(len(class_names)):  # hold out the same share of every class
            members = np.flatnonzero(labels == k)
            test[rng.choice(members, int(round(test_fraction * len(members))), replace=False)] = True
        dataset = Dataset(images[~test], labels[~test], images[test], labels[test])
    elif {"train_images", "train_labels", "test_images", "test_labels"} <= arrays.keys():
        train = _own_split(path, "train_", arrays["train_images"], arrays["train_labels"], class_names)
        test_split = _own_split(path, "test_", arrays["test_images"], arrays["test_labels"], class_names)
        dataset = Dataset(*train, *test_split)
    else:
        raise UserError(
            f"data.path {path} holds {sorted(arrays)}; it needs images and labels "
            "(or train_images, train_labels, test_images and test_labels)."
        )
    for split, labels in (("train", dataset.train_labels), ("test", dataset.test_labels)):
        counts = np.bincount(labels, minlength=len(class_names))
        if counts.min() < min_per_class:
            k = int(counts.argmin())
            raise UserError(
                f"data.path {path}: the {split} split has {counts[k]} image(s) of class "
                f"'{class_names[k]}'; every class needs at least {min_per_class} there."
            )
    return dataset


def _own_split(
    path: Path, prefix: str, images: np.ndarray, labels: np.ndarray, class_names: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Validated uint8 (N, 28, 28) images and int64 labels in 0..K-1: one sentence for anything else."""
    where = f"data.path {path}: {prefix}images"
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]  # (N, 28, 28, 1), as Keras keeps them
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise UserError(f"{where} has shape {images.shape}; expected N x 28 x 28 grayscale.")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.number) or not np.isfinite(images).all():
            raise UserError(
                f"{where} has dtype {images.dtype} or NaN/infinite values; expected uint8 pixels."
            )
        raise UserError(f"{where} has dtype {images.dtype}; expected uint8 pixels 0-255.")
    if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(
            f"data.path {path}: {prefix}labels must be {images.shape[0]} integers, "
            f"got shape {labels.shape} of {labels.dtype}."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise UserError(
            f"data.path {path}: {prefix}labels run from {labels.min()} to {labels.max()}, outside "
            f"0-{len(class_names) - 1} (data.classes names {len(class_names)} classes)."
        )
    return images, labels.astype(np.int64)
