"""The tutorial's objective: binary cross-entropy on D's sigmoid, real = 1, fake = 0, and G
trained towards "real" (the non-saturating form)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.gan.losses.base import GanLoss, Term


def _bce_with(label: float) -> Term:
    def term(logits: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label))

    return term


LOSS = GanLoss(name="bce", d_real=_bce_with(1.0), d_fake=_bce_with(0.0), g=_bce_with(1.0))
