"""The tutorial's DCGAN (`model.arch: dcgan`): its params section, Generator, Discriminator, their builders.

Every size is a constructor argument; nothing is read from module globals. Layer for
layer these are the Keras tutorial's models: Keras' BatchNormalization(momentum=0.8) is
PyTorch momentum 0.2 (PyTorch weighs the NEW batch by `momentum`), Keras' epsilon 1e-3,
glorot-uniform kernels and zero biases, and Keras' "same" padding for stride 2, which pads
only the bottom/right edge of an even-sized input.

Beyond the tutorial, off by default and leaving the default models untouched: a
class-conditional pair (`n_classes`: G joins a label embedding to z, D adds a projection of
its features on a label embedding, Miyato & Koyama 2018) and spectral normalisation of D.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import torch
from pydantic import Field
from torch import nn

from pipeline.data import IMAGE_SIZE
from pipeline.gan.architectures.base import Architecture, spectral_normalise, split_class_column
from pipeline.gan.layers import Dropout, TapConv, UpsampleConv, conv_same, keras_batch_norm, keras_init_
from pipeline.sections import PositiveInt, Probability, Section

if TYPE_CHECKING:
    from pipeline.params import ModelParams

BASE_SIZE = IMAGE_SIZE // 4  # the generator upsamples twice: 7 -> 14 -> 28
LABEL_DIM = 50  # a conditional generator's label embedding, joined to z


class DcganParams(Section):
    """`model.dcgan`: the tutorial's sizes and Keras settings; the defaults are the tutorial's model."""

    g_dense_channels: PositiveInt = 128  # Dense(latent -> C*7*7), reshaped to C x 7 x 7
    g_channels: Annotated[list[PositiveInt], Field(min_length=2, max_length=2)] = [128, 64]
    d_channels: Annotated[list[PositiveInt], Field(min_length=4, max_length=4)] = [32, 64, 128, 256]
    dropout: Probability = 0.25
    leaky_slope: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.2
    bn_momentum: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.8  # Keras convention
    bn_eps: Annotated[float, Field(gt=0.0, le=0.1)] = 1e-3  # Keras default


class Generator(nn.Module):
    """z (N, latent_dim) -> images (N, 1, 28, 28) in [-1, 1]."""

    def __init__(
        self,
        latent_dim: int = 100,
        dense_channels: int = 128,
        channels: tuple[int, int] = (128, 64),
        bn_momentum: float = 0.8,
        bn_eps: float = 1e-3,
        phased: bool = True,
        by_taps: bool = True,
        n_classes: int = 0,
        by_matmul: bool = True,
        nhwc: bool = True,
        upsample_by_taps: bool = False,
    ) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.nhwc = nhwc  # inference on the CPU in channels-last activations (the parameters are unchanged)
        self.dense_channels = dense_channels
        self.n_classes = n_classes  # 0: unconditional, the tutorial's
        self.embed = nn.Embedding(n_classes, LABEL_DIM) if n_classes else None
        self.dense = nn.Linear(
            latent_dim + (LABEL_DIM if n_classes else 0), dense_channels * BASE_SIZE * BASE_SIZE
        )
        layers: list[nn.Module] = []
        in_ch = dense_channels
        for out_ch in channels:  # 7 -> 14 -> 28
            layers += [
                UpsampleConv(in_ch, out_ch, phased, by_matmul, upsample_by_taps),
                keras_batch_norm(out_ch, bn_momentum, bn_eps),
                nn.ReLU(inplace=True),
            ]
            in_ch = out_ch
        layers += [TapConv(in_ch, 1, by_taps), nn.Tanh()]
        self.body = nn.Sequential(*layers)
        keras_init_(self)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """A conditional generator needs `labels` (N,); given one tensor, as MLflow's pyfunc passes
        it, it reads the class from z's last column (N, latent_dim + 1)."""
        if self.embed is not None:
            if labels is None:
                z, labels = split_class_column(z, self.latent_dim)
            z = torch.cat([z, self.embed(labels).to(z.dtype)], dim=1)
        x = torch.relu(self.dense(z)).view(-1, self.dense_channels, BASE_SIZE, BASE_SIZE)
        if self.nhwc and not self.training and x.device.type == "cpu":
            # Inference (sampling, scoring): oneDNN runs G's transposed and 1x1 convs faster on
            # channels-last activations, to the same output (benchmarks/scoring_levers.py measures
            # it). Training takes UpsampleConv's matmul form in bf16 instead (channels-last too),
            # and NCHW with the transposed conv in fp32.
            x = x.contiguous(memory_format=torch.channels_last)
        return self.body(x)


