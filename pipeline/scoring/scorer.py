"""Scoring with the frozen classifier (frozen_classifier.py): the real-data reference and the one
`score` every stage reports (reference floor, training FID, evaluate).

Real images and generator samples both arrive here as uint8 pixels and go through
`data.to_model` (in `frozen_classifier.classify`), so the two sides of every score see
identical preprocessing.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy
import torch

from pipeline.errors import UserError
from pipeline.files import atomic_path
from pipeline.gan.architectures.dcgan import Generator
from pipeline.gan.sampling import generate, requested_labels
from pipeline.layout import Layout
from pipeline.params import EvaluateParams, Params
from pipeline.scoring import metrics
from pipeline.scoring.frozen_classifier import Classifier, classify, load_classifier
from pipeline.scoring.scores import score as score  # every registered score of a sample set (scores/)

RECOMPUTE = "run `dvc repro reference` (or `python -m pipeline reference`) to compute it again"


# --- the real-data reference --------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """Classifier features of the real reference images and what every score compares against."""

    features: np.ndarray  # (N, D) float32, kept for KID and PRDC
    mean: np.ndarray  # (D,) float64
    cov: np.ndarray  # (D, D) float64, unbiased
    label_distribution: np.ndarray  # (10,) float64, fractions of the real labels
    classifier_sha256: str  # the weights the features came from; scores are only comparable under one


def compute_reference(
    features: np.ndarray, labels: np.ndarray, classifier_sha256: str, n_classes: int = 10
) -> Reference:
    """Statistics of real features (N >= 2 * D, see metrics.feature_stats) and their label distribution."""
    mean, cov = metrics.feature_stats(features)
    labels = np.asarray(labels)
    if labels.shape != (features.shape[0],) or labels.min() < 0 or labels.max() >= n_classes:
        raise UserError(
            f"reference labels must be N={features.shape[0]} classes 0-{n_classes - 1}; got {labels.shape}."
        )
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    return Reference(np.asarray(features, np.float32), mean, cov, counts / counts.sum(), classifier_sha256)


def save_reference(ref: Reference, path: Path) -> None:
    """Uncompressed .npz of plain arrays (no pickle), written atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            features=ref.features,
            mean=ref.mean,
            cov=ref.cov,
            label_distribution=ref.label_distribution,
            classifier_sha256=np.array(ref.classifier_sha256),
        )


