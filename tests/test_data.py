from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import data
from pipeline.data import from_model, load_prepared, save_prepared, to_model
from pipeline.errors import UserError
from tests.conftest import idx_bytes, synthetic_mnist

SPEC = data.IdxFile("demo-idx1-ubyte.gz", "", (5,))


def spec_for(raw: bytes, shape: tuple[int, ...]) -> data.IdxFile:
    import hashlib

    return data.IdxFile("demo.gz", hashlib.md5(raw).hexdigest(), shape)


def test_decode_good_file() -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = idx_bytes(array)
    np.testing.assert_array_equal(data.decode_idx(raw, spec_for(raw, (2, 3, 4))), array)


def test_truncated_file_is_refused() -> None:
    raw = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    with pytest.raises(UserError, match=r"demo\.gz is truncated or padded: 35 bytes, expected 40"):
        data.decode_idx(raw[:-5], spec_for(raw, (2, 3, 4)))


def test_wrong_magic_is_refused() -> None:
    raw = idx_bytes(np.zeros(5, dtype=np.uint8))
    bad = b"\x00\x00\x0d" + raw[3:]  # 0x0D = float32 IDX
    with pytest.raises(UserError, match="bad magic number"):
        data.decode_idx(bad, spec_for(raw, (5,)))


def test_wrong_shape_is_refused() -> None:
    raw = idx_bytes(np.zeros(6, dtype=np.uint8))
    with pytest.raises(UserError, match=r"has shape \(6,\), expected \(5,\)"):
        data.decode_idx(raw, spec_for(raw, (5,)))


def test_wrong_checksum_is_refused() -> None:
    raw = idx_bytes(np.zeros(5, dtype=np.uint8))
    flipped = raw[:-1] + b"\x01"
    with pytest.raises(UserError, match=r"has md5 [0-9a-f]{32}, expected [0-9a-f]{32} \(corrupted or altered\)"):
        data.decode_idx(flipped, spec_for(raw, (5,)))


def test_damaged_gzip_is_refused() -> None:
    blob = gzip.compress(idx_bytes(np.zeros(500, dtype=np.uint8)))
    with pytest.raises(UserError, match="damaged gzip file"):
        data.decompress(blob[: len(blob) // 2], SPEC, "here")


def test_pixel_transform_round_trips_exactly() -> None:
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16).repeat(3, 1, 1)
    pixels = torch.nn.functional.pad(pixels, (6, 6, 6, 6))
    model_input = to_model(pixels)
    assert model_input.shape == (3, 1, 28, 28)
    assert model_input.min() == -1.0 and model_input.max() == 1.0
    assert torch.equal(from_model(model_input), pixels)
    assert torch.equal(from_model(torch.tensor([[[[-5.0, 5.0]]]])), torch.tensor([[[0, 255]]], dtype=torch.uint8))


def test_to_model_refuses_floats() -> None:
    with pytest.raises(TypeError):
        to_model(torch.zeros(1, 28, 28))


def test_prepared_round_trip(tmp_path: Path) -> None:
    mnist = synthetic_mnist()
    save_prepared(mnist, tmp_path / "m.npz")
    loaded = load_prepared(tmp_path / "m.npz")
    for key in data.PREPARED_KEYS:
        np.testing.assert_array_equal(getattr(loaded, key), getattr(mnist, key))
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]  # no temp file left behind


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_damaged_prepared_dataset_is_a_user_error(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "m.npz"
    save_prepared(synthetic_mnist(), path)
    blob = bytearray(path.read_bytes())
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "flip":
        blob[len(blob) // 2] ^= 0xFF
    else:
        blob = bytearray(b"not a zip file at all")
    path.write_bytes(bytes(blob))
    with pytest.raises(UserError, match=r"prepared dataset .* (is damaged|has a malformed)"):
        load_prepared(path)


def test_missing_prepared_dataset(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="run `dvc repro prepare` first"):
        load_prepared(tmp_path / "absent.npz")