class Discriminator(nn.Module):
    """images (N, 1, 28, 28) -> logits (N,); sigmoid(logit) is the probability of "real"."""

    def __init__(
        self,
        channels: tuple[int, int, int, int] = (32, 64, 128, 256),
        dropout: float = 0.25,
        leaky_slope: float = 0.2,
        bn_momentum: float = 0.8,
        bn_eps: float = 1e-3,
        fast_dropout: bool = True,
        n_classes: int = 0,
        spectral_norm: bool = False,
    ) -> None:
        super().__init__()
        c1, c2, c3, c4 = channels
        self.n_classes = n_classes
        drop = Dropout if fast_dropout else nn.Dropout

        def act() -> list[nn.Module]:
            return [nn.LeakyReLU(leaky_slope, inplace=True), drop(dropout)]

        self.features = nn.Sequential(
            conv_same(1, c1, 2),
            *act(),  # 28 -> 14 (no BN on the first block, as in Keras)
            conv_same(c1, c2, 2),  # 14 -> 7
            nn.ZeroPad2d((0, 1, 0, 1)),  # 7 -> 8, the tutorial's ZeroPadding2D
            keras_batch_norm(c2, bn_momentum, bn_eps),
            *act(),
            conv_same(c2, c3, 2),
            keras_batch_norm(c3, bn_momentum, bn_eps),
            *act(),  # 8 -> 4
            conv_same(c3, c4, 1),
            keras_batch_norm(c4, bn_momentum, bn_eps),
            *act(),  # 4 -> 4
            nn.Flatten(),
        )
        self.head = nn.Linear(c4 * 4 * 4, 1)
        # The projection discriminator: logit + <embed(label), features>, initialised like the head.
        self.embed = nn.Embedding(n_classes, c4 * 4 * 4) if n_classes else None
        keras_init_(self)
        if self.embed is not None:
            nn.init.xavier_uniform_(self.embed.weight)
        if spectral_norm:
            spectral_normalise(self)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.features(images)
        logits = self.head(h).squeeze(1)
        if self.embed is None:
            return logits
        if labels is None:
            raise ValueError("a conditional discriminator needs the labels of its images")
        return logits + (self.embed(labels).to(h.dtype) * h).sum(dim=1)


def build_generator(
    model: ModelParams,
    *,
    n_classes: int,
    fast_upsample: bool | str = True,
    fast_output: bool = True,
    fast_layout: bool = True,
    **_levers: bool,
) -> Generator:
    """The generator of `model` (conditional on `n_classes` with model.conditional); the flags choose
    faster forms of the same function and, for inference on the CPU, channels-last activations;
    `fast_upsample="taps"` trains the up-sampling on the CPU by tap products (UpsampleConv)."""
    sizes: DcganParams = model.dcgan
    return Generator(
        latent_dim=model.latent_dim,
        dense_channels=sizes.g_dense_channels,
        channels=tuple(sizes.g_channels),
        bn_momentum=sizes.bn_momentum,
        bn_eps=sizes.bn_eps,
        phased=bool(fast_upsample),
        by_matmul=fast_upsample is True,
        upsample_by_taps=fast_upsample == "taps",
        by_taps=fast_output,
        n_classes=n_classes if model.conditional else 0,
        nhwc=fast_layout,
    )


def build_discriminator(
    model: ModelParams, *, n_classes: int, fast_dropout: bool = True, **_levers: bool
) -> Discriminator:
    sizes: DcganParams = model.dcgan
    return Discriminator(
        channels=tuple(sizes.d_channels),
        dropout=sizes.dropout,
        leaky_slope=sizes.leaky_slope,
        bn_momentum=sizes.bn_momentum,
        bn_eps=sizes.bn_eps,
        fast_dropout=fast_dropout,
        n_classes=n_classes if model.conditional else 0,
        spectral_norm=model.spectral_norm,
    )


def from_weights(weights: dict[str, torch.Tensor], model: ModelParams) -> tuple[ModelParams, int]:
    """`model` with the sizes a trained generator's weights show (batch-norm settings stay `model`'s),
    and the number of classes it is conditioned on (0: none)."""
    dense = weights["dense.weight"]  # (C * 7 * 7, latent [+ label embedding])
    n_classes = int(weights["embed.weight"].shape[0]) if "embed.weight" in weights else 0
    blocks = sorted(key for key in weights if key.endswith(".conv.weight"))  # the two upsampling convs
    sizes = model.dcgan.model_copy(
        update={
            "g_dense_channels": int(dense.shape[0]) // (BASE_SIZE * BASE_SIZE),
            "g_channels": [int(weights[key].shape[0]) for key in blocks],
        }
    )
    shared = {
        "latent_dim": int(dense.shape[1]) - (LABEL_DIM if n_classes else 0),
        "conditional": bool(n_classes),
    }
    return model.model_copy(update={**shared, "arch": "dcgan", "dcgan": sizes}), n_classes


ARCHITECTURE = Architecture(
    name="dcgan",
    params=DcganParams,
    generator=build_generator,
    discriminator=build_discriminator,
    from_weights=from_weights,
    # These keys sat directly under `model` before architectures had their own sections.
    flat_keys=tuple(DcganParams.model_fields),
)
