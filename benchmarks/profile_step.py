"""Where one training step's time goes: torch.profiler over `pipeline.gan.loop.train_step`.

The step is the pipeline's own (params.yaml defaults, `--batch-size` overriding the batch),
run unchanged: the phase labels are record_function ranges opened and closed by hooks on
the generator, the discriminator and the two optimisers, so pipeline/gan/loop.py needs no edit.
The step calls D three times (the real batch, the fake batch, G's update through the frozen
D), so the n-th D call of a step names its phase; a phase runs from its forward to the next
optimiser step, its loss and backward pass included.

    G forward          G(z), once per step
    D real (fwd+bwd)   D on the real batch, its loss and backward
    D fake (fwd+bwd)   D on the detached fakes, its loss and backward
    G update           the fakes through the frozen D, G's loss and backward (through D and G)
    optimiser          the three Adam steps (D twice, G once)
    other              the rest of the step: drawing the batch and the noise, zero_grad,
                       toggling D's requires_grad, the step's statistics

After `--warmup` untimed steps, `--steps` steps run under the profiler; every figure is the
mean per step. On CUDA each phase boundary synchronises the device, so that the phases hold
their kernels' time, and the operator table is sorted by device time (it lists operators and
the kernels they launch alike). The JSON holds, per device, the share of the step of each
phase and the top 10 operators with their share of the step, ready for a README table.

    python benchmarks/profile_step.py                    # batch 32, CPU (+ CUDA when present)
    python benchmarks/profile_step.py --batch-size 128 --steps 20
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from pipeline import data, machine
from pipeline.gan.loop import _autocast, train_step
from pipeline.gan.losses import LOSSES
from pipeline.gan.state import TrainState, new_state
from pipeline.layout import Layout
from pipeline.params import Params, load_params

PHASES = ("G forward", "D real (fwd+bwd)", "D fake (fwd+bwd)", "G update", "optimiser")
D_CALLS = PHASES[1:4]  # what the 1st, 2nd and 3rd call of D in a step are
STEP = "train step"
TOP = 10


class PhaseLabels:
    """record_function ranges around the phases of `train_step`, opened and closed by hooks.

    At most one range is open at a time: opening one closes the last, so a D phase ends where
    the next optimiser step begins.
    """

    def __init__(self, state: TrainState, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.current: record_function | None = None
        self.d_calls = 0
        self.handles = [
            state.generator.register_forward_pre_hook(lambda *_: self.begin(PHASES[0])),
            state.generator.register_forward_hook(lambda *_: self.end()),
            state.discriminator.register_forward_pre_hook(lambda *_: self.begin(D_CALLS[self.next_d_call()])),
        ]
        for opt in (state.opt_d, state.opt_g):
            self.handles.append(opt.register_step_pre_hook(lambda *_: self.begin(PHASES[4])))
            self.handles.append(opt.register_step_post_hook(lambda *_: self.end()))

    def next_d_call(self) -> int:
        self.d_calls += 1
        return (self.d_calls - 1) % len(D_CALLS)

    def begin(self, name: str) -> None:
        self.end()
        self.sync()  # nor does the device's work queued before it
        self.current = record_function(name)
        self.current.__enter__()

    def end(self) -> None:
        if self.current is not None:
            self.sync()  # the device's work of the phase belongs to it
            self.current.__exit__(None, None, None)
            self.current = None

    def remove(self) -> None:
        self.end()
        for handle in self.handles:
            handle.remove()


def load_images(device: torch.device) -> torch.Tensor:
    """The prepared training images on the device; random pixels on a fresh clone."""
    prepared = Layout().prepared
    if prepared.is_file():
        return torch.from_numpy(data.load_prepared(prepared).train_images).to(device)
    return torch.randint(0, 256, (60000, 28, 28), dtype=torch.uint8, device=device)


def profile_device(device: torch.device, params: Params, steps: int, warmup: int) -> dict[str, Any]:
    """Profile `steps` train steps on `device` after `warmup` ones; the per-step figures."""
    p, latent_dim = params.train, params.model.latent_dim
    images = load_images(device)
    state = new_state(params.model, p, device, 10)
    if device.type == "cpu":  # as train() does
        machine.keep_freed_memory()
    if p.compile:  # as train() does
        state.generator.compile()
        state.discriminator.compile()
    state.generator.train()
    state.discriminator.train()
    autocast, loss = _autocast(device, p.precision), LOSSES[p.loss]
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def step() -> None:  # as train() runs it: a random real batch, fresh noise, the step
        idx = torch.randint(0, images.shape[0], (p.batch_size,), device=device)
        real = data.to_model(images[idx])
        z = torch.randn(p.batch_size, latent_dim, device=device)
        train_step(state, real, z, autocast, loss)

    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()  # the same steps without the profiler or labels, for scale
    for _ in range(steps):
        step()
    sync()
    plain_ms = (time.perf_counter() - start) / steps * 1e3

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    labels = PhaseLabels(state, sync)
    try:
        with profile(activities=activities) as prof:
            for _ in range(steps):
                sync()
                with record_function(STEP):
                    step()
                    labels.end()
    finally:
        labels.remove()
    events = prof.key_averages()
    # The labels' host-side ranges (CUDA traces also list them as device annotations).
    by_name = {e.key: e for e in events if e.device_type == DeviceType.CPU}
    step_us = by_name[STEP].cpu_time_total / steps
    phases = {name: by_name[name].cpu_time_total / steps if name in by_name else 0.0 for name in PHASES}
    phases["other"] = step_us - sum(phases.values())

    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    ops = [e for e in events if e.key not in (*PHASES, STEP) and not e.key.startswith("Optimizer.")]
    self_us = {e.key: getattr(e, sort_by) / steps for e in ops}
    ops.sort(key=lambda e: self_us[e.key], reverse=True)
    return {
        "device": machine.device_name(device),
        "precision": machine.resolve_precision(p.precision, device),
        "batch_size": p.batch_size,
        "steps": steps,
        "warmup": warmup,
        "step_ms": round(step_us / 1e3, 3),
        "step_ms_unprofiled": round(plain_ms, 3),
        "phases": {
            name: {"ms": round(us / 1e3, 3), "share": round(us / step_us, 4)} for name, us in phases.items()
        },
        "top_ops_by": sort_by,
        "top_ops": [
            {
                "name": e.key,
                "self_ms": round(self_us[e.key] / 1e3, 3),
                "share_of_step": round(self_us[e.key] / step_us, 4),
                "calls": round(e.count / steps, 2),
            }
            for e in ops[:TOP]
        ],
        "table": events.table(sort_by=sort_by, row_limit=15),
    }


def print_report(result: dict[str, Any]) -> None:
    print(f"\n== {result['device']}, {result['precision']}, batch {result['batch_size']}: "
          f"{result['step_ms']:.2f} ms per profiled step ({result['step_ms_unprofiled']:.2f} ms unprofiled), "
          f"mean of {result['steps']}")  # fmt: skip
    print(result["table"])
    print(f"{'phase':<20}{'ms/step':>10}{'share':>9}")
    for name, row in result["phases"].items():
        print(f"{name:<20}{row['ms']:>10.2f}{100 * row['share']:>8.1f}%")
    print(f"\ntop {TOP} operators by {result['top_ops_by']}:")
    print(f"{'operator':<48}{'ms/step':>10}{'% step':>9}{'calls':>8}")
    for op in result["top_ops"]:
        print(
            f"{op['name'][:47]:<48}{op['self_ms']:>10.3f}{100 * op['share_of_step']:>8.1f}%{op['calls']:>8g}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="profiled steps (the figures are their mean)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"], help="cuda is skipped when absent")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/profile_step.json"))
    args = parser.parse_args()
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        raise SystemExit("--batch-size and --steps must be at least 1, --warmup at least 0.")

    params = load_params(args.params)
    params = params.model_copy(
        update={"train": params.train.model_copy(update={"batch_size": args.batch_size})}
    )
    devices = [torch.device(d) for d in args.devices if d != "cuda" or torch.cuda.is_available()]
    runs = []
    for device in devices:
        result = profile_device(device, params, args.steps, args.warmup)
        print_report(result)
        runs.append({k: v for k, v in result.items() if k != "table"})
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "params": "params.yaml defaults" if args.params == Path("params.yaml") else str(args.params),
        "runs": runs,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n-> {args.output}")


if __name__ == "__main__":
    main()
