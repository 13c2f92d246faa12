"""Tests for the `classifier` stage: augmentation, determinism, learning, and the min_accuracy gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.data import Dataset, save_prepared
from pipeline.files import sha256_file
from pipeline.params import ClassifierParams
from pipeline.scoring.frozen_classifier import load_classifier
from pipeline.stages.classifier import random_shift, train_classifier
from tests.conftest import CPU, leave_kill_leftovers, run_cli, synthetic_mnist

TINY = ClassifierParams(epochs=1, batch_size=16, feature_dim=16)


def squares_mnist(n_train: int = 400, n_test: int = 100) -> Dataset:
    """A trivially learnable set: digit c is a white 6x6 square at a position of its own."""
    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(n, dtype=np.int64) % 10
        images = np.zeros((n, 28, 28), np.uint8)
        for i, c in enumerate(labels):
            row, col = 3 + 8 * (c // 3), 3 + 8 * (c % 3)
            images[i, row : row + 6, col : col + 6] = 255
        return images, labels

    (train_x, train_y), (test_x, test_y) = make(n_train), make(n_test)
    return Dataset(train_x, train_y, test_x, test_y)


def test_random_shift_moves_content_within_bounds() -> None:
    x = -torch.ones(64, 1, 28, 28)
    x[:, 0, 14, 14] = 1.0  # one bright pixel in the middle
    out = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    rows, cols = (out[:, 0] == 1.0).nonzero()[:, 1:].T
    assert len(rows) == 64 and rows.sub(14).abs().max() == 2 and cols.sub(14).abs().max() == 2
    assert torch.equal(random_shift(x, 0, torch.Generator()), x)


def test_training_is_deterministic_on_cpu() -> None:
    mnist = synthetic_mnist(n_train=64, n_test=32)
    (a, report_a), (b, report_b) = (train_classifier(TINY, mnist, CPU) for _ in range(2))
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert report_a["test_loss"] == report_b["test_loss"]


def test_training_learns_a_separable_problem() -> None:
    params = ClassifierParams(epochs=2, batch_size=32, feature_dim=16)
    _, report = train_classifier(params, squares_mnist(), CPU)
    assert report["test_accuracy"] > 0.9 and report["epochs"] == 2


def _stage_dir(tmp_path: Path, min_accuracy: float) -> Path:
    save_prepared(synthetic_mnist(n_train=64, n_test=32), tmp_path / "data/prepared/mnist.npz")
    classifier = {"epochs": 1, "batch_size": 32, "feature_dim": 16, "min_accuracy": min_accuracy}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"classifier": classifier}))
    return tmp_path


def test_stage_below_min_accuracy_writes_nothing(tmp_path: Path) -> None:
    result = run_cli(["classifier"], cwd=_stage_dir(tmp_path, min_accuracy=0.999))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: the classifier reached test accuracy 0.")
    assert "below classifier.min_accuracy 0.999" in result.stderr
    assert not (tmp_path / "models").exists() and not (tmp_path / "metrics").exists()


@pytest.mark.slow
def test_stage_writes_weights_and_metrics(tmp_path: Path) -> None:
    stale = leave_kill_leftovers(tmp_path / "models/.classifier-mnist.pt.k1ll.tmp",
                                 tmp_path / "metrics/.classifier.json.k1ll.tmp")  # fmt: skip
    result = run_cli(["classifier"], cwd=_stage_dir(tmp_path, min_accuracy=0.0))
    assert result.returncode == 0, result.stderr
    assert not any(path.exists() for path in stale)
    assert "epoch 1/1" in result.stdout
    metrics = json.loads((tmp_path / "metrics/classifier.json").read_text())
    weights = tmp_path / "models/classifier-mnist.pt"
    assert metrics["sha256"] == sha256_file(weights) == load_classifier(weights, 16, CPU)[1]
    assert metrics["feature_dim"] == 16 and metrics["epochs"] == 1 and 0.0 <= metrics["test_accuracy"] <= 1.0
    assert {"test_loss", "seconds", "torch"} <= set(metrics)
    # Same params on CPU: the same weights, byte for byte (the hash DVC and every score record).
    assert run_cli(["classifier"], cwd=tmp_path).returncode == 0
    assert sha256_file(weights) == metrics["sha256"]
