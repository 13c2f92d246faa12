"""`dvc repro` end to end in a fresh git repository holding a copy of the project."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import copy_project, git_env, shared_mnist_dir

pytestmark = pytest.mark.slow


def dvc(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    mirror = shared_mnist_dir()
    if mirror is None:
        pytest.skip("needs the offline MNIST copy (MNIST_MIRROR or ../shared/data/mnist)")
    repo = copy_project(tmp_path / "repo")
    env = git_env()
    # Stages run `python -m pipeline`: make `python` this interpreter, as an activated venv does.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    env["MNIST_MIRROR"] = str(mirror)
    env.pop("MLFLOW_TRACKING_URI", None)
    return repo, env


def test_repro_prepare_twice_second_is_a_no_op(project: tuple[Path, dict[str, str]]) -> None:
    repo, env = project
    first = dvc(["repro", "prepare"], repo, env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert (repo / "data/prepared/mnist.npz").is_file()
    assert (repo / "metrics/data.json").is_file()
    second = dvc(["repro", "prepare"], repo, env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Running stage" not in second.stdout
    assert "up to date" in second.stdout
