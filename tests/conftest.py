"""Shared fixtures: MNIST sources that never touch the network, tiny datasets, a repo copy."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import data
from pipeline.data import IdxFile, Mnist

ROOT = Path(__file__).resolve().parents[1]


def shared_mnist_dir() -> Path | None:
    """The offline MNIST copy (MNIST_MIRROR or ../shared/data/mnist), if this machine has one."""
    for candidate in (os.environ.get("MNIST_MIRROR"), ROOT.parent / "shared" / "data" / "mnist"):
        if candidate and "://" not in str(candidate) and (Path(candidate) / "t10k-labels-idx1-ubyte.gz").is_file():
            return Path(candidate)
    return None


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX file."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def synthetic_mnist(n_train: int = 256, n_test: int = 64, seed: int = 0) -> Mnist:
    """Random digits-shaped data: enough to exercise shapes, files and determinism."""
    rng = np.random.default_rng(seed)
    return Mnist(
        train_images=rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        train_labels=np.arange(n_train, dtype=np.int64) % 10,
        test_images=rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        test_labels=np.arange(n_test, dtype=np.int64) % 10,
    )


@pytest.fixture
def tiny_idx_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A mirror directory with small, valid IDX files; the checksums are patched to match."""
    mirror = tmp_path / "tiny-mirror"
    mirror.mkdir()
    mnist = synthetic_mnist(n_train=40, n_test=20)
    specs = {}
    for key, spec in data.MNIST_FILES.items():
        array = getattr(mnist, key).astype(np.uint8)
        raw = idx_bytes(array)
        (mirror / spec.name).write_bytes(gzip.compress(raw))
        specs[key] = IdxFile(spec.name, hashlib.md5(raw).hexdigest(), array.shape)
    monkeypatch.setattr(data, "MNIST_FILES", specs)
    return mirror


@pytest.fixture
def mnist_mirror(request: pytest.FixtureRequest) -> Path:
    """The real offline MNIST when present, else the tiny patched mirror."""
    shared = shared_mnist_dir()
    return shared if shared is not None else request.getfixturevalue("tiny_idx_dir")


def copy_project(dst: Path, with_git: bool = True) -> Path:
    """What a fresh clone of this working tree holds, in `dst`, as a git repo with one commit."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split("\0")  # fmt: skip
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file() and not name.startswith(("tests/", "benchmarks/")):
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    if with_git:
        env = git_env()
        for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "init"]):
            subprocess.run(cmd, cwd=dst, check=True, env=env)
    return dst


def git_env() -> dict[str, str]:
    """Environment with a committer identity, so tests never depend on the machine's git config."""
    env = dict(os.environ)
    env.update(
        GIT_AUTHOR_NAME="pipeline tests",
        GIT_AUTHOR_EMAIL="tests@example.invalid",
        GIT_COMMITTER_NAME="pipeline tests",
        GIT_COMMITTER_EMAIL="tests@example.invalid",
    )
    return env


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `python -m pipeline ...` in a subprocess, as a user would."""
    full_env = dict(os.environ if env is None else env)
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
