"""Training and scoring throughput of the pipeline against a straightforward baseline.

The baseline is the DCGAN loop as most people write it: fp32, a DataLoader with shuffling
over the prepared tensors, `.item()` on every loss every step, and the generator run
twice per step (once for D's fake batch, once for G's update), as the tutorial does.
The pipeline side is `pipeline.train.train` itself, with the params under test.

Each (device, batch size) pair alternates baseline and pipeline over several repeats in
this one process and reports medians and their ratio. Peak memory is measured in a fresh
child process per variant that loads the data and runs 5 steps (CUDA: the peak of
torch.cuda.max_memory_allocated; CPU: the process's peak resident set size).

    python benchmarks/train_throughput.py                 # full: batch 32..256, CPU (+CUDA)
    python benchmarks/train_throughput.py --quick         # a few steps, to prove it runs
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import queue as queue_module
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import data, runtime
from pipeline.layout import Layout
from pipeline.models import build_discriminator, build_generator
from pipeline.params import ModelParams, TrainParams
from pipeline.train import new_state, train

PATHS = Layout()


def load_images(device: torch.device) -> torch.Tensor:
    if PATHS.prepared.is_file():
        return torch.from_numpy(data.load_prepared(PATHS.prepared).train_images).to(device)
    return torch.randint(0, 256, (60000, 28, 28), dtype=torch.uint8, device=device)


class Baseline:
    """The common way to write the tutorial's loop in PyTorch."""

    def __init__(self, images: torch.Tensor, batch_size: int, device: torch.device) -> None:
        model = ModelParams()
        self.device, self.latent = device, model.latent_dim
        # The tutorial's layers as they read: upsample then conv, plain conv, nn.Dropout.
        self.G = build_generator(model, fast_upsample=False, fast_output=False).to(device)
        self.D = build_discriminator(model, fast_dropout=False).to(device)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=2e-4, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=2e-4, betas=(0.5, 0.999))
        dataset = torch.utils.data.TensorDataset(data.to_model(images.cpu()))
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True)
        self.batches = iter(self.loader)

    def run(self, steps: int) -> None:
        for _ in range(steps):
            try:
                (real,) = next(self.batches)
            except StopIteration:
                self.batches = iter(self.loader)
                (real,) = next(self.batches)
            real = real.to(self.device)
            b = real.shape[0]
            ones, zeros = torch.ones(b, device=self.device), torch.zeros(b, device=self.device)
            with torch.no_grad():
                fake = self.G(torch.randn(b, self.latent, device=self.device))
            self.opt_d.zero_grad()
            loss_real = F.binary_cross_entropy_with_logits(self.D(real), ones)
            loss_real.backward()
            self.opt_d.step()
            self.opt_d.zero_grad()
            loss_fake = F.binary_cross_entropy_with_logits(self.D(fake), zeros)
            loss_fake.backward()
            self.opt_d.step()
            self.opt_g.zero_grad()
            g_loss = F.binary_cross_entropy_with_logits(self.D(self.G(torch.randn(b, self.latent, device=self.device))), ones)
            g_loss.backward()
            self.opt_g.step()
            _ = (loss_real.item() + loss_fake.item()) / 2, g_loss.item()  # the per-step print


class Pipeline:
    """pipeline.train.train with the given levers, extended `steps` at a time."""

    def __init__(self, images: torch.Tensor, params: TrainParams, device: torch.device) -> None:
        self.images, self.model = images, ModelParams()
        self.params = params.model_copy(update={"log_every": 50, "checkpoint_every": 10**9, "sample_every": 10**9})
        self.state = new_state(self.model, self.params, device)

    def run(self, steps: int) -> None:
        params = self.params.model_copy(update={"steps": self.state.step + steps})
        train(self.state, self.images, params, self.model.latent_dim)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def images_per_second(runner: Baseline | Pipeline, steps: int, batch_size: int, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    runner.run(steps)
    sync(device)
    return steps * batch_size / (time.perf_counter() - start)


def make(variant: str, images: torch.Tensor, batch_size: int, levers: dict[str, Any], device: torch.device) -> Baseline | Pipeline:
    if variant == "baseline":
        return Baseline(images, batch_size, device)
    return Pipeline(images, TrainParams(batch_size=batch_size, device=device.type, **levers), device)


def peak_rss_mib() -> float:
    """This process's peak resident set size. Linux: VmHWM, which (unlike ru_maxrss) does not
    inherit the parent's size from before exec, so a spawned child measures only itself."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if platform.system() == "Darwin" else maxrss / 1024  # bytes on macOS, KiB elsewhere


def _in_child(target: Any, *args: Any) -> Any:
    """Run target(*args, queue) in a fresh spawned process and return what it puts on the queue."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    while True:
        try:
            value = queue.get(timeout=1)
            break
        except queue_module.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"the benchmark's child process died (exit code {proc.exitcode})") from None
    proc.join()
    return value


