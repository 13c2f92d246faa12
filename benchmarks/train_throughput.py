"""Training and scoring throughput of the pipeline against the Keras tutorial and a PyTorch baseline.

Three arms train the same DCGAN at each batch size:

* Keras: the tutorial's own code (benchmarks/keras_tutorial.py, Keras 3 on TensorFlow-CPU),
  in its own process, so TensorFlow never enters this one; it needs the `keras` extra
  (pip install -e '.[keras]'), or `--no-keras` leaves it out. CPU rows only.
* baseline: the DCGAN loop as most people write it in PyTorch: fp32, a DataLoader with
  shuffling over the prepared tensors, `.item()` on every loss every step, and the generator
  run twice per step (once for D's fake batch, once for G's update), as the tutorial does.
* pipeline: `pipeline.gan.loop.train` itself, with the params under test.

Each (device, batch size) pair alternates the arms over several repeats (Keras, baseline,
pipeline, Keras, ...), so drifting machine load hits all alike, and reports the median
images/s of each (timed steps x batch size / wall time, after untimed warm-up steps) and the
ratios pipeline/Keras and pipeline/baseline. Every arm runs with the same thread count:
torch's intra-op threads (`--threads`, default torch's own) and TensorFlow's intra-op pool
set to it, TensorFlow's inter-op pool to torch's inter-op count; the JSON records them. Both
torch arms run with the malloc setting the pipeline's training makes for itself (freed memory
kept for reuse, `machine.keep_freed_memory`; TensorFlow caches its own).

Distance to the limit (benchmarks/peak_flops.py): this machine's fp32 and bf16 matmul peak
through torch, measured first on a quiet machine, and the FLOPs of one training step counted
by torch's FLOP counter. Each arm's achieved useful GFLOP/s is the tutorial's model math per
iteration (the same FLOPs for every arm, whatever its layers or loop do) x iterations/s, and
its fraction of peak divides that by the peak of the precision it computes in: fp32 for Keras
and the baseline, the pipeline's resolved precision for the pipeline. The FLOPs each arm
actually executes (fewer for the pipeline's fast layers, one more G forward for the
tutorial's loop) are in the JSON as executed GFLOP/s.

Peak memory is measured in a fresh child process per torch variant that loads the data and
runs 5 steps (CUDA: the peak of torch.cuda.max_memory_allocated; CPU: the process's peak
resident set size); Keras': its own process's peak resident set size.

    pip install -e '.[keras]'
    python benchmarks/train_throughput.py                 # full: batch 32..256, CPU (+CUDA)
    python benchmarks/train_throughput.py --batch-sizes 32 128 --repeats 5
    python benchmarks/train_throughput.py --quick         # a few steps of everything, to prove it runs
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import multiprocessing as mp
import platform
import queue as queue_module
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import peak_flops  # benchmarks/peak_flops.py: this script's folder is first on sys.path
import torch
import torch.nn.functional as F

from pipeline import data, files, machine
from pipeline.gan.architectures import build_discriminator, build_generator
from pipeline.gan.loop import train
from pipeline.gan.state import new_state
from pipeline.layout import Layout
from pipeline.params import ModelParams, TrainParams

PATHS = Layout()
KERAS_SCRIPT = Path(__file__).resolve().with_name("keras_tutorial.py")
NO_KERAS = (
    "The Keras arm needs TensorFlow and Keras 3, which this environment lacks: "
    "pip install -e '.[keras]' (or pass --no-keras to leave the arm out)."
)
ARMS = ("keras", "baseline", "pipeline")


def load_images(device: torch.device) -> torch.Tensor:
    if PATHS.prepared.is_file():
        return torch.from_numpy(data.load_prepared(PATHS.prepared).train_images).to(device)
    # A fresh clone (as in CI): noise, the same in every process, so that arms score the same data.
    noise = torch.randint(0, 256, (60000, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return noise.to(device)


class Baseline:
    """The common way to write the tutorial's loop in PyTorch."""

    def __init__(self, images: torch.Tensor, batch_size: int, device: torch.device) -> None:
        model = ModelParams()
        self.device, self.latent = device, model.latent_dim
        # The tutorial's layers as they read: upsample then conv, plain conv, nn.Dropout, NCHW activations.
        self.G = build_generator(model, n_classes=0, fast_upsample=False, fast_output=False, fast_layout=False).to(device)
        self.D = build_discriminator(model, n_classes=0, fast_dropout=False).to(device)
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
    """pipeline.gan.loop.train with the given levers, extended `steps` at a time."""

    def __init__(self, images: torch.Tensor, params: TrainParams, device: torch.device) -> None:
        self.images, self.model = images, ModelParams()
        self.params = params.model_copy(update={"log_every": 50, "checkpoint_every": 10**9, "sample_every": 10**9})
        self.state = new_state(self.model, self.params, device, 10)

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


