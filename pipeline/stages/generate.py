"""Command `generate`: draw samples from a trained generator.

The generator comes from the train stage's DVC output (default), from the model an MLflow
training run logged (`--run RUN_ID`), or from the registry (`--model models:/NAME@champion`,
`models:/NAME/3`). From MLflow only the weights file logged beside the model is read, weights-only
and after its SHA-256 matched the one recorded when it was logged (loading the MLflow model itself
would unpickle). Whatever the source, its weights go into the pipeline's own Generator, so
the samples are those `evaluate` draws: the same seed, N and batch size give the same pixels,
and `evaluate --samples` of them gives the stage's scores. A conditional generator draws the
classes evaluate asks for, or only `--label`'s; `--raw` takes the trained G of an EMA run.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import data, files, machine
from pipeline.errors import UserError
from pipeline.gan.architectures import build_generator, model_for_weights
from pipeline.gan.architectures.dcgan import Generator
from pipeline.gan.export import load_generator
from pipeline.gan.sampling import generate, requested_labels
from pipeline.layout import Layout
from pipeline.params import DataParams, ModelParams, load_params
from pipeline.scoring import scorer


def from_weights(weights: dict[str, torch.Tensor], model: ModelParams, where: str) -> Generator:
    """A generator of `model`'s architecture holding `weights`, its sizes read off them."""
    try:
        sizes, n_classes = model_for_weights(weights, model)
        generator = build_generator(sizes, n_classes=n_classes)
        generator.load_state_dict(weights)
    except (KeyError, RuntimeError, ValueError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(f"{where} is not a generator of this pipeline ({first}).") from None
    return generator


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
    from pipeline.tracking import logged_model, mlflow_run

    run = mlflow_run.MlflowRun.existing(run_id, experiment_id)
    if run is None:
        raise UserError(f"MLflow run {run_id} is not in this experiment's tracking store.")
    ready = sorted((m for m in run.logged_models() if str(m.status) == "READY"), key=lambda m: m.creation_timestamp)
    if not ready:
        raise UserError(f"MLflow run {run_id} holds no finished model; train (or `resend`) it first.")
    repair = "run `python -m pipeline resend` in its project, or train it again"
    return Logged(ready[-1].artifact_location, ready[-1].tags.get(logged_model.ARTIFACT_SHA_TAG), f"MLflow run {run_id}",
                  repair)  # fmt: skip


def by_uri(uri: str) -> Logged:
    """The generator of `models:/NAME@ALIAS`, `models:/NAME/VERSION` or `models:/<model id>`.

    A registered version is trusted through the SHA-256 copied onto it when it was registered, so a
    logged model whose file and tags were both rewritten afterwards is still caught.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import connection, logged_model

    client = MlflowClient()
    ref = uri.removeprefix("models:/")
    try:
        if uri.startswith("models:/m-") and "/" not in ref:
            model = client.get_logged_model(ref)
            return Logged(model.artifact_location, model.tags.get(logged_model.ARTIFACT_SHA_TAG), f"MLflow model {ref}",
                          "run `python -m pipeline resend` in its project, or train it again")  # fmt: skip
        if not uri.startswith("models:/") or not ("@" in ref or ref.rpartition("/")[2].isdigit()):
            raise UserError(f"--model {uri} is not models:/NAME@ALIAS, models:/NAME/VERSION or models:/<model id>.")
        if "@" in ref:
            name, _, alias = ref.partition("@")
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = ref.rpartition("/")
            version = client.get_model_version(name, number)
        who = f"registered model {name} version {version.version}"
        repair = (f"run `python -m pipeline resend` for its training run {version.run_id} and evaluate again, "
                  "or train it again")  # fmt: skip
        source = str(version.source or "")
        model_id = version.model_id or (source.removeprefix("models:/") if source.startswith("models:/m-") else "")
        if not model_id:  # registered from a run's artifacts, as MLflow 2 did: no weights file
            return Logged("", None, who, repair)
        model = client.get_logged_model(model_id)
    except MlflowException as exc:
        raise UserError(f"MLflow has no model {uri} ({connection.first_line(exc).rstrip('.')}).") from None
    return Logged(model.artifact_location, version.tags.get(logged_model.ARTIFACT_SHA_TAG), who, repair)


def trusted_weights(logged: Logged) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The weights (and batch-norm settings) in `logged`'s weights file, read weights-only once its
    SHA-256 matches the recorded one. Never the MLflow model itself: loading that unpickles."""
    import tempfile

    import mlflow

    from pipeline.tracking import connection, logged_model

    if not logged.recorded:
        raise UserError(f"{logged.who} was logged without a verifiable weights file (by an older version of this "
                        f"pipeline), so it is not loaded; {logged.repair}.")  # fmt: skip
    # A progress bar for one small file would be the only thing on stderr; the user's setting wins.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=f"{logged.location.rstrip('/')}/{logged_model.WEIGHTS_PATH}", dst_path=folder))  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - a deleted file, an unreachable store: the same for the user
            raise UserError(f"{logged.who}'s generator weights ({logged_model.WEIGHTS_PATH}) cannot be fetched "
                            f"({connection.first_line(exc).rstrip('.')}); {logged.repair}.") from None  # fmt: skip
        found = files.sha256_file(path)
        if found != logged.recorded:
            raise UserError(f"{logged.who}'s generator weights fail their SHA-256 check (recorded "
                            f"{logged.recorded[:12]}, found {found[:12]}); refusing to load them.")  # fmt: skip
        try:
            state = files.load_checkpoint(path)
        except UserError as exc:
            raise UserError(f"{logged.who}'s generator weights cannot be loaded ({str(exc).rstrip('.')}).") from None
    weights, arch = state.get("generator"), state.get("architecture", {})
    if not isinstance(weights, dict) or not isinstance(arch, dict):
        raise UserError(f"{logged.who}'s weights file holds no generator; {logged.repair}.")
    return weights, {key: float(value) for key, value in arch.items() if key in ("bn_eps", "bn_momentum")}


def class_index(label: str, data_params: DataParams) -> int:
    """--label as a class index: its number or its name."""
    names = data.class_names(data_params)
    if label.isdigit() and int(label) < len(names):
        return int(label)
    if label in names:
        return names.index(label)
    raise UserError(f"--label {label!r} is not a class of {data_params.dataset}: give 0-{len(names) - 1} or one of "
                    f"{', '.join(names)}.")  # fmt: skip


def image_grid(pixels: np.ndarray) -> np.ndarray:
    """The first samples (at most 100) as one square grid."""
    rows = math.isqrt(min(len(pixels), 100) - 1) + 1
    return data.make_grid(pixels[: rows * rows], rows)


def main(
    params_path: Path = Path("params.yaml"), n: int = 25, seed: int | None = None, run: str | None = None,
    model: str | None = None, grid: Path | None = None, output: Path | None = None, folder: Path | None = None,
    label: str | None = None, raw: bool = False,
) -> None:  # fmt: skip
    params = load_params(params_path)
    paths = Layout(dataset=params.data.dataset)
    if run and model:
        raise UserError("give --run or --model, not both.")
    if n < 1:
        raise UserError(f"-n must be at least 1, not {n}.")
    if raw and (run or model):
        raise UserError("--raw reads the train stage's models/generator.pt; MLflow holds only the generator a run gives.")
    device = machine.pick_device(params.train.device)
    if run or model:
        from pipeline.tracking import connection

        uri, experiment_id, _ = connection.open_experiment(params.tracking.experiment, Path.cwd(), dict(os.environ))
        logged = by_uri(model) if model else by_run(run or "", experiment_id)
        weights, arch = trusted_weights(logged)
        source = model or f"MLflow run {run}"
        settings = params.model.arch_params.model_copy(update=arch)  # as the weights file records them
        generator = from_weights(weights, params.model.model_copy(update={params.model.arch: settings}), source).to(device)
    else:
        source = str(paths.generator)
        if not paths.generator.is_file():
            raise UserError(f"{paths.generator} is missing; train first (`dvc repro train`) or give --run or --model.")
        generator = load_generator(paths.generator, params.model, device, len(data.class_names(params.data)), raw)
    # The evaluate stage's seed and batch size by default: the same noise, so the same samples.
    seed = params.evaluate.seed if seed is None else seed
    labels = None
    if label is not None and not generator.n_classes:
        raise UserError(f"{source} is not a conditional generator (model.conditional): it cannot be asked for a class.")
    if label is not None:
        labels = torch.full((n,), class_index(label, params.data))
    elif generator.n_classes:  # the classes evaluate asks for: the real test set's shares
        labels = requested_labels(n, scorer.load_reference(paths.reference).label_distribution, seed)
    pixels = generate(generator, n, seed, params.evaluate.batch_size, device, labels).numpy()  # (n, 28, 28) uint8
    if grid is None and output is None and folder is None:
        grid = Path("generated.png")
    written = []
    if grid is not None:
        data.save_png(image_grid(pixels), grid)
        written.append(str(grid))
    if output is not None:
        if output.suffix != ".npy":
            raise UserError(f"--output {output} must end in .npy (N x 28 x 28 uint8, as evaluate --samples reads).")
        with files.atomic_path(output) as tmp, open(tmp, "wb") as fh:
            np.save(fh, pixels)
        written.append(str(output))
    if folder is not None:
        for i, image in enumerate(pixels):
            data.save_png(image, folder / f"{i:06d}.png", scale=1)
        written.append(f"{folder}/ ({n} PNGs)")
    print(f"{n} samples from {source} (seed {seed}) -> {', '.join(written)}")
