"""The hinge loss of SAGAN and BigGAN (Lim & Ye 2017; Miyato et al. 2018): D pushes real logits
above +1 and fake ones below -1, with no gradient once they are; G raises D's logit on its images."""

from __future__ import annotations

import torch.nn.functional as F

from pipeline.gan.losses.base import GanLoss

LOSS = GanLoss(
    name="hinge",
    d_real=lambda logits: F.relu(1.0 - logits).mean(),
    d_fake=lambda logits: F.relu(1.0 + logits).mean(),
    g=lambda logits: -logits.mean(),
)