def keras_installed() -> bool:
    """Whether TensorFlow and Keras can be imported, found without importing them here."""
    return all(importlib.util.find_spec(name) is not None for name in ("tensorflow", "keras"))


class KerasArm:
    """The tutorial's Keras code (keras_tutorial.py --serve) in its own process, answering "time N steps".

    It starts building, verifying and warming up at once; `ready()` waits for that. Its timings
    are taken in that process around the tutorial's loop alone, as the torch arms' are here.
    """

    def __init__(self, batch_size: int, warmup: int, threads: tuple[int, int], log: Any) -> None:
        command = [
            sys.executable, str(KERAS_SCRIPT), "--serve", "--verify", "--batch-size", str(batch_size),
            "--warmup", str(warmup), "--threads", str(threads[0]), "--inter-op-threads", str(threads[1]),
            "--data", str(PATHS.prepared),
        ]  # fmt: skip
        self.log = log  # its stderr: TensorFlow's chatter, whose last line explains a failure
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                     text=True, bufsize=1)  # fmt: skip
        self.info: dict[str, Any] | None = None
        self.peak_mib = 0.0

    def _receive(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                message: dict[str, Any] = json.loads(line)
                self.peak_mib = message.get("peak_rss_mib") or 0.0
                return message
        code = self.proc.wait()
        self.log.seek(0)
        last = (self.log.read().strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"The Keras arm's process ended (exit code {code}): {last}")

    def ready(self) -> dict[str, Any]:
        """The child's versions, threads and verification, once it has warmed up."""
        if self.info is None:
            self.info = self._receive()
        return self.info

    def images_per_second(self, steps: int) -> float:
        self.ready()
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{steps}\n")
        self.proc.stdin.flush()
        return float(self._receive()["images_per_second"])

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()  # EOF: the child returns
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def keras_arm(batch_size: int, warmup: int, threads: tuple[int, int]) -> Iterator[KerasArm]:
    """A started KerasArm whose process is ended on the way out, whatever happened."""
    with tempfile.TemporaryFile("w+") as log:
        arm = KerasArm(batch_size, warmup, threads, log)
        try:
            yield arm
        finally:
            arm.close()


def flop_figures(flops: dict[str, int], img_s: dict[str, float | None], batch_size: int,
                 precisions: dict[str, str], peaks: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Useful and executed GFLOP/s per arm, and useful GFLOP/s as a fraction of the peak of the arm's precision.

    Useful FLOPs: the tutorial's model math once per iteration (peak_flops' docstring), the same for
    every arm. Executed: what the arm's step runs: the tutorial's loop for Keras; for the baseline,
    counted on its own step (which also computes D's weight gradients in G's update, as such loops
    do); the pipeline's layers and loop for the pipeline.
    """
    executed = {"keras": flops["tutorial_loop"], "baseline": flops["baseline"], "pipeline": flops["pipeline"]}
    figures: dict[str, Any] = {"useful_gflop_s": {}, "executed_gflop_s": {}, "peak_precision": precisions,
                               "fraction_of_peak": {}}  # fmt: skip
    for arm, rate in img_s.items():
        if rate is None:
            continue
        steps_per_s = rate / batch_size
        useful = flops["useful"] * steps_per_s / 1e9
        figures["useful_gflop_s"][arm] = round(useful, 2)
        figures["executed_gflop_s"][arm] = round(executed[arm] * steps_per_s / 1e9, 2)
        figures["fraction_of_peak"][arm] = round(useful / peaks[precisions[arm]]["gflops"], 4)
    return figures


def bench_batch(device: torch.device, images: torch.Tensor, batch_size: int, levers: dict[str, Any],
                timing: dict[str, int], peaks: dict[str, Any], keras: KerasArm | None) -> dict[str, Any]:  # fmt: skip
    """One batch size: the arms alternated over the repeats, their medians, ratios, FLOP rates and peak memory.

    While the Keras process starts (seconds of TensorFlow import and tracing), this one does the
    untimed work: the torch arms' warm-up, the FLOP count and the peak-memory children.
    """
    runners = {v: make(v, images, batch_size, levers, device) for v in ("baseline", "pipeline")}
    for runner in runners.values():
        runner.run(timing["warmup"])  # allocator, caches, compilation
    flops = peak_flops.step_flops(batch_size, levers, device)
    flops["baseline"] = peak_flops.count_flops(lambda: runners["baseline"].run(1))
    peak_mib = {v: peak_memory_mib(v, batch_size, levers, device) for v in runners}
    if keras is not None:
        keras.ready()
    rates: dict[str, list[float]] = {arm: [] for arm in ARMS if arm != "keras" or keras is not None}
    for _ in range(timing["repeats"]):  # alternate, so drifting machine load hits every arm alike
        if keras is not None:
            rates["keras"].append(keras.images_per_second(timing["steps"]))
        for variant, runner in runners.items():
            rates[variant].append(images_per_second(runner, timing["steps"], batch_size, device))
    median = {arm: round(statistics.median(rates[arm]), 1) if arm in rates else None for arm in ARMS}
    precision = machine.resolve_precision(TrainParams(**levers).precision, device)
    row: dict[str, Any] = {
        "device": device.type,
        "batch_size": batch_size,
        "precision": precision,
        **{f"{arm}_img_s": median[arm] for arm in ARMS},
        "speedup": round(median["pipeline"] / median["baseline"], 2),  # pipeline / baseline
        "speedup_vs_keras": round(median["pipeline"] / median["keras"], 2) if median["keras"] else None,
        "all_img_s": {k: [round(r, 1) for r in v] for k, v in rates.items()},
        "flops_per_step": flops,
        **flop_figures(flops, median, batch_size, {"keras": "fp32", "baseline": "fp32", "pipeline": precision}, peaks),
        "baseline_peak_mib": peak_mib["baseline"],
        "pipeline_peak_mib": peak_mib["pipeline"],
        "keras_peak_mib": keras.peak_mib if keras is not None else None,
    }
    print_row(row)
    return row


def print_row(row: dict[str, Any]) -> None:
    keras = f"Keras {row['keras_img_s']:>7,.0f}   " if row["keras_img_s"] else ""
    vs_keras = f"   x{row['speedup_vs_keras']:.2f} Keras" if row["speedup_vs_keras"] else ""
    print(f"{row['device']:<5} batch {row['batch_size']:>4}: {keras}baseline {row['baseline_img_s']:>7,.0f}   "
          f"pipeline {row['pipeline_img_s']:>7,.0f} img/s ({row['precision']}){vs_keras}   x{row['speedup']:.2f} baseline"
          f"   peak MiB {row['baseline_peak_mib']} / {row['pipeline_peak_mib']}", flush=True)  # fmt: skip


def bench_training(device: torch.device, batch_sizes: list[int], levers: dict[str, Any], timing: dict[str, int],
                   peaks: dict[str, Any], keras_threads: tuple[int, int] | None) -> list[dict[str, Any]]:  # fmt: skip
    """Every batch size on `device`; `keras_threads` (intra-op, inter-op) runs the Keras arm, None leaves it out."""
    images = load_images(device)
    rows = []
    for batch_size in batch_sizes:
        if keras_threads is None:
            rows.append(bench_batch(device, images, batch_size, levers, timing, peaks, None))
            continue
        with keras_arm(batch_size, timing["warmup"], keras_threads) as keras:
            row = bench_batch(device, images, batch_size, levers, timing, peaks, keras)
            row["keras"] = keras.ready()
            rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]], peaks: dict[str, dict[str, Any]]) -> None:
    """The side-by-side summary: images/s, the pipeline's ratios and each arm's fraction of the peak."""
    for device, peak in peaks.items():
        print(f"\n{device} peak (torch matmul, {peak['threads']} threads): fp32 {peak['fp32']['gflops']:,.1f} GFLOP/s, "
              f"bf16 {peak['bf16']['gflops']:,.1f} GFLOP/s; % of peak = useful GFLOP/s (the tutorial's model math "
              "per step, the same for every arm) / the peak of the arm's precision")  # fmt: skip
    print(f"{'':<12}{'images/s':^32}{'pipeline /':^20}{'useful GFLOP/s':^27}{'% of peak':^27}")
    print(f"{'device batch':<12}" + "".join(f"{a:>11}" for a in ("Keras", "baseline", "pipeline"))
          + f"{'Keras':>10}{'baseline':>10}" + "".join(f"{a:>9}" for a in ("Keras", "basel.", "pipel.") * 2))  # fmt: skip

    def cell(value: float | None, width: int, spec: str) -> str:
        return f"{value:>{width}{spec}}" if value is not None else f"{'-':>{width}}"

    for row in rows:
        gflops, fraction = row["useful_gflop_s"], row["fraction_of_peak"]
        print(f"{row['device']:<6}{row['batch_size']:>6}"
              + "".join(cell(row[f"{a}_img_s"], 11, ",.0f") for a in ARMS)
              + cell(row["speedup_vs_keras"], 10, ".2f") + cell(row["speedup"], 10, ".2f")
              + "".join(cell(gflops.get(a), 9, ".1f") for a in ARMS)
              + "".join(cell(100 * fraction[a] if a in fraction else None, 9, ".1f") for a in ARMS))  # fmt: skip


def scoring_inputs(device: torch.device) -> tuple[torch.nn.Module, Any, str]:
    """The frozen classifier and the real data's reference, as evaluate loads them, and what the
    reference was made of (its file's SHA-256, or how it was made): on a fresh clone (as in CI) the
    reference comes from the prepared test images, or from noise."""
    from pipeline.scoring import frozen_classifier, scorer

    classifier, sha = frozen_classifier.load_classifier(PATHS.classifier, 128, device)
    if PATHS.reference.is_file():
        source = f"{PATHS.reference} (sha256 {files.sha256_file(PATHS.reference)[:12]})"
        return classifier, scorer.load_reference(PATHS.reference), source
    if PATHS.prepared.is_file():
        real = data.load_prepared(PATHS.prepared).test_images
        source = f"the test images of {PATHS.prepared} (sha256 {files.sha256_file(PATHS.prepared)[:12]})"
    else:
        real = load_images(device)[:2000].cpu().numpy()
        source = "2,000 seeded noise images (no prepared data here)"
    features, _ = frozen_classifier.classify(classifier, real, 1000, device)
    return classifier, scorer.compute_reference(features, np.arange(len(features)) % 10, sha), source


def _scoring_child(device_type: str, n: int, queue: Any) -> None:
    """Samples/s of evaluation, in a fresh process: generation, classifier features, every metric."""
    from pipeline.gan.architectures.dcgan import Generator
    from pipeline.gan.sampling import generate
    from pipeline.params import EvaluateParams
    from pipeline.stages import evaluate

    device = torch.device(device_type)
    machine.keep_freed_memory()  # as the evaluate stage does
    classifier, reference, source = scoring_inputs(device)
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
        "reference": source,
        "generate_s": round(generated - start, 2),
        "score_s": round(done - generated, 2),
        "samples_per_s": round(n / (done - start), 1),
        "peak_mib": round(torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mib(), 1),
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
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads of every arm")
    parser.add_argument("--no-keras", action="store_true", help="leave out the Keras tutorial's arm")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/train_throughput.json"))
    args = parser.parse_args()

    devices = [torch.device(d) for d in args.devices if d != "cuda" or torch.cuda.is_available()]
    with_keras = not args.no_keras and any(d.type == "cpu" for d in devices)
    if with_keras and not keras_installed():
        raise SystemExit(NO_KERAS)
    torch.set_num_threads(args.threads)
    threads = (torch.get_num_threads(), torch.get_num_interop_threads())
    # The allocator setting the pipeline's training makes for itself, made for both torch arms here.
    allocator = "glibc heap kept (machine.keep_freed_memory)" if machine.keep_freed_memory() else "default"
    report: dict[str, Any] = {
        "levers": args.levers or "params.yaml defaults",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "threads": {"torch_intra_op": threads[0], "torch_inter_op": threads[1]},
        "allocator": allocator,
        "torch": torch.__version__,
        "peak": {},
        "training": [],
        "scoring": [],
    }
    for device in devices:
        if args.quick:  # every code path, in seconds: one batch size, two steps, memory and FLOPs included
            batch_sizes, timing = args.batch_sizes[:1], {"repeats": 1, "steps": 2, "warmup": 1}
            peak_size = {"max_n": 1024, "repeats": 2, "budget_s": 1.0}
        else:
            steps = args.steps or (30 if device.type == "cpu" else 500)
            batch_sizes = args.batch_sizes
            timing = {"repeats": args.repeats, "steps": steps, "warmup": 5 if device.type == "cpu" else 50}
            peak_size = {}
        # First, while nothing else of this benchmark runs.
        peaks = report["peak"][device.type] = peak_flops.measure_peaks(device, **peak_size)
        keras_threads = threads if with_keras and device.type == "cpu" else None
        rows = bench_training(device, batch_sizes, args.levers, timing, peaks, keras_threads)
        report["training"] += rows
        if keras_threads is not None:
            info = rows[0]["keras"]
            report["threads"] |= {"tensorflow_intra_op": info["intra_op_threads"],
                                  "tensorflow_inter_op": info["inter_op_threads"]}  # fmt: skip
            report["keras"] = {k: info[k] for k in ("tensorflow", "keras", "backend", "numpy", "python")}
        report["scoring"].append(bench_scoring(device, 1000 if args.quick else 10_000))
    print_table(report["training"], report["peak"])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
