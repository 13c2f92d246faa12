"""What a GAN objective is: three terms over D's logits.

The tutorial updates D on the real batch and on the fake batch separately (two
`train_on_batch` calls), so an objective is three terms, each a mean over the batch of D's
logits (N,) in float32: D on real images, D on fakes, and G through D.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Term = Callable[[torch.Tensor], torch.Tensor]  # logits (N,) -> scalar loss


@dataclass(frozen=True)
class GanLoss:
    name: str  # what `train.loss` says to pick it
    d_real: Term  # D's loss on real images
    d_fake: Term  # D's loss on generated images
    g: Term  # G's loss, through D's logits on its images
