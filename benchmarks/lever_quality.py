"""What a lever does to sample quality: FID after a fixed budget, arm against arm, over seeds.

An arm is a set of overrides of params.yaml's model and train sections (dotted keys, as
`dvc exp run -S` takes them). For each seed, every arm trains with `pipeline.gan.loop.train` for
the same number of steps and its generator (the EMA of G where the arm keeps one) is scored
with the frozen classifier (the same noise for all), with the 95 % interval of its FID over the draw
of its samples (scoring/metrics.fid_with_interval, as evaluate records it); an arm with
train.standing_stats is also scored with the statistics training left (`fid_as_trained`, paired). A difference between
two arms' mean FIDs is given with its 95 % interval from the seeds' spread (Welch's t); it is
real when that interval excludes 0, as the champion moves only when the intervals part. With one
seed an arm has no spread: the runs' own intervals are compared instead (the draw's noise only).

Two uses:

    # the quality study of docs/training.md: the tutorial, each lever alone and the quality preset
    python benchmarks/lever_quality.py --study --steps 4000 --fid-samples 10000 --jobs 2 \\
        --speed-steps 200 --grids docs/quality_grids.png

    # the remedies against collapse, each on top of the preset
    python benchmarks/lever_quality.py --remedies --seeds 0 1 2 --steps 4000 --fid-samples 10000 --jobs 2

    # part of the study, e.g. more seeds of the tutorial and the preset, and their speed alone
    python benchmarks/lever_quality.py --study --arms tutorial "quality preset" --seeds 0 1 2 --steps 4000 \\
        --fid-samples 10000 --jobs 2 --speed-steps 200 --grids docs/quality_grids.png

    # do the speed levers cost quality? (TrainParams overrides against the defaults)
    python benchmarks/lever_quality.py --steps 1500 --lever '{"precision": "fp32"}'

`--jobs N` trains N arms at once, each in its own process with 1/N of the threads (the FIDs do
not depend on it, the bits do). Their images/s share the machine, so `--speed-steps` measures
each arm's speed again afterwards, alone, alternating the arms over three repeats.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import data, files, machine, search_space
from pipeline.errors import UserError
from pipeline.gan import levers
from pipeline.gan.loop import Callbacks, train
from pipeline.gan.sampling import fixed_noise, sample_grid
from pipeline.gan.state import new_state
from pipeline.layout import Layout
from pipeline.params import Params, load_params, validate_params
from pipeline.scoring import metrics, scorer
from pipeline.scoring.frozen_classifier import classify

# The quality preset (docs/training.md): the class-conditional pair with an EMA of G, at the
# tutorial's loss and learning rates. Each key is a `dvc exp run -S` override. Hinge loss with spectral
# norm on top of it (the earlier preset) won at seed 0 but let D overpower G at other seeds.
PRESET: dict[str, Any] = {"model.conditional": True, "train.ema_decay": 0.995}
STUDY: dict[str, dict[str, Any]] = {
    "tutorial": {},
    "ema 0.995": {"train.ema_decay": 0.995},
    "conditional": {"model.conditional": True},
    "hinge + spectral norm": {"train.loss": "hinge", "model.spectral_norm": True},
    "conditional + hinge + spectral norm + ema": {
        "model.conditional": True, "model.spectral_norm": True, "train.loss": "hinge", "train.ema_decay": 0.995,
    },  # fmt: skip
    "quality preset": PRESET,
}
# The remedies of pipeline/gan/remedies.py on the preset, each alone (docs/training.md, "The preset is fragile").
REMEDIES: dict[str, dict[str, Any]] = {
    "preset + ema warm-up 1000": {**PRESET, "train.ema_warmup": 1000},
    "preset + r1 0.1": {**PRESET, "train.r1_gamma": 0.1},
    "preset + translation": {**PRESET, "train.augment": "translation"},
}
# The quality preset with R1 (the remedy that helped at seed 0), the EMA's warm-up (short runs), the collapse
# watchdog (which changes no number until it acts) and D's learning rate doubled (39.9 -> 24.3 mean FID over
# ten seeds): the robust preset until D lost its dropout, and the `best` preset's base.
FASTER_D: dict[str, Any] = {**PRESET, "train.r1_gamma": 0.1, "train.ema_warmup": 1000, "train.watchdog": True,
                            "train.lr_d": 0.0004}  # fmt: skip
# The robust preset (docs/training.md): that, with D's dropout off (MNIST 24.3 -> 9.5 mean FID over ten seeds,
# Fashion-MNIST 105.6 at seeds 0-2 -> 40.9 over ten seeds).
ROBUST: dict[str, Any] = {**FASTER_D, "model.dcgan.dropout": 0.0}
# The `best` preset (docs/training.md, "Towards the best preset"): the robust preset with EMA 0.9995, lazy R1
# (every fourth step) and 17,500 steps, the learning rates decayed over the second half: 6.1 ± 0.2 over seeds
# 0-2 (9.9 ± 0.8 with D's dropout, FASTER_D's).
BEST_CANDIDATE: dict[str, Any] = {**ROBUST, "train.ema_decay": 0.9995, "train.r1_every": 4, "train.steps": 17500,
                                  "train.lr_decay_from": 0.5}  # fmt: skip


def dvc_overrides(arm: dict[str, Any]) -> str:
    """The arm as `-S key=value` options of `dvc exp run`."""
    return " ".join(f"-S {key}={json.dumps(value)}" for key, value in arm.items())


def with_overrides(params: Params, arm: dict[str, Any]) -> Params:
    """params.yaml's values with the arm's dotted overrides, validated as the file would be."""
    raw = params.model_dump(mode="json")
    for key, value in arm.items():  # nested as `dvc exp run -S model.dcgan.dropout=0` takes them
        search_space.assign(raw, key, value)
    return validate_params(raw, source=f"the arm {arm}")


def training_data(params: Params, paths: Layout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The prepared training images (uint8) and labels of params' dataset, on `device`."""
    dataset = data.load_prepared(paths.prepared, len(data.class_names(params.data)))
    return torch.from_numpy(dataset.train_images).to(device), torch.from_numpy(dataset.train_labels).to(device)


