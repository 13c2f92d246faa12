"""MNIST: fetch, verify, decode, save and load the prepared arrays.

Also the ONE place that maps uint8 pixels to model inputs and back: real images and
generator samples both pass through `to_model` before any network sees them.
"""

from __future__ import annotations

import gzip
import hashlib
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.runtime import atomic_path

IMAGE_SIZE = 28
N_CLASSES = 10


@dataclass(frozen=True)
class IdxFile:
    name: str  # file name as published, gzip-compressed
    md5: str  # md5 of the DECOMPRESSED bytes (the .gz wrappers differ between mirrors)
    shape: tuple[int, ...]


MNIST_FILES: dict[str, IdxFile] = {
    "train_images": IdxFile("train-images-idx3-ubyte.gz", "6bbc9ace898e44ae57da46a324031adb", (60000, 28, 28)),
    "train_labels": IdxFile("train-labels-idx1-ubyte.gz", "a25bea736e30d166cdddb491f175f624", (60000,)),
    "test_images": IdxFile("t10k-images-idx3-ubyte.gz", "2646ac647ad5339dbf082846283269ea", (10000, 28, 28)),
    "test_labels": IdxFile("t10k-labels-idx1-ubyte.gz", "27ae3e4e09519cfbb04c329615203637", (10000,)),
}

HOW_TO_SUPPLY = (
    "put the four official MNIST .gz files in data/raw/mnist/ or set MNIST_MIRROR "
    "to a directory or URL that holds them"
)


@dataclass(frozen=True)
class Mnist:
    """The prepared dataset: uint8 images (N, 28, 28) and int64 labels (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


# --- decoding and verification ---------------------------------------------------------


def decode_idx(raw: bytes, spec: IdxFile, source: str = "") -> np.ndarray:
    """Verify one decompressed IDX file (md5, magic number, shape) and decode it."""
    where = f"{spec.name}{f' from {source}' if source else ''}"
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{where} is not an unsigned-byte IDX file (bad magic number); {HOW_TO_SUPPLY}.")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim != len(spec.shape) or len(raw) < header:
        raise UserError(f"{where} has {ndim} dimensions, expected {len(spec.shape)}; {HOW_TO_SUPPLY}.")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if dims != spec.shape:
        raise UserError(f"{where} has shape {dims}, expected {spec.shape}; {HOW_TO_SUPPLY}.")
    expected_len = header + int(np.prod(dims))
    if len(raw) != expected_len:
        raise UserError(
            f"{where} is truncated or padded: {len(raw)} bytes, expected {expected_len}; {HOW_TO_SUPPLY}."
        )
    md5 = hashlib.md5(raw).hexdigest()
    if md5 != spec.md5:
        raise UserError(f"{where} has md5 {md5}, expected {spec.md5} (corrupted or altered); {HOW_TO_SUPPLY}.")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def decompress(blob: bytes, spec: IdxFile, source: str) -> bytes:
    """gunzip with a clear error for truncated or damaged archives."""
    if blob[:2] != b"\x1f\x8b":  # an already-decompressed file is accepted as is
        return blob
    try:
        return gzip.decompress(blob)
    except (EOFError, OSError, zlib.error) as exc:
        raise UserError(f"{spec.name} from {source} is a damaged gzip file ({exc}); {HOW_TO_SUPPLY}.") from None


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
    spec: IdxFile, raw_dir: Path, mirror: str | None, mirrors: list[str], timeout_s: float
) -> np.ndarray:
    """Get one MNIST file, verified and decoded: raw_dir, then `mirror`, then `mirrors`.

    Downloaded files are verified before they are cached in raw_dir, so a bad download
    never poisons the cache.
    """
    blob = _read_local(raw_dir, spec)
    if blob is not None:
        return decode_idx(decompress(blob, spec, str(raw_dir)), spec, str(raw_dir))

    if mirror:
        if "://" not in mirror:
            directory = Path(mirror).expanduser()
            if not directory.is_dir():
                raise UserError(f"MNIST_MIRROR={mirror} is not a directory or URL; {HOW_TO_SUPPLY}.")
            blob = _read_local(directory, spec)
            if blob is None:
                raise UserError(f"MNIST_MIRROR={mirror} has no {spec.name}; {HOW_TO_SUPPLY}.")
            return decode_idx(decompress(blob, spec, mirror), spec, mirror)
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
        array = decode_idx(decompress(blob, spec, url), spec, url)
        with atomic_path(raw_dir / spec.name) as tmp:
            tmp.write_bytes(blob)
        return array
    raise UserError(f"cannot download {spec.name} ({'; '.join(failures)}); {HOW_TO_SUPPLY}.")


def fetch_mnist(raw_dir: Path, mirror: str | None, mirrors: list[str], timeout_s: float) -> Mnist:
    """All four files, verified and decoded."""
    arrays = {key: fetch_file(spec, raw_dir, mirror, mirrors, timeout_s) for key, spec in MNIST_FILES.items()}
    return Mnist(
        train_images=arrays["train_images"],
        train_labels=arrays["train_labels"].astype(np.int64),
        test_images=arrays["test_images"],
        test_labels=arrays["test_labels"].astype(np.int64),
    )


# --- prepared dataset ------------------------------------------------------------------

PREPARED_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def save_prepared(mnist: Mnist, path: Path) -> None:
    """Uncompressed .npz: about 55 MB that loads in tens of milliseconds."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **{key: getattr(mnist, key) for key in PREPARED_KEYS})


