"""Is the FID's 95 % interval as wide as the FID's real noise? A trained generator scored many times.

The interval evaluate records (scoring/metrics.fid_with_interval) comes from one draw of N samples:
FID ± 1.96 x the sd of the FIDs of bootstrap resamples of that draw. This script draws the trained
generator's N samples afresh with each of `--draws` seeds (as evaluate does with evaluate.seed),
scores every draw against the reference, and prints the sd of those FIDs beside the bootstrap sd of
each draw, their ratio, how many draws' intervals hold the mean FID of all draws, and how long the
interval takes. Run it in a project where `dvc repro` has trained and scored a generator:

    python benchmarks/fid_interval.py                     # 10 draws of evaluate.n_samples
    python benchmarks/fid_interval.py --draws 5 --n 2000
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from pipeline import data
from pipeline.gan.export import load_generator
from pipeline.layout import Layout
from pipeline.params import load_params
from pipeline.scoring import metrics, scorer
from pipeline.scoring.frozen_classifier import classify

Z = 1.959964


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--n", type=int, default=None, help="samples per draw (default evaluate.n_samples)")
    args = parser.parse_args()
    if args.draws < 2:
        parser.error("--draws must be at least 2: the draws' spread is what the interval is compared with")
    params = load_params(args.params)
    p, paths, device = params.evaluate, Layout(dataset=params.data.dataset), torch.device("cpu")
    n = args.n or p.n_samples
    frozen = scorer.Scorer.load(paths, params, device)
    ref = frozen.reference
    generator = load_generator(paths.generator, params.model, device, len(data.class_names(params.data)))
    rows = []
    for seed in range(p.seed, p.seed + args.draws):
        images, _ = scorer.draw(generator, n, seed, p.batch_size, device, ref)
        features, _ = classify(frozen.classifier, images, p.batch_size, device)
        started = time.perf_counter()
        fid, low, high = metrics.fid_with_interval(features, ref.mean, ref.cov, p.fid_resamples, seed)
        rows.append({"seed": seed, "fid": fid, "low": low, "high": high, "seconds": time.perf_counter() - started})
        print(json.dumps(rows[-1]))
    fids = [r["fid"] for r in rows]
    spread, mean = statistics.stdev(fids), statistics.fmean(fids)
    boot = statistics.fmean((r["high"] - r["low"]) / (2 * Z) for r in rows)
    held = sum(r["low"] <= mean <= r["high"] for r in rows)
    print(
        f"N={n}, {args.draws} draws, {p.fid_resamples} resamples: FID {mean:.3f} ± {spread:.3f} (sd over draws); "
        f"bootstrap sd {boot:.3f} (x{boot / spread:.2f} the draws' sd); {held}/{len(rows)} intervals hold the mean; "
        f"interval {statistics.median(r['seconds'] for r in rows):.2f} s (median)"
    )


if __name__ == "__main__":
    main()
