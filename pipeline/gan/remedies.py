"""Known remedies for unstable GAN training, each a param that is off by default (the tutorial has none).

- `train.r1_gamma`: the R1 gradient penalty (Mescheder et al. 2018), gamma / 2 x the mean over the
  real batch of |d D(x) / d x|^2, added to D's loss on real images: D may not grow steep around
  the real data, which keeps its gradients to G informative. With `train.r1_every` = k > 1 it is
  lazy (StyleGAN2's lazy regularisation): only every k-th step, with gamma x k, the same penalty
  on average for about 1/k of its cost (a double backward through D on the real batch).
- `train.augment`: differentiable augmentation (Zhao et al. 2020, "DiffAugment"): the same random
  translation and/or cutout applied to every image D sees, real or fake, in D's and G's updates
  alike, so that D cannot memorise the training images and G is not taught the augmentation.
  Translation shifts by up to 1/8 of the side (3 pixels of 28) and fills with the background
  (-1, black: MNIST's), cutout blanks a square of half the side to the background.
- `train.ema_warmup`: the EMA of G (`train.ema_decay`) ramps its decay linearly from 0 over the
  first `ema_warmup` steps, so that a short run's EMA is not the average of random initial weights.

Every random draw comes from torch's generator of the images' device, as the batches do: a resumed
run continues bit-identically.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn

if TYPE_CHECKING:
    from pipeline.params import TrainParams

BACKGROUND = -1.0  # the model's pixel value of black, MNIST's background (data.to_model)


def augmentations(spec: str) -> tuple[str, ...]:
    """`train.augment` (one of AUGMENT_CHOICES) as the names it holds."""
    return () if spec == "none" else tuple(spec.split(","))


@dataclass(frozen=True)
class Remedies:
    """What a training step applies beyond the tutorial: R1 (its gamma, 0 = off, and every how many
    steps) and the augmentations."""

    r1_gamma: float = 0.0
    augment: tuple[str, ...] = ()
    r1_every: int = 1

    @classmethod
    def of(cls, params: TrainParams) -> Remedies:
        return cls(params.r1_gamma, augmentations(params.augment), params.r1_every)

    def r1_at(self, step: int) -> float:
        """R1's gamma at the training step `step` (0-based; the steps done before it): gamma x r1_every
        at every r1_every-th step from the first, else 0 (none this step)."""
        return self.r1_gamma * self.r1_every if self.r1_gamma and step % self.r1_every == 0 else 0.0

    def view(self, images: torch.Tensor) -> torch.Tensor:
        """The images as D sees them: augmented, or themselves."""
        return diff_augment(images, self.augment) if self.augment else images


def translate(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Each image of `x` (B, C, H, W) moved by its (dy, dx) in `shifts` (B, 2), the uncovered pixels
    set to the background: a gather, so gradients flow to the pixels that moved."""
    b, _, h, w = x.shape
    rows = torch.arange(h, device=x.device).view(1, h, 1) - shifts[:, 0].view(b, 1, 1)  # source row
    cols = torch.arange(w, device=x.device).view(1, 1, w) - shifts[:, 1].view(b, 1, 1)
    inside = ((rows >= 0) & (rows < h)).expand(b, h, w) & ((cols >= 0) & (cols < w)).expand(b, h, w)
    flat = (rows.clamp(0, h - 1) * w).expand(b, h, w) + cols.clamp(0, w - 1).expand(b, h, w)
    moved = x.flatten(2).gather(2, flat.flatten(1).unsqueeze(1).expand(-1, x.shape[1], -1))
    return torch.where(inside.unsqueeze(1), moved.view_as(x), torch.full_like(x, BACKGROUND))


def cutout(x: torch.Tensor, corners: torch.Tensor, size: int) -> torch.Tensor:
    """Each image of `x` with the size x size square at its (top, left) in `corners` (B, 2) set to the
    background (the square may reach past the edge, as in DiffAugment)."""
    _, _, h, w = x.shape
    rows = torch.arange(h, device=x.device).view(1, h, 1) - corners[:, 0].view(-1, 1, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w) - corners[:, 1].view(-1, 1, 1)
    square = (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)
    return torch.where(square.unsqueeze(1), torch.full_like(x, BACKGROUND), x)


def random_translation(x: torch.Tensor) -> torch.Tensor:
    """`x` (B, C, H, W), each image moved by its own draw of up to 1/8 of the side each way."""
    h = x.shape[2]
    return translate(x, torch.randint(-(h // 8), h // 8 + 1, (x.shape[0], 2), device=x.device))


def random_cutout(x: torch.Tensor) -> torch.Tensor:
    """`x` (B, C, H, W), each image with a square of half the side blanked where its own draw puts it."""
    size = x.shape[2] // 2
    corners = torch.randint(0, x.shape[2] + 1, (x.shape[0], 2), device=x.device) - size // 2
    return cutout(x, corners, size)


# The registry of train.augment's names: it takes one, or two joined by a comma (applied in that order).
AUGMENTATIONS = {"translation": random_translation, "cutout": random_cutout}
AUGMENT_CHOICES = (
    "none",
    *AUGMENTATIONS,
    *(",".join(pair) for pair in itertools.combinations(AUGMENTATIONS, 2)),
)


def diff_augment(x: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
    """`x` under the random augmentations `names` (each image its own draw), in the order given."""
    for name in names:
        x = AUGMENTATIONS[name](x)
    return x


def r1_penalty(logits_real: torch.Tensor, real: torch.Tensor, gamma: float) -> torch.Tensor:
    """gamma / 2 x the batch mean of |d logit / d x|^2 over the real images `real` (which D was given with
    requires_grad), built into the graph so that D's backward includes it."""
    (grad,) = torch.autograd.grad(logits_real.sum(), real, create_graph=True)
    return gamma / 2 * grad.float().square().flatten(1).sum(1).mean()


@dataclass
class EmaWarmup:
    """The EMA update with the decay ramped over the first `warmup` steps: decay x min(1, step / warmup),
    step being the training step the update follows (set by the loop before each update)."""

    decay: float
    warmup: int
    step: int = 0

    def current(self) -> float:
        return self.decay * min(1.0, self.step / self.warmup)

    def __call__(self, averaged: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor) -> None:
        get_ema_multi_avg_fn(self.current())(averaged, current, n)  # torch's own update, at today's decay