def _setup(threads: int) -> None:
    torch.set_num_threads(threads)


def train_arm(params_path: str, arm: dict[str, Any], steps: int, seed: int, fid_samples: int, device_type: str
              ) -> dict[str, Any]:  # fmt: skip
    """One (arm, seed): train, score; the figures and the last grid."""
    device = torch.device(device_type)
    params = with_overrides(load_params(params_path), {**arm, "train.steps": steps, "train.seed": seed,
                                                       "train.device": device_type})  # fmt: skip
    paths = Layout(dataset=params.data.dataset)
    images, labels = training_data(params, paths, device)
    frozen = scorer.Scorer.load(paths, params, device)
    params, _ = levers.choose(params, device, len(frozen.reference.label_distribution))  # the `auto` speed levers
    p = params.train
    state = new_state(params.model, p, device, len(frozen.reference.label_distribution))
    start = time.perf_counter()
    curve: list[tuple[int, float]] = []  # with train.watchdog: the quick FID of each look, by step

    def look(state: Any) -> float:
        curve.append((state.step, round(frozen.watch(state.output, params)["fid"], 2)))
        return curve[-1][1]

    watch = Callbacks(on_watch=look,
                      on_rescue=lambda event: print(f"seed {seed} {arm}: {event.sentence()}", flush=True))  # fmt: skip
    train(state, images, p, params.model.latent_dim, watch, labels=labels)
    rescues = [vars(event) for event in state.watch.events] if state.watch is not None else []
    seconds = time.perf_counter() - start
    grid = sample_grid(state.given(), fixed_noise(params.model.latent_dim, seed, device))
    fid, low, high = final_fid(state.given(), frozen, fid_samples, params)
    row = {"seed": seed, "fid": round(fid, 3), "fid_low": round(low, 3), "fid_high": round(high, 3),
           "seconds": round(seconds, 1), "img_s": round(steps * p.batch_size / seconds, 1),
           "threads": torch.get_num_threads(), "rescues": rescues, "quick_fid_by_step": curve, "grid": grid}  # fmt: skip
    if p.standing_stats:  # the same weights with the statistics training left: the lever's effect, paired
        row["fid_as_trained"] = [round(x, 3) for x in final_fid(state.output, frozen, fid_samples, params)]
    return row


