"""The datasets: MNIST, Fashion-MNIST and your own; fetch, verify, decode, save and load them.

`DATASETS` is the table of published datasets (files, checksums, class names, mirrors) that
prepare, the classifier and the reports read, keyed by `data.dataset`; `own` is the user's
.npz. Also the ONE place that maps uint8 pixels to model inputs and back: real images and
generator samples both pass through `to_model` before any network sees them.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.files import atomic_path

if TYPE_CHECKING:
    from pipeline.params import DataParams

IMAGE_SIZE = 28
N_CLASSES = 10  # MNIST's and Fashion-MNIST's; your own data has as many as its class names


@dataclass(frozen=True)
class IdxFile:
    name: str  # file name as published, gzip-compressed
    md5: str  # md5 of the DECOMPRESSED bytes (the .gz wrappers differ between mirrors)
    shape: tuple[int, ...]


@dataclass(frozen=True)
class DatasetSpec:
    """A published dataset of 28 x 28 grayscale IDX files: where they come from and what they hold."""

    name: str
    files: dict[str, IdxFile]  # train_images, train_labels, test_images, test_labels
    class_names: tuple[str, ...]
    mirrors: tuple[
        str, ...
    ]  # official download bases, tried in order (unless prepare.mirrors says otherwise)
    mirror_env: str  # the variable naming an offline copy (a directory or URL base)
    min_accuracy: float  # the frozen classifier's test accuracy must reach this
    classifier_epochs: int  # what its classifier trains for unless classifier.epochs says otherwise

    def how_to_supply(self, raw_dir: Path | str) -> str:
        return (
            f"put the four official {self.name} .gz files in {raw_dir}/ or set {self.mirror_env} "
            "to a directory or URL that holds them"
        )


def _idx_files(md5s: tuple[str, str, str, str]) -> dict[str, IdxFile]:
    names = (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    )
    shapes = ((60000, 28, 28), (60000,), (10000, 28, 28), (10000,))
    keys = ("train_images", "train_labels", "test_images", "test_labels")
    return {
        key: IdxFile(name, md5, shape)
        for key, name, md5, shape in zip(keys, names, md5s, shapes, strict=True)
    }


MNIST = DatasetSpec(
    name="MNIST",
    files=_idx_files(
        (
            "6bbc9ace898e44ae57da46a324031adb",
            "a25bea736e30d166cdddb491f175f624",
            "2646ac647ad5339dbf082846283269ea",
            "27ae3e4e09519cfbb04c329615203637",
        )
    ),
    class_names=tuple(str(digit) for digit in range(10)),
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    mirror_env="MNIST_MIRROR",
    min_accuracy=0.993,
    classifier_epochs=4,
)
FASHION_MNIST = DatasetSpec(
    name="Fashion-MNIST",
    files=_idx_files(
        (
            "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "9018921c3c673c538a1fc5bad174d6f9",
            "8181f5470baa50b63fa0f6fddb340f0a",
            "15d484375f8d13e6eb1aabb0c3f46965",
        )
    ),
    class_names=(
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    mirror_env="FASHION_MNIST_MIRROR",
    min_accuracy=0.93,
    classifier_epochs=12,  # clothes are harder than digits: 4 epochs reach 92.3% on its test set
)
DATASETS: dict[str, DatasetSpec] = {"mnist": MNIST, "fashion-mnist": FASHION_MNIST}  # data.dataset's names
OWN = "own"  # data.dataset's name for your own .npz (data.path)
OWN_MIN_ACCURACY = 0.9  # your own data's classifier floor, unless classifier.min_accuracy says otherwise
OWN_CLASSIFIER_EPOCHS = 10


@dataclass(frozen=True)
class Dataset:
    """A prepared dataset: uint8 images (N, 28, 28) and int64 labels (N,), a train and a test split."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


# --- decoding and verification ---------------------------------------------------------


