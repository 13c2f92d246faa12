"""Command `generate`: draw samples from a trained generator into files.

The generator comes from the train stage's DVC output (default), an MLflow training run
(`--run RUN_ID`) or the registry (`--model models:/NAME@champion`), read weights-only and
checked (stages/drawing.py). The samples are those `evaluate` draws: the same seed, N and batch
size give the same pixels, and `evaluate --samples` of them gives the stage's scores. A
conditional generator draws the classes evaluate asks for, or only `--label`'s; `--raw` takes
the trained G of an EMA run.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pipeline import data, files, machine
from pipeline.errors import UserError
from pipeline.params import load_params
from pipeline.stages.drawing import chosen_generator, draw


def image_grid(pixels: np.ndarray) -> np.ndarray:
    """The first samples (at most 100) as one square grid."""
    rows = math.isqrt(min(len(pixels), 100) - 1) + 1
    return data.make_grid(pixels[: rows * rows], rows)


def main(
    params_path: Path = Path("params.yaml"),
    n: int = 25,
    seed: int | None = None,
    run: str | None = None,
    model: str | None = None,
    grid: Path | None = None,
    output: Path | None = None,
    folder: Path | None = None,
    label: str | None = None,
    raw: bool = False,
) -> None:
    params = load_params(params_path)
    if n < 1:  # before the generator is loaded: a typo costs no wait
        raise UserError(f"-n must be at least 1, not {n}.")
    device = machine.pick_device(params.train.device)
    generator, source = chosen_generator(params, device, run, model, raw)
    pixels, seed = draw(generator, source, params, n, seed, label, device)
    if grid is None and output is None and folder is None:
        grid = Path("generated.png")
    written = []
    if grid is not None:
        data.save_png(image_grid(pixels), grid)
        written.append(str(grid))
    if output is not None:
        if output.suffix != ".npy":
            raise UserError(
                f"--output {output} must end in .npy (N x 28 x 28 uint8, as evaluate --samples reads)."
            )
        with files.atomic_path(output) as tmp, open(tmp, "wb") as fh:
            np.save(fh, pixels)
        written.append(str(output))
    if folder is not None:
        for i, image in enumerate(pixels):
            data.save_png(image, folder / f"{i:06d}.png", scale=1)
        written.append(f"{folder}/ ({n} PNGs)")
    print(f"{n} samples from {source} (seed {seed}) -> {', '.join(written)}")
