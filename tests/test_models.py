from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline import files
from pipeline.errors import UserError
from pipeline.gan.architectures import build_discriminator, build_generator
from pipeline.gan.architectures.dcgan import Discriminator, Generator
from pipeline.gan.export import load_generator
from pipeline.gan.summary import count_parameters, summary
from pipeline.params import ModelParams
from pipeline.scoring.frozen_classifier import Classifier


def test_parameter_counts_equal_the_keras_tutorial() -> None:
    assert count_parameters(build_generator(ModelParams(), n_classes=10)) == (855_809, 856_193)
    assert count_parameters(build_discriminator(ModelParams(), n_classes=10)) == (392_833, 393_729)


def test_shapes_and_ranges() -> None:
    torch.manual_seed(0)
    g, d = Generator(), Discriminator()
    images = g(torch.randn(4, 100))
    assert images.shape == (4, 1, 28, 28)
    assert images.min() >= -1 and images.max() <= 1
    logits = d(images)
    assert logits.shape == (4,)
    features = Classifier(feature_dim=32).features(images)
    assert features.shape == (4, 32)


def test_every_size_is_a_constructor_argument() -> None:
    g = build_generator(ModelParams(latent_dim=8, g_dense_channels=16, g_channels=[8, 4]), n_classes=10)
    d = build_discriminator(ModelParams(d_channels=[4, 8, 8, 16], dropout=0.0), n_classes=10)
    out = g(torch.randn(3, 8))
    assert out.shape == (3, 1, 28, 28) and d(out).shape == (3,)


def test_keras_batchnorm_conventions() -> None:
    bn = next(m for m in Generator().modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert bn.momentum == pytest.approx(0.2) and bn.eps == pytest.approx(1e-3)


def test_keras_same_padding_for_stride_two() -> None:
    """Keras pads only bottom/right: the top-left input pixel must reach the first output."""
    d = Discriminator(dropout=0.0)
    conv = d.features[0][1]
    x = torch.zeros(1, 1, 28, 28, requires_grad=True)
    conv(d.features[0][0](x))[0, 0, 0, 0].backward()
    assert x.grad[0, 0, 0, 0] != 0 and x.grad[0, 0, 2, 2] != 0 and x.grad[0, 0, 3, 3] == 0


def test_summary_lists_layers_and_totals() -> None:
    text = summary(Generator(), (100,))
    assert "trainable params: 855,809" in text and "(128, 14, 14)" in text


def test_load_generator_round_trip_and_mismatch(tmp_path: Path) -> None:
    g = Generator()
    files.save_checkpoint({"generator": g.state_dict()}, tmp_path / "g.pt")
    loaded = load_generator(tmp_path / "g.pt", ModelParams(), torch.device("cpu"), 10)
    z = torch.randn(2, 100)
    assert torch.equal(loaded(z), g.eval()(z))
    with pytest.raises(UserError, match="does not match the model section"):
        load_generator(tmp_path / "g.pt", ModelParams(latent_dim=64), torch.device("cpu"), 10)


def fast_and_plain(layer: torch.nn.Module, switch: str, x: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """Assert that `layer` gives the same output and gradients (float64, 1e-12) with `switch` on and off."""
    outputs, grads = [], []
    for fast in (True, False):
        setattr(layer, switch, fast)
        y = layer(x)
        outputs.append(y)
        grads.append(torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(), [x, *params]))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=1e-12)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    return outputs[0]


def test_phased_upsample_conv_is_the_same_function_and_gradient() -> None:
    from pipeline.gan.layers import UpsampleConv

    torch.manual_seed(0)
    layer = UpsampleConv(5, 3).double()
    x = torch.randn(2, 5, 7, 7, dtype=torch.float64, requires_grad=True)
    y = fast_and_plain(layer, "phased", x, [layer.conv.weight, layer.conv.bias])
    assert y.shape == (2, 3, 14, 14)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("form", ["by_matmul", "by_taps"])
