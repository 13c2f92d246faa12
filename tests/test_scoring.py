"""Tests for pipeline.scoring (frozen_classifier, scorer): safe weight loading, batch-independent features, the reference, score()."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import MNIST, Dataset, fetch_dataset, from_model, load_prepared
from pipeline.errors import UserError
from pipeline.files import sha256_file
from pipeline.params import EvaluateParams
from pipeline.scoring.frozen_classifier import Classifier, classify, load_classifier, save_classifier
from pipeline.scoring.scorer import Reference, compute_reference, load_reference, save_reference, score
from tests.conftest import CPU, ROOT, Payload, shared_mnist_dir, synthetic_mnist

COMMITTED = ROOT / "models/classifier-mnist.pt"
SCORE_KEYS = {
    "fid", "fid_low", "fid_high", "kid_mean", "kid_std", "is_mean", "is_std", "class_kl", "classes_covered", "mean_confidence",
    "precision", "recall", "density", "coverage", "class_counts",
}  # fmt: skip


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "models/classifier-mnist.pt"
    save_classifier(Classifier(16), path)
    return path


# --- the classifier file ---------------------------------------------------------------


def test_save_load_roundtrip(weights: Path) -> None:
    model, sha = load_classifier(weights, 16, CPU)
    assert sha == sha256_file(weights)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert not [p for p in weights.parent.iterdir() if p.name != "classifier-mnist.pt"]  # no temp files left
    save_classifier(model, weights.with_name("again.pt"))  # same weights, same bytes: the hash is stable
    assert sha256_file(weights.with_name("again.pt")) == sha


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage", "empty"])
def test_load_refuses_damaged_files(weights: Path, damage: str) -> None:
    blob = weights.read_bytes()
    if damage == "missing":
        weights.unlink()
    else:
        damaged = {"truncated": blob[: len(blob) // 2], "garbage": os.urandom(4096), "empty": b""}
        weights.write_bytes(damaged[damage])
    with pytest.raises(UserError, match=rf"classifier weights {weights} .*dvc repro classifier"):
        load_classifier(weights, 16, CPU)


def test_load_refuses_other_feature_dim(weights: Path) -> None:
    with pytest.raises(UserError, match=r"do not fit a Classifier with feature_dim=32"):
        load_classifier(weights, 32, CPU)


@pytest.mark.parametrize("wrapping", ["torch.save", "bare pickle", "state_dict entry"])
def test_load_never_executes_pickled_objects(tmp_path: Path, wrapping: str) -> None:
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    if wrapping == "torch.save":
        torch.save(Payload(marker), path)
    elif wrapping == "bare pickle":
        path.write_bytes(pickle.dumps(Payload(marker)))
    else:
        state = dict(Classifier(16).state_dict())
        state["head.bias"] = Payload(marker)  # type: ignore[assignment]
        torch.save(state, path)
    with pytest.raises(UserError, match=r"not a plain weights file"):
        load_classifier(path, 16, CPU)
    assert not marker.exists()


def test_load_refuses_non_tensor_values(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    torch.save({"body.0.weight": 1.0}, path)  # allowed by weights_only, but not weights
    with pytest.raises(UserError, match=r"not a state_dict of tensors"):
        load_classifier(path, 16, CPU)


# --- classify ---------------------------------------------------------------------------


def test_classify_is_independent_of_batch_size_and_input_type(weights: Path) -> None:
    model, _ = load_classifier(weights, 16, CPU)
    images = synthetic_mnist(n_train=50, n_test=1).train_images
    features, probs = classify(model, images, 50, CPU)
    assert features.shape == (50, 16) and probs.shape == (50, 10) and probs.dtype == np.float64
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-12)
    for batch_size in (1, 7, 1000):
        f, p = classify(model, images, batch_size, CPU)
        np.testing.assert_allclose(f, features, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(p, probs, rtol=1e-5, atol=1e-7)
    f, p = classify(model, torch.from_numpy(images), 50, CPU)  # generator samples arrive as tensors
    np.testing.assert_array_equal(f, features)


def test_the_cpu_scorer_runs_channels_last_to_the_same_features(weights: Path) -> None:
    model, _ = load_classifier(weights, 16, CPU)
    assert model.body[3].weight.is_contiguous(memory_format=torch.channels_last)  # the 32 -> 32 conv
    plain = Classifier(16)
    plain.load_state_dict(torch.load(weights, weights_only=True))
    plain.eval().requires_grad_(False)
    images = synthetic_mnist(n_train=64, n_test=1).train_images
    features, probs = classify(model, images, 32, CPU)
    want_features, want_probs = classify(plain, images, 32, CPU)
    assert plain.body[3].weight.is_contiguous()  # the reference stays NCHW
    np.testing.assert_allclose(features, want_features, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probs, want_probs, rtol=1e-5, atol=1e-9)


def test_generator_outputs_take_the_same_path_as_real_pixels(weights: Path) -> None:
    model, _ = load_classifier(weights, 16, CPU)
    images = synthetic_mnist(n_train=8, n_test=1).train_images
    tanh_out = torch.from_numpy(images).float().div(127.5).sub(1.0).unsqueeze(1)  # what G would emit
    fake_path, real_path = classify(model, from_model(tanh_out), 8, CPU), classify(model, images, 8, CPU)
    np.testing.assert_array_equal(fake_path[0], real_path[0])


def test_classify_rejects_wrong_shape(weights: Path) -> None:
    model, _ = load_classifier(weights, 16, CPU)
    with pytest.raises(UserError, match=r"\(N, 28, 28\)"):
        classify(model, np.zeros((0, 28, 28), np.uint8), 8, CPU)


# --- the reference and score() ----------------------------------------------------------


def _gaussian_reference(rng: np.random.Generator, n: int = 400, d: int = 8) -> Reference:
    return compute_reference(np.abs(rng.normal(size=(n, d))).astype(np.float32), np.arange(n) % 10, "f" * 64)


def test_reference_roundtrip_and_damage(tmp_path: Path) -> None:
    ref = _gaussian_reference(np.random.default_rng(0))
    np.testing.assert_allclose(ref.label_distribution, 0.1)
    path = tmp_path / "data/reference/mnist.npz"
    save_reference(ref, path)
    back = load_reference(path)
    assert back.classifier_sha256 == ref.classifier_sha256
    for name in ("features", "mean", "cov", "label_distribution"):
        np.testing.assert_array_equal(getattr(back, name), getattr(ref, name))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match=rf"reference {path} is damaged.*dvc repro reference"):
        load_reference(path)
    with pytest.raises(UserError, match=r"is missing"):
        load_reference(tmp_path / "nope.npz")


def test_reference_of_another_classifier_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "reference.npz"
    save_reference(_gaussian_reference(np.random.default_rng(0)), path)
    assert load_reference(path, classifier_sha256="f" * 64).classifier_sha256 == "f" * 64
    with pytest.raises(UserError, match=r"with classifier ffffffffffff, not the current 000000000000"):
        load_reference(path, classifier_sha256="0" * 64)


def test_score_keys_and_sanity_on_synthetic_features() -> None:
    rng = np.random.default_rng(1)
    ref = _gaussian_reference(rng)
    params = EvaluateParams(n_samples=400, kid_subsets=10, kid_subset_size=100, is_splits=4, prdc_k=3)
    same = np.abs(rng.normal(size=(400, 8)))
    probs = np.eye(10)[np.arange(400) % 10] * 0.9 + 0.01
    good = score(same, probs, ref, params)
    bad = score(same + 2.0, probs, ref, params)
    assert set(good) == SCORE_KEYS
    json.dumps(good)  # plain Python values only
    assert sum(good["class_counts"]) == 400 and good["classes_covered"] == 10
    assert good["class_kl"] == pytest.approx(0.0, abs=1e-9)
    assert good["is_mean"] == pytest.approx(np.exp((probs[0] * np.log(probs[0] / 0.1)).sum()))
    assert good["fid"] < 0.5 < 10 < bad["fid"]
    assert bad["kid_mean"] > good["kid_mean"] + 10 * good["kid_std"]
    assert good["precision"] > 0.8 > 0.1 > bad["precision"]


# --- with the committed classifier and real MNIST (skip without them) ---------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> tuple[Classifier, Dataset]:
    if not COMMITTED.is_file():
        pytest.skip("needs the committed classifier models/classifier-mnist.pt")
    prepared = ROOT / "data/prepared/mnist.npz"
    if prepared.is_file():
        mnist = load_prepared(prepared)
    elif (mirror := shared_mnist_dir()) is not None:
        mnist = fetch_dataset(MNIST, tmp_path_factory.mktemp("raw"), str(mirror), [], 30.0)
    else:
        pytest.skip("needs real MNIST (data/prepared/mnist.npz or the offline copy)")
    return load_classifier(COMMITTED, Classifier().feature_dim, CPU)[0], mnist


@pytest.fixture(scope="module")
def real_reference(real: tuple[Classifier, Dataset]) -> tuple[np.ndarray, np.ndarray, Reference]:
    """The committed classifier's features and probabilities of the real test set, and its reference."""
    model, mnist = real
    test_features, test_probs = classify(model, mnist.test_images, 1000, CPU)
    return test_features, test_probs, compute_reference(test_features, mnist.test_labels, "committed")


