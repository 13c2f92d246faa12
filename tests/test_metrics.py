"""Tests for pipeline.metrics: closed forms, independent implementations, input checks."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import torch
from torchmetrics.image.fid import _compute_fid
from torchmetrics.image.kid import poly_mmd

from pipeline.metrics import (
    MetricInputError,
    class_report,
    feature_stats,
    fid,
    frechet_distance,
    inception_score,
    kid,
    prdc,
)


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _two_feature_sets(rng: np.random.Generator, n: int = 1000, d: int = 64) -> tuple[np.ndarray, np.ndarray]:
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / np.sqrt(d)
    b = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / np.sqrt(d) + 0.3
    return a, b


# --- FID ---------------------------------------------------------------------------------


def test_frechet_distance_diagonal_closed_form() -> None:
    rng = np.random.default_rng(0)
    d = 50
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2.0 * np.sqrt(a * b))
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_non_commuting_matches_sqrtm() -> None:
    rng = np.random.default_rng(1)
    d = 40
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    c1, c2 = _random_spd(rng, d), _random_spd(rng, d)
    assert not np.allclose(c1 @ c2, c2 @ c1)
    tr_covmean = np.trace(scipy.linalg.sqrtm(c1 @ c2)).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2.0 * tr_covmean
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-8)


def test_fid_of_samples_approaches_population_value() -> None:
    rng = np.random.default_rng(2)
    d = 4
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    c1, c2 = _random_spd(rng, d), _random_spd(rng, d)
    a = rng.multivariate_normal(mu1, c1, size=50_000)
    b = rng.multivariate_normal(mu2, c2, size=50_000)
    assert fid(a, b) == pytest.approx(frechet_distance(mu1, c1, mu2, c2), rel=0.05)


def test_fid_identical_features_is_zero() -> None:
    a, _ = _two_feature_sets(np.random.default_rng(3))
    scale = np.trace(np.cov(a, rowvar=False))
    assert 0.0 <= fid(a, a) < 1e-8 * scale


# Penultimate features are often a linear map of fewer ReLU units than they have dimensions:
# their covariance has exact null directions, which numerical square roots turn into round-off
# far above eps. OpenBLAS picks its kernels by CPU type (OPENBLAS_CORETYPE pins one), and each
# kernel rounds differently, so the check runs in fresh processes under each setting.
RANK_DEFICIENT_SELF_FID = """
import numpy as np
from pipeline.metrics import feature_stats, frechet_distance
rng = np.random.default_rng(0)
hidden = np.maximum(rng.standard_normal((10000, 64)) @ rng.standard_normal((64, 96)), 0.0)
features = hidden @ np.abs(rng.standard_normal((96, 128)))  # rank 96 in 128 dimensions
mean, cov = feature_stats(features)
print(frechet_distance(mean, cov, mean, cov) / np.trace(cov))
"""


@pytest.mark.parametrize("coretype", [None, "Haswell", "Sandybridge"])
def test_fid_of_identical_rank_deficient_features_is_zero_under_each_openblas_kernel(coretype: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    if coretype is not None:
        env["OPENBLAS_CORETYPE"] = coretype
    result = subprocess.run([sys.executable, "-c", RANK_DEFICIENT_SELF_FID], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr  # the old formula raised "came out negative" here
    assert 0.0 <= float(result.stdout) < 1e-13


def test_frechet_distance_refuses_covariances_that_are_not_psd() -> None:
    mean = np.zeros(3)
    with pytest.raises(MetricInputError, match="came out negative"):
        frechet_distance(mean, np.diag([1.0, 1.0, -5.0]), mean, np.diag([1.0, 1.0, 1.0]))


def test_fid_matches_torchmetrics() -> None:
    a, b = _two_feature_sets(np.random.default_rng(4))
    (mu1, c1), (mu2, c2) = feature_stats(a), feature_stats(b)
    assert mu1.dtype == c1.dtype == np.float64
    np.testing.assert_allclose(c1, torch.cov(torch.from_numpy(a).T).numpy(), rtol=1e-10, atol=1e-12)
    t = [torch.from_numpy(x) for x in (mu1, c1, mu2, c2)]
    expected = float(_compute_fid(*t))
    assert fid(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-6)


# --- input checks ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [100, 128, 200])
def test_too_few_samples_refused_with_n_and_dim(n: int) -> None:
    feats = np.random.default_rng(5).normal(size=(n, 128))
    with pytest.raises(MetricInputError) as info:
        feature_stats(feats)
    assert f"N={n}" in str(info.value) and "128-dimensional" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_two_times_dim_samples_accepted() -> None:
    mu, cov = feature_stats(np.random.default_rng(6).normal(size=(256, 128)))
    assert mu.shape == (128,) and cov.shape == (128, 128)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_features_refused(bad: float) -> None:
    a = np.random.default_rng(7).normal(size=(300, 8))
    b = a.copy()
    b[3, 2] = bad
    with pytest.raises(MetricInputError, match="NaN"):
        fid(a, b)
    with pytest.raises(MetricInputError):
        kid(a, b)
    with pytest.raises(MetricInputError):
        prdc(a, b)


def test_shape_errors_refused() -> None:
    rng = np.random.default_rng(8)
    with pytest.raises(MetricInputError, match="differ"):
        fid(rng.normal(size=(100, 8)), rng.normal(size=(100, 9)))
    with pytest.raises(MetricInputError, match="2-D"):
        feature_stats(rng.normal(size=100))
    with pytest.raises(MetricInputError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# --- KID ---------------------------------------------------------------------------------


def test_kid_full_set_matches_torchmetrics_and_brute_force() -> None:
    a, b = _two_feature_sets(np.random.default_rng(9), n=60, d=8)
    # One subset of size N is a permutation of each set; unbiased MMD^2 ignores order.
    mean, std = kid(a, b, subsets=1, subset_size=10_000)
    expected = float(poly_mmd(torch.from_numpy(a), torch.from_numpy(b)))
    assert mean == pytest.approx(expected, rel=1e-10) and std == 0.0

    m, d = a.shape
    k = lambda x, y: (float(x @ y) / d + 1.0) ** 3  # noqa: E731
    xx = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(a[i], b[j]) for i in range(m) for j in range(m)) / (m * m)
    assert mean == pytest.approx(xx + yy - 2.0 * xy, rel=1e-10)


def test_kid_subsets_match_torchmetrics_per_subset() -> None:
    a, b = _two_feature_sets(np.random.default_rng(10), n=300, d=16)
    b = b[:250]  # unequal sizes: subsets use min(subset_size, N_a, N_b)
    rng = np.random.default_rng(3)
    scores = []
    for _ in range(7):
        ia = rng.choice(len(a), 50, replace=False)
        ib = rng.choice(len(b), 50, replace=False)
        scores.append(float(poly_mmd(torch.from_numpy(a[ia]), torch.from_numpy(b[ib]))))
    mean, std = kid(a, b, subsets=7, subset_size=50, seed=3)
    assert mean == pytest.approx(np.mean(scores), rel=1e-10)
    assert std == pytest.approx(np.std(scores), rel=1e-10)
    assert kid(a, b, subsets=7, subset_size=50, seed=3) == (mean, std)


def test_kid_same_distribution_near_zero_shifted_positive() -> None:
    rng = np.random.default_rng(11)
    a, b = rng.normal(size=(2000, 16)), rng.normal(size=(2000, 16))
    same, same_std = kid(a, b, subsets=20, subset_size=500)
    shifted, _ = kid(a, b + 1.0, subsets=20, subset_size=500)
    assert abs(same) < 3 * same_std + 1e-3
    assert shifted > 100 * abs(same)


# --- Inception score ---------------------------------------------------------------------


def test_inception_score_uniform_confident_is_num_classes() -> None:
    probs = np.eye(10)[np.arange(1000) % 10]
    mean, std = inception_score(probs, splits=10)
    assert mean == pytest.approx(10.0, rel=1e-6) and std < 1e-6


def test_inception_score_single_class_is_one() -> None:
    probs = np.zeros((500, 10))
    probs[:, 3] = 1.0
    mean, std = inception_score(probs)
    assert mean == pytest.approx(1.0, abs=1e-6) and std < 1e-9


def test_inception_score_refuses_non_probabilities() -> None:
    with pytest.raises(MetricInputError, match="softmax"):
        inception_score(np.random.default_rng(12).normal(size=(100, 10)))


# --- class report ------------------------------------------------------------------------


def test_class_report_single_digit() -> None:
    probs = np.full((400, 10), 0.01)
    probs[:, 7] = 0.91
    report = class_report(probs, np.full(10, 0.1))
    assert report["counts"] == [0] * 7 + [400] + [0] * 2
    assert report["classes_covered"] == 1
    assert report["kl_divergence"] > 2.0  # ~ln(10)
    assert report["mean_confidence"] == pytest.approx(0.91)


def test_class_report_balanced() -> None:
    probs = np.eye(10)[np.arange(1000) % 10]
    report = class_report(probs, np.full(10, 100))  # counts are normalised too
    assert report["classes_covered"] == 10
    assert report["kl_divergence"] == pytest.approx(0.0, abs=1e-9)
    assert report["fractions"] == pytest.approx([0.1] * 10)
    assert report["mean_confidence"] == pytest.approx(1.0)


def test_class_report_class_missing_from_reference_is_large_but_finite() -> None:
    probs = np.eye(10)[np.arange(1000) % 10]
    ref = np.r_[np.zeros(1), np.full(9, 1 / 9)]
    kl = class_report(probs, ref)["kl_divergence"]
    assert np.isfinite(kl) and kl > 1.0


# --- PRDC --------------------------------------------------------------------------------


def _prdc_naive(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """Straight transcription of Naeem et al. with full distance matrices."""
    d_rr = scipy.spatial.distance.cdist(real, real)
    d_ff = scipy.spatial.distance.cdist(fake, fake)
    d_rf = scipy.spatial.distance.cdist(real, fake)
    r_real = np.sort(d_rr, axis=1)[:, k]  # column 0 is the point itself
    r_fake = np.sort(d_ff, axis=1)[:, k]
    return {
        "precision": float((d_rf < r_real[:, None]).any(axis=0).mean()),
        "recall": float((d_rf < r_fake[None, :]).any(axis=1).mean()),
        "density": float((d_rf < r_real[:, None]).sum() / (k * len(fake))),
        "coverage": float((d_rf.min(axis=1) < r_real).mean()),
    }


def test_prdc_chunked_matches_naive() -> None:
    rng = np.random.default_rng(13)
    real = rng.normal(size=(300, 6))
    fake = rng.normal(size=(250, 6)) * 1.3 + 0.2
    got = prdc(real, fake, k=5, chunk=37)
    want = _prdc_naive(real, fake, k=5)
    assert got == pytest.approx(want, abs=1e-12)


def test_prdc_same_distribution_near_one() -> None:
    rng = np.random.default_rng(14)
    real, fake = rng.normal(size=(2000, 8)), rng.normal(size=(2000, 8))
    scores = prdc(real, fake)
    assert scores["precision"] > 0.9 and scores["recall"] > 0.9 and scores["coverage"] > 0.9
    assert scores["density"] == pytest.approx(1.0, abs=0.15)


def test_prdc_far_away_fake_scores_zero() -> None:
    rng = np.random.default_rng(15)
    real, fake = rng.normal(size=(1000, 8)), rng.normal(size=(1000, 8)) + 50.0
    scores = prdc(real, fake)
    assert scores == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_prdc_refuses_k_too_large() -> None:
    rng = np.random.default_rng(16)
    with pytest.raises(MetricInputError, match="k="):
        prdc(rng.normal(size=(5, 3)), rng.normal(size=(10, 3)), k=5)
