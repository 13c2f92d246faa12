"""The generator as MLflow holds it: its weights file, its hashes and the tags that name them."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


# --- the generator's weights beside its MLflow model --------------------------------------
# Loading an MLflow PyTorch model unpickles (data/model.pth, or a .pt2 archive's sample inputs),
# so whoever can write to an artifact store would run code on everyone who draws from it. Every
# logged generator therefore carries its state dict as a checkpoint of files.save_checkpoint's
# format (read weights-only), and its model's tags record, at log time, the SHA-256 of that file
# (checked before it is parsed) and of its tensors (what evaluate compares with models/generator.pt).

WEIGHTS_FILE = "generator_weights.pt"
WEIGHTS_PATH = f"extra_files/{WEIGHTS_FILE}"  # inside the logged model's artifacts
ARTIFACT_SHA_TAG = "weights.artifact_sha256"
TENSORS_SHA_TAG = "weights.tensors_sha256"


def tensors_sha256(weights: Mapping[str, Any]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and values: equal for equal weights, whatever file holds them."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for key in sorted(weights):
        tensor = weights[key].detach().cpu().contiguous()
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def architecture(model: Any) -> dict[str, float]:
    """What rebuilding `model` needs beyond the sizes its weights show: its batch norms' settings."""
    norm = next((m for m in model.modules() if hasattr(m, "eps") and hasattr(m, "momentum")), None)
    return {} if norm is None else {"bn_eps": float(norm.eps), "bn_momentum": float(norm.momentum)}


def save_weights(weights: Mapping[str, Any], arch: dict[str, float], path: Path) -> dict[str, str]:
    """The weights file a logged model carries; the tags that record its SHA-256 and its tensors'."""
    from pipeline.files import save_checkpoint, sha256_file

    state = {key: value.detach().cpu() for key, value in weights.items()}
    save_checkpoint({"generator": state, "architecture": arch}, path)
    return {ARTIFACT_SHA_TAG: sha256_file(path), TENSORS_SHA_TAG: tensors_sha256(state)}


def weights_present(model_location: str) -> bool:
    """Whether the logged model at `model_location` (its artifact location) holds its weights file."""
    import mlflow

    try:
        found = mlflow.artifacts.list_artifacts(artifact_uri=f"{model_location.rstrip('/')}/extra_files")
    except Exception:  # noqa: BLE001 - a folder the store does not have
        return False
    return any(Path(item.path).name == WEIGHTS_FILE for item in found)
