"""What an architecture is: a name, its own params section, and how to build its G and D."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from pipeline.sections import Section

if TYPE_CHECKING:
    from pipeline.params import ModelParams


@dataclass(frozen=True)
class Architecture:
    """One generator/discriminator pair that `model.arch` can name.

    `params` is its own section, `model.<name>` in params.yaml (its sizes and settings; the
    shared `model` keys, latent_dim, conditional and spectral_norm, are read from `model`).
    The builders take the whole model section, the number of classes a conditional pair is
    conditioned on (0: unconditional), and keyword speed levers, which an architecture without
    that lever ignores. `from_weights` reads a trained generator's sizes off its weights: the
    model section that rebuilds it and its number of classes. Every generator has the attributes
    `latent_dim` and `n_classes`, which sampling reads.
    """

    name: str
    params: type[Section]
    generator: Callable[
        ..., nn.Module
    ]  # (model, *, n_classes, **levers) -> G: z (N, latent) [, labels] -> images
    discriminator: Callable[
        ..., nn.Module
    ]  # (model, *, n_classes, **levers) -> D: images [, labels] -> logits (N,)
    from_weights: Callable[[dict[str, torch.Tensor], ModelParams], tuple[ModelParams, int]]
    flat_keys: tuple[str, ...] = ()  # keys that users may still write directly under `model` (moved in here)

    def __post_init__(self) -> None:
        unknown = set(self.flat_keys) - set(self.params.model_fields)
        if unknown:
            raise RuntimeError(f"architecture {self.name}: flat_keys {sorted(unknown)} are not its params")


def split_class_column(z: torch.Tensor, latent_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z with the class as its last column (N, latent_dim + 1), as MLflow's pyfunc passes one tensor to a
    conditional generator, split into z (N, latent_dim) and the labels (N,)."""
    if z.shape[-1] != latent_dim + 1:
        raise ValueError(
            f"a conditional generator takes z and labels, or z with the class as its "
            f"last column ({latent_dim + 1} columns); got {z.shape[-1]}"
        )
    return z[:, :-1].contiguous(), z[:, -1].round().long()


def spectral_normalise(module: nn.Module) -> None:
    """Each conv and dense layer of `module` divided by its largest singular value (one power iteration a step)."""
    for m in list(module.modules()):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.utils.parametrizations.spectral_norm(m)
