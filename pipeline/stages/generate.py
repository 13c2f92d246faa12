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
        raise UserError(f"{logged.who} was logged without a verifiable weights file (by an older version of this "
                        f"pipeline), so it is not loaded; {logged.repair}.")  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        path = download_weights(logged, Path(folder))
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
