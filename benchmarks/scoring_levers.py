"""What each lever of evaluate's scoring gives on the CPU: every lever on against each one off.

Each arm generates n samples with an untrained generator (as train_throughput.py's scoring
line does) and scores them as the evaluate stage does, in its own spawned process; the arms
alternate over the repeats, so drifting machine load hits all alike, and the medians are
reported. The levers:

* G layout: the generator samples in channels-last activations (`Generator(nhwc=True)`, the
  default); off: in NCHW.
* heap: freed memory stays in glibc's heap (`machine.keep_freed_memory`); off: not called.
* classifier layout: the frozen classifier runs channels-last
  (`frozen_classifier.load_classifier`); off: its weights made contiguous again, so oneDNN
  runs its convs and max-pools in NCHW.
* centre: PRDC's float32 screen measures the points from their centre; off: from the origin,
  as before (a subclass of the screen that passes a zero centre).

Each child times generation, the classifier's features, PRDC and the whole score, and counts
the pairs PRDC computed exactly in float64. Every arm must give the same scores: the largest
relative difference of each arm's scalar scores from the all-on arm's is printed with them.

    python benchmarks/scoring_levers.py                  # 10,000 samples, 3 repeats
    python benchmarks/scoring_levers.py --n 2000 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import train_throughput  # benchmarks/train_throughput.py: this script's folder is first on sys.path

from pipeline import machine
from pipeline.gan.architectures.dcgan import Generator
from pipeline.gan.sampling import generate
from pipeline.params import EvaluateParams
from pipeline.scoring import frozen_classifier, metrics
from pipeline.stages import evaluate

LEVERS = ("G layout", "heap", "classifier layout", "centre")
ARMS: dict[str, tuple[str, ...]] = {
    "all on": (),
    "G NCHW": ("G layout",),
    "heap not kept": ("heap",),
    "classifier NCHW": ("classifier layout",),
    "PRDC from the origin": ("centre",),
    "all off": LEVERS,
}
TIMES = ("generate_s", "classify_s", "prdc_s", "score_s", "total_s")


class _FromOrigin(metrics._Screen):
    """PRDC's screen as it was before the centred one: distances' bounds measured from the origin."""

    def __init__(self, points: np.ndarray, center: np.ndarray) -> None:
        super().__init__(points, np.zeros_like(center))


def _timed(module: Any, name: str, clock: dict[str, float]) -> None:
    """Wrap module.name so that its calls add their wall time to clock[name]."""
    function = getattr(module, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            clock[name] = clock.get(name, 0.0) + time.perf_counter() - start

    setattr(module, name, wrapper)


def _child(off: tuple[str, ...], n: int, queue: Any) -> None:
    device = torch.device("cpu")
    if "heap" not in off:
        machine.keep_freed_memory()
    classifier, reference, _ = train_throughput.scoring_inputs(device)
    if "classifier layout" in off:
        classifier.to(memory_format=torch.contiguous_format)
    if "centre" in off:
        metrics._Screen = _FromOrigin
    clock: dict[str, float] = {}
    _timed(frozen_classifier, "classify", clock)  # evaluate.evaluate calls it through the module
    _timed(metrics, "prdc", clock)
    exact_pairs = 0
    pair_sq_dists = metrics._pair_sq_dists

    def counted(x: np.ndarray, y: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        nonlocal exact_pairs
        exact_pairs += len(i)
        return pair_sq_dists(x, y, i, j)

    metrics._pair_sq_dists = counted
    params = EvaluateParams(n_samples=n, kid_subset_size=min(1000, n // 2))
    torch.manual_seed(0)  # the same untrained G in every arm, so that their scores can be compared
    generator = Generator(nhwc="G layout" not in off)
    start = time.perf_counter()
    images = generate(generator, n, 0, params.batch_size, device).numpy()
    generated = time.perf_counter()
    scores = evaluate.evaluate(images, classifier, reference, params, device)
    done = time.perf_counter()
    queue.put({
        "generate_s": generated - start, "classify_s": clock["classify"], "prdc_s": clock["prdc"],
        "score_s": done - generated, "total_s": done - start, "exact_pairs": exact_pairs,
        "scores": {key: float(scores[key]) for key in evaluate.SCALARS},
    })  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000, help="samples generated and scored per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/scoring_levers.json"))
    args = parser.parse_args()

    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    for repeat in range(args.repeats):
        for arm, off in ARMS.items():
            runs[arm].append(train_throughput._in_child(_child, off, args.n))
            print(f"repeat {repeat + 1}/{args.repeats}: {arm}: {runs[arm][-1]['total_s']:.2f} s", flush=True)

    base = runs["all on"][0]["scores"]
    report = []
    for arm, results in runs.items():
        row: dict[str, Any] = {"arm": arm, "off": list(ARMS[arm])}
        row |= {key: round(statistics.median(r[key] for r in results), 2) for key in TIMES}
        row["runs_total_s"] = [round(r["total_s"], 2) for r in results]
        row["exact_pairs"] = statistics.median(r["exact_pairs"] for r in results)
        row["max_rel_score_diff"] = max(
            abs(r["scores"][key] - base[key]) / max(abs(base[key]), 1e-12) for r in results for key in base
        )
        report.append(row)

    print(f"\nscoring {args.n} samples of an untrained G on the CPU, medians of {args.repeats} (s):")
    print(f"{'arm':<22}" + "".join(f"{key[:-2]:>10}" for key in TIMES) + f"{'exact pairs':>13}{'score diff':>12}")
    for row in report:
        print(f"{row['arm']:<22}" + "".join(f"{row[key]:>10.2f}" for key in TIMES)
              + f"{row['exact_pairs']:>13,.0f}{row['max_rel_score_diff']:>12.1e}")  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    payload = {"n": args.n, "repeats": args.repeats, "torch": torch.__version__, "arms": report}
    args.output.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
