"""Tests for pipeline.scoring.metrics: closed forms, independent implementations, input checks."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import torch

from pipeline.scoring import metrics
from pipeline.scoring.metrics import (
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


def test_frechet_distance_with_the_reference_root_kept_is_the_same_number() -> None:
    """fid_with_interval keeps the square root of the reference's covariance for all its resamples."""
    rng = np.random.default_rng(5)
    mu1, mu2, c1, c2 = rng.normal(size=12), rng.normal(size=12), _random_spd(rng, 12), _random_spd(rng, 12)
    assert frechet_distance(mu1, c1, mu2, c2, metrics._sqrt_psd(c2)) == frechet_distance(mu1, c1, mu2, c2)


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


def test_the_fid_interval_is_a_bootstrap_of_the_samples_by_hand() -> None:
    """The interval is the FID ± 1.96 sd of the FIDs of resamples drawn with replacement, as written out here
    with scipy's sqrtm in float64 (the code sums the resamples' covariances in float32)."""
    rng = np.random.default_rng(4)
    a, b = _two_feature_sets(rng, n=400, d=16)
    mu, cov = feature_stats(b)
    centre, low, high = metrics.fid_with_interval(a, mu, cov, resamples=30, seed=9)
    assert centre == fid(a, b)
    draws = np.random.default_rng(9)
    by_hand = []
    for _ in range(30):
        counts = np.bincount(draws.integers(0, len(a), len(a)), minlength=len(a))
        m = counts @ a / len(a)
        c = ((a - m) * counts[:, None]).T @ (a - m) / (len(a) - 1)
        root = scipy.linalg.sqrtm(c @ cov).real
        by_hand.append((m - mu) @ (m - mu) + np.trace(c) + np.trace(cov) - 2 * np.trace(root))
    half = 1.959964 * np.std(by_hand, ddof=1)
    assert (low, high) == pytest.approx((centre - half, centre + half), rel=1e-5)
    assert metrics.fid_with_interval(a, mu, cov, resamples=30, seed=9) == (centre, low, high)  # seeded


def test_the_fid_interval_covers_the_spread_of_independent_draws() -> None:
    """The bootstrap's sd estimates how the FID moves from one draw of N samples to the next: against 40
    independent draws from the same Gaussian it agrees within the noise of the two estimates."""
    rng = np.random.default_rng(5)
    d, n = 8, 2000
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    reference = rng.normal(size=(20_000, d)) @ mixing
    mu, cov = feature_stats(reference)

    def sample() -> np.ndarray:
        return rng.normal(size=(n, d)) @ (1.3 * mixing) + 0.2

    spread = np.std([fid(sample(), reference) for _ in range(40)], ddof=1)
    centre, low, high = metrics.fid_with_interval(sample(), mu, cov, resamples=200, seed=0)
    assert 0.6 < (high - low) / (2 * 1.959964 * spread) < 1.6
    with pytest.raises(MetricInputError, match="at least 2 resamples"):
        metrics.fid_with_interval(sample(), mu, cov, resamples=1, seed=0)


