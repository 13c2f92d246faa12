"""Several trainings on one machine: images/s of the default run alone and beside others, with every
process on torch's own thread count (one per core: what a user gets) and with each given a share of
the cores (`train.threads`, what the train stage advises when the load is above the cores).

Each arm starts its processes together; each trains the default model and params (batch 32) with
`pipeline.gan.loop.train`, untimed warm-up steps first, then reports its own images/s. Arms alternate
over the repeats, so drifting machine load hits all alike; the table gives the medians.

    python benchmarks/shared_machine.py                      # 1 and 2 jobs, 3 repeats
    python benchmarks/shared_machine.py --jobs 1 2 4 --steps 300
    python benchmarks/shared_machine.py --quick              # a few steps, to prove it runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(threads: int, steps: int, warmup: int, batch_size: int) -> None:
    """One training process: its images/s over `steps` timed steps, as JSON on stdout."""
    import torch

    sys.path.insert(0, str(HERE))
    from train_throughput import Pipeline, images_per_second, load_images  # noqa: PLC0415 - the benchmark's own runner

    from pipeline import machine
    from pipeline.params import TrainParams

    machine.use_threads(threads)
    device = torch.device("cpu")
    runner = Pipeline(load_images(device), TrainParams(batch_size=batch_size, device="cpu"), device)
    runner.run(warmup)
    rate = images_per_second(runner, steps, batch_size, device)
    print(json.dumps({"threads": torch.get_num_threads(), "img_s": rate}))


def arm(jobs: int, threads: int, args: argparse.Namespace) -> list[float]:
    """Start `jobs` training processes at once; the images/s of each."""
    command = [sys.executable, __file__, "--child", "--threads", str(threads), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--batch-size", str(args.batch_size)]  # fmt: skip
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(jobs)]
    rates = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"a training process failed (exit {proc.returncode})")
        rates.append(json.loads(out.strip().splitlines()[-1])["img_s"])
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2], help="processes per arm (default: 1 2)")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a few steps of every arm")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.threads, args.steps, args.warmup, args.batch_size)
        return
    if args.quick:
        args.steps, args.warmup, args.repeats = 4, 2, 1
    from pipeline import machine

    cores = machine.cores()
    arms = [(jobs, threads) for jobs in args.jobs for threads in ([0] if jobs == 1 else [0, max(1, cores // jobs)])]
    results: dict[tuple[int, int], list[list[float]]] = {key: [] for key in arms}
    started = time.perf_counter()
    for _ in range(args.repeats):
        for key in arms:
            results[key].append(arm(*key, args))
    print(f"{cores} cores, batch {args.batch_size}, {args.steps} timed steps per process, "
          f"median of {args.repeats} ({time.perf_counter() - started:.0f} s)")  # fmt: skip
    print(f"{'jobs':>4}  {'threads each':<20}{'img/s per job':>14}{'all jobs':>10}")
    rows = []
    for (jobs, threads), repeats in results.items():
        per_job = statistics.median(statistics.mean(r) for r in repeats)
        total = statistics.median(sum(r) for r in repeats)
        label = "torch's own (cores)" if threads == 0 else f"{threads} (a share)"
        print(f"{jobs:>4}  {label:<20}{per_job:>14.1f}{total:>10.1f}")
        rows.append({"jobs": jobs, "threads": threads, "img_s_per_job": per_job, "img_s_all": total,
                     "repeats": repeats})  # fmt: skip
    print(json.dumps({"cores": cores, "batch_size": args.batch_size, "steps": args.steps, "rows": rows}))


if __name__ == "__main__":
    main()