def final_fid(generator: Any, frozen: scorer.Scorer, n: int, params: Params) -> tuple[float, float, float]:
    """The FID of n samples with its 95 % interval. Not frozen.quick_fid (seeded by train.seed, which
    differs between the seeds here): the same noise for every arm and seed."""
    ref, batch = frozen.reference, params.evaluate.batch_size
    images, _ = scorer.draw(generator, n, 1234, batch, frozen.device, ref)
    features, _ = classify(frozen.classifier, images, batch, frozen.device)
    return metrics.fid_with_interval(features, ref.mean, ref.cov, params.evaluate.fid_resamples, 1234)


def speed(params_path: str, arms: dict[str, dict[str, Any]], steps: int, device: torch.device, repeats: int = 3
          ) -> dict[str, float]:  # fmt: skip
    """Each arm's images/s alone in this process: `steps` timed steps after 20 warm-up, arms alternating, medians.
    The watchdog is off here: its looks (a quick FID every `watchdog_every` steps) are not the step's speed."""
    params = load_params(params_path)
    paths = Layout(dataset=params.data.dataset)
    images, labels = training_data(params, paths, device)
    rates: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(repeats):
        for name, arm in arms.items():
            fixed = {"train.steps": 20, "train.device": device.type, "train.watchdog": False}
            armed = with_overrides(params, {**arm, **fixed})
            state = new_state(armed.model, armed.train, device, int(labels.max()) + 1)
            train(state, images, armed.train, armed.model.latent_dim, labels=labels)  # warm-up
            timed = armed.train.model_copy(update={"steps": 20 + steps})
            start = time.perf_counter()
            train(state, images, timed, armed.model.latent_dim, labels=labels)
            if device.type == "cuda":
                torch.cuda.synchronize()
            rates[name].append(steps * timed.batch_size / (time.perf_counter() - start))
    return {name: round(statistics.median(r), 1) for name, r in rates.items()}


def run(params_path: str, arms: dict[str, dict[str, Any]], steps: int, seeds: dict[str, list[int]], fid_samples: int,
        device: torch.device, jobs: int) -> tuple[dict[str, Any], dict[tuple[str, int], np.ndarray]]:  # fmt: skip
    """Every arm over its seeds, `jobs` at a time: the report and the last grids."""
    for arm in arms.values():  # a typo in an arm fails before hours of training
        with_overrides(load_params(params_path), arm)
    order = list(arms)[::-1]  # the last arm (the preset of --study) first: the one most worth seeing early
    tasks = sorted(((name, seed) for name in arms for seed in seeds[name]), key=lambda t: (t[1], order.index(t[0])))
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else torch.get_num_threads()
    rows, grids = [], {}
    with concurrent.futures.ProcessPoolExecutor(jobs, mp.get_context("spawn"), _setup, (threads,)) as pool:
        futures = {pool.submit(train_arm, params_path, arms[name], steps, seed, fid_samples, device.type): (name, seed)
                   for name, seed in tasks}  # fmt: skip
        for future in concurrent.futures.as_completed(futures):
            name, seed = futures[future]
            row = future.result()
            grids[(name, seed)] = row.pop("grid")
            rows.append({"arm": name, **row})
            paired = " (as trained: {:.3f} [{:.3f}, {:.3f}])".format(*row["fid_as_trained"]) if "fid_as_trained" in row else ""
            print(f"seed {seed} {name:<28} FID {row['fid']:8.3f} [{row['fid_low']:.3f}, {row['fid_high']:.3f}]{paired}  "
                  f"({row['seconds']:.0f} s, {row['img_s']:.0f} img/s on {row['threads']} thread(s))", flush=True)  # fmt: skip
    summary = {}
    for name in arms:
        fids = [r["fid"] for r in rows if r["arm"] == name]
        summary[name] = {"mean": round(statistics.mean(fids), 3), "std": round(statistics.stdev(fids), 3) if len(fids) > 1 else None,
                         "seeds": len(fids)}  # fmt: skip
    first = next(iter(arms))
    comparisons = [compare(name, rows, first) for name in list(arms)[1:]]
    params = load_params(params_path)
    report = {"arms": arms, "steps": steps, "seeds": seeds, "fid_samples": fid_samples, "device": device.type,
              "precision_resolved": machine.resolve_precision(params.train.precision, device), "torch": torch.__version__,
              "jobs": jobs, "runs": sorted(rows, key=lambda r: (r["seed"], list(arms).index(r["arm"]))), "summary": summary,
              "comparisons": comparisons}  # fmt: skip
    return report, grids


