"""The generator/discriminator pairs, by name: `model.arch` picks one from ARCHITECTURES.

Each module here that defines `ARCHITECTURE` (a base.Architecture) is one, with its own params
section `model.<name>`; adding one is adding a module (see docs/architecture.md, "Add an
architecture"). The functions below build whichever one the model section names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pipeline.gan.architectures.base import Architecture
from pipeline.registry import discover

if TYPE_CHECKING:
    from pipeline.params import ModelParams

ARCHITECTURES: dict[str, Architecture] = discover(__name__, "ARCHITECTURE")


def build_generator(model: ModelParams, *, n_classes: int, **levers: bool) -> Any:
    """The generator `model` describes: z (N, latent_dim) [, labels (N,)] -> images (N, 1, 28, 28) in [-1, 1]."""
    return ARCHITECTURES[model.arch].generator(model, n_classes=n_classes, **levers)


def build_discriminator(model: ModelParams, *, n_classes: int, **levers: bool) -> nn.Module:
    """The discriminator `model` describes: images [, labels] -> logits (N,)."""
    return ARCHITECTURES[model.arch].discriminator(model, n_classes=n_classes, **levers)


def model_for_weights(weights: dict[str, torch.Tensor], model: ModelParams) -> tuple[ModelParams, int]:
    """The model section that rebuilds the generator holding `weights` (its sizes read off them), and
    the number of classes it is conditioned on."""
    return ARCHITECTURES[model.arch].from_weights(weights, model)


__all__ = ["ARCHITECTURES", "Architecture", "build_discriminator", "build_generator", "model_for_weights"]
