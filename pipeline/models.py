"""The tutorial's DCGAN (Generator, Discriminator) and the frozen MNIST Classifier.

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
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import runtime
from pipeline.data import from_model
from pipeline.errors import UserError
from pipeline.params import ClassifierParams, ModelParams

IMAGE_SIZE = 28
BASE_SIZE = IMAGE_SIZE // 4  # the generator upsamples twice: 7 -> 14 -> 28
LABEL_DIM = 50  # a conditional generator's label embedding, joined to z


def _batch_norm(channels: int, keras_momentum: float, eps: float) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=eps, momentum=1.0 - keras_momentum)


def _conv_same(in_ch: int, out_ch: int, stride: int) -> nn.Sequential | nn.Conv2d:
    """3x3 conv with Keras' "same" padding: (0, 1, 0, 1) for stride 2 on even inputs."""
    if stride == 1:
        return nn.Conv2d(in_ch, out_ch, 3, stride=1, padding=1)
    return nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(in_ch, out_ch, 3, stride=stride))


def keras_init_(module: nn.Module) -> None:
    """Keras defaults: glorot-uniform kernels, zero biases (BN keeps gamma=1, beta=0)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# Nearest x2 upsampling then a 3x3 conv: output row 2i reads input rows (i-1, i) with taps
# (w0, w1 + w2), row 2i+1 reads (i, i+1) with (w0 + w1, w2). That is a stride-2 transposed
# conv whose 4 taps per axis are these sums, in this order:
_TAPS = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # (4, 3)


# The same taps by output phase: output row 2i + a (a = 0, 1) is a two-tap conv over rows
# (i + a, i + a + 1) of the input padded by one; phase 0 takes (w0, w1 + w2), phase 1 (w0 + w1, w2).
_PHASE_TAPS = _TAPS[[3, 1, 2, 0]].view(2, 2, 3)  # (a, tap, 3x3 row)


def _zero_border(t: torch.Tensor, top: int, left: int, height: int, width: int) -> None:
    """Zeroes all of t (B, rows, columns, ...) but the block of `height` x `width` at (top, left),
    which the caller fills: cheaper than zeroing all of a large fresh tensor first."""
    t[:, :top] = 0
    t[:, top + height :] = 0
    t[:, top : top + height, :left] = 0
    t[:, top : top + height, left + width :] = 0


class _PhaseProduct(torch.autograd.Function):
    """x (B, C, H, W) -> (B, out, 2H, 2W), channels-last in memory: every 2x2 window of the padded
    input times `matrix` (4C, 4 out; rows: window tap dy, dx, channel; columns: phase a, b, channel)
    gives the four output pixels (2i + a, 2j + b) it feeds, in one matrix product.

    Windows are read from the padded input flattened to (pixels, C), where the window's four taps
    are row offsets 0, 1, W + 2, W + 3. So the backward pass needs no scatter of 4x larger
    tensors: the input gradient is four products accumulated at those offsets, the weight
    gradient one product with the saved windows. Every product is a plain GEMM (oneDNN, bf16 on
    AMX), where oneDNN's own transposed conv runs its backward at a fraction of that speed.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, matrix: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        out = matrix.shape[1] // 4
        row = width + 2  # a padded image row, in flat pixels
        padded = x.new_empty(batch, height + 2, row, channels)
        _zero_border(padded, 1, 1, height, width)
        padded[:, 1:-1, 1:-1] = x.permute(0, 2, 3, 1)
        flat = padded.view(-1, channels)
        n = flat.shape[0] - row - 1  # windows whose four taps lie inside the flat array
        pairs = flat.as_strided((n + row, 2 * channels), (channels, 1))  # pixel p and p + 1: a window's top or bottom row
        windows = x.new_empty(n, 2, 2 * channels)
        windows[:, 0], windows[:, 1] = pairs[:n], pairs[row:]
        windows = windows.view(n, 4 * channels)
        phases = x.new_empty(flat.shape[0], 4 * out)  # the last row + 1 windows are never read
        torch.mm(windows, matrix, out=phases[:n])
        phases = phases.view(batch, height + 2, row, 2, 2, out)
        y = x.new_empty(batch, 2 * height, 2 * width, out)
        pixels = y.view(batch, height, 2, width, 2, out)
        for a in range(2):
            for b in range(2):  # output pixel (2i + a, 2j + b) is phase (a, b) of the window at (i + a, j + b)
                torch.add(phases[:, a : a + height, b : b + width, a, b], bias, out=pixels[:, :, a, :, b])
        ctx.save_for_backward(windows, matrix)
        ctx.dims = batch, channels, height, width, out
        ctx.channels_last = not x.is_contiguous()
        return y.permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        windows, matrix = ctx.saved_tensors
        batch, channels, height, width, out = ctx.dims
        row, n = width + 2, windows.shape[0]
        pixels = grad.permute(0, 2, 3, 1).reshape(batch, height, 2, width, 2, out)
        phases = grad.new_empty(batch, height + 2, row, 2, 2, out)
        for a in range(2):
            for b in range(2):
                _zero_border(phases[:, :, :, a, b], a, b, height, width)
                phases[:, a : a + height, b : b + width, a, b] = pixels[:, :, a, :, b]
        phases = phases.view(-1, 4 * out)[:n]
        grad_x = grad_matrix = grad_bias = None
        if ctx.needs_input_grad[0]:
            flat = grad.new_zeros(phases.shape[0] + row + 1, channels)
            for tap, offset in enumerate((0, 1, row, row + 1)):
                flat[offset : offset + n].addmm_(phases, matrix[tap * channels : (tap + 1) * channels].t())
            grad_x = flat.view(batch, height + 2, row, channels)[:, 1:-1, 1:-1].permute(0, 3, 1, 2)
            grad_x = grad_x.contiguous(memory_format=torch.channels_last if ctx.channels_last else torch.contiguous_format)
        if ctx.needs_input_grad[1]:
            grad_matrix = windows.t() @ phases
        if ctx.needs_input_grad[2]:
            sums = phases.sum(0).to(torch.promote_types(phases.dtype, torch.float32))
            grad_bias = sums.view(4, out).sum(0).to(phases.dtype)
        return grad_x, grad_matrix, grad_bias


