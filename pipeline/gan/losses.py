"""The GAN objectives, by name: `train.loss` picks one from LOSSES.

The tutorial updates D on the real batch and on the fake batch separately (two
`train_on_batch` calls), so an objective is three terms, each a mean over the batch of D's
logits (N,) in float32: D on real images, D on fakes, and G through D.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Term = Callable[[torch.Tensor], torch.Tensor]  # logits (N,) -> scalar loss


@dataclass(frozen=True)
class GanLoss:
    d_real: Term  # D's loss on real images
    d_fake: Term  # D's loss on generated images
    g: Term  # G's loss, through D's logits on its images


def _bce_with(label: float) -> Term:
    def term(logits: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label))

    return term


# The tutorial's: binary cross-entropy on D's sigmoid, real = 1, fake = 0, and G trained
# towards "real" (the non-saturating form).
BCE = GanLoss(d_real=_bce_with(1.0), d_fake=_bce_with(0.0), g=_bce_with(1.0))

# The hinge loss of SAGAN and BigGAN (Lim & Ye 2017; Miyato et al. 2018): D pushes real logits
# above +1 and fake ones below -1, with no gradient once they are; G raises D's logit on its images.
HINGE = GanLoss(
    d_real=lambda logits: F.relu(1.0 - logits).mean(),
    d_fake=lambda logits: F.relu(1.0 + logits).mean(),
    g=lambda logits: -logits.mean(),
)

LOSSES: dict[str, GanLoss] = {"bce": BCE, "hinge": HINGE}
