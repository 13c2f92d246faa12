"""Do the speed levers cost sample quality? FID after a fixed budget, with and without each.

For each seed, trains the default model with `pipeline.train.train` once with the
params.yaml defaults and once per `--lever` (TrainParams overrides, usually turning a
lever off), for the same number of steps, then scores every generator with the frozen
classifier (`scoring.generator_fid`, same noise for all). A lever is harmless when the
difference of mean FIDs is within twice the seed-to-seed standard deviation.

    python benchmarks/lever_quality.py --steps 1500 \
        --lever '{"precision": "fp32"}' \
        --lever '{"precision": "fp32", "fast_upsample": false, "fast_output": false, "fused_adam": false}'
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
from pipeline.layout import Layout
from pipeline.params import load_params
from pipeline.train import new_state, train


def run(levers: list[dict[str, Any]], steps: int, seeds: list[int], fid_samples: int, device: torch.device) -> dict[str, Any]:
    params = load_params("params.yaml")
    paths = Layout(dataset=params.data.dataset)
    images = torch.from_numpy(data.load_prepared(paths.prepared).train_images).to(device)
    classifier, sha = scoring.load_classifier(paths.classifier, params.classifier.feature_dim, device)
    reference = scoring.load_reference(paths.reference, classifier_sha256=sha)
    arms = {"default": {}, **{json.dumps(lever, sort_keys=True): lever for lever in levers}}
    rows = []
    for seed in seeds:
        for name, overrides in arms.items():
            p = params.train.model_copy(update={"steps": steps, "seed": seed, "device": device.type, **overrides})
            start = time.perf_counter()
            state = train(new_state(params.model, p, device), images, p, params.model.latent_dim)
            seconds = time.perf_counter() - start
            fid = scoring.generator_fid(
                state.generator, classifier, reference, fid_samples, 1234, params.evaluate.batch_size, device
            )
            rows.append({"seed": seed, "arm": name, "fid": round(fid, 3), "seconds": round(seconds, 1),
                         "img_s": round(steps * p.batch_size / seconds, 1)})  # fmt: skip
            print(f"seed {seed} {name:<40} FID {fid:8.3f}  ({seconds:.0f} s, {rows[-1]['img_s']:.0f} img/s)", flush=True)
    fids = {arm: [r["fid"] for r in rows if r["arm"] == arm] for arm in arms}
    summary = {
        arm: {"mean": round(statistics.mean(f), 3), "std": round(statistics.stdev(f), 3) if len(f) > 1 else 0.0}
        for arm, f in fids.items()
    }
    comparisons = []
    for arm in list(arms)[1:]:
        diff = summary[arm]["mean"] - summary["default"]["mean"]
        spread = max(summary["default"]["std"], summary[arm]["std"])
        verdict = "within seed-to-seed noise" if abs(diff) <= 2 * spread else "outside seed-to-seed noise"
        comparisons.append({"arm": arm, "difference": round(diff, 3), "verdict": verdict})
        print(f"default {summary['default']}  vs  {arm} {summary[arm]}: difference {diff:+.3f}, {verdict}")
    resolved = runtime.resolve_precision(params.train.precision, device)
    return {"defaults": {**params.train.model_dump(exclude={"steps", "seed", "device"}), "precision_resolved": resolved},
            "steps": steps, "seeds": seeds, "fid_samples": fid_samples, "device": device.type, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "runs": rows, "summary": summary, "comparisons": comparisons}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lever", type=json.loads, action="append", required=True,
                        help="TrainParams overrides as JSON; repeat for more arms")  # fmt: skip
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