def compare(name: str, rows: list[dict[str, Any]], base: str) -> dict[str, Any]:
    """Arm `name`'s mean FID minus arm `base`'s, its 95 % interval and the verdict."""
    from scipy import stats

    a, b = ([r for r in rows if r["arm"] == arm] for arm in (name, base))
    diff = statistics.mean(r["fid"] for r in a) - statistics.mean(r["fid"] for r in b)
    if len(a) > 1 and len(b) > 1:  # Welch: the seeds' spread of each arm
        va, vb = (statistics.variance([r["fid"] for r in x]) / len(x) for x in (a, b))
        df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if va + vb > 0 else 1.0
        half, source = float(stats.t.ppf(0.975, df)) * (va + vb) ** 0.5, "seeds"
    else:  # one seed: only the draw's noise, from the runs' bootstrap intervals
        sds = [[(r["fid_high"] - r["fid_low"]) / (2 * 1.959964) for r in x] for x in (a, b)]
        half, source = 1.959964 * sum(statistics.mean(s) ** 2 for s in sds) ** 0.5, "one seed: the draw's noise only"
    verdict = "within noise" if abs(diff) <= half else ("a real gain" if diff < 0 else "a real loss")
    return {"arm": name, "difference": round(diff, 3), "interval": [round(diff - half, 3), round(diff + half, 3)],
            "interval_from": source, "verdict": verdict}  # fmt: skip


def print_table(report: dict[str, Any]) -> None:
    speeds = report.get("speed_img_s", {})
    first = next(iter(report["arms"]))
    print(f"\n{report['steps']} steps, FID at N = {report['fid_samples']}")
    print(f"{'arm':<26}{'FID mean':>10}{'± std':>9}{'seeds':>7}{'img/s':>9}{'x speed':>9}")
    for name, s in report["summary"].items():
        rate = speeds.get(name)
        ratio = f"{rate / speeds[first]:.2f}" if rate and speeds.get(first) else ""
        std = f"{s['std']:.1f}" if s["std"] is not None else "-"
        print(f"{name:<26}{s['mean']:>10.1f}{std:>9}{s['seeds']:>7}{rate or '':>9}{ratio:>9}")
    for c in report["comparisons"]:
        low, high = c["interval"]
        print(f"{c['arm']} - {first}: {c['difference']:+.1f} [{low:+.1f}, {high:+.1f}] ({c['interval_from']}): {c['verdict']}")


