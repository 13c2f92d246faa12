"""Building blocks of the GAN's models: the Keras tutorial's batch norm, "same" padding and
initialisation, and faster same-function forms of its layers on the CPU (`UpsampleConv`,
`TapConv`, `Dropout`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def keras_batch_norm(channels: int, keras_momentum: float, eps: float) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=eps, momentum=1.0 - keras_momentum)


def conv_same(in_ch: int, out_ch: int, stride: int) -> nn.Sequential | nn.Conv2d:
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


def _layout(x: torch.Tensor) -> torch.memory_format:
    """The memory format of an NCHW tensor that is contiguous or channels-last: its gradient's."""
    return torch.contiguous_format if x.is_contiguous() else torch.channels_last


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
    def matrix(weight: torch.Tensor) -> torch.Tensor:
        """The 3x3 conv's weight (out, in, 3, 3) as `forward`'s matrix."""
        taps = _PHASE_TAPS.to(weight)
        return torch.einsum("aty,bsx,oiyx->tsiabo", taps, taps, weight).reshape(4 * weight.shape[1], -1)

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
        pairs = flat.as_strided(
            (n + row, 2 * channels), (channels, 1)
        )  # pixel p and p + 1: a window's top or bottom row
        windows = x.new_empty(n, 2, 2 * channels)
        windows[:, 0], windows[:, 1] = pairs[:n], pairs[row:]
        windows = windows.view(n, 4 * channels)
        phases = x.new_empty(flat.shape[0], 4 * out)  # the last row + 1 windows are never read
        torch.mm(windows, matrix, out=phases[:n])
        phases = phases.view(batch, height + 2, row, 2, 2, out)
        y = x.new_empty(batch, 2 * height, 2 * width, out)
        pixels = y.view(batch, height, 2, width, 2, out)
        for a in range(2):
            for b in range(
                2
            ):  # output pixel (2i + a, 2j + b) is phase (a, b) of the window at (i + a, j + b)
                torch.add(phases[:, a : a + height, b : b + width, a, b], bias, out=pixels[:, :, a, :, b])
        ctx.save_for_backward(windows, matrix)
        ctx.dims = batch, channels, height, width, out
        ctx.layout = _layout(x)
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
            grad_x = grad_x.contiguous(memory_format=ctx.layout)
        if ctx.needs_input_grad[1]:
            grad_matrix = windows.t() @ phases
        if ctx.needs_input_grad[2]:
            sums = phases.sum(0).to(torch.promote_types(phases.dtype, torch.float32))
            grad_bias = sums.view(4, out).sum(0).to(phases.dtype)
        return grad_x, grad_matrix, grad_bias


# The same conv by tap, at the input's resolution: the product of tap (dy, dx) with input pixel
# (i, j) reaches the four output pixels of a 2x2 block, so each of the nine products is computed
# once and added to four outputs, where the phases compute sixteen. Along each axis, output
# phase 0 of row i reads taps (0, 1, 2) at input rows (i - 1, i, i), phase 1 at (i, i, i + 1).
_CHUNK_BYTES = 2 << 20  # tap products spread (or gathered) per chunk of images: they stay in cache


def _spread_taps(taps: torch.Tensor, y: torch.Tensor) -> None:
    """taps (n, H, W, 3, 3, out), one product per input pixel and tap -> y (n, H, 2, W, 2, out): each
    output pixel (2i + a, 2j + b) the sum of the nine it reads; columns first, then rows."""
    n, height, width, *_, out = taps.shape
    rows = taps.new_empty(n, height, width, 2, 3, out)  # (column phase b, row tap dy): summed over dx
    torch.add(taps[:, :, :, :, 1], taps[:, :, :, :, 2], out=rows[:, :, :, 0])
    rows[:, :, 1:, 0] += taps[:, :, :-1, :, 0]
    torch.add(taps[:, :, :, :, 0], taps[:, :, :, :, 1], out=rows[:, :, :, 1])
    rows[:, :, :-1, 1] += taps[:, :, 1:, :, 2]
    pixels = y.permute(0, 1, 3, 2, 4, 5)  # (n, i, j, a, b, out)
    torch.add(rows[..., 1, :], rows[..., 2, :], out=pixels[:, :, :, 0])
    pixels[:, 1:, :, 0] += rows[:, :-1, ..., 0, :]
    torch.add(rows[..., 0, :], rows[..., 1, :], out=pixels[:, :, :, 1])
    pixels[:, :-1, :, 1] += rows[:, 1:, ..., 2, :]