def _peak_memory_child(variant: str, batch_size: int, levers: dict[str, Any], device_type: str, queue: Any) -> None:
    device = torch.device(device_type)
    images = load_images(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    make(variant, images, batch_size, levers, device).run(5)
    sync(device)
    if device.type == "cuda":
        queue.put(torch.cuda.max_memory_allocated() / 2**20)
    else:  # the whole process's peak RSS: torch, the training set, the variant's copies and 5 steps
        queue.put(peak_rss_mib())


def peak_memory_mib(variant: str, batch_size: int, levers: dict[str, Any], device: torch.device) -> float:
    return round(float(_in_child(_peak_memory_child, variant, batch_size, levers, device.type)), 1)


def bench_training(device: torch.device, batch_sizes: list[int], levers: dict[str, Any], repeats: int,
                   steps: int, warmup: int) -> list[dict[str, Any]]:  # fmt: skip
    images = load_images(device)
    rows = []
    for batch_size in batch_sizes:
        runners = {v: make(v, images, batch_size, levers, device) for v in ("baseline", "pipeline")}
        for runner in runners.values():
            runner.run(warmup)  # allocator, caches, compilation
        rates: dict[str, list[float]] = {"baseline": [], "pipeline": []}
        for _ in range(repeats):  # alternate, so drifting machine load hits both alike
            for variant, runner in runners.items():
                rates[variant].append(images_per_second(runner, steps, batch_size, device))
        row = {
            "device": device.type,
            "batch_size": batch_size,
            "precision": runtime.resolve_precision(TrainParams(**levers).precision, device),
            "baseline_img_s": round(statistics.median(rates["baseline"]), 1),
            "pipeline_img_s": round(statistics.median(rates["pipeline"]), 1),
            "all_img_s": {k: [round(r, 1) for r in v] for k, v in rates.items()},
        }
        row["speedup"] = round(row["pipeline_img_s"] / row["baseline_img_s"], 2)
        row["baseline_peak_mib"] = peak_memory_mib("baseline", batch_size, levers, device)
        row["pipeline_peak_mib"] = peak_memory_mib("pipeline", batch_size, levers, device)
        rows.append(row)
        print(f"{device.type:<5} batch {batch_size:>4}: baseline {row['baseline_img_s']:>9,.0f} img/s   "
              f"pipeline {row['pipeline_img_s']:>9,.0f} img/s ({row['precision']})   x{row['speedup']:.2f}"
              f"   peak MiB {row['baseline_peak_mib']} / {row['pipeline_peak_mib']}", flush=True)  # fmt: skip
    return rows


def _scoring_child(device_type: str, n: int, queue: Any) -> None:
    """Samples/s of evaluation, in a fresh process: generation, classifier features, every metric."""
    from pipeline import evaluate, scoring
    from pipeline.models import Generator, generate
    from pipeline.params import EvaluateParams

    device = torch.device(device_type)
    classifier, sha = scoring.load_classifier(PATHS.classifier, 128, device)
    if PATHS.reference.is_file():
        reference = scoring.load_reference(PATHS.reference)
    else:  # a fresh clone (as in CI): a reference from the prepared test images, or from noise
        real = data.load_prepared(PATHS.prepared).test_images if PATHS.prepared.is_file() else load_images(device)[:2000].cpu().numpy()
        features, _ = scoring.classify(classifier, real, 1000, device)
        reference = scoring.compute_reference(features, np.arange(len(features)) % 10, sha)
    params = EvaluateParams(n_samples=n, kid_subset_size=min(1000, n // 2))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    images = generate(Generator().to(device), n, 0, params.batch_size, device).numpy()
    generated = time.perf_counter()
    evaluate.evaluate(images, classifier, reference, params, device)
    done = time.perf_counter()
    result = {
        "device": device.type,
        "n": n,
        "generate_s": round(generated - start, 2),
        "score_s": round(done - generated, 2),
        "samples_per_s": round(n / (done - start), 1),
        "peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda"
        else round(peak_rss_mib(), 1),  # fmt: skip
    }
    queue.put(result)


def bench_scoring(device: torch.device, n: int) -> dict[str, Any]:
    """Generation and scoring of n samples (10k in full mode), timed and measured in a child process."""
    result: dict[str, Any] = _in_child(_scoring_child, device.type, n)
    print(f"{device.type:<5} scoring {n} samples: generate {result['generate_s']} s + score {result['score_s']} s "
          f"= {result['samples_per_s']:,.0f} samples/s, peak MiB {result['peak_mib']}")  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few steps of each, to prove it works")
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"], help="cuda is skipped when absent")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 64, 128, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=0, help="timed steps per repeat (default: by device)")
    parser.add_argument("--levers", type=json.loads, default={}, help='TrainParams overrides, e.g. \'{"precision": "bf16"}\'')
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/train_throughput.json"))
    args = parser.parse_args()

    devices = [torch.device(d) for d in args.devices if d != "cuda" or torch.cuda.is_available()]
    report: dict[str, Any] = {
        "levers": args.levers or "params.yaml defaults",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},  # fmt: skip
        "torch": torch.__version__,
        "training": [],
        "scoring": [],
    }
    for device in devices:
        if args.quick:  # every code path, in seconds: one batch size, two steps, memory included
            batch_sizes, repeats, steps, warmup = args.batch_sizes[:1], 1, 2, 1
        else:
            batch_sizes, repeats, warmup = args.batch_sizes, args.repeats, 5 if device.type == "cpu" else 50
            steps = args.steps or (30 if device.type == "cpu" else 500)
        report["training"] += bench_training(device, batch_sizes, args.levers, repeats, steps, warmup)
        report["scoring"].append(bench_scoring(device, 1000 if args.quick else 10_000))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
