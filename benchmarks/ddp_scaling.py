"""Images/s of data-parallel training: the plain path, then DDP jobs of 1..N processes.

Each arm is the pipeline's own `train.train` on the default model and the prepared MNIST
(random digits when it is missing), started as a job of its own through torch's launcher (as
`train.nproc` does), alternated over the repeats, reporting the median images/s of the timed
window after a warm-up. The global batch is the same in every arm, split over the processes,
as the train stage splits `train.batch_size`.

    python benchmarks/ddp_scaling.py                       # CPU: plain, DDP x1, DDP x2
    python benchmarks/ddp_scaling.py --device cuda --nprocs 0 1 8   # a GPU machine (0 = plain)
    python benchmarks/ddp_scaling.py --quick               # a few steps, to prove it runs

Scaling efficiency = images/s of N processes / (N x images/s of one process).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import data, distributed
from pipeline.gan.loop import Callbacks, train
from pipeline.gan.resume import resume_or_fresh
from pipeline.layout import Layout
from pipeline.params import ModelParams, Params, TrainParams


def images(device: torch.device) -> torch.Tensor:
    prepared = Layout().prepared
    if prepared.is_file():
        return torch.from_numpy(data.load_prepared(prepared).train_images).to(device)
    return torch.randint(0, 256, (60000, 28, 28), dtype=torch.uint8, device=device)


def worker(config: dict[str, Any]) -> None:
    """One process of an arm: train warm-up + timed steps; rank 0 writes the timed images/s."""
    device = torch.device(config["device"])
    world = distributed.World()
    if distributed.under_torchrun(os.environ):
        world, device = distributed.join(device, os.environ, timeout_s=600)
    window = config["steps"]
    params = TrainParams(batch_size=config["batch_size"], steps=config["warmup"] + window, log_every=window,
                         checkpoint_every=10**9, sample_every=10**9, device=device.type)  # fmt: skip
    # log_every = the window: one flush (and one rate) at the end of the warm-up, one at the end.
    full = Params(train=params, model=ModelParams())
    state, _ = resume_or_fresh(full, None, Path("none"), "", device, 10, world)
    rates: list[float] = []
    log = Callbacks(on_log=lambda rows, rate: rates.append(rate)) if world.writer else Callbacks()
    train(state, images(device), params, full.model.latent_dim, log, world)
    if world.writer:
        Path(config["result"]).write_text(json.dumps({"images_per_second": rates[-1]}))
    distributed.leave(world)


def run_arm(nproc: int, config: dict[str, Any]) -> float:
    """Images/s of one job: nproc = 0 is the plain single process, else a DDP job of nproc processes."""
    import subprocess

    result = Path(tempfile.gettempdir()) / f"ddp-bench-{uuid.uuid4().hex}.json"
    args = [str(Path(__file__).resolve()), "--worker", json.dumps({**config, "result": str(result)})]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if nproc == 0:
        subprocess.run([sys.executable, *args], check=True, env=env)
    else:
        from torch.distributed.launcher.api import LaunchConfig, elastic_launch

        os.environ["PYTHONPATH"] = env["PYTHONPATH"]
        if config["device"] == "cpu":  # processes share the cores: one thread each, as torchrun sets
            os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
        launch = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex[:8],
                              rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{distributed.free_port()}",
                              max_restarts=0)  # fmt: skip
        elastic_launch(launch, entrypoint=sys.executable)(*args)
        os.environ.pop("OMP_NUM_THREADS", None)
    rate = json.loads(result.read_text())["images_per_second"]
    result.unlink()
    return float(rate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--nprocs", type=int, nargs="+", default=[0, 1, 2], help="0 = the plain path (no DDP)")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch, split over the processes")
    parser.add_argument("--steps", type=int, default=100, help="timed steps")
    parser.add_argument("--warmup", type=int, default=100, help="untimed steps first (a multiple of --steps)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a few steps, one repeat")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/ddp_scaling.json")
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    if args.quick:
        args.steps, args.warmup, args.repeats = 4, 4, 1
    if args.warmup % args.steps:
        parser.error("--warmup must be a multiple of --steps (the timed window starts at a flush)")
    config = {"device": args.device, "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup}
    rates: dict[int, list[float]] = {n: [] for n in args.nprocs}
    for repeat in range(args.repeats):  # alternate the arms: a busy moment hits all of them alike
        for nproc in args.nprocs:
            rates[nproc].append(run_arm(nproc, config))
            print(f"repeat {repeat + 1}: {'plain' if nproc == 0 else f'DDP x{nproc}'}: "
                  f"{rates[nproc][-1]:,.0f} img/s", flush=True)  # fmt: skip
    medians = {n: statistics.median(r) for n, r in rates.items()}
    one = medians.get(1) or medians.get(0)
    rows = []
    print(f"\n{'arm':<10}{'img/s':>10}{'per-rank batch':>16}{'efficiency':>12}")
    for nproc, rate in medians.items():
        n = max(nproc, 1)
        efficiency = rate / (n * one) if one else float("nan")
        rows.append({"nproc": nproc, "images_per_second": rate, "repeats": rates[nproc],
                     "per_rank_batch": args.batch_size // n, "efficiency": efficiency})  # fmt: skip
        print(f"{'plain' if nproc == 0 else f'DDP x{nproc}':<10}{rate:>10,.0f}{args.batch_size // n:>16}{efficiency:>12.2f}")
    if 0 in medians and 1 in medians:
        print(f"DDP overhead with one process: {100 * (1 - medians[1] / medians[0]):+.1f}% images/s")
    report = {"config": config, "rows": rows, "torch": torch.__version__, "machine": platform.processor() or
              platform.machine(), "cpus": os.cpu_count()}  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