def test_upsample_conv_by_matmul_or_taps_is_the_transposed_conv_forward_and_backward(
    form: str, channels_last: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.gan import layers

    torch.manual_seed(0)
    layer = layers.UpsampleConv(5, 3).double()
    layer.matmul_dtypes = (torch.float64,)  # by default bf16 only, where it is faster
    layer.by_matmul = False  # the other form, plain: the transposed conv
    # taps: two images (7 x 6 pixels, 9 x 3 products each, float64) a chunk, the last one partial
    monkeypatch.setattr(layers, "_CHUNK_BYTES", 2 * 7 * 6 * 27 * 8)
    torch.nn.init.normal_(layer.conv.bias)
    x = torch.randn(3, 5, 7, 6, dtype=torch.float64)  # not square: rows and columns kept apart
    x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format).requires_grad_()
    y = fast_and_plain(layer, form, x, [layer.conv.weight, layer.conv.bias])
    assert y.shape == (3, 3, 14, 12)
    setattr(layer, form, True)
    (grad,) = torch.autograd.grad(layer(x).sum(), x)
    assert grad.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize(
    ("form", "allowed"),
    [
        # the matmul form's input gradient adds its four window taps in bf16 (four roundings where
        # oneDNN makes one)
        ("by_matmul", 1.5),
        # each of the nine tap products is rounded to bf16 before the spread adds them, the centre one
        # again with the bias (the output's error 1.45x the transposed conv's, the gradients'
        # 1.0-1.06x, when this test was last measured)
        ("by_taps", 2.0),
    ],
)
def test_upsample_conv_by_matmul_or_taps_in_bf16_is_about_as_accurate_as_the_transposed_conv(
    form: str, allowed: float
) -> None:
    """Under autocast every form rounds its inputs to bf16 alike; the mean errors against float64."""
    from pipeline.gan.layers import UpsampleConv

    torch.manual_seed(0)
    layer = UpsampleConv(64, 32)
    layer.by_matmul = False
    torch.nn.init.normal_(layer.conv.bias)
    x, weights = torch.randn(8, 64, 14, 14), [layer.conv.weight, layer.conv.bias]
    probe = torch.randn(8, 32, 28, 28)

    def output_and_grads(fast: bool, exact: bool = False) -> list[torch.Tensor]:
        setattr(layer, form, fast)
        net, inputs = (layer.double(), x.double()) if exact else (layer.float(), x)
        inputs = inputs.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not exact):
            y = net(inputs)
        grads = torch.autograd.grad((y * probe.to(y.dtype)).sum(), [inputs, *[w for w in weights]])
        return [t.double() for t in (y, *grads)]

    exact = output_and_grads(False, exact=True)
    fast, transposed = output_and_grads(True), output_and_grads(False)
    for name, f, t, e in zip(("output", "input grad", "weight grad", "bias grad"), fast, transposed, exact):
        assert (f - e).abs().mean() <= allowed * (t - e).abs().mean(), name


