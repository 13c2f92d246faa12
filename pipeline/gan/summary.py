"""A Keras-style summary of any network: each leaf layer's output shape and parameter count."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from pipeline.gan.layers import UpsampleConv


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
