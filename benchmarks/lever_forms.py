"""The table behind `auto`: every form of the speed levers that may be `auto`, timed on this machine.

`train.fast_upsample` (three forms), `train.fast_output` and `train.channels_last` (two each)
compute the same function in every form (pipeline/gan/levers.py); `auto` times the twelve
combinations over a few steps when a run first needs them. This script times them longer, the
combinations alternating over the repeats (medians), at each batch, with params.yaml's model and
precision, and says which one `auto` would keep and how far the defaults (true, true, false) are
from it.

    python benchmarks/lever_forms.py                          # batches 32 and 128, 3 repeats of 30 steps
    python benchmarks/lever_forms.py --batch-sizes 32 --repeats 1 --steps 3    # a few seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch

from pipeline import machine
from pipeline.gan import levers
from pipeline.params import load_params

DEFAULTS = {"fast_upsample": True, "fast_output": True, "channels_last": False}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per form and repeat")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/lever_forms.json"))
    args = parser.parse_args()

    device = torch.device("cpu")
    machine.keep_freed_memory()  # as training does
    base = load_params(args.params)
    auto = base.model_copy(
        update={"train": base.train.model_copy(update=dict.fromkeys(levers.AUTO_LEVERS, "auto"))}
    )
    tables = []
    for batch in args.batch_sizes:
        params = auto.model_copy(update={"train": auto.train.model_copy(update={"batch_size": batch})})
        rates = levers.timings(params, device, 10, args.repeats, args.steps)  # as `auto` times them, longer
        medians = {form: round(statistics.median(r), 1) for form, r in rates.items()}
        fastest = max(medians, key=medians.get)
        default = medians[json.dumps(DEFAULTS, sort_keys=True)]
        tables.append({"batch": batch, "img_s": medians, "runs": rates, "fastest": json.loads(fastest),
                       "fastest_over_defaults": round(medians[fastest] / default, 3)})  # fmt: skip
        print(f"\nbatch {batch} ({machine.resolve_precision(params.train.precision, device)}; "
              f"medians of {args.repeats} x {args.steps} steps):")  # fmt: skip
        print(f"{'fast_upsample':>14}{'fast_output':>13}{'channels_last':>15}{'img/s':>9}{'x defaults':>12}")
        for form, rate in sorted(medians.items(), key=lambda item: -item[1]):
            f = json.loads(form)
            print(f"{f['fast_upsample']!s:>14}{f['fast_output']!s:>13}{f['channels_last']!s:>15}"
                  f"{rate:>9.1f}{rate / default:>12.3f}" + ("   <- auto" if form == fastest else ""))  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    payload = {"processor": machine.processor_name(device), "machine": platform.machine(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "repeats": args.repeats, "steps": args.steps, "batches": tables}  # fmt: skip
    args.output.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