def decode_idx(raw: bytes, spec: IdxFile, source: str = "", how: str = "") -> np.ndarray:
    """Verify one decompressed IDX file (md5, magic number, shape) and decode it; `how` says how to fix it."""
    where, how = (
        f"{spec.name}{f' from {source}' if source else ''}",
        how or MNIST.how_to_supply("data/raw/mnist"),
    )
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{where} is not an unsigned-byte IDX file (bad magic number); {how}.")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim != len(spec.shape) or len(raw) < header:
        raise UserError(f"{where} has {ndim} dimensions, expected {len(spec.shape)}; {how}.")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if dims != spec.shape:
        raise UserError(f"{where} has shape {dims}, expected {spec.shape}; {how}.")
    expected_len = header + int(np.prod(dims))
    if len(raw) != expected_len:
        raise UserError(f"{where} is truncated or padded: {len(raw)} bytes, expected {expected_len}; {how}.")
    md5 = hashlib.md5(raw).hexdigest()
    if md5 != spec.md5:
        raise UserError(f"{where} has md5 {md5}, expected {spec.md5} (corrupted or altered); {how}.")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def decompress(blob: bytes, spec: IdxFile, source: str, how: str = "") -> bytes:
    """gunzip with a clear error for truncated or damaged archives."""
    if blob[:2] != b"\x1f\x8b":  # an already-decompressed file is accepted as is
        return blob
    try:
        return gzip.decompress(blob)
    except (EOFError, OSError, zlib.error) as exc:
        how = how or MNIST.how_to_supply("data/raw/mnist")
        raise UserError(f"{spec.name} from {source} is a damaged gzip file ({exc}); {how}.") from None


# --- fetching ----------------------------------------------------------------------------