def _gather_taps(grad: torch.Tensor, taps: torch.Tensor) -> None:
    """The adjoint of `_spread_taps`: grad (n, H, 2, W, 2, out) -> taps (n, H, W, 3, 3, out), the sum of
    the four output pixels' gradients each tap product reached; rows first, then columns."""
    n, height, _, width, _, out = grad.shape
    pixels = grad.permute(0, 1, 3, 2, 4, 5)  # (n, i, j, a, b, out)
    rows = grad.new_empty(n, height, width, 3, 2, out)  # (row tap dy, column phase b): summed over a
    rows[:, :, :, 0] = pixels[:, :, :, 1]
    rows[:, :-1, :, 0] += pixels[:, 1:, :, 0]
    torch.add(pixels[:, :, :, 0], pixels[:, :, :, 1], out=rows[:, :, :, 1])
    rows[:, :, :, 2] = pixels[:, :, :, 0]
    rows[:, 1:, :, 2] += pixels[:, :-1, :, 1]
    taps[:, :, :, :, 0] = rows[..., 1, :]
    taps[:, :, :-1, :, 0] += rows[:, :, 1:, :, 0]
    torch.add(rows[..., 0, :], rows[..., 1, :], out=taps[:, :, :, :, 1])
    taps[:, :, :, :, 2] = rows[..., 0, :]
    taps[:, :, 1:, :, 2] += rows[:, :, :-1, :, 1]


