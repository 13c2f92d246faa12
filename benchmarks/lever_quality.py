"""Does a speed lever cost sample quality? FID after a fixed budget, with and without it.

For each seed, trains the default model twice with `pipeline.train.train` (once with the
params.yaml defaults, once with the lever's overrides) for the same number of steps, then
scores both generators with the frozen classifier (`scoring.generator_fid`). A lever is
harmless when the with/without difference is within the seed-to-seed spread.

    python benchmarks/lever_quality.py --lever '{"precision": "bf16"}' --steps 1000
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from pipeline import data, runtime, scoring
from pipeline.params import load_params
from pipeline.train import new_state, train


def run(lever: dict[str, Any], steps: int, seeds: list[int], fid_samples: int, device: torch.device) -> dict[str, Any]:
    params = load_params("params.yaml")
    images = torch.from_numpy(data.load_prepared(Path("data/prepared/mnist.npz")).train_images).to(device)
    classifier, sha = scoring.load_classifier(Path("models/classifier.pt"), params.classifier.feature_dim, device)
    reference = scoring.load_reference(Path("data/reference/reference.npz"), classifier_sha256=sha)
    rows = []
    for seed in seeds:
        for name, overrides in (("default", {}), ("lever", lever)):
            p = params.train.model_copy(update={"steps": steps, "seed": seed, "device": device.type, **overrides})
            start = time.perf_counter()
            state = train(new_state(params.model, p, device), images, p, params.model.latent_dim)
            seconds = time.perf_counter() - start
            fid = scoring.generator_fid(state.generator, classifier, reference, fid_samples, 1234, 1000, device)
            rows.append({"seed": seed, "variant": name, "fid": round(fid, 3), "seconds": round(seconds, 1)})
            print(f"seed {seed} {name:<8} FID {fid:8.3f}  ({seconds:.0f} s, {steps * p.batch_size / seconds:.0f} img/s)", flush=True)
    fids = {v: [r["fid"] for r in rows if r["variant"] == v] for v in ("default", "lever")}
    summary = {
        v: {"mean": round(statistics.mean(f), 3), "std": round(statistics.stdev(f), 3) if len(f) > 1 else 0.0}
        for v, f in fids.items()
    }
    diff = summary["lever"]["mean"] - summary["default"]["mean"]
    spread = max(summary["default"]["std"], summary["lever"]["std"])
    verdict = "within seed-to-seed noise" if abs(diff) <= 2 * spread else "outside seed-to-seed noise"
    print(f"default {summary['default']}  lever {summary['lever']}  difference {diff:+.3f}: {verdict}")
    return {"lever": lever, "steps": steps, "fid_samples": fid_samples, "device": device.type, "runs": rows,
            "summary": summary, "difference": round(diff, 3), "verdict": verdict}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lever", type=json.loads, required=True, help="TrainParams overrides, as JSON")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--fid-samples", type=int, default=2000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/lever_quality.json"))
    args = parser.parse_args()
    result = run(args.lever, args.steps, args.seeds, args.fid_samples, runtime.pick_device(args.device))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(args.output.read_text()) if args.output.is_file() else []
    runtime.write_json(args.output, [*existing, result])
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