def load_prepared(path: Path | str) -> Mnist:
    """Load and sanity-check the prepared dataset; a damaged file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prepared dataset {path} is missing; run `dvc repro prepare` first.")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in PREPARED_KEYS}
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise UserError(f"prepared dataset {path} is damaged ({exc}); run `dvc repro prepare` again.") from None
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if (
            images.dtype != np.uint8
            or images.ndim != 3
            or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE)
            or labels.shape != images.shape[:1]
            or labels.size == 0
            or labels.min() < 0
            or labels.max() >= N_CLASSES
        ):
            raise UserError(f"prepared dataset {path} has a malformed {split} split; run `dvc repro prepare` again.")
    return Mnist(**arrays)


def class_counts(labels: np.ndarray) -> dict[str, int]:
    """Images per digit, keyed '0'..'9'."""
    counts = np.bincount(labels, minlength=N_CLASSES)
    return {str(digit): int(n) for digit, n in enumerate(counts)}


# --- the one pixel transform -------------------------------------------------------------


def make_grid(pixels: np.ndarray, rows: int = 5, pad: int = 2) -> np.ndarray:
    """uint8 images (n <= rows*rows, 28, 28) -> one uint8 grid image, as the tutorial's 5x5 plots."""
    size = IMAGE_SIZE + pad
    grid = np.zeros((rows * size + pad, rows * size + pad), dtype=np.uint8)
    for i, image in enumerate(pixels[: rows * rows]):
        r, c = divmod(i, rows)
        grid[pad + r * size : pad + r * size + IMAGE_SIZE, pad + c * size : pad + c * size + IMAGE_SIZE] = image
    return grid


def save_png(image: np.ndarray, path: Path, scale: int = 3) -> None:
    """Save a uint8 grayscale image as PNG, enlarged `scale` times (nearest), atomically."""
    from PIL import Image

    big = Image.fromarray(image).resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        big.save(tmp, format="PNG")


def to_model(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 pixels (N, 28, 28) -> float32 (N, 1, 28, 28) in [-1, 1], as the tutorial scales."""
    tensor = torch.as_tensor(images)
    if tensor.dtype != torch.uint8:
        raise TypeError(f"to_model expects uint8 pixels, got {tensor.dtype}")
    return (tensor.to(torch.float32) / 127.5 - 1.0).unsqueeze(1)


def from_model(images: torch.Tensor) -> torch.Tensor:
    """Model outputs in [-1, 1] (N, 1, 28, 28) -> uint8 pixels (N, 28, 28), rounded."""
    return ((images.detach().float().squeeze(1) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)

