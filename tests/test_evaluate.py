from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import UserError
from pipeline.stages.evaluate import load_samples


def test_uint8_npy(tmp_path: Path) -> None:
    array = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "s.npy", array)
    np.testing.assert_array_equal(load_samples(tmp_path / "s.npy"), array)


def test_float_npz_goes_through_the_model_transform(tmp_path: Path) -> None:
    floats = np.stack([np.full((1, 28, 28), -1.0), np.full((1, 28, 28), 1.0), np.zeros((1, 28, 28))]).astype(np.float32)
    np.savez(tmp_path / "s.npz", samples=floats)
    pixels = load_samples(tmp_path / "s.npz")
    assert pixels.dtype == np.uint8 and pixels.shape == (3, 28, 28)
    assert pixels[0].max() == 0 and pixels[1].min() == 255 and pixels[2].max() == 128


def test_png_folder(tmp_path: Path) -> None:
    for i in range(3):
        Image.fromarray(np.full((28, 28), i * 50, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    pixels = load_samples(tmp_path)
    assert pixels.shape == (3, 28, 28) and pixels[2, 0, 0] == 100


@pytest.mark.parametrize(
    ("array", "pattern"),
    [
        (np.zeros((5, 32, 32), np.uint8), r"has shape \(5, 32, 32\); expected N x 28 x 28"),
        (np.full((5, 28, 28), np.nan, np.float32), "contains NaN"),
        (np.full((5, 28, 28), 3.0, np.float32), r"expected \[-1, 1\]"),
        (np.zeros((5, 28, 28), np.int64), "has dtype int64"),
    ],
)
def test_bad_samples_are_refused(tmp_path: Path, array: np.ndarray, pattern: str) -> None:
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(UserError, match=pattern):
        load_samples(tmp_path / "bad.npy")


def test_unreadable_and_missing(tmp_path: Path) -> None:
    (tmp_path / "x.npy").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a readable numpy file"):
        load_samples(tmp_path / "x.npy")
    with pytest.raises(UserError, match="does not exist"):
        load_samples(tmp_path / "nope.npy")
    with pytest.raises(UserError, match="holds no .png"):
        load_samples(tmp_path)
