"""What `generate` and `serve` share: the generator a command names, and its samples drawn as evaluate draws them.

The generator comes from the train stage's DVC output (default), from the model an MLflow
training run logged (`run`), or from the registry (`model`: models:/NAME@champion,
models:/NAME/3). From MLflow only the weights file logged beside the model is read, weights-only
and after its SHA-256 matched the one recorded when it was logged (loading the MLflow model itself
would unpickle). Whatever the source, its weights go into the pipeline's own generator, so the
samples are those `evaluate` draws: the same seed, N and batch size give the same pixels.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from pipeline import data, files
from pipeline.errors import UserError
from pipeline.gan.architectures import build_generator, model_for_weights
from pipeline.gan.architectures.dcgan import Generator
from pipeline.gan.export import load_generator
from pipeline.gan.sampling import generate, requested_labels
from pipeline.layout import Layout
from pipeline.params import DataParams, ModelParams, Params
from pipeline.scoring import scorer
from pipeline.tracking.logged_model import Logged, by_run, by_uri, download_weights


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


def trusted_weights(logged: Logged) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The weights (and batch-norm settings) in `logged`'s weights file, read weights-only once its
    SHA-256 matches the recorded one. Never the MLflow model itself: loading that unpickles."""
    import tempfile

    if not logged.recorded:
        raise UserError(
            f"{logged.who} was logged without a verifiable weights file (by an older version of this "
            f"pipeline), so it is not loaded; {logged.repair}."
        )
    with tempfile.TemporaryDirectory() as folder:
        path = download_weights(logged, Path(folder))
        found = files.sha256_file(path)
        if found != logged.recorded:
            raise UserError(
                f"{logged.who}'s generator weights fail their SHA-256 check (recorded "
                f"{logged.recorded[:12]}, found {found[:12]}); refusing to load them."
            )
        try:
            state = files.load_checkpoint(path)
        except UserError as exc:
            raise UserError(
                f"{logged.who}'s generator weights cannot be loaded ({str(exc).rstrip('.')})."
            ) from None
    weights, arch = state.get("generator"), state.get("architecture", {})
    if not isinstance(weights, dict) or not isinstance(arch, dict):
        raise UserError(f"{logged.who}'s weights file holds no generator; {logged.repair}.")
    return weights, {key: float(value) for key, value in arch.items() if key in ("bn_eps", "bn_momentum")}


def class_index(label: str, data_params: DataParams, asked_as: str = "--label") -> int:
    """A requested class as an index: its number or its name (`asked_as`: how the user gave it)."""
    names = data.class_names(data_params)
    if label.isdigit() and int(label) < len(names):
        return int(label)
    if label in names:
        return names.index(label)
    raise UserError(
        f"{asked_as} {label!r} is not a class of {data_params.dataset}: give 0-{len(names) - 1} or one of "
        f"{', '.join(names)}."
    )


def chosen_generator(
    params: Params, device: torch.device, run: str | None = None, model: str | None = None, raw: bool = False
) -> tuple[Generator, str]:
    """The generator `run` or `model` names (else the train stage's output), on `device`, and where it came from."""
    if run and model:
        raise UserError("give --run or --model, not both.")
    if raw and (run or model):
        raise UserError(
            "--raw reads the train stage's models/generator.pt; MLflow holds only the generator a run gives."
        )
    if run or model:
        from pipeline.tracking import connection

        _, experiment_id, _ = connection.open_experiment(
            params.tracking.experiment, Path.cwd(), dict(os.environ)
        )
        logged = by_uri(model) if model else by_run(run or "", experiment_id)
        weights, arch = trusted_weights(logged)
        source = model or f"MLflow run {run}"
        settings = params.model.arch_params.model_copy(update=arch)  # as the weights file records them
        generator = from_weights(
            weights, params.model.model_copy(update={params.model.arch: settings}), source
        )
        return generator.to(device), source
    paths = Layout(dataset=params.data.dataset)
    if not paths.generator.is_file():
        raise UserError(
            f"{paths.generator} is missing; train first (`dvc repro train`) or give --run or --model."
        )
    n_classes = len(data.class_names(params.data))
    return load_generator(paths.generator, params.model, device, n_classes, raw), str(paths.generator)


def draw(
    generator: Generator,
    source: str,
    params: Params,
    n: int,
    seed: int | None,
    label: str | None,
    device: torch.device,
    asked_as: str = "--label",
) -> tuple[np.ndarray, int]:
    """n samples (uint8, (n, 28, 28)) and the seed they were drawn with: by default the evaluate
    stage's seed and batch size, so the same noise and the same samples. A conditional generator
    draws only `label`'s class, or else the classes evaluate asks for (the real test set's shares)."""
    seed = params.evaluate.seed if seed is None else seed
    labels = None
    if label is not None and not generator.n_classes:
        raise UserError(
            f"{source} is not a conditional generator (model.conditional): it cannot be asked for a class."
        )
    if label is not None:
        labels = torch.full((n,), class_index(label, params.data, asked_as))
    elif generator.n_classes:
        reference = Layout(dataset=params.data.dataset).reference
        labels = requested_labels(n, scorer.load_reference(reference).label_distribution, seed)
    return generate(generator, n, seed, params.evaluate.batch_size, device, labels).numpy(), seed