class UpsampleConv(nn.Module):
    """Nearest x2 upsampling followed by a 3x3 "same" conv, optionally by output phase.

    `phased`: as one stride-2 transposed conv (4x4 kernel summed from the 3x3 one), the same
    function with 16 instead of 36 multiply-adds per output pixel and channel pair, and no 4x
    larger intermediate. With `by_matmul` too, in training on the CPU, the phases run as one
    matrix product over the 2x2 windows of the padded input (`_PhaseProduct`): the same function
    in another order of sums, with more multiply-adds (the border's windows: x1.3 at 14 -> 28,
    x1.65 at 7 -> 14) but forward and backward together 1.2x (14 -> 28) and 1.4x (7 -> 14)
    faster at batch 128 in bf16 on AMX, where oneDNN's transposed-conv backward runs far below
    its matmul speed; the training step gained 11%. In fp32 the extra multiply-adds made it
    1.2-1.8x slower, so it runs only in the dtypes of `matmul_dtypes`. Its output is
    channels-last in memory. Inference keeps the transposed conv. The parameters are the 3x3
    conv's in every form, so checkpoints do not depend on it.
    """

    matmul_dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,)

    def __init__(self, in_ch: int, out_ch: int, phased: bool = True, by_matmul: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.phased = phased
        self.by_matmul = by_matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.phased:
            return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        if self.by_matmul and self.training and x.device.type == "cpu" and dtype in self.matmul_dtypes:
            with torch.autocast("cpu", enabled=False):
                weight = self.conv.weight
                taps = _PHASE_TAPS.to(weight)
                matrix = torch.einsum("aty,bsx,oiyx->tsiabo", taps, taps, weight).reshape(4 * weight.shape[1], -1)
                return _PhaseProduct.apply(x.to(dtype), matrix.to(dtype), self.conv.bias.to(dtype))
        taps = _TAPS.to(self.conv.weight)
        kernel = torch.einsum("ty,sx,oiyx->iots", taps, taps, self.conv.weight)  # (in, out, 4, 4)
        return F.conv_transpose2d(x, kernel, self.conv.bias, stride=2, padding=1)


class TapConv(nn.Conv2d):
    """A 3x3 "same" conv to a few channels, optionally as a 1x1 conv to its taps and a shifted sum.

    With `by_taps`, the 1x1 conv gives the nine tap products (9 x out_channels maps), and
    each output pixel sums its nine neighbours' taps, in fp32: the same function. oneDNN
    runs a conv with one output channel slowly; this form is about twice as fast on the
    CPU, forward and backward. The parameters are the plain conv's either way.
    """

    def __init__(self, in_ch: int, out_ch: int, by_taps: bool = True) -> None:
        super().__init__(in_ch, out_ch, 3, padding=1)
        self.by_taps = by_taps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.by_taps:
            return super().forward(x)
        out, height, width = self.out_channels, x.shape[-2], x.shape[-1]
        kernel = self.weight.permute(2, 3, 0, 1).reshape(9 * out, self.in_channels, 1, 1)  # rows: (dy, dx, out)
        taps = F.pad(F.conv2d(x, kernel), (1, 1, 1, 1)).unflatten(1, (9, out))
        taps = taps.to(torch.promote_types(taps.dtype, torch.float32))  # sum bf16 taps in fp32
        y = sum(taps[:, 3 * dy + dx, :, dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3))
        return y + self.bias.view(1, -1, 1, 1)


class Dropout(nn.Dropout):
    """nn.Dropout with a cheaper mask on the CPU: the same distribution, another random stream.

    The CPU's bernoulli_ and torch.rand draw a 32-bit number per element. Here one draw decides
    four elements, a byte each, kept when the byte is >= 256p: exactly probability 1 - p where
    256p is a whole number (the tutorial's 0.25 is); other rates draw one float per element.
    The mask multiplies rather than selects (autograd's backward of torch.where is slow), and
    the kept values are scaled by 1/(1-p) as in nn.Dropout. Other devices keep their fused kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        threshold = 256 * self.p
        if threshold == int(threshold):
            n = x.numel()
            draws = torch.randint(-(2**31), 2**31, ((n + 3) // 4,), dtype=torch.int32, device=x.device)
            keep = draws.view(torch.uint8)[:n].view(x.shape) >= int(threshold)
        else:
            keep = torch.rand(x.shape, device=x.device) >= self.p
        return (x * keep).mul_(1.0 / (1.0 - self.p))


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
                _batch_norm(out_ch, bn_momentum, bn_eps),
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
            _conv_same(1, c1, 2), *act(),  # 28 -> 14 (no BN on the first block, as in Keras)
            _conv_same(c1, c2, 2),  # 14 -> 7
            nn.ZeroPad2d((0, 1, 0, 1)),  # 7 -> 8, the tutorial's ZeroPadding2D
            _batch_norm(c2, bn_momentum, bn_eps), *act(),
            _conv_same(c2, c3, 2), _batch_norm(c3, bn_momentum, bn_eps), *act(),  # 8 -> 4
            _conv_same(c3, c4, 1), _batch_norm(c4, bn_momentum, bn_eps), *act(),  # 4 -> 4
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


class Classifier(nn.Module):
    """A small CNN whose penultimate layer gives the features FID is computed on; one per dataset."""

    def __init__(self, feature_dim: int = 128, dropout: float = 0.3, n_classes: int = 10) -> None:
        super().__init__()

        def block(in_ch: int, out_ch: int) -> list[nn.Module]:
            return [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            *block(1, 32), *block(32, 32), nn.MaxPool2d(2),  # 28 -> 14
            *block(32, 64), *block(64, 64), nn.MaxPool2d(2),  # 14 -> 7
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, feature_dim), nn.ReLU(inplace=True),
        )  # fmt: skip
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, n_classes)
        self.feature_dim = feature_dim

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer activations (N, feature_dim)."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (N, n_classes)."""
        return self.head(self.dropout(self.body(images)))


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


def build_classifier(params: ClassifierParams, n_classes: int = 10) -> Classifier:
    return Classifier(feature_dim=params.feature_dim, n_classes=n_classes)


def load_generator(path: Path, params: ModelParams, device: torch.device, n_classes: int = 10, raw: bool = False) -> Generator:
    """The trained generator saved by the train stage (weights only, checksum verified): the one the
    stage exports (the EMA of G with train.ema_decay), or with `raw` the trained G itself."""
    state = runtime.load_checkpoint(path, map_location=device)
    if raw and "generator_raw" not in state:
        raise UserError(f"{path} holds one generator (trained without train.ema_decay): leave out --raw.")
    generator = build_generator(params, n_classes=n_classes).to(device)
    try:
        generator.load_state_dict(state["generator_raw" if raw else "generator"])
    except (KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"{path} does not match the model section of params.yaml ({first}).") from None
    return generator.eval()


def requested_labels(n: int, distribution: np.ndarray | list[float], seed: int) -> torch.Tensor:
    """n class labels (int64, CPU) drawn from `distribution` with their own seeded RNG: what a conditional
    generator is asked for when it is scored (the real data's class shares)."""
    rng = torch.Generator().manual_seed(seed)
    return torch.multinomial(torch.as_tensor(distribution, dtype=torch.float64), n, replacement=True, generator=rng)


@torch.no_grad()
def generate(
    generator: Generator, n: int, seed: int, batch_size: int, device: torch.device, labels: torch.Tensor | None = None
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
        y = labels[start : start + z.shape[0]].to(device) if generator.n_classes and labels is not None else None
        chunks.append(from_model(generator(z.to(device), y)).cpu())
    generator.train(was_training)
    return torch.cat(chunks)


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
