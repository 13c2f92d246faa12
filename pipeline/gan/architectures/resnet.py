"""An SNGAN-style residual pair sized for 28 x 28 (`model.arch: resnet`), after Miyato et al. 2018.

G: z -> Dense -> C x 7 x 7 -> two up-sampling residual blocks (7 -> 14 -> 28) -> BN, ReLU,
Conv3x3 -> tanh. Each block is BN, ReLU, Upsample x2, Conv3x3, BN, ReLU, Conv3x3 beside a
shortcut Upsample x2, Conv1x1. A conditional G normalises with conditional batch norm: each
class has its own scale and shift (an embedding, initialised to 1 and 0) after a plain batch norm.

D: an optimised first block (Conv3x3, ReLU, Conv3x3, AvgPool beside AvgPool, Conv1x1: 28 -> 14),
a down-sampling residual block (14 -> 7), two residual blocks at 7 x 7, ReLU, the sum over
positions, Dense(1); a conditional D adds the projection of those features on a label embedding.
`model.spectral_norm` normalises every conv and dense layer of D, as SNGAN does.

Its sizes are `model.resnet` (channels of G and of D); the shared `model` keys (latent_dim,
conditional, spectral_norm) are read from `model`. The tutorial's speed levers are the DCGAN's
and do not apply here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.data import IMAGE_SIZE
from pipeline.gan.architectures.base import Architecture, spectral_normalise, split_class_column
from pipeline.sections import PositiveInt, Section

if TYPE_CHECKING:
    from pipeline.params import ModelParams

BASE_SIZE = IMAGE_SIZE // 4  # 7 -> 14 -> 28


class ResnetParams(Section):
    """`model.resnet`: the channels of G's and D's residual blocks."""

    g_channels: PositiveInt = 128
    d_channels: PositiveInt = 128


class ConditionalBatchNorm(nn.Module):
    """Batch norm whose scale and shift are the class's (an embedding); a plain batch norm without classes."""

    def __init__(self, channels: int, n_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=not n_classes)
        self.scale = nn.Embedding(n_classes, channels) if n_classes else None
        self.shift = nn.Embedding(n_classes, channels) if n_classes else None
        if self.scale is not None and self.shift is not None:
            nn.init.ones_(self.scale.weight)
            nn.init.zeros_(self.shift.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        x = self.norm(x)
        if self.scale is None or self.shift is None:
            return x
        if labels is None:
            raise ValueError("a conditional generator needs one label per sample")
        return x * self.scale(labels)[:, :, None, None] + self.shift(labels)[:, :, None, None]


class UpBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, n_classes: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = (
            ConditionalBatchNorm(in_ch, n_classes),
            ConditionalBatchNorm(out_ch, n_classes),
        )
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        h = F.interpolate(F.relu(self.norm1(x, labels)), scale_factor=2)
        h = self.conv2(F.relu(self.norm2(self.conv1(h), labels)))
        return h + self.shortcut(F.interpolate(x, scale_factor=2))


class Generator(nn.Module):
    """z (N, latent_dim) [, labels (N,)] -> images (N, 1, 28, 28) in [-1, 1]."""

    def __init__(self, latent_dim: int = 100, channels: int = 128, n_classes: int = 0) -> None:
        super().__init__()
        self.latent_dim, self.channels, self.n_classes = latent_dim, channels, n_classes
        self.dense = nn.Linear(latent_dim, channels * BASE_SIZE * BASE_SIZE)
        self.blocks = nn.ModuleList([UpBlock(channels, channels, n_classes) for _ in range(2)])
        self.norm = nn.BatchNorm2d(channels)
        self.out = nn.Conv2d(channels, 1, 3, padding=1)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """A conditional generator needs `labels`; given one tensor, as MLflow's pyfunc passes it, it
        reads the class from z's last column (N, latent_dim + 1)."""
        if self.n_classes and labels is None:
            z, labels = split_class_column(z, self.latent_dim)
        x = self.dense(z).view(-1, self.channels, BASE_SIZE, BASE_SIZE)
        for block in self.blocks:
            x = block(x, labels if self.n_classes else None)
        return torch.tanh(self.out(F.relu(self.norm(x))))


class DownBlock(nn.Module):
    """A residual block of D; `first`: the optimised block on the image (no ReLU before its first conv)."""

    def __init__(self, in_ch: int, out_ch: int, down: bool, first: bool = False) -> None:
        super().__init__()
        self.down, self.first = down, first
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if (in_ch != out_ch or down) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.relu(self.conv1(x if self.first else F.relu(x))))
        if self.down:
            h = F.avg_pool2d(h, 2)
        s = x
        if self.shortcut is not None:  # the optimised block pools before its 1x1 conv, the others after
            s = self.shortcut(F.avg_pool2d(s, 2)) if self.first else self.shortcut(s)
            s = F.avg_pool2d(s, 2) if self.down and not self.first else s
        return h + s


class Discriminator(nn.Module):
    """images (N, 1, 28, 28) [, labels] -> logits (N,)."""

    def __init__(self, channels: int = 128, n_classes: int = 0, spectral_norm: bool = False) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.blocks = nn.Sequential(
            DownBlock(1, channels, down=True, first=True),  # 28 -> 14
            DownBlock(channels, channels, down=True),  # 14 -> 7
            DownBlock(channels, channels, down=False),
            DownBlock(channels, channels, down=False),
        )
        self.head = nn.Linear(channels, 1)
        self.embed = nn.Embedding(n_classes, channels) if n_classes else None
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        if self.embed is not None:
            nn.init.xavier_uniform_(self.embed.weight)
        if spectral_norm:
            spectral_normalise(self)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = F.relu(self.blocks(images)).sum(dim=(2, 3))  # (N, C)
        logits = self.head(h).squeeze(1)
        if self.embed is None:
            return logits
        if labels is None:
            raise ValueError("a conditional discriminator needs the labels of its images")
        return logits + (self.embed(labels).to(h.dtype) * h).sum(dim=1)


def build_generator(model: ModelParams, *, n_classes: int, **_levers: bool) -> Generator:
    return Generator(model.latent_dim, model.resnet.g_channels, n_classes if model.conditional else 0)


def build_discriminator(model: ModelParams, *, n_classes: int, **_levers: bool) -> Discriminator:
    return Discriminator(model.resnet.d_channels, n_classes if model.conditional else 0, model.spectral_norm)


def from_weights(weights: dict[str, torch.Tensor], model: ModelParams) -> tuple[ModelParams, int]:
    """`model` with the sizes a trained generator's weights show, and its number of classes (0: none)."""
    dense = weights["dense.weight"]  # (C * 7 * 7, latent)
    scale = weights.get("blocks.0.norm1.scale.weight")
    n_classes = 0 if scale is None else int(scale.shape[0])
    sizes = model.resnet.model_copy(update={"g_channels": int(dense.shape[0]) // (BASE_SIZE * BASE_SIZE)})
    shared = {"latent_dim": int(dense.shape[1]), "conditional": bool(n_classes)}
    return model.model_copy(update={**shared, "arch": "resnet", "resnet": sizes}), n_classes


ARCHITECTURE = Architecture(
    name="resnet",
    params=ResnetParams,
    generator=build_generator,
    discriminator=build_discriminator,
    from_weights=from_weights,
)
