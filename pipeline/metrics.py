"""Generative-model scores (FID, KID, IS, PRDC, class balance) on classifier features.

Numpy math in float64 (torch only for a fast exact k-th smallest value): callers extract
features/probabilities with the frozen MNIST classifier and pass plain arrays here.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.errors import UserError


class MetricInputError(UserError, ValueError):
    """Inputs that cannot give a meaningful score (shape, size or non-finite values)."""


def _as_features(x: np.ndarray, name: str) -> np.ndarray:
    """Validate an N x D feature array and return it as float64."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise MetricInputError(f"{name} must be a 2-D array (samples x features); got shape {x.shape}.")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise MetricInputError(f"{name} is empty: got shape {x.shape}.")
    if not np.isfinite(x).all():
        raise MetricInputError(f"{name} contains NaN or infinite values; check the generator and classifier.")
    return x


def _as_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_features(a, "features_a"), _as_features(b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise MetricInputError(f"Feature dimensions differ: {a.shape[1]} vs {b.shape[1]}.")
    return a, b


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (float64) of N x D features.

    Rule: refuse unless N >= 2 * D. With N <= D the covariance is singular, and just
    above D it is so noisy that FID is dominated by estimation error.
    """
    x = _as_features(features, "features")
    n, d = x.shape
    if n <= d:
        raise MetricInputError(
            f"FID needs more samples than feature dimensions: got N={n} samples of "
            f"{d}-dimensional features; use at least {2 * d}."
        )
    if n < 2 * d:
        raise MetricInputError(
            f"FID needs well above as many samples as feature dimensions: got N={n} samples of "
            f"{d}-dimensional features; use at least {2 * d}."
        )
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _sqrt_psd(cov: np.ndarray) -> np.ndarray:
    """The symmetric square root of a covariance; round-off negatives of its eigenvalues count as 0."""
    w, v = np.linalg.eigh((cov + cov.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Frechet distance between N(mu1, cov1) and N(mu2, cov2)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu1.ndim != 1 or mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise MetricInputError(
            f"Expected means of shape (D,) and covariances (D, D); got {mu1.shape}, {cov1.shape}, "
            f"{mu2.shape}, {cov2.shape}."
        )
    if not all(np.isfinite(a).all() for a in (mu1, cov1, mu2, cov2)):
        raise MetricInputError("Means or covariances contain NaN or infinite values.")
    # tr sqrt(cov1 cov2) is the sum of the singular values of sqrt(cov1) sqrt(cov2), whose
    # square is the symmetric PSD s1 cov2 s1. Taking singular values of the product, rather
    # than square roots of the eigenvalues of s1 cov2 s1, keeps round-off at eps x ||cov||:
    # ReLU features have near-null directions, where sqrt(eigenvalue ~ eps ||cov||^2) turned
    # round-off into an error of sqrt(eps) x ||cov|| per direction (-4.5e-6 for FID(x, x)).
    product = _sqrt_psd(cov1) @ _sqrt_psd(cov2)
    tr_covmean = np.linalg.svd(product, compute_uv=False).sum()
    diff = mu1 - mu2
    tr1, tr2 = np.trace(cov1), np.trace(cov2)
    value = float(diff @ diff + tr1 + tr2 - 2.0 * tr_covmean)
    # The true value is >= 0. Round-off of the sums above is a few eps per term and feature:
    # negatives within that are zero; anything larger means covariances that are not PSD.
    tolerance = 16 * d * np.finfo(np.float64).eps * float(diff @ diff + abs(tr1) + abs(tr2))
    if value < -tolerance:
        raise MetricInputError(f"Frechet distance came out negative ({value:.3g}); covariances are not PSD.")
    return max(value, 0.0)


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two N x D feature sets (each needs N >= 2 * D)."""
    a, b = _as_pair(features_a, features_b)
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(x.y / d + 1)^3 for all pairs, in place (numpy's ** 3 calls pow() per element: 5x slower)."""
    g = x @ y.T
    g /= x.shape[1]
    g += 1.0
    k = g * g
    k *= g
    return k


def _poly_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3 for equal-size sets."""
    m = x.shape[0]
    k_xx, k_yy, k_xy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    # Unbiased: drop the diagonal k(x_i, x_i) terms from the within-set sums.
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def kid(
    features_a: np.ndarray,
    features_b: np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance: mean and std (ddof=0, as torch-fidelity) of unbiased MMD^2 over subsets."""
    a, b = _as_pair(features_a, features_b)
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2 or subsets < 1:
        raise MetricInputError(f"KID needs subset_size >= 2 and subsets >= 1; got m={m}, subsets={subsets}.")
    rng = np.random.default_rng(seed)
    scores = np.array([
        _poly_mmd2(a[rng.choice(a.shape[0], m, replace=False)], b[rng.choice(b.shape[0], m, replace=False)])
        for _ in range(subsets)
    ])
    return float(scores.mean()), float(scores.std())


def _as_probs(probs: np.ndarray) -> np.ndarray:
    p = _as_features(probs, "probs")
    if (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise MetricInputError("probs must be non-negative with rows summing to 1 (apply softmax first).")
    return p


def inception_score(probs: np.ndarray, splits: int = 10, eps: float = 1e-12) -> tuple[float, float]:
    """Inception score exp(E[KL(p(y|x) || p(y))]): mean and std (ddof=0) over splits."""
    p = _as_probs(probs)
    if not 1 <= splits <= p.shape[0]:
        raise MetricInputError(f"splits must be between 1 and N={p.shape[0]}; got {splits}.")
    scores = []
    for part in np.array_split(p, splits):
        log_p = np.log(part + eps)
        log_py = np.log(part.mean(axis=0) + eps)
        scores.append(np.exp((part * (log_p - log_py)).sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def class_report(
    probs: np.ndarray, reference_distribution: np.ndarray, eps: float = 1e-6
) -> dict[str, object]:
    """Predicted-class balance of generated samples versus a reference class distribution.

    A class counts as covered when at least 1% of samples are predicted as it, so a
    handful of stray predictions does not hide mode collapse.
    """
    p = _as_probs(probs)
    n, c = p.shape
    ref = np.asarray(reference_distribution, dtype=np.float64)
    if ref.shape != (c,) or not np.isfinite(ref).all() or (ref < 0).any() or ref.sum() <= 0:
        raise MetricInputError(
            f"reference_distribution must be {c} non-negative finite weights; got shape {ref.shape}."
        )
    counts = np.bincount(p.argmax(axis=1), minlength=c)
    frac = counts / n
    # Smooth both sides so a class missing from either one gives a large but finite KL.
    p_gen = (frac + eps) / (1.0 + c * eps)
    p_ref = (ref / ref.sum() + eps) / (1.0 + c * eps)
    return {
        "counts": [int(v) for v in counts],
        "fractions": [float(v) for v in frac],
        "kl_divergence": float((p_gen * np.log(p_gen / p_ref)).sum()),
        "classes_covered": int((frac >= 0.01).sum()),
        "mean_confidence": float(p.max(axis=1).mean()),
    }


def _sq_dists(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances, clipped at 0 against cancellation round-off."""
    d = x @ y.T
    # In-place updates: this block is chunk x N, so avoid full-size temporaries.
    d *= -2.0
    d += np.einsum("ij,ij->i", x, x)[:, None]
    d += np.einsum("ij,ij->i", y, y)[None, :]
    return np.maximum(d, 0.0, out=d)


def _kth_nn_sq_radii(x: np.ndarray, k: int, chunk: int) -> np.ndarray:
    """Squared distance from each point to its k-th nearest other point."""
    radii = np.empty(x.shape[0])
    for start in range(0, x.shape[0], chunk):
        d = _sq_dists(x[start:start + chunk], x)
        rows = np.arange(d.shape[0])
        d[rows, start + rows] = np.inf  # exclude the point itself
        # torch.topk (threaded, partial) gives np.partition's exact k-th value about 15x faster.
        nearest = torch.topk(torch.from_numpy(d), k, dim=1, largest=False).values
        radii[start:start + chunk] = nearest[:, k - 1].numpy()
    return radii


def prdc(
    real_features: np.ndarray, fake_features: np.ndarray, k: int = 5, chunk: int = 2048
) -> dict[str, float]:
    """Precision, recall, density and coverage (Naeem et al., 2020) with k-NN balls."""
    real, fake = _as_pair(real_features, fake_features)
    if not 1 <= k < min(real.shape[0], fake.shape[0]):
        raise MetricInputError(
            f"prdc needs 1 <= k < N for both sets; got k={k}, N={real.shape[0]} and {fake.shape[0]}."
        )
    if chunk < 1:
        raise MetricInputError(f"prdc needs chunk >= 1; got {chunk}.")
    r_real = _kth_nn_sq_radii(real, k, chunk)
    r_fake = _kth_nn_sq_radii(fake, k, chunk)
    fake_in_real = np.zeros(fake.shape[0], dtype=bool)  # precision
    fake_ball_count = np.zeros(fake.shape[0])  # density
    real_in_fake = np.zeros(real.shape[0], dtype=bool)  # recall
    real_covered = np.zeros(real.shape[0], dtype=bool)  # coverage
    # One pass over real-row chunks of the real x fake distance matrix; strict "<" as in the
    # reference implementation.
    for start in range(0, real.shape[0], chunk):
        d = _sq_dists(real[start:start + chunk], fake)
        inside = d < r_real[start:start + chunk, None]
        fake_in_real |= inside.any(axis=0)
        fake_ball_count += inside.sum(axis=0)
        real_covered[start:start + chunk] = inside.any(axis=1)
        real_in_fake[start:start + chunk] = (d < r_fake[None, :]).any(axis=1)
    return {
        "precision": float(fake_in_real.mean()),
        "recall": float(real_in_fake.mean()),
        "density": float(fake_ball_count.sum() / (k * fake.shape[0])),
        "coverage": float(real_covered.mean()),
    }
