"""The frozen classifier every score uses: its network, its file (hashed as loaded, weights
only) and the features and predictions it gives for uint8 images."""

from __future__ import annotations

import hashlib
import io
import pickle
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.data import to_model
from pipeline.errors import UserError
from pipeline.files import atomic_path
from pipeline.params import ClassifierParams


class Classifier(nn.Module):
    """A small CNN whose penultimate layer gives the features FID is computed on; one per dataset."""

    def __init__(self, feature_dim: int = 128, dropout: float = 0.3, n_classes: int = 10) -> None:
        super().__init__()

        def block(in_ch: int, out_ch: int) -> list[nn.Module]:
            return [
                nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_ch),
                nn.ReLU(inplace=True),
            ]

        self.body = nn.Sequential(
            *block(1, 32),
            *block(32, 32),
            nn.MaxPool2d(2),  # 28 -> 14
            *block(32, 64),
            *block(64, 64),
            nn.MaxPool2d(2),  # 14 -> 7
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, feature_dim),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, n_classes)
        self.feature_dim = feature_dim

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer activations (N, feature_dim)."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (N, n_classes)."""
        return self.head(self.dropout(self.body(images)))


def build_classifier(params: ClassifierParams, n_classes: int = 10) -> Classifier:
    return Classifier(feature_dim=params.feature_dim, n_classes=n_classes)


RETRAIN = "run `dvc repro classifier` (or `python -m pipeline classifier`) to train it again"

# What torch.load raises on a truncated, garbage or non-weights file (weights_only refuses
# unknown globals with UnpicklingError before anything in the file is executed).
_LOAD_ERRORS = (
    pickle.UnpicklingError,
    RuntimeError,
    EOFError,
    ValueError,
    OSError,
    KeyError,
    TypeError,
    AttributeError,
    IndexError,
    zipfile.BadZipFile,
    UnicodeDecodeError,
)


# --- the classifier file ---------------------------------------------------------------


def save_classifier(model: Classifier, path: Path) -> None:
    """Write the weights atomically as a plain state_dict of CPU tensors."""
    # Contiguous copies: the bytes (and the hash) must not depend on the layout the model ran in.
    state = {
        key: value.detach().cpu().clone(memory_format=torch.contiguous_format)
        for key, value in model.state_dict().items()
    }
    # Save through a file object: given a path, torch names the archive after the (random) temp
    # file, and the same weights would get a different SHA-256 on every run.
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(state, fh)


def load_classifier(path: Path, feature_dim: int, device: torch.device) -> tuple[Classifier, str]:
    """Load frozen weights (never unpickling arbitrary objects); return the model and the file's SHA-256."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"classifier weights {path} are missing; {RETRAIN}.")
    try:
        blob = path.read_bytes()  # hash exactly the bytes that are loaded, not a later version of the file
        with warnings.catch_warnings():  # torch warns about odd pickle protocols before refusing them
            warnings.simplefilter("ignore")
            state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except _LOAD_ERRORS as exc:
        # torch's own message suggests weights_only=False, exactly the wrong advice here.
        raise UserError(
            f"classifier weights {path} are damaged or not a plain weights file "
            f"({type(exc).__name__}); {RETRAIN}."
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise UserError(f"classifier weights {path} are not a state_dict of tensors; {RETRAIN}.")
    head = state.get("head.weight")
    n_classes = int(head.shape[0]) if isinstance(head, torch.Tensor) and head.ndim == 2 else 10
    with torch.random.fork_rng(devices=[]):  # building layers draws from the RNG: leave training's alone
        model = Classifier(feature_dim, n_classes=n_classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise UserError(
            f"classifier weights {path} do not fit a Classifier with feature_dim={feature_dim} "
            f"(changed params or a damaged file); {RETRAIN}."
        ) from None
    # On the CPU, channels-last weights make oneDNN run every conv and max-pool on channels-last
    # activations: the same features to float32 round-off (another summation order), faster
    # (benchmarks/scoring_levers.py measures it).
    layout = torch.channels_last if torch.device(device).type == "cpu" else torch.preserve_format
    model.to(device, memory_format=layout).eval().requires_grad_(False)
    return model, hashlib.sha256(blob).hexdigest()  # == files.sha256_file(path)


# --- features and class probabilities -----------------------------------------------------


def classify(
    model: Classifier, images: np.ndarray | torch.Tensor, batch_size: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 28, 28) -> penultimate features (N, D) float32 and softmax probs (N, 10) float64."""
    if images.ndim != 3 or images.shape[0] == 0:
        raise UserError(f"classify expects a non-empty (N, 28, 28) uint8 batch; got {tuple(images.shape)}.")
    was_training = model.training
    model.eval()  # BatchNorm on running statistics, no dropout: each image's features stand alone
    features, probs = [], []
    try:
        with torch.inference_mode():
            for start in range(0, images.shape[0], batch_size):
                x = to_model(images[start : start + batch_size]).to(device)
                f = model.features(x)  # (B, D)
                # In eval mode dropout is the identity, so head(features) are exactly forward()'s logits.
                logits = model.head(f)  # (B, 10)
                features.append(f.float().cpu().numpy())
                # Softmax in float64 (IS and KL take logs of small probabilities) on the CPU: MPS lacks it.
                probs.append(torch.softmax(logits.cpu().double(), dim=1).numpy())
    finally:
        model.train(was_training)
    return np.concatenate(features), np.concatenate(probs)
