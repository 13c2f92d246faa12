"""The trained generator in and out: from the train stage's file, and in the form MLflow gets it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline import files
from pipeline.errors import UserError
from pipeline.gan.architectures import build_generator
from pipeline.gan.architectures.dcgan import Generator
from pipeline.params import ModelParams


def load_generator(
    path: Path, params: ModelParams, device: torch.device, n_classes: int, raw: bool = False
) -> Generator:
    """The trained generator saved by the train stage (weights only, checksum verified): the one the
    stage exports (the EMA of G with train.ema_decay), or with `raw` the trained G itself."""
    state = files.load_checkpoint(path, map_location=device)
    if raw and "generator_raw" not in state:
        raise UserError(f"{path} holds one generator (trained without train.ema_decay): leave out --raw.")
    generator = build_generator(params, n_classes=n_classes).to(device)
    try:
        generator.load_state_dict(state["generator_raw" if raw else "generator"])
    except (KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"{path} does not match the model section of params.yaml ({first}).") from None
    return generator.eval()


def for_export(
    model: ModelParams, weights: dict[str, torch.Tensor], n_classes: int
) -> tuple[Generator, str, np.ndarray]:
    """The generator as MLflow gets it: on the CPU, in inference mode, with its name and an input example.

    MLflow's pyfunc passes one tensor, so a conditional generator's example carries the class
    in z's last column (see Generator.forward).
    """
    generator = build_generator(model, n_classes=n_classes)
    generator.load_state_dict({k: v.cpu() for k, v in weights.items()})
    # A batch of 8 in the example keeps the exported model's batch size dynamic.
    example = np.random.default_rng(0).standard_normal((8, model.latent_dim)).astype(np.float32)
    if generator.n_classes:
        example = np.concatenate([example, (np.arange(8) % n_classes)[:, None].astype(np.float32)], axis=1)
    return generator.eval(), "generator", example
