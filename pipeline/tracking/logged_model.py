"""The generator as MLflow holds it: its weights file, its hashes and the tags that name them; and,
for `generate`, the logged model a run or a models:/ URI names and its weights file, fetched."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

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


# --- finding a logged generator and fetching its weights file (the generate command) ------------


@dataclass(frozen=True)
class Logged:
    """A generator MLflow holds: its logged model's artifact location, the SHA-256 recorded for its
    weights file when it was logged (None: logged by older code, without one), and who it is."""

    location: str
    recorded: str | None
    who: str  # "MLflow run <id>", "registered model <name> version <n>", ...
    repair: str  # how to give it a weights file


def by_run(run_id: str, experiment_id: str) -> Logged:
    """The generator that training run `run_id` logged last (its finished upload)."""
    from pipeline.tracking import runs

    run = runs.existing_run(run_id, experiment_id)
    if run is None:
        raise UserError(f"MLflow run {run_id} is not in this experiment's tracking store.")
    ready = sorted(
        (m for m in run.logged_models() if str(m.status) == "READY"), key=lambda m: m.creation_timestamp
    )
    if not ready:
        raise UserError(f"MLflow run {run_id} holds no finished model; train (or `resend`) it first.")
    repair = "run `python -m pipeline resend` in its project, or train it again"
    return Logged(
        ready[-1].artifact_location, ready[-1].tags.get(ARTIFACT_SHA_TAG), f"MLflow run {run_id}", repair
    )


def by_uri(uri: str) -> Logged:
    """The generator of `models:/NAME@ALIAS`, `models:/NAME/VERSION` or `models:/<model id>`.

    A registered version is trusted through the SHA-256 copied onto it when it was registered, so a
    logged model whose file and tags were both rewritten afterwards is still caught.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import connection

    client = MlflowClient()
    ref = uri.removeprefix("models:/")
    try:
        if uri.startswith("models:/m-") and "/" not in ref:
            model = client.get_logged_model(ref)
            return Logged(
                model.artifact_location,
                model.tags.get(ARTIFACT_SHA_TAG),
                f"MLflow model {ref}",
                "run `python -m pipeline resend` in its project, or train it again",
            )
        if not uri.startswith("models:/") or not ("@" in ref or ref.rpartition("/")[2].isdigit()):
            raise UserError(
                f"--model {uri} is not models:/NAME@ALIAS, models:/NAME/VERSION or models:/<model id>."
            )
        if "@" in ref:
            name, _, alias = ref.partition("@")
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = ref.rpartition("/")
            version = client.get_model_version(name, number)
        who = f"registered model {name} version {version.version}"
        repair = (
            f"run `python -m pipeline resend` for its training run {version.run_id} and evaluate again, "
            "or train it again"
        )
        source = str(version.source or "")
        model_id = version.model_id or (
            source.removeprefix("models:/") if source.startswith("models:/m-") else ""
        )
        if not model_id:  # registered from a run's artifacts, as MLflow 2 did: no weights file
            return Logged("", None, who, repair)
        model = client.get_logged_model(model_id)
    except MlflowException as exc:
        raise UserError(f"MLflow has no model {uri} ({connection.first_line(exc).rstrip('.')}).") from None
    return Logged(model.artifact_location, version.tags.get(ARTIFACT_SHA_TAG), who, repair)


def download_weights(logged: Logged, folder: Path) -> Path:
    """`logged`'s weights file, downloaded into `folder` (not yet checked: see stages/drawing.trusted_weights)."""
    import mlflow

    from pipeline.tracking import connection

    # A progress bar for one small file would be the only thing on stderr; the user's setting wins.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{logged.location.rstrip('/')}/{WEIGHTS_PATH}", dst_path=str(folder)
            )
        )
    except Exception as exc:  # noqa: BLE001 - a deleted file, an unreachable store: the same for the user
        raise UserError(
            f"{logged.who}'s generator weights ({WEIGHTS_PATH}) cannot be fetched "
            f"({connection.first_line(exc).rstrip('.')}); {logged.repair}."
        ) from None
