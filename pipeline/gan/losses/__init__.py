"""The GAN objectives, by name: `train.loss` picks one from LOSSES.

Each module here that defines `LOSS` (a base.GanLoss) is one objective; adding one is adding a
module (see docs/architecture.md, "Add a loss").
"""

from __future__ import annotations

from pipeline.gan.losses.base import GanLoss, Term
from pipeline.registry import discover

LOSSES: dict[str, GanLoss] = discover(__name__, "LOSS")

__all__ = ["LOSSES", "GanLoss", "Term"]