@pytest.mark.slow
def test_real_vs_real_scores_are_near_their_floor(
    real: tuple[Classifier, Dataset], real_reference: tuple[np.ndarray, np.ndarray, Reference]
) -> None:
    (model, mnist), (test_features, test_probs, ref) = real, real_reference
    params = EvaluateParams(n_samples=2000, kid_subsets=20, kid_subset_size=500)
    pick = np.random.default_rng(0).choice(len(mnist.train_images), 2000, replace=False)
    floor = score(*classify(model, mnist.train_images[pick], 1000, CPU), ref, params)
    # FID is in squared feature units: compare it with the features' total variance.
    assert floor["fid"] < 0.01 * np.trace(ref.cov)
    assert abs(floor["kid_mean"]) < 3 * floor["kid_std"]
    assert floor["classes_covered"] == 10 and floor["class_kl"] < 0.01 and floor["mean_confidence"] > 0.98
    assert min(floor["precision"], floor["recall"], floor["density"]) > 0.85  # coverage needs N ~ reference N
    # The classifier is confident and the test set balanced: IS is close to its maximum of 10.
    assert score(test_features, test_probs, ref, EvaluateParams(kid_subsets=2))["is_mean"] > 9.5


@pytest.mark.slow
def test_noise_and_single_digit_samples_score_as_they_should(
    real: tuple[Classifier, Dataset], real_reference: tuple[np.ndarray, np.ndarray, Reference]
) -> None:
    (model, mnist), (_, _, ref) = real, real_reference
    params = EvaluateParams(n_samples=1000, kid_subsets=10, kid_subset_size=500)
    noise = np.random.default_rng(0).integers(0, 256, (1000, 28, 28), dtype=np.uint8)
    noisy = score(*classify(model, noise, 1000, CPU), ref, params)
    real_train = score(*classify(model, mnist.train_images[:1000], 1000, CPU), ref, params)
    assert noisy["fid"] > 50 * real_train["fid"] and noisy["precision"] < 0.01
    ones = mnist.train_images[mnist.train_labels == 1][:1000]
    single = score(*classify(model, ones, 1000, CPU), ref, params)
    assert single["classes_covered"] == 1 and single["class_kl"] > 2.0
