"""Tests for the `reference` stage: the pure function and the CLI end to end on small data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.data import save_prepared
from pipeline.errors import UserError
from pipeline.files import sha256_file
from pipeline.params import EvaluateParams
from pipeline.scoring.frozen_classifier import Classifier, save_classifier
from pipeline.scoring.scorer import load_reference
from pipeline.stages.reference import build_reference
from tests.conftest import CPU, leave_kill_leftovers, run_cli, synthetic_mnist

SMALL = EvaluateParams(n_samples=40, batch_size=16, kid_subsets=5, kid_subset_size=20, is_splits=2, prdc_k=3)


def _random_classifier(feature_dim: int = 16) -> Classifier:
    torch.manual_seed(0)  # a random-init classifier is enough for plumbing
    return Classifier(feature_dim).eval()


def test_build_reference_is_deterministic_and_shaped() -> None:
    model, mnist = _random_classifier(), synthetic_mnist(n_train=120, n_test=64)
    ref, floor = build_reference(model, "a" * 64, mnist, SMALL, CPU)
    assert ref.features.shape == (64, 16) and ref.mean.shape == (16,) and ref.cov.shape == (16, 16)
    assert ref.classifier_sha256 == "a" * 64 and ref.label_distribution.sum() == pytest.approx(1.0)
    assert sum(floor["class_counts"]) == 40
    assert build_reference(model, "a" * 64, mnist, SMALL, CPU)[1] == floor
    other_seed = build_reference(model, "a" * 64, mnist, SMALL.model_copy(update={"seed": 7}), CPU)[1]
    assert other_seed["fid"] != floor["fid"]


def test_build_reference_refuses_more_samples_than_images() -> None:
    with pytest.raises(UserError, match=r"evaluate.n_samples=500 exceeds the 120 real training images"):
        too_many = SMALL.model_copy(update={"n_samples": 500})
        build_reference(_random_classifier(), "", synthetic_mnist(120, 64), too_many, CPU)


@pytest.fixture
def stage_dir(tmp_path: Path) -> Path:
    save_prepared(synthetic_mnist(n_train=400, n_test=300), tmp_path / "data/prepared/mnist.npz")
    save_classifier(_random_classifier(), tmp_path / "models/classifier-mnist.pt")
    params = {
        "classifier": {"feature_dim": 16},
        "evaluate": {"n_samples": 300, "batch_size": 128, "fid_resamples": 10, "kid_subsets": 10, "kid_subset_size": 100},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def test_stage_end_to_end(stage_dir: Path) -> None:
    stale = leave_kill_leftovers(stage_dir / "data/reference/.mnist.npz.k1ll.tmp",
                                 stage_dir / "metrics/.reference.json.k1ll.tmp")  # fmt: skip
    result = run_cli(["reference"], cwd=stage_dir)
    assert result.returncode == 0, result.stderr
    assert not any(path.exists() for path in stale)
    assert "real-vs-real floor" in result.stdout and "fid" in result.stdout
    sha = sha256_file(stage_dir / "models/classifier-mnist.pt")
    ref = load_reference(stage_dir / "data/reference/mnist.npz")
    assert ref.features.shape == (300, 16) and ref.classifier_sha256 == sha
    metrics = json.loads((stage_dir / "metrics/reference.json").read_text())
    assert metrics["classifier_sha256"] == sha and metrics["n_samples"] == 300 and metrics["seed"] == 1234
    assert metrics["feature_dim"] == 16
    assert {"fid", "kid_mean", "is_mean", "precision", "numpy", "scipy", "torch"} <= set(metrics)

    # The stage is a pure function of its inputs: the same features again, bit for bit.
    assert run_cli(["reference"], cwd=stage_dir).returncode == 0
    again = load_reference(stage_dir / "data/reference/mnist.npz")
    np.testing.assert_array_equal(again.features, ref.features)


def test_stage_refuses_a_damaged_classifier(stage_dir: Path) -> None:
    weights = stage_dir / "models/classifier-mnist.pt"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = run_cli(["reference"], cwd=stage_dir)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "models/classifier-mnist.pt are damaged" in result.stderr
    assert not (stage_dir / "data/reference").exists() and not (stage_dir / "metrics").exists()