# Penultimate features are often a linear map of fewer ReLU units than they have dimensions:
# their covariance has exact null directions, which numerical square roots turn into round-off
# far above eps. OpenBLAS picks its kernels by CPU type (OPENBLAS_CORETYPE pins one), and each
# kernel rounds differently, so the check runs in fresh processes under each setting.
RANK_DEFICIENT_SELF_FID = """
import numpy as np
from pipeline.scoring.metrics import feature_stats, frechet_distance
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
    from torchmetrics.image.fid import _compute_fid  # here: the subprocess tests import this module

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
    from torchmetrics.image.kid import poly_mmd

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
    from torchmetrics.image.kid import poly_mmd

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


# The fast PRDC screens distances in float32 and decides every pair the bound cannot settle in
# float64: each test below compares it, decision for decision, with the naive version above.


def _near_tie_sets(seed: int = 19) -> tuple[np.ndarray, np.ndarray]:
    """Fakes placed at their real point's k-NN radius (k = 5), inside or outside by 1e-9 of it:
    float32 cannot tell which, only the exact check can."""
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(300, 8)) * 100.0
    d = scipy.spatial.distance.cdist(real, real)
    radius = np.sort(d, axis=1)[:, 5]
    centres = rng.choice(len(real), 200, replace=False)
    direction = rng.normal(size=(200, 8))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    side = np.where(np.arange(200) % 2 == 0, 1 - 1e-9, 1 + 1e-9)  # half just inside, half just outside
    fake = real[centres] + direction * (radius[centres] * side)[:, None]
    return real, fake


@pytest.mark.parametrize("chunk", [1, 64, 333, 4096])
def test_prdc_matches_naive_for_every_chunk_and_k(chunk: int) -> None:
    rng = np.random.default_rng(17)
    real = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16))
    fake = rng.normal(size=(350, 16)) @ rng.normal(size=(16, 16)) * 0.9 + 0.1
    for k in (1, 3, 5):
        assert prdc(real, fake, k=k, chunk=chunk) == _prdc_naive(real, fake, k)


def test_prdc_exact_ties_and_duplicates_match_naive() -> None:
    # Integer coordinates: many distances tie exactly, with each other and with the radii, some
    # radii are 0 (repeated points), and strict "<" must hold exactly as in the naive version.
    rng = np.random.default_rng(18)
    real = rng.integers(0, 4, size=(300, 5)).astype(np.float64)
    fake = np.vstack([real[:50], rng.integers(0, 4, size=(250, 5))]).astype(np.float64)
    for k in (1, 5):
        assert prdc(real, fake, k=k, chunk=70) == _prdc_naive(real, fake, k)


def test_prdc_decides_pairs_float32_cannot_separate() -> None:
    # Each constructed pair decided the wrong way would move density by 1 / (5 x 200).
    real, fake = _near_tie_sets()
    assert prdc(real, fake, k=5, chunk=128) == _prdc_naive(real, fake, 5)


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_prdc_is_scale_free(scale: float) -> None:
    # float32 alone would underflow or overflow here; the power-of-two rescaling keeps every decision.
    rng = np.random.default_rng(20)
    real, fake = rng.normal(size=(300, 12)), rng.normal(size=(300, 12)) + 0.2
    assert prdc(real * scale, fake * scale) == prdc(real, fake) == _prdc_naive(real, fake, 5)


def test_prdc_screens_a_collapsed_generator_far_from_the_origin(monkeypatch: pytest.MonkeyPatch) -> None:
    # A collapsed generator: near-duplicate samples far from the origin. Measured from the origin,
    # float32's error bound (a multiple of |x|^2) exceeds every distance between them, and all
    # 300 x 300 of their pairs had to be computed exactly; from their centre, a few per point.
    rng = np.random.default_rng(21)
    real = rng.normal(size=(300, 8))
    fake = 50.0 + 1e-3 * rng.normal(size=(300, 8))
    exact_pairs = 0
    pair_sq_dists = metrics._pair_sq_dists

    def counted(x: np.ndarray, y: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        nonlocal exact_pairs
        exact_pairs += len(i)
        return pair_sq_dists(x, y, i, j)

    monkeypatch.setattr(metrics, "_pair_sq_dists", counted)
    assert prdc(real, fake, k=5, chunk=128) == _prdc_naive(real, fake, 5)
    assert exact_pairs < 20 * 5 * (len(real) + len(fake))  # was over 90,000


# OpenBLAS picks its float32 kernels by CPU type too: the screening bound must hold for each.
PRDC_NEAR_TIES = """
from pipeline.scoring.metrics import prdc
from tests.test_metrics import _near_tie_sets, _prdc_naive
real, fake = _near_tie_sets()
print(prdc(real, fake, k=5, chunk=128) == _prdc_naive(real, fake, 5))
"""


@pytest.mark.parametrize("coretype", [None, "Haswell", "Sandybridge"])
def test_prdc_matches_naive_under_each_openblas_kernel(coretype: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    if coretype is not None:
        env["OPENBLAS_CORETYPE"] = coretype
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, "-c", PRDC_NEAR_TIES]
    result = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


def _kid_naive(a: np.ndarray, b: np.ndarray, subsets: int, m: int, seed: int) -> tuple[float, float]:
    """KID the obvious way: fresh kernel matrices per subset, the diagonal dropped by a mask."""
    rng = np.random.default_rng(seed)
    d, off = a.shape[1], ~np.eye(m, dtype=bool)
    scores = []
    for _ in range(subsets):
        x, y = a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)]
        k_xx, k_yy, k_xy = ((u @ v.T / d + 1.0) ** 3 for u, v in ((x, x), (y, y), (x, y)))
        scores.append(k_xx[off].mean() + k_yy[off].mean() - 2.0 * k_xy.mean())
    return float(np.mean(scores)), float(np.std(scores))


def test_kid_with_reused_buffers_matches_naive() -> None:
    a, b = _two_feature_sets(np.random.default_rng(21), n=500, d=32)
    mean, std = kid(a, b, subsets=12, subset_size=200, seed=5)
    want_mean, want_std = _kid_naive(a, b, 12, 200, 5)
    assert mean == pytest.approx(want_mean, rel=1e-12) and std == pytest.approx(want_std, rel=1e-10)
