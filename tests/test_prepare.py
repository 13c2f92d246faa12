from __future__ import annotations

import functools
import http.server
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline import data
from pipeline.data import load_prepared
from pipeline.errors import UserError
from pipeline.params import Params, PrepareParams
from pipeline.stages.prepare import prepare
from tests.conftest import ROOT, run_cli, shared_mnist_dir

UNREACHABLE = ["http://127.0.0.1:9/mnist/"]


def prepare_mnist(params: PrepareParams, raw: Path, mirror: str | None):  # type: ignore[no-untyped-def]
    """The prepare stage's core for MNIST with these mirror params and MNIST_MIRROR=`mirror`."""
    return prepare(Params(prepare=params), raw, {"MNIST_MIRROR": mirror} if mirror else {})  # the discard port on loopback: refused at once


@pytest.fixture
def http_mirror(tiny_idx_dir: Path) -> Iterator[str]:
    """Serve the tiny mirror over HTTP on loopback (no real network)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tiny_idx_dir))
    handler.log_message = lambda *args, **kwargs: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_prepare_from_mirror_directory(mnist_mirror: Path, tmp_path: Path) -> None:
    mnist, summary = prepare_mnist(PrepareParams(mirrors=UNREACHABLE), tmp_path / "raw", str(mnist_mirror))
    assert summary["train"]["count"] == mnist.train_images.shape[0] == data.MNIST.files["train_images"].shape[0]
    assert sum(summary["test"]["per_class"].values()) == summary["test"]["count"]
    assert mnist.train_images.dtype == np.uint8
    if shared_mnist_dir() is not None and mnist_mirror == shared_mnist_dir():
        assert summary["train"]["per_class"]["1"] == 6742 and summary["test"]["per_class"]["0"] == 980


def test_raw_dir_wins_over_mirror(tiny_idx_dir: Path, tmp_path: Path) -> None:
    mnist, _ = prepare_mnist(PrepareParams(mirrors=UNREACHABLE), tiny_idx_dir, mirror=str(tmp_path / "does-not-exist"))
    assert mnist.train_images.shape == (40, 28, 28)


def test_download_is_verified_then_cached(http_mirror: str, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    prepare_mnist(PrepareParams(mirrors=UNREACHABLE + [http_mirror]), raw, mirror=None)
    assert sorted(p.name for p in raw.iterdir()) == sorted(s.name for s in data.MNIST.files.values())
    prepare_mnist(PrepareParams(mirrors=UNREACHABLE), raw, mirror=None)  # now served from the cache


def test_mirror_url(http_mirror: str, tmp_path: Path) -> None:
    mnist, _ = prepare_mnist(PrepareParams(mirrors=UNREACHABLE), tmp_path / "raw", mirror=http_mirror)
    assert mnist.test_labels.shape == (20,)


def test_no_network_and_no_copy_says_how_to_supply(tiny_idx_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"cannot download train-images.*put the four official MNIST \.gz files"):
        prepare_mnist(PrepareParams(mirrors=UNREACHABLE, timeout_s=2), tmp_path / "raw", mirror=None)
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())


def test_corrupt_download_is_not_cached(tiny_idx_dir: Path, http_mirror: str, tmp_path: Path) -> None:
    target = tiny_idx_dir / data.MNIST.files["test_labels"].name
    target.write_bytes(target.read_bytes()[:-3])  # truncated gzip stream
    with pytest.raises(UserError, match=r"t10k-labels-idx1-ubyte\.gz from http://.* damaged gzip"):
        prepare_mnist(PrepareParams(mirrors=[http_mirror]), tmp_path / "raw", mirror=None)
    assert not (tmp_path / "raw" / target.name).exists()


def test_cli_writes_outputs_and_a_bad_file_keeps_the_old_ones(tmp_path: Path, mnist_mirror: Path) -> None:
    if mnist_mirror != shared_mnist_dir():
        pytest.skip("the CLI reads the real checksums; needs the offline MNIST copy")
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    env = dict(os.environ, MNIST_MIRROR=str(mnist_mirror))
    result = run_cli(["prepare"], cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    prepared = tmp_path / "data/prepared/mnist.npz"
    before = prepared.read_bytes()
    assert load_prepared(prepared).train_images.shape == (60000, 28, 28)
    counts = json.loads((tmp_path / "metrics/data.json").read_text())
    assert counts["test"]["count"] == 10000

    # A corrupted file in data/raw/mnist: clear error, exit 2, the good outputs stay.
    raw = tmp_path / "data/raw/mnist"
    raw.mkdir(parents=True)
    for spec in data.MNIST.files.values():
        (raw / spec.name).write_bytes((mnist_mirror / spec.name).read_bytes())
    blob = bytearray((raw / "t10k-images-idx3-ubyte.gz").read_bytes())
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(bytes(blob[: len(blob) - 1000]))
    result = run_cli(["prepare"], cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert "t10k-images-idx3-ubyte.gz from data/raw/mnist is a damaged gzip file" in result.stderr
    assert "Traceback" not in result.stderr
    assert prepared.read_bytes() == before
    assert not [p for p in prepared.parent.iterdir() if p.name != "mnist.npz"]