def load_reference(path: Path, classifier_sha256: str | None = None) -> Reference:
    """Load and check a saved reference; missing, damaged or (given the hash) stale is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"reference {path} is missing; {RECOMPUTE}.")
    try:
        with np.load(path, allow_pickle=False) as npz:
            ref = Reference(
                features=np.asarray(npz["features"], np.float32),
                mean=np.asarray(npz["mean"], np.float64),
                cov=np.asarray(npz["cov"], np.float64),
                label_distribution=np.asarray(npz["label_distribution"], np.float64),
                classifier_sha256=str(npz["classifier_sha256"]),
            )
    except (KeyError, ValueError, TypeError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"reference {path} is damaged ({exc}); {RECOMPUTE}.") from None
    n, d = ref.features.shape if ref.features.ndim == 2 else (0, 0)
    if (
        n == 0
        or ref.mean.shape != (d,)
        or ref.cov.shape != (d, d)
        or ref.label_distribution.ndim != 1
        or ref.label_distribution.size < 2
        or not all(np.isfinite(a).all() for a in (ref.features, ref.mean, ref.cov, ref.label_distribution))
    ):
        raise UserError(f"reference {path} has inconsistent arrays; {RECOMPUTE}.")
    if classifier_sha256 is not None and classifier_sha256 != ref.classifier_sha256:
        # Features of another classifier live in another space: every score would be meaningless.
        raise UserError(
            f"reference {path} was computed with classifier {ref.classifier_sha256[:12]}, not the current "
            f"{classifier_sha256[:12]}; {RECOMPUTE}."
        )
    return ref


# --- the frozen classifier with its reference ---------------------------------------------


@dataclass(frozen=True, eq=False)
class Scorer:
    """The frozen classifier, its file's SHA-256 and the reference computed with it: what the stages
    that score generated samples (train's quick FID, evaluate, sweep) load, in this one place."""

    classifier: Classifier
    sha256: str
    reference: Reference
    device: torch.device

    @classmethod
    def load(cls, paths: Layout, params: Params, device: torch.device) -> Scorer:
        """Load the classifier and the reference; a reference of other weights is a UserError."""
        classifier, sha256 = load_classifier(paths.classifier, params.classifier.feature_dim, device)
        return cls(classifier, sha256, load_reference(paths.reference, classifier_sha256=sha256), device)

    @property
    def feature_dim(self) -> int:
        return int(self.reference.features.shape[1])

    def quick_fid(self, generator: Generator, params: Params) -> float:
        """The in-training FID of `params`' run: train.fid_samples fresh samples, the same noise at every
        call (their own RNG: training's is untouched), so the curve shows the generator changing."""
        # Seeded by train.seed, not evaluate.seed: the curve is a training output (metrics/train_fid.csv,
        # the checkpoint's fid_history), and the train stage's DVC params and resume fingerprint cover
        # train.*, not evaluate.*. Sweep trials share train.seed unless it is searched, and then their
        # weights and batches differ by seed as well: one rule for the train stage and the sweep.
        return self.watch(generator, params)["fid"]

    def watch(self, generator: Generator, params: Params) -> dict[str, float]:
        """What the collapse watchdog (train.watchdog) judges and logs: the quick FID (quick_fid's
        number) and the classes its samples cover."""
        train = params.train
        fid, probs = quick_look(
            generator,
            self.classifier,
            self.reference,
            train.fid_samples,
            train.seed,
            params.evaluate.batch_size,
            self.device,
        )
        report = metrics.class_report(probs, self.reference.label_distribution)
        return {"fid": fid, "classes_covered": float(report["classes_covered"])}  # type: ignore[arg-type]


# --- the scores ---------------------------------------------------------------------------


def draw(
    generator: Generator, n: int, seed: int, batch_size: int, device: torch.device, reference: Reference
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """n seeded samples (uint8, CPU) and, of a conditional generator, the labels they were asked for:
    drawn with the reference's class shares, so that the samples' classes match the real ones."""
    labels = requested_labels(n, reference.label_distribution, seed) if generator.n_classes else None
    return generate(generator, n, seed, batch_size, device, labels), labels


def quick_look(
    generator: Generator,
    classifier: Classifier,
    reference: Reference,
    n: int,
    seed: int,
    batch_size: int,
    device: torch.device,
) -> tuple[float, np.ndarray]:
    """The FID of n fresh samples (seeded, inference mode) against the reference, the quick estimate,
    and the samples' class probabilities (N, K)."""
    images, _ = draw(generator, n, seed, batch_size, device, reference)
    features, probs = classify(classifier, images, batch_size, device)
    mean, cov = metrics.feature_stats(features)
    return metrics.frechet_distance(mean, cov, reference.mean, reference.cov), probs


def scoring_metadata(
    classifier_sha256: str, feature_dim: int, params: EvaluateParams
) -> dict[str, str | int]:
    """What must match for two scores to be comparable: classifier, features, preprocessing, N, seed."""
    return {
        "n_samples": params.n_samples,
        "seed": params.seed,
        "classifier_sha256": classifier_sha256,
        "feature_dim": feature_dim,
        "feature_layer": "Classifier.features (penultimate, after ReLU)",
        "preprocessing": "data.to_model (uint8 / 127.5 - 1)",
        "kid_kernel": "(x.y/d + 1)^3 on features scaled to unit mean square per dimension of the reference",
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "torch": torch.__version__,
    }