def _read_local(directory: Path, spec: IdxFile) -> bytes | None:
    for candidate in (directory / spec.name, directory / spec.name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate.read_bytes()
    return None


def _download(url: str, timeout_s: float) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "dcgan-mnist-pipeline"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return response.read()


def fetch_file(
    spec: IdxFile,
    raw_dir: Path,
    mirror: str | None,
    mirrors: list[str],
    timeout_s: float,
    dataset: DatasetSpec = MNIST,
) -> np.ndarray:
    """Get one file of `dataset`, verified and decoded: raw_dir, then `mirror`, then `mirrors`.

    Downloaded files are verified before they are cached in raw_dir, so a bad download
    never poisons the cache.
    """
    how, env = dataset.how_to_supply(raw_dir), dataset.mirror_env
    blob = _read_local(raw_dir, spec)
    if blob is not None:
        return decode_idx(decompress(blob, spec, str(raw_dir), how), spec, str(raw_dir), how)

    if mirror:
        if "://" not in mirror:
            directory = Path(mirror).expanduser()
            if not directory.is_dir():
                raise UserError(f"{env}={mirror} is not a directory or URL; {how}.")
            blob = _read_local(directory, spec)
            if blob is None:
                raise UserError(f"{env}={mirror} has no {spec.name}; {how}.")
            return decode_idx(decompress(blob, spec, mirror, how), spec, mirror, how)
        bases = [mirror]
    else:
        bases = mirrors

    failures = []
    for base in bases:
        url = base.rstrip("/") + "/" + spec.name
        try:
            blob = _download(url, timeout_s)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            failures.append(f"{url}: {getattr(exc, 'reason', exc)}")
            continue
        array = decode_idx(decompress(blob, spec, url, how), spec, url, how)
        with atomic_path(raw_dir / spec.name) as tmp:
            tmp.write_bytes(blob)
        return array
    raise UserError(f"cannot download {spec.name} ({'; '.join(failures)}); {how}.")


def fetch_dataset(
    dataset: DatasetSpec, raw_dir: Path, mirror: str | None, mirrors: list[str] | None, timeout_s: float
) -> Dataset:
    """All four files of a published dataset, verified and decoded (`mirrors` None: its official ones)."""
    bases = list(dataset.mirrors) if mirrors is None else mirrors
    arrays = {
        key: fetch_file(spec, raw_dir, mirror, bases, timeout_s, dataset)
        for key, spec in dataset.files.items()
    }
    return Dataset(
        train_images=arrays["train_images"],
        train_labels=arrays["train_labels"].astype(np.int64),
        test_images=arrays["test_images"],
        test_labels=arrays["test_labels"].astype(np.int64),
    )


def class_names(data: DataParams) -> tuple[str, ...]:
    """The dataset's classes, label k being the k-th."""
    return tuple(data.classes or ()) if data.dataset == OWN else DATASETS[data.dataset].class_names


def min_accuracy(data: DataParams) -> float:
    """The frozen classifier's floor unless classifier.min_accuracy says otherwise."""
    return OWN_MIN_ACCURACY if data.dataset == OWN else DATASETS[data.dataset].min_accuracy


def classifier_epochs(data: DataParams) -> int:
    """How long the dataset's classifier trains unless classifier.epochs says otherwise."""
    return OWN_CLASSIFIER_EPOCHS if data.dataset == OWN else DATASETS[data.dataset].classifier_epochs


def fingerprint(dataset: Dataset) -> str:
    """SHA-256 of the arrays themselves (not of a file that holds them)."""
    digest = hashlib.sha256()
    for key in PREPARED_KEYS:
        array = np.ascontiguousarray(getattr(dataset, key))
        digest.update(f"{key}{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


# --- prepared dataset ------------------------------------------------------------------

PREPARED_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def save_prepared(mnist: Dataset, path: Path) -> None:
    """Uncompressed .npz: about 55 MB that loads in tens of milliseconds. Each array is written with its
    size known and a fixed date, so that the bytes (and dvc.lock's hash of them) do not depend on the
    Python release: np.savez streams its entries, whose zip headers changed within Python 3.11."""
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
            for key in PREPARED_KEYS:
                array = io.BytesIO()
                np.lib.format.write_array(array, np.asanyarray(getattr(mnist, key)), allow_pickle=False)
                entry = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                archive.writestr(entry, array.getvalue())


def load_prepared(path: Path | str, n_classes: int = N_CLASSES) -> Dataset:
    """Load and sanity-check the prepared dataset; a damaged file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prepared dataset {path} is missing; run `dvc repro prepare` first.")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in PREPARED_KEYS}
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise UserError(
            f"prepared dataset {path} is damaged ({exc}); run `dvc repro prepare` again."
        ) from None
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if (
            images.dtype != np.uint8
            or images.ndim != 3
            or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE)
            or labels.shape != images.shape[:1]
            or labels.size == 0
            or labels.min() < 0
            or labels.max() >= n_classes
        ):
            raise UserError(
                f"prepared dataset {path} has a malformed {split} split; run `dvc repro prepare` again."
            )
    return Dataset(**arrays)


def class_counts(
    labels: np.ndarray, class_names: list[str] | tuple[str, ...] = MNIST.class_names
) -> dict[str, int]:
    """Images per class, keyed by class name."""
    counts = np.bincount(labels, minlength=len(class_names))
    return {name: int(n) for name, n in zip(class_names, counts, strict=True)}


# --- the one pixel transform -------------------------------------------------------------


def make_grid(pixels: np.ndarray, rows: int = 5, pad: int = 2) -> np.ndarray:
    """uint8 images (n <= rows*rows, 28, 28) -> one uint8 grid image, as the tutorial's 5x5 plots."""
    size = IMAGE_SIZE + pad
    grid = np.zeros((rows * size + pad, rows * size + pad), dtype=np.uint8)
    for i, image in enumerate(pixels[: rows * rows]):
        r, c = divmod(i, rows)
        grid[pad + r * size : pad + r * size + IMAGE_SIZE, pad + c * size : pad + c * size + IMAGE_SIZE] = (
            image
        )
    return grid


def png_bytes(image: np.ndarray, scale: int = 3) -> bytes:
    """A uint8 grayscale image as PNG, enlarged `scale` times (nearest)."""
    import io

    from PIL import Image

    big = Image.fromarray(image).resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST)
    buffer = io.BytesIO()
    big.save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(image: np.ndarray, path: Path, scale: int = 3) -> None:
    """Save a uint8 grayscale image as PNG, enlarged `scale` times (nearest), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(png_bytes(image, scale))


def to_model(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 pixels (N, 28, 28) -> float32 (N, 1, 28, 28) in [-1, 1], as the tutorial scales."""
    tensor = torch.as_tensor(images)
    if tensor.dtype != torch.uint8:
        raise TypeError(f"to_model expects uint8 pixels, got {tensor.dtype}")
    return (tensor.to(torch.float32) / 127.5 - 1.0).unsqueeze(1)


def from_model(images: torch.Tensor) -> torch.Tensor:
    """Model outputs in [-1, 1] (N, 1, 28, 28) -> uint8 pixels (N, 28, 28), rounded."""
    return ((images.detach().float().squeeze(1) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