def test_upsample_conv_infers_with_the_transposed_conv() -> None:
    """Only training takes the matmul or the taps form: inference (and the generator MLflow exports)
    keeps the transposed conv, bit for bit."""
    from pipeline.gan.layers import UpsampleConv

    torch.manual_seed(0)
    layer, x = UpsampleConv(5, 3).eval(), torch.randn(2, 5, 7, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with_matmul = layer(x)
        layer.by_taps = True
        with_taps = layer(x)
        layer.by_matmul = layer.by_taps = False
        plain = layer(x)
    assert torch.equal(with_matmul, plain) and torch.equal(with_taps, plain) and plain.is_contiguous()


def test_upsample_conv_trains_by_matmul_only_in_bf16_and_by_taps_in_every_dtype() -> None:
    """In fp32 the matmul form's extra multiply-adds made it slower: the transposed conv stays. The
    taps form takes fewer multiply-adds than either, and is chosen by `auto` where it is faster."""
    from pipeline.gan.layers import UpsampleConv

    layer, x = UpsampleConv(5, 3), torch.randn(2, 5, 7, 7)
    assert layer(x).is_contiguous()  # fp32: the transposed conv's NCHW output
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layer(x).is_contiguous()  # bf16: the matmul form's channels-last output
    layer.by_taps = True
    assert not layer(x).is_contiguous() and layer(x).dtype == torch.float32  # fp32: the taps form's


@pytest.mark.parametrize("out_ch", [1, 3])
def test_tap_conv_is_the_same_function_and_gradient(out_ch: int) -> None:
    from pipeline.gan.layers import TapConv

    torch.manual_seed(0)
    layer = TapConv(5, out_ch).double()
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(2, 5, 9, 7, dtype=torch.float64, requires_grad=True)
    y = fast_and_plain(layer, "by_taps", x, [layer.weight, layer.bias])
    assert y.shape == (2, out_ch, 9, 7) and y.dtype == torch.float64


def test_tap_conv_sums_bf16_taps_in_fp32() -> None:
    from pipeline.gan.layers import TapConv

    torch.manual_seed(0)
    layer, x = TapConv(64, 1), torch.randn(4, 64, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = layer(x)
        layer.by_taps = False
        plain = layer(x)
    exact = layer.double()(x.double())
    assert fast.dtype == torch.float32
    # No worse than the plain conv under autocast (whose inputs are rounded to bf16 alike).
    assert (fast.double() - exact).abs().max() <= 1.5 * (plain.double() - exact).abs().max()


def test_tap_sum_backward_gives_autograd_s_gradient_bit_for_bit() -> None:
    """_TapSum writes each tap's gradient once where autograd of the shifted slices zero-fills and adds."""
    from pipeline.gan.layers import _TapSum

    torch.manual_seed(0)
    taps = torch.randn(2, 9 * 3, 5, 6).to(torch.bfloat16).requires_grad_()
    y = _TapSum.apply(taps, 3)
    padded = F.pad(taps, (1, 1, 1, 1)).unflatten(1, (9, 3)).float()
    slices = sum(padded[:, 3 * dy + dx, :, dy : dy + 5, dx : dx + 6] for dy in range(3) for dx in range(3))
    probe = torch.randn_like(y)
    assert y.dtype == torch.float32 and torch.equal(y, slices)
    assert torch.equal(*(torch.autograd.grad(out, taps, probe)[0] for out in (y, slices)))


@pytest.mark.parametrize("p", [0.25, 0.3])  # a byte per element (256p whole), a float per element
def test_dropout_keeps_the_distribution_of_nn_dropout(p: float) -> None:
    from pipeline.gan.layers import Dropout

    torch.manual_seed(0)
    layer, x = Dropout(p), torch.ones(200_003, requires_grad=True)  # not a multiple of the 4 bytes a draw gives
    y = layer(x)
    kept = y != 0
    assert abs(kept.double().mean().item() - (1 - p)) < 0.005
    for offset in range(4):  # each byte of a draw decides alike
        assert abs(kept[offset::4].double().mean().item() - (1 - p)) < 0.01
    assert abs((kept[1:] & kept[:-1]).double().mean().item() - (1 - p) ** 2) < 0.005  # neighbours independent
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(grad, torch.where(kept, 1 / (1 - p), 0.0))  # no gradient through dropped units
    assert torch.equal(layer.eval()(x), x)
    torch.manual_seed(1)
    first = layer.train()(x)
    torch.manual_seed(1)
    assert torch.equal(layer(x), first)  # seeded by the global RNG, so runs repeat
    half = torch.randn(64, 32, 14, 14).abs().add_(0.1).to(torch.bfloat16)  # under autocast: scaled as x * (1/(1-p))
    y = layer(half)
    assert y.dtype == torch.bfloat16 and torch.equal(y, torch.where(y != 0, half * (1 / (1 - p)), 0.0))


def test_generator_inference_in_channels_last_gives_the_nchw_output() -> None:
    torch.manual_seed(0)
    for n_classes in (0, 10):
        fast, nchw = Generator(n_classes=n_classes).eval(), Generator(n_classes=n_classes, nhwc=False).eval()
        nchw.load_state_dict(fast.state_dict())
        z, labels = torch.randn(16, 100), (torch.arange(16) % 10 if n_classes else None)
        with torch.inference_mode():
            assert torch.equal(fast(z, labels), nchw(z, labels))


def test_generator_checkpoints_do_not_depend_on_the_fast_forms() -> None:
    torch.manual_seed(0)
    fast, reference = Generator(phased=True, by_taps=True), Generator(phased=False, by_taps=False)
    reference.load_state_dict(fast.state_dict())
    z = torch.randn(4, 100)
    torch.testing.assert_close(fast.eval()(z), reference.eval()(z), rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_fast_forms_on_cuda_match_the_cpu() -> None:
    torch.manual_seed(0)
    cpu = Generator().eval()
    cuda = Generator().cuda().eval()
    cuda.load_state_dict(cpu.state_dict())
    z = torch.randn(64, 100)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # compare fp32 with fp32, not with TensorFloat-32 convs
    try:
        with torch.no_grad():
            torch.testing.assert_close(cuda(z.cuda()).cpu(), cpu(z), rtol=0, atol=1e-4)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    d = Discriminator().cuda().train()  # the fused CUDA dropout path
    logits = d(cuda(z.cuda()))
    logits.sum().backward()
    assert torch.isfinite(logits).all() and all(torch.isfinite(p.grad).all() for p in d.parameters())
