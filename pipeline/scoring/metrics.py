"""Generative-model scores (FID and its interval, KID, IS, PRDC, class balance) on classifier features.

Numpy math in float64 (PRDC screens its distances in float32 first, and torch gives a fast k-th
smallest value): callers extract features/probabilities with the frozen MNIST classifier and pass
plain arrays here.
"""

from __future__ import annotations

import numpy as np
import torch
from threadpoolctl import threadpool_limits

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


def frechet_distance(
    mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray, root2: np.ndarray | None = None
) -> float:
    """Frechet distance between N(mu1, cov1) and N(mu2, cov2); `root2`: _sqrt_psd(cov2), when the
    caller scores many sample sets against one reference and keeps it."""
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
    product = _sqrt_psd(cov1) @ (_sqrt_psd(cov2) if root2 is None else root2)
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


def fid_with_interval(
    features: np.ndarray,
    mu_ref: np.ndarray,
    cov_ref: np.ndarray,
    resamples: int,
    seed: int,
    z: float = 1.959964,
) -> tuple[float, float, float]:
    """The FID of `features` against N(mu_ref, cov_ref) and its confidence interval, FID ± z x its bootstrap sd.

    Each resample draws the N samples with replacement (its own seeded RNG) and scores them
    again. The spread of those FIDs measures how much the score of this generator moves with the
    draw of its N samples; the interval is centred on the FID itself, not on the resamples' mean,
    because a resample's FID is biased upward (repeated samples narrow the spread of its
    features). z = 1.96 gives a 95 % interval. The covariances are summed in float32 (twice as
    fast; the sd moves by a few 1e-6 relative).
    """
    x = _as_features(features, "features")
    if resamples < 2:
        raise MetricInputError(f"the FID interval needs at least 2 resamples; got {resamples}.")
    centre = frechet_distance(*feature_stats(x), mu_ref, cov_ref)
    rng = np.random.default_rng(seed)
    xt = torch.from_numpy(x.astype(np.float32))
    values = np.empty(resamples)
    # LAPACK on 128 x 128 matrices is fastest on one thread: OpenBLAS's threads cost 20x, and 600x on
    # a machine whose cores are busy (two test workers, a training beside).
    with threadpool_limits(limits=1, user_api="blas"):
        root_ref = _sqrt_psd(np.asarray(cov_ref, np.float64))  # the same for every resample
        for i in range(resamples):
            values[i] = frechet_distance(*_resampled_stats(xt, rng), mu_ref, cov_ref, root_ref)
    half = z * float(values.std(ddof=1))
    return centre, max(centre - half, 0.0), centre + half


