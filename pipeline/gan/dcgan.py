"""The tutorial's DCGAN: Generator, Discriminator, building them from params, the layer summary.

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

from collections.abc import Iterator

import torch
from torch import nn

from pipeline.gan.layers import Dropout, TapConv, UpsampleConv, conv_same, keras_batch_norm, keras_init_
from pipeline.params import ModelParams


IMAGE_SIZE = 28
BASE_SIZE = IMAGE_SIZE // 4  # the generator upsamples twice: 7 -> 14 -> 28
LABEL_DIM = 50  # a conditional generator's label embedding, joined to z


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
    ) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.nhwc = nhwc  # inference on the CPU in channels-last activations (the parameters are unchanged)
        self.dense_channels = dense_channels
        self.n_classes = n_classes  # 0: unconditional, the tutorial's
        self.embed = nn.Embedding(n_classes, LABEL_DIM) if n_classes else None
        self.dense = nn.Linear(latent_dim + (LABEL_DIM if n_classes else 0), dense_channels * BASE_SIZE * BASE_SIZE)
        layers: list[nn.Module] = []
        in_ch = dense_channels
        for out_ch in channels:  # 7 -> 14 -> 28
            layers += [
                UpsampleConv(in_ch, out_ch, phased, by_matmul),
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
                if z.shape[-1] != self.latent_dim + 1:
                    raise ValueError(f"a conditional generator takes z and labels, or z with the class as its "
                                     f"last column ({self.latent_dim + 1} columns); got {z.shape[-1]}")  # fmt: skip
                z, labels = z[:, :-1], z[:, -1].round().long()
            z = torch.cat([z, self.embed(labels).to(z.dtype)], dim=1)
        x = torch.relu(self.dense(z)).view(-1, self.dense_channels, BASE_SIZE, BASE_SIZE)
        if self.nhwc and not self.training and x.device.type == "cpu":
            # Inference (sampling, scoring): oneDNN runs G's transposed and 1x1 convs faster on
            # channels-last activations, to the same output (generation about 1.2x faster over all:
            # benchmarks/scoring_levers.py). Training takes UpsampleConv's matmul form
            # in bf16 instead (channels-last too), and NCHW with the transposed conv in fp32.
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
            conv_same(1, c1, 2), *act(),  # 28 -> 14 (no BN on the first block, as in Keras)
            conv_same(c1, c2, 2),  # 14 -> 7
            nn.ZeroPad2d((0, 1, 0, 1)),  # 7 -> 8, the tutorial's ZeroPadding2D
            keras_batch_norm(c2, bn_momentum, bn_eps), *act(),
            conv_same(c2, c3, 2), keras_batch_norm(c3, bn_momentum, bn_eps), *act(),  # 8 -> 4
            conv_same(c3, c4, 1), keras_batch_norm(c4, bn_momentum, bn_eps), *act(),  # 4 -> 4
            nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(c4 * 4 * 4, 1)
        # The projection discriminator: logit + <embed(label), features>, initialised like the head.
        self.embed = nn.Embedding(n_classes, c4 * 4 * 4) if n_classes else None
        keras_init_(self)
        if self.embed is not None:
            nn.init.xavier_uniform_(self.embed.weight)
        if spectral_norm:  # each weight divided by its largest singular value (one power iteration a step)
            for m in list(self.modules()):
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.utils.parametrizations.spectral_norm(m)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.features(images)
        logits = self.head(h).squeeze(1)
        if self.embed is None:
            return logits
        if labels is None:
            raise ValueError("a conditional discriminator needs the labels of its images")
        return logits + (self.embed(labels).to(h.dtype) * h).sum(dim=1)


def build_generator(
    params: ModelParams, *, n_classes: int = 10, fast_upsample: bool = True, fast_output: bool = True,
    fast_layout: bool = True,
) -> Generator:  # fmt: skip
    """The generator of `params` (conditional on `n_classes` with model.conditional); the flags choose
    faster forms of the same function and, for inference on the CPU, channels-last activations."""
    return Generator(
        latent_dim=params.latent_dim,
        dense_channels=params.g_dense_channels,
        channels=tuple(params.g_channels),
        bn_momentum=params.bn_momentum,
        bn_eps=params.bn_eps,
        phased=fast_upsample,
        by_matmul=fast_upsample,
        by_taps=fast_output,
        n_classes=n_classes if params.conditional else 0,
        nhwc=fast_layout,
    )


def build_discriminator(params: ModelParams, *, n_classes: int = 10, fast_dropout: bool = True) -> Discriminator:
    return Discriminator(
        channels=tuple(params.d_channels),
        dropout=params.dropout,
        leaky_slope=params.leaky_slope,
        bn_momentum=params.bn_momentum,
        bn_eps=params.bn_eps,
        fast_dropout=fast_dropout,
        n_classes=n_classes if params.conditional else 0,
        spectral_norm=params.spectral_norm,
    )


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total as Keras counts it: trainable + BN moving mean and variance)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    moving = sum(
        m.running_mean.numel() + m.running_var.numel()
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    )
    return trainable, trainable + moving


def _layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Leaf modules, an UpsampleConv counting as one layer."""
    grouped: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in grouped):
            continue
        if isinstance(module, UpsampleConv):
            grouped.append(name)
            yield name, module
        elif not list(module.children()):
            yield name, module


def summary(model: nn.Module, input_shape: tuple[int, ...], labels: torch.Tensor | None = None) -> str:
    """A Keras-style table: each leaf layer's output shape and parameter count."""
    rows: list[tuple[str, str, int]] = []
    hooks = []
    for name, module in _layers(model):
        def hook(mod: nn.Module, _inp: object, out: torch.Tensor, name: str = name) -> None:
            count = sum(p.numel() for p in mod.parameters())
            rows.append((f"{name} ({type(mod).__name__})", str(tuple(out.shape[1:])), count))

        hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(2, *input_shape), labels)
    model.train(was_training)
    for h in hooks:
        h.remove()
    trainable, total = count_parameters(model)
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{type(model).__name__}", f"{'layer':<{width}}{'output shape':<20}{'params':>10}"]
    lines += [f"{n:<{width}}{s:<20}{c:>10,}" for n, s, c in rows]
    lines.append(f"trainable params: {trainable:,}   total (with BN moving statistics): {total:,}")
    return "\n".join(lines)
