"""This machine's achievable matmul peak through torch, and the FLOPs of one DCGAN training step.

Peak: GFLOP/s of an n x n by n x n product (2 n^3 FLOPs) in fp32 and in bf16, the best of a
few timed products after one untimed, at sizes doubling from 512 up to `max_n` (4096 by
default) while the next size fits in a time budget, so that a dtype the CPU only emulates
(bf16 without AVX512-BF16 or AMX) costs seconds, not minutes. The peak is that of torch's
own matmul with torch's thread count: what this software can reach here, not the data sheet.

FLOPs: counted with torch.utils.flop_counter.FlopCounterMode while the step runs. It counts
matrix multiplies and convolutions, forward and backward (grad-input and grad-weight products
only where autograd needs them: none for D's weights in G's update, none for the real images),
and nothing element-wise (bias adds, batch norm, activations, dropout, losses, Adam). Those are
the multiply-adds a matmul peak bounds. Three counts per batch size:

* ``useful``: the tutorial's model math for one iteration, each part once: G forward, D forward
  and backward on the real batch, D forward and backward on the fake batch, and G's update
  through the frozen D (D forward, backward to D's input, G backward). It is counted on
  `pipeline.gan.loop.train` with the tutorial's own layers (upsample then 3x3 conv, a plain 3x3
  output conv). This is the same figure for every arm, so it is the one the throughput
  benchmark turns into GFLOP/s and a fraction of the peak: an arm that does the same training
  with fewer FLOPs scores higher, as it should.
* ``pipeline``: what the pipeline's step executes with its levers. Its phased upsample convs
  and tap-sum output conv compute the same function with fewer FLOPs, so this is lower.
* ``tutorial_loop``: what the Keras tutorial executes: ``useful`` plus a second G forward,
  because `generator.predict` makes the fake batch and the combined model then runs G again
  for G's update (D is frozen there, so no D weight gradients). The throughput benchmark
  counts its PyTorch baseline's step directly: this, plus D's weight gradients in G's update.

    python benchmarks/peak_flops.py                        # peaks, and FLOPs at batch 32 and 128
    python benchmarks/peak_flops.py --max-n 1024 --batch-sizes 32
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline import machine
from pipeline.data import IMAGE_SIZE
from pipeline.gan.architectures import build_generator
from pipeline.gan.loop import train
from pipeline.gan.state import new_state
from pipeline.params import ModelParams, TrainParams

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_gflops(n: int, dtype: torch.dtype, repeats: int, device: torch.device) -> tuple[float, float]:
    """GFLOP/s of the best of `repeats` timed n x n products after one untimed; and that product's seconds."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    seconds = []
    for _ in range(repeats + 1):  # the first is a warm-up: packing buffers, kernel choice, clocks
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        seconds.append(time.perf_counter() - start)
    best = min(seconds[1:])
    return 2 * n**3 / best / 1e9, best


def matmul_peak(dtype: torch.dtype, device: torch.device, max_n: int = 4096, repeats: int = 3,
                budget_s: float = 15.0) -> dict[str, Any]:  # fmt: skip
    """The best GFLOP/s over sizes 512, 1024, ... max_n.

    A larger size is tried only while its predicted time (8x the last size's product, times
    repeats + 1) fits in what is left of `budget_s`.
    """
    by_size: dict[int, float] = {}
    n, spent = min(512, max_n), 0.0
    while n <= max_n:
        start = time.perf_counter()
        gflops, seconds = matmul_gflops(n, dtype, repeats, device)
        spent += time.perf_counter() - start
        by_size[n] = round(gflops, 1)
        if 8 * seconds * (repeats + 1) > budget_s - spent:
            break
        n *= 2
    best_n = max(by_size, key=by_size.__getitem__)
    return {"gflops": by_size[best_n], "n": best_n, "by_size": by_size}


def measure_peaks(
    device: torch.device, max_n: int = 4096, repeats: int = 3, budget_s: float = 15.0
) -> dict[str, Any]:
    """fp32 and bf16 matmul peaks on `device` (each within `budget_s`), with whether the CPU has native bf16."""
    peaks: dict[str, Any] = {
        name: matmul_peak(dtype, device, max_n, repeats, budget_s) for name, dtype in DTYPES.items()
    }
    peaks["threads"] = torch.get_num_threads()
    if device.type == "cpu":
        peaks["native_bf16"] = machine.cpu_has_native_bf16()
    return peaks


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matmuls and convolutions that `fn()` runs (FlopCounterMode: 2 per multiply-add)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def train_step_flops(model: ModelParams, params: TrainParams, device: torch.device) -> int:
    """FLOPs of one iteration of `pipeline.gan.loop.train` with these params, on random images."""
    params = params.model_copy(
        update={
            "steps": 1,
            "compile": False,
            "log_every": 1,
            "checkpoint_every": 10**9,
            "sample_every": 10**9,
        }
    )
    state = new_state(model, params, device, 10)
    images = torch.randint(
        0, 256, (2 * params.batch_size, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8, device=device
    )
    return count_flops(lambda: train(state, images, params, model.latent_dim))


def tutorial_generator_flops(model: ModelParams, batch_size: int, device: torch.device) -> int:
    """FLOPs of one forward pass of the tutorial's generator (upsample then conv, plain output conv)."""
    generator = build_generator(model, n_classes=0, fast_upsample=False, fast_output=False).to(device)
    z = torch.randn(batch_size, model.latent_dim, device=device)
    with torch.no_grad():
        return count_flops(lambda: generator(z))


def step_flops(batch_size: int, levers: dict[str, Any], device: torch.device) -> dict[str, int]:
    """The module docstring's three counts for one iteration at `batch_size`; `levers`: the pipeline's TrainParams."""
    model = ModelParams()
    params = TrainParams(batch_size=batch_size, device=device.type, **levers)
    tutorial_layers = params.model_copy(update={"fast_upsample": False, "fast_output": False})
    useful = train_step_flops(model, tutorial_layers, device)
    return {
        "useful": useful,
        "pipeline": train_step_flops(model, params, device),
        "tutorial_loop": useful + tutorial_generator_flops(model, batch_size, device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-n", type=int, default=4096, help="largest matmul side")
    parser.add_argument("--repeats", type=int, default=3, help="timed products per size (the best counts)")
    parser.add_argument("--budget-s", type=float, default=15.0, help="seconds each dtype's sizes may take")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch's intra-op threads"
    )
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 128])
    parser.add_argument("--levers", type=json.loads, default={}, help="the pipeline's TrainParams overrides")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    peaks = measure_peaks(device, args.max_n, args.repeats, args.budget_s)
    for name in DTYPES:
        print(f"{device.type} {name} matmul peak: {peaks[name]['gflops']:,.1f} GFLOP/s (n={peaks[name]['n']}, "
              f"{peaks['threads']} threads)")  # fmt: skip
    for batch_size in args.batch_sizes:
        flops = step_flops(batch_size, args.levers, device)
        print(f"batch {batch_size:>4}: GFLOP per step: "
              + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in flops.items()))  # fmt: skip


if __name__ == "__main__":
    main()