def _resampled_stats(xt: torch.Tensor, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of one bootstrap resample of the samples `xt` (N, D): the N rows
    drawn with replacement, as multiplicities."""
    n = xt.shape[0]
    counts = torch.from_numpy(np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float32))
    mean = (counts @ xt) / n
    centred = xt - mean
    cov = ((centred * counts[:, None]).T @ centred) / (n - 1)
    return mean.double().numpy(), cov.double().numpy()


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two N x D feature sets (each needs N >= 2 * D)."""
    a, b = _as_pair(features_a, features_b)
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def _poly_kernel_sums(
    x: torch.Tensor, y: torch.Tensor, g: torch.Tensor, k: torch.Tensor
) -> tuple[float, float]:
    """Sum and trace of k(x, y) = (x.y / d + 1)^3 over all pairs (float64), computed in the buffers g and k.

    One BLAS call gives g = x.y / d + 1, one pass squares it into k, and the sum of the cubes is
    the dot product of k with g: torch runs each on every core, where numpy's element-wise
    passes ran on one (the same sums up to the order of float additions, about 1e-15 relative).
    """
    torch.addmm(torch.ones((), dtype=g.dtype), x, y.T, alpha=1.0 / x.shape[1], out=g)
    torch.mul(g, g, out=k)
    diagonal = g.diagonal()
    return torch.dot(k.view(-1), g.view(-1)).item(), (diagonal * diagonal * diagonal).sum().item()


def _poly_mmd2(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor, k: torch.Tensor) -> float:
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3 for equal-size sets (m x m buffers g and k)."""
    m = x.shape[0]
    (s_xx, t_xx), (s_yy, t_yy) = _poly_kernel_sums(x, x, g, k), _poly_kernel_sums(y, y, g, k)
    s_xy, _ = _poly_kernel_sums(x, y, g, k)
    # Unbiased: drop the diagonal k(x_i, x_i) terms from the within-set sums.
    within = (s_xx - t_xx + s_yy - t_yy) / (m * (m - 1))
    return float(within - 2.0 * s_xy / (m * m))


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
    g, k = (
        torch.empty(m, m, dtype=torch.float64),
        torch.empty(m, m, dtype=torch.float64),
    )  # reused by every subset

    def subset(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(
            np.ascontiguousarray(x[rng.choice(x.shape[0], m, replace=False)], dtype=np.float64)
        )

    scores = np.array([_poly_mmd2(subset(a), subset(b), g, k) for _ in range(subsets)])  # draws a's, then b's
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


# PRDC compares every pair of points (10^8 pairs at N = 10,000) with k-NN radii, and almost every
# pair is far from the radius it is compared with. So distances are screened in float32 (half
# the cost of float64 matrix products) under a rigorous bound on their error, and only the pairs
# the bound cannot settle (a few per point) are computed exactly, in float64, as sum((x - y)^2).
# The decisions are those of exact distances; the float64 formula |x|^2 + |y|^2 - 2 x.y of earlier
# versions could differ from them only within ~1e-16 x |x|^2 of a radius, that is for exact ties.

_U32 = float(np.finfo(np.float32).eps) / 2  # unit round-off of float32


class _Screen:
    """A point set prepared for screened squared distances: `left[i] @ right[j]` is |x_i - x_j|^2
    in float32, within `bound(i, j) = slack[i] + slack[j]` of the exact value. Two screens give
    distances to each other only when they share their `center`."""

    def __init__(self, points: np.ndarray, center: np.ndarray) -> None:
        self.points = points  # (N, D) float64, for the exact distances
        # Distances do not change under a shift, but the bound (a multiple of |x|^2) does: measured
        # from the points' centre it stays of the order of their spread, not of their norms. A
        # generator that collapsed draws near-duplicates far from the origin; from the origin the
        # bound covered most pairs of its samples, and each had to be computed exactly.
        shifted = points - center  # rounding here, u64 of each coordinate, is far inside the bound
        x32 = shifted.astype(np.float32)
        sq = np.einsum("ij,ij->i", x32, x32, dtype=np.float64).astype(np.float32)[:, None]
        ones = np.ones_like(sq)
        # One matrix product gives -2 x.y + |x|^2 + |y|^2: no elementwise passes over the N x N block.
        self.left = np.hstack([-2.0 * x32, sq, ones])  # (N, D + 2) float32
        self.right = np.hstack([x32, ones, sq])
        # A float32 dot product of n = D + 2 terms (any order, FMA or not) is off by at most
        # n u sum |terms| <= n u 2 (|x|^2 + |y|^2); rounding the inputs and norms to float32 adds
        # about 5 u (|x|^2 + |y|^2). Twice that covers higher-order terms and the float64 sums
        # here; the absolute term covers float32 underflow of tiny products.
        n = points.shape[1] + 2
        self.slack = 2.0 * (2 * n + 5) * _U32 * np.einsum("ij,ij->i", shifted, shifted)
        self.slack += 8 * n * float(np.finfo(np.float32).smallest_subnormal)

    def block(self, rows: slice, other: _Screen) -> np.ndarray:
        """Screened squared distances (float32) from the points `rows` to every point of `other`."""
        return self.left[rows] @ other.right.T


def _up32(values: np.ndarray) -> np.ndarray:
    """float64 -> the float32 values just above: a threshold that is never too low."""
    return np.nextafter(values.astype(np.float32), np.float32(np.inf))


def _pairs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) indices of the True entries of a 2-D mask; np.nonzero is far slower in 2-D."""
    return np.divmod(np.flatnonzero(mask), mask.shape[1])


def _pair_sq_dists(x: np.ndarray, y: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Exact-as-float64 squared distances |x_i - y_j|^2 of the listed pairs."""
    diff = x[i] - y[j]
    return np.einsum("ij,ij->i", diff, diff)


def _kth_nn_sq_radii(s: _Screen, k: int, chunk: int) -> np.ndarray:
    """Squared distance from each point to its k-th nearest other point."""
    n = s.points.shape[0]
    radii = np.empty(n)
    reach = s.slack.max()
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        d = s.block(rows, s)  # (B, N) float32
        local = np.arange(d.shape[0])
        d[local, start + local] = np.inf  # exclude the point itself
        # torch.topk (threaded, partial) gives np.partition's exact k-th value, far faster.
        kth = torch.topk(torch.from_numpy(d), k, dim=1, largest=False).values[:, k - 1].numpy()
        # k points lie within kth + bound of point i, so every one of its k nearest has a screened
        # value within kth + 2 x bound: those candidates (about k per point) decide exactly.
        i, j = _pairs(d <= _up32(kth + 2.0 * (s.slack[rows] + reach))[:, None])
        exact = _pair_sq_dists(s.points[rows], s.points, i, j)
        order = np.lexsort((exact, i))  # by point, then by distance; each point has >= k candidates
        first = np.searchsorted(i[order], local)
        radii[rows] = exact[order][first + k - 1]
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
    # Scale by a power of two (exact: every decision stays the same) so that float32 neither
    # overflows nor loses the features' relative precision.
    scale = 2.0 ** -np.frexp(max(np.abs(real).max(), np.abs(fake).max()))[1]
    real, fake = real * scale, fake * scale
    # Each set's radii from its own centre, the pairs between them from the centre of both.
    r_real = _kth_nn_sq_radii(_Screen(real, real.mean(axis=0)), k, chunk)
    r_fake = _kth_nn_sq_radii(_Screen(fake, fake.mean(axis=0)), k, chunk)
    both = (real.sum(axis=0) + fake.sum(axis=0)) / (real.shape[0] + fake.shape[0])
    s_real, s_fake = _Screen(real, both), _Screen(fake, both)
    fake_in_real = np.zeros(fake.shape[0], dtype=bool)  # precision
    ball_count = 0  # density
    real_in_fake = np.zeros(real.shape[0], dtype=bool)  # recall
    real_covered = np.zeros(real.shape[0], dtype=bool)  # coverage
    # One pass over real-row blocks of the real x fake distances. A pair can be inside a ball
    # only if its screened value is below radius + bound; those few are decided exactly, with
    # strict "<" as in the reference implementation.
    reach_fake = s_fake.slack.max()
    for start in range(0, real.shape[0], chunk):
        rows = slice(start, min(start + chunk, real.shape[0]))
        d = s_real.block(rows, s_fake)  # (B, N_fake) float32
        i, j = _pairs(d <= _up32(r_real[rows] + s_real.slack[rows] + reach_fake)[:, None])
        inside = _pair_sq_dists(s_real.points[rows], s_fake.points, i, j) < r_real[rows][i]
        fake_in_real[j[inside]] = True
        ball_count += int(inside.sum())
        real_covered[start + i[inside]] = True
        i, j = _pairs(d <= _up32(r_fake + s_fake.slack + s_real.slack[rows].max())[None, :])
        inside = _pair_sq_dists(s_real.points[rows], s_fake.points, i, j) < r_fake[j]
        real_in_fake[start + i[inside]] = True
    return {
        "precision": float(fake_in_real.mean()),
        "recall": float(real_in_fake.mean()),
        "density": float(ball_count / (k * fake.shape[0])),
        "coverage": float(real_covered.mean()),
    }
