"""Drawing from a generator: requested labels, batches of samples, the fixed noise of the sample grids,
and the generator with standing batch-norm statistics."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from pipeline import data
from pipeline.data import from_model
from pipeline.gan.architectures.dcgan import Generator


def requested_labels(n: int, distribution: np.ndarray | list[float], seed: int) -> torch.Tensor:
    """n class labels (int64, CPU) drawn from `distribution` with their own seeded RNG: what a conditional
    generator is asked for when it is scored (the real data's class shares)."""
    rng = torch.Generator().manual_seed(seed)
    return torch.multinomial(
        torch.as_tensor(distribution, dtype=torch.float64), n, replacement=True, generator=rng
    )


@torch.no_grad()
def generate(
    generator: Generator,
    n: int,
    seed: int,
    batch_size: int,
    device: torch.device,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """n samples as uint8 pixels (n, 28, 28) on the CPU, in inference mode, from seeded noise.

    The noise is drawn on the CPU from its own generator, so the same seed gives the same
    latent vectors on every device and never disturbs the training RNG. A conditional
    generator draws sample i of class `labels[i]`.
    """
    if generator.n_classes and (labels is None or labels.shape != (n,)):
        raise ValueError(f"a conditional generator needs one label per sample ({n})")
    rng = torch.Generator().manual_seed(seed)
    was_training = generator.training
    generator.eval()
    chunks = []
    for start in range(0, n, batch_size):
        z = torch.randn(min(batch_size, n - start), generator.latent_dim, generator=rng)
        y = (
            labels[start : start + z.shape[0]].to(device)
            if generator.n_classes and labels is not None
            else None
        )
        chunks.append(from_model(generator(z.to(device), y)).cpu())
    generator.train(was_training)
    return torch.cat(chunks)


GRID = 5  # the tutorial's 5x5 sample grid


def fixed_noise(latent_dim: int, seed: int, device: torch.device) -> torch.Tensor:
    """The 25 latent vectors every sample grid is drawn from (its own RNG: training is unaffected)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(GRID * GRID, latent_dim, generator=gen).to(device)


def grid_labels(generator: Generator, device: torch.device) -> torch.Tensor | None:
    """A conditional generator's classes for the grid: 0, 1, 2, ... row by row."""
    return torch.arange(GRID * GRID, device=device) % generator.n_classes if generator.n_classes else None


@torch.no_grad()
def sample_grid(generator: Generator, noise: torch.Tensor) -> np.ndarray:
    """A 5x5 grid (uint8, H x W) of samples in inference mode, as the tutorial's save_imgs."""
    was_training = generator.training
    generator.eval()
    pixels = (
        data.from_model(generator(noise, grid_labels(generator, noise.device))).cpu().numpy()
    )  # (25, 28, 28)
    generator.train(was_training)
    return data.make_grid(pixels, GRID)


STANDING_BATCH = 256  # samples in each batch over which standing statistics are gathered


@torch.no_grad()
def with_standing_stats(generator: Generator, batches: int, seed: int) -> Generator:
    """A copy of `generator` whose batch-norm statistics are those of its own samples, averaged over
    `batches` batches of STANDING_BATCH seeded noise vectors (the classes in turn, for a conditional
    generator), in place of the running averages training left (of past weights, for an EMA of G):
    BigGAN's "standing statistics". The noise has its own RNG; `generator` is left as it was."""
    standing = copy.deepcopy(generator)
    _plain_batchnorm(standing)  # a data-parallel job's SyncBatchNorm would wait for the other processes
    norms = [m for m in standing.modules() if isinstance(m, _BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches
    device = next(standing.parameters()).device
    rng = torch.Generator().manual_seed(seed)
    labels = (
        torch.arange(STANDING_BATCH, device=device) % generator.n_classes if generator.n_classes else None
    )
    standing.train()
    for _ in range(batches):
        standing(torch.randn(STANDING_BATCH, generator.latent_dim, generator=rng).to(device), labels)
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    return standing.train(generator.training)


def _plain_batchnorm(module: torch.nn.Module) -> None:
    """Each SyncBatchNorm inside `module` replaced by a BatchNorm2d of the same state."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.SyncBatchNorm):
            plain = torch.nn.BatchNorm2d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            plain.load_state_dict(child.state_dict())
            setattr(module, name, plain.to(next(child.buffers()).device))
        else:
            _plain_batchnorm(child)