def save_grids(grids: dict[tuple[str, int], np.ndarray], names: list[str], seed: int, path: Path) -> None:
    """The arms' last grids of one seed side by side, 8 px apart, as one PNG."""
    tiles = [grids[(name, seed)] for name in names if (name, seed) in grids]
    gap = np.full((tiles[0].shape[0], 8), 255, np.uint8)
    row = np.concatenate([part for tile in tiles for part in (tile, gap)][:-1], axis=1)
    data.save_png(row, path, scale=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", action="store_true", help="the arms of docs/training.md: tutorial, each lever, the preset")
    parser.add_argument("--arms", nargs="+", metavar="NAME", help="with --study: only these of its arms")
    parser.add_argument("--remedies", action="store_true", help="the quality preset against each remedy on top of it")
    parser.add_argument("--arm", action="append", default=[], metavar="NAME=JSON",
                        help='an arm of dotted overrides, e.g. \'ema={"train.ema_decay": 0.995}\'; repeat for more')  # fmt: skip
    parser.add_argument("--lever", type=json.loads, action="append", default=[],
                        help="TrainParams overrides as JSON (an arm against the defaults); repeat for more")  # fmt: skip
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--robust", action="store_true", help="the quality preset against the robust candidate")
    parser.add_argument("--seeds-for", action="append", default=[], metavar="NAME=SEEDS",
                        help="an arm's own seeds, e.g. 'quality preset=1,2'; repeat for more")  # fmt: skip
    parser.add_argument("--lever-seeds", nargs="+", type=int,
                        help="with --study: the seeds of the arms between the first and the last (default: --seeds)")  # fmt: skip
    parser.add_argument("--fid-samples", type=int, default=2000)
    parser.add_argument("--jobs", type=int, default=1, help="arms trained at once, each in its own process")
    parser.add_argument("--speed-steps", type=int, default=0, help="then each arm's img/s alone over this many steps")
    parser.add_argument("--speed-only", action="store_true", help="only the --speed-steps measurement, no training")
    parser.add_argument("--grids", type=Path, help="a PNG of the first and last arms' final grids (first seed)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/lever_quality.json"))
    args = parser.parse_args()
    arms: dict[str, dict[str, Any]] = dict(STUDY) if args.study else {"default": {}}
    if args.remedies:
        arms = {"quality preset": PRESET, **REMEDIES}
    if args.robust:
        arms = {"quality preset": PRESET, "robust": ROBUST}
    if args.arms:
        if not args.study or set(args.arms) - set(STUDY):
            parser.error(f"--arms picks from the study's arms (with --study): {', '.join(map(repr, STUDY))}")
        arms = {name: arm for name, arm in STUDY.items() if name in args.arms}
    for text in args.arm:
        name, _, overrides = text.partition("=")
        arms[name] = json.loads(overrides)
    for lever in args.lever:
        arms[json.dumps(lever, sort_keys=True)] = {f"train.{k}": v for k, v in lever.items()}
    if len(arms) < 2 and not args.arms:
        parser.error("give --study, --arm or --lever: there is nothing to compare the defaults with")
    device = machine.pick_device(args.device)
    if args.speed_only:
        speeds = speed(args.params, arms, args.speed_steps or 200, device)
        first = next(iter(arms))
        for name, rate in speeds.items():
            print(f"{name:<26}{rate:>9.1f} img/s  x{rate / speeds[first]:.2f}")
        files.write_json(args.output, {"arms": arms, "speed_img_s": speeds, "threads": torch.get_num_threads()})
        return
    names = list(arms)
    between = args.lever_seeds if args.study and args.lever_seeds else args.seeds
    seeds = {name: args.seeds if name in (names[0], names[-1]) else between for name in names}
    for text in args.seeds_for:
        name, _, listed = text.partition("=")
        if name not in arms:
            parser.error(f"--seeds-for names {name!r}, not an arm: {', '.join(map(repr, arms))}")
        seeds[name] = [int(seed) for seed in listed.split(",")]
    report, grids = run(args.params, arms, args.steps, seeds, args.fid_samples, device, args.jobs)
    if args.speed_steps:
        report["speed_img_s"] = speed(args.params, arms, args.speed_steps, device)
    print_table(report)
    if args.grids:
        save_grids(grids, [names[0], names[-1]], args.seeds[0], args.grids)
        print(f"grids of {names[0]!r} and {names[-1]!r} (seed {args.seeds[0]}) -> {args.grids}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(args.output.read_text()) if args.output.is_file() else []
    files.write_json(args.output, [*existing, report])
    print(f"-> {args.output}")


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:
        raise SystemExit(f"error: {exc}") from None