class _TapProduct(torch.autograd.Function):
    """x (B, C, H, W) -> (B, out, 2H, 2W), channels-last in memory: the nine tap products of every
    input pixel, one matrix product with `matrix` (C, 9 out; columns: tap dy, dx, channel), spread
    into the output pixels that read them (`_spread_taps`); the bias rides on the centre tap, which
    every output pixel reads once. 9 multiply-adds per input pixel and channel pair where the phases
    take 16 (and the window matrix product more, for the border's windows), at the cost of adding
    each product to four pixels. The backward pass gathers the output gradient onto the taps and
    takes two plain products. Chunks of images keep the tap products in cache between the product
    and the spread; a chunk's size follows from the shapes, so a run computes alike every time.
    """

    @staticmethod
    def matrix(weight: torch.Tensor) -> torch.Tensor:
        """The 3x3 conv's weight (out, in, 3, 3) as `forward`'s matrix (in; dy, dx, out)."""
        return weight.permute(1, 2, 3, 0).reshape(weight.shape[1], -1)

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, matrix: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        out = matrix.shape[1] // 9
        pixels = x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        chunk = max(1, _CHUNK_BYTES // (height * width * matrix.shape[1] * x.element_size()))
        y = x.new_empty(batch, height, 2, width, 2, out)
        for start in range(0, batch, chunk):
            part = slice(start, start + chunk)
            taps = torch.mm(pixels[part].flatten(0, 1), matrix)
            taps.view(-1, 9, out)[:, 4] += bias  # (addmm would first copy the bias to all nine taps)
            _spread_taps(taps.view(-1, height, width, 3, 3, out), y[part])
        ctx.save_for_backward(pixels, matrix)
        ctx.chunk, ctx.layout = chunk, _layout(x)
        return y.view(batch, 2 * height, 2 * width, out).permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        pixels, matrix = ctx.saved_tensors
        (batch, _, height, width), chunk = grad.shape, ctx.chunk
        channels, out = pixels.shape[2], grad.shape[1]
        grads = grad.permute(0, 2, 3, 1).reshape(batch, height // 2, 2, width // 2, 2, out)
        grad_x = pixels.new_empty(pixels.shape) if ctx.needs_input_grad[0] else None
        wide = torch.promote_types(matrix.dtype, torch.float32)  # the chunks' weight gradients add up in it
        grad_matrix = matrix.new_zeros(matrix.shape, dtype=wide) if ctx.needs_input_grad[1] else None
        for start in range(0, batch, chunk):
            part = slice(start, start + chunk)
            taps = grad.new_empty(min(chunk, batch - start), height // 2, width // 2, 3, 3, out)
            _gather_taps(grads[part], taps)
            taps = taps.view(-1, 9 * out)
            if grad_x is not None:
                torch.mm(taps, matrix.t(), out=grad_x[part].view(-1, channels))
            if grad_matrix is not None:
                grad_matrix += pixels[part].flatten(0, 1).t() @ taps
        if grad_x is not None:
            grad_x = grad_x.view(batch, height // 2, width // 2, channels).permute(0, 3, 1, 2)
            grad_x = grad_x.contiguous(memory_format=ctx.layout)
        if grad_matrix is not None:
            grad_matrix = grad_matrix.to(matrix.dtype)
        # a bf16 sum accumulates in fp32 on the CPU (summing a copy widened to fp32 cost 3% of a step)
        grad_bias = grad.sum((0, 2, 3)) if ctx.needs_input_grad[2] else None
        return grad_x, grad_matrix, grad_bias


class UpsampleConv(nn.Module):
    """Nearest x2 upsampling followed by a 3x3 "same" conv, optionally by output phase.

    `phased`: as one stride-2 transposed conv (4x4 kernel summed from the 3x3 one), the same
    function with 16 instead of 36 multiply-adds per output pixel and channel pair, and no 4x
    larger intermediate. With `by_matmul` too, in training on the CPU, the phases run as one
    matrix product over the 2x2 windows of the padded input (`_PhaseProduct`): the same function
    in another order of sums, with more multiply-adds (the border's windows) but a faster forward
    and backward in bf16, where oneDNN's transposed-conv backward runs far below its matmul
    speed. In fp32 the extra multiply-adds cost more than they save, so it runs only in the
    dtypes of `matmul_dtypes` (docs/speed.md has the measurements). Its output is
    channels-last in memory. `by_taps` (with `phased`) trains on the CPU, in every dtype, by the
    nine tap products instead (`_TapProduct`): fewer multiply-adds again, channels-last too.
    Inference keeps the transposed conv. The parameters are the 3x3 conv's in every form, so
    checkpoints do not depend on it.
    """

    matmul_dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,)

    def __init__(
        self, in_ch: int, out_ch: int, phased: bool = True, by_matmul: bool = True, by_taps: bool = False
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.phased = phased
        self.by_matmul = by_matmul
        self.by_taps = by_taps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.phased:
            return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        product: type[_TapProduct] | type[_PhaseProduct] | None = None  # a matrix-product form (CPU training)
        if self.training and x.device.type == "cpu":
            if self.by_taps:
                product = _TapProduct
            elif self.by_matmul and dtype in self.matmul_dtypes:
                product = _PhaseProduct
        if product is not None:
            with torch.autocast("cpu", enabled=False):
                matrix = product.matrix(self.conv.weight).to(dtype)
                return product.apply(x.to(dtype), matrix, self.conv.bias.to(dtype))
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
        out = self.out_channels
        kernel = self.weight.permute(2, 3, 0, 1).reshape(
            9 * out, self.in_channels, 1, 1
        )  # rows: (dy, dx, out)
        return _TapSum.apply(F.conv2d(x, kernel), out) + self.bias.view(1, -1, 1, 1)


class _TapSum(torch.autograd.Function):
    """taps (B, 9 out, H, W), the nine tap maps of a 3x3 "same" conv (rows: dy, dx, out) -> (B, out, H, W),
    each output pixel the sum of the nine taps it reads, in fp32 (bf16 taps are widened first).

    Autograd of the shifted slices would zero-fill a padded gradient for each tap and add the nine up;
    the backward pass here writes each tap's gradient once: the same values, in a fraction of the time.
    """

    @staticmethod
    def forward(ctx: Any, taps: torch.Tensor, out: int) -> torch.Tensor:
        height, width = taps.shape[-2:]
        padded = F.pad(taps, (1, 1, 1, 1)).unflatten(1, (9, out))
        padded = padded.to(torch.promote_types(padded.dtype, torch.float32))
        ctx.dtype = taps.dtype
        return sum(
            padded[:, 3 * dy + dx, :, dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)
        )

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        batch, out, height, width = grad.shape
        taps = grad.new_zeros(batch, 3, 3, out, height, width, dtype=ctx.dtype)
        for dy in range(3):  # tap (dy, dx) at pixel (p, q) reached output pixel (p - dy + 1, q - dx + 1)
            rows, read_rows = _shifted(2 - dy, height), _shifted(dy, height)
            for dx in range(3):
                taps[:, dy, dx, :, rows, _shifted(2 - dx, width)] = grad[:, :, read_rows, _shifted(dx, width)]
        return taps.view(batch, 9 * out, height, width), None


def _shifted(tap: int, size: int) -> slice:
    """The positions along an axis of `size` whose tap `tap` (0, 1, 2) lies inside: a 3-tap "same" window
    reads position i + tap - 1."""
    return slice(max(1 - tap, 0), size + min(1 - tap, 0))


class Dropout(nn.Dropout):
    """nn.Dropout with a cheaper mask on the CPU: the same distribution, another random stream.

    The CPU's bernoulli_ and torch.rand draw a 32-bit number per element. Here one draw decides
    four elements, a byte each, kept when the byte is >= 256p: exactly probability 1 - p where
    256p is a whole number (the tutorial's 0.25 is); other rates draw one float per element.
    The mask multiplies rather than selects (autograd's backward of torch.where is slow), in x's
    dtype (a bool mask would be cast again in every product, forward and backward), and the kept
    values are scaled by 1/(1-p) as in nn.Dropout. Other devices keep their fused kernel.
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
        return (x * keep.to(x.dtype)).mul_(1.0 / (1.0 - self.p))
