"""Stage `evaluate`: score the trained generator (or any samples) with the frozen classifier.

Scores are reported next to their real-data floor (metrics/reference.json) and logged to
the training run in MLflow: every evaluation is a nested run under it, and the training
run's `eval_*` metrics always hold the latest scores, so the MLflow UI keeps one row per
trained model.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline import data, files, machine
from pipeline.errors import UserError
from pipeline.gan.export import load_generator
from pipeline.layout import Layout
from pipeline.params import EvaluateParams, Params, load_params
from pipeline.scoring import frozen_classifier, scorer
from pipeline.scoring.scorer import Scorer
from pipeline.scoring.scores import CONDITIONAL_SCALARS, SCALARS  # the single-number scores
from pipeline.scoring.scores.base import Asked

if TYPE_CHECKING:
    from pipeline.tracking.tracker import Run


def load_samples(path: Path) -> np.ndarray:
    """Samples made elsewhere -> uint8 (N, 28, 28).

    Accepts an .npy/.npz array (N x 28 x 28 or N x 1 x 28 x 28; uint8 pixels or floats in
    [-1, 1], which go through data.from_model like our generator's output) or a folder of
    28x28 grayscale PNGs.
    """
    if not path.exists():
        raise UserError(f"samples file {path} does not exist.")
    if path.is_dir():
        from PIL import Image

        files = sorted(path.glob("*.png"))
        if not files:
            raise UserError(f"{path} holds no .png files.")
        try:
            array = np.stack([np.asarray(Image.open(f).convert("L")) for f in files])
        except (OSError, ValueError) as exc:
            raise UserError(f"{path} has a PNG that cannot be read or differs in size ({exc}).") from None
    elif path.suffix in (".npy", ".npz"):
        try:
            loaded = np.load(path, allow_pickle=False)
            if isinstance(loaded, np.lib.npyio.NpzFile):
                with loaded:
                    keys = list(loaded.keys())
                    if not keys:
                        raise UserError(f"{path} holds no arrays.")
                    array = loaded["samples" if "samples" in keys else keys[0]]
            else:
                array = loaded
        except (ValueError, OSError, EOFError) as exc:
            raise UserError(f"{path} is not a readable numpy file ({str(exc).splitlines()[0]}).") from None
    else:
        raise UserError(f"{path}: samples must be an .npy or .npz file or a folder of PNGs.")

    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 3 or array.shape[1:] != (data.IMAGE_SIZE, data.IMAGE_SIZE):
        raise UserError(f"{path} has shape {array.shape}; expected N x 28 x 28 (or N x 1 x 28 x 28).")
    if array.dtype == np.uint8:
        return array
    if not np.issubdtype(array.dtype, np.floating):
        raise UserError(f"{path} has dtype {array.dtype}; expected uint8 pixels or floats in [-1, 1].")
    if not np.isfinite(array).all():
        raise UserError(f"{path} contains NaN or infinite values.")
    if array.min() < -1.0001 or array.max() > 1.0001:
        raise UserError(
            f"{path} has floats in [{array.min():.3g}, {array.max():.3g}]; expected [-1, 1] (tanh output)."
        )
    return data.from_model(torch.from_numpy(array.astype(np.float32)).unsqueeze(1)).numpy()


def evaluate(
    images: np.ndarray,
    classifier: torch.nn.Module,
    reference: scorer.Reference,
    params: EvaluateParams,
    device: torch.device,
    asked: Asked | None = None,
) -> dict[str, Any]:
    """Score uint8 samples against the reference; the pure core of the stage. `asked`: of a conditional
    generator, the labels each sample was asked for and the real labels of the reference images."""
    features, probs = frozen_classifier.classify(classifier, images, params.batch_size, device)
    return scorer.score(features, probs, reference, params, asked)


def scalars(result: dict[str, Any]) -> tuple[str, ...]:
    """The single-number scores of a result: every generator's, and a conditional one's."""
    return SCALARS + tuple(key for key in CONDITIONAL_SCALARS if key in result)


def report(scores: dict[str, Any], floors: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """metrics/eval.json: each score, its real-data floor beside it, and what makes it comparable."""
    out: dict[str, Any] = {}
    for key in scalars(scores):
        out[key] = scores[key]
        if key in floors:
            out[f"{key}_floor"] = floors[key]
    out["class_counts"] = scores["class_counts"]
    if "fid_per_class" in scores:
        out["fid_per_class"] = scores["fid_per_class"]
    out.update(context)
    return out


def print_report(result: dict[str, Any]) -> None:
    print(f"{'score':<18}{'value':>12}{'real floor':>14}")
    for key in scalars(result):
        floor = result.get(f"{key}_floor")
        floor_text = f"{floor:>14.4f}" if isinstance(floor, (int, float)) else f"{'':>14}"
        print(f"{key:<18}{result[key]:>12.4f}{floor_text}")
    print(
        f"n={result['n_samples']}, feature_dim={result['feature_dim']}, classifier sha256 {result['classifier_sha256'][:12]}…"
    )


def class_rows(scores: dict[str, Any], reference: scorer.Reference, names: tuple[str, ...]) -> str:
    """plots/eval_classes.csv: the share of samples the classifier puts in each class, beside the real share."""
    counts = np.asarray(scores["class_counts"], dtype=np.float64)
    lines = ["class,fraction,reference"]
    lines += [
        f"{name.replace(',', ' ')},{c / counts.sum():.5f},{r:.5f}"
        for name, c, r in zip(names, counts, reference.label_distribution, strict=True)
    ]
    return "\n".join(lines) + "\n"


def main(
    params_path: Path = Path("params.yaml"), samples: Path | None = None, output: Path | None = None
) -> None:
    params = load_params(params_path)
    paths = Layout(dataset=params.data.dataset)
    device = machine.pick_device(params.train.device)
    machine.keep_freed_memory()  # the classifier's activations and PRDC's distance blocks, reused
    frozen = Scorer.load(paths, params, device)
    if samples is not None:  # scoring outside samples: a report, not a pipeline output
        started = time.perf_counter()
        images = outside_samples(samples, frozen.feature_dim)
        result, _ = score_and_report(images, None, str(samples), params, paths, frozen, started)
        out = output or Path(f"{samples.stem}.eval.json")
        files.write_json(out, result)
        print(f"report -> {out}")
        return

    from pipeline.tracking import connection

    # A tracking server that is down is reported before any work.
    tracking = connection.open_experiment(params.tracking.experiment, Path.cwd(), dict(os.environ))
    files.remove_stale_temps(*paths.outputs("evaluate"))
    started = time.perf_counter()
    images, asked = generator_samples(params, paths, frozen)
    result, scores = score_and_report(images, asked, str(paths.generator), params, paths, frozen, started)
    grid = write_outputs(
        paths, images, class_rows(scores, frozen.reference, data.class_names(params.data)), result
    )
    log_or_warn(params, paths, result, grid, tracking, frozen)


def score_and_report(
    images: np.ndarray,
    asked: Asked | None,
    source: str,
    params: Params,
    paths: Layout,
    frozen: Scorer,
    started: float,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Score `images` (see evaluate), print them; (metrics/eval.json's report, the scores)."""
    scores = evaluate(images, frozen.classifier, frozen.reference, params.evaluate, frozen.device, asked)
    context = {
        **scorer.scoring_metadata(frozen.sha256, frozen.feature_dim, params.evaluate),
        "n_samples": int(images.shape[0]),
        "samples": source,
        "seconds": round(time.perf_counter() - started, 2),
    }
    result = report(scores, comparable_floors(paths, params.evaluate), context)
    print_per_class(result, data.class_names(params.data))
    print_report(result)
    return result, scores


def comparable_floors(paths: Layout, p: EvaluateParams) -> dict[str, Any]:
    """The real-data floors of metrics/reference.json, when they were scored at this N."""
    floors = files.read_json(paths.floors) if paths.floors.is_file() else {}
    if floors.get("n_samples") not in (None, p.n_samples):
        return {}  # floors at another N are not comparable
    return {key: value for key, value in floors.items() if key in SCALARS}


def outside_samples(samples: Path, feature_dim: int) -> np.ndarray:
    """Samples made elsewhere (see load_samples), enough of them for a meaningful FID."""
    images = load_samples(samples)
    need = 2 * feature_dim  # see metrics.feature_stats
    if images.shape[0] < need:
        raise UserError(
            f"{samples} holds {images.shape[0]} samples; scoring needs at least {need} "
            "(2 x classifier.feature_dim) for a meaningful FID."
        )
    return images


def generator_samples(params: Params, paths: Layout, frozen: Scorer) -> tuple[np.ndarray, Asked | None]:
    """evaluate.n_samples seeded samples of the trained generator; of a conditional one, also the labels
    they were asked for and the real labels of the reference images (see evaluate)."""
    p, n_classes = params.evaluate, len(data.class_names(params.data))
    generator = load_generator(paths.generator, params.model, frozen.device, n_classes)
    pixels, labels = scorer.draw(
        generator, p.n_samples, p.seed, p.batch_size, frozen.device, frozen.reference
    )
    if labels is None:
        return pixels.numpy(), None
    return pixels.numpy(), Asked(labels.numpy(), data.load_prepared(paths.prepared, n_classes).test_labels)


def print_per_class(result: dict[str, Any], names: tuple[str, ...]) -> None:
    if "fid_per_class" not in result:
        return
    print("per-class FID (the samples asked for each class against its real images):")
    for name, value in zip(names, result["fid_per_class"], strict=True):
        print(f"  {name:<16}{'too few samples' if value is None else f'{value:>10.3f}'}")


def write_outputs(paths: Layout, images: np.ndarray, classes_csv: str, result: dict[str, Any]) -> np.ndarray:
    """The stage's outputs (sample grid, class shares, metrics/eval.json); returns the grid."""
    grid = data.make_grid(images[:25])
    with files.atomic_files():  # the three outputs appear together, or (a full disk) the old ones stay
        data.save_png(grid, paths.eval_samples)
        with files.atomic_open(paths.class_plot) as fh:
            fh.write(classes_csv)
        files.write_json(paths.eval_metrics, result)
    return grid


def log_or_warn(
    params: Params,
    paths: Layout,
    result: dict[str, Any],
    grid: np.ndarray,
    tracking: tuple[str, str, Path],
    frozen: Scorer,
) -> None:
    """log_to_mlflow, where a tracking store out of room is a warning: the outputs are written."""
    try:
        log_to_mlflow(params, paths, result, grid, tracking, frozen)
    except UserError as exc:
        # The outputs are complete and true: a tracking store out of room is a loss to report, as a
        # lost item is, not a failed stage (whose outputs DVC would then refuse to record).
        if files.out_of_room(exc) is None:
            raise
        print(
            f"warning: {str(exc).rstrip('.')}; the outputs are complete, run the evaluate stage again once "
            "MLflow's store has room.",
            file=sys.stderr,
        )


def log_to_mlflow(
    params: Params,
    paths: Layout,
    result: dict[str, Any],
    grid: np.ndarray,
    tracking: tuple[str, str, Path],
    frozen: Scorer,
) -> None:
    """A nested run per evaluation under the training run; the latest scores on the training run.
    `tracking`: connection.open_experiment's (URI, experiment id, repository root)."""
    from pipeline.tracking import connection, runs

    uri, experiment_id, root = tracking
    train_run_id = files.read_json(paths.run_info).get("run_id") if paths.run_info.is_file() else None
    parent = runs.existing_run(train_run_id, experiment_id) if train_run_id else None
    if train_run_id and parent is None:
        print(f"training run {train_run_id} is not in {uri}; recording this evaluation as a run of its own.")
    tags = {
        **connection.run_tags("evaluate", params, dict(os.environ), root, frozen.device),
        "generator.sha256": files.sha256_file(paths.generator),
    }
    name = f"evaluate n={result['n_samples']}"
    run = parent.child(name, tags) if parent else runs.open_run(experiment_id, name, tags)
    log_evaluation(run, params, paths, result, grid, len(frozen.reference.features))
    if parent is not None:
        scores = {f"eval_{k}": float(result[k]) for k in scalars(result)}
        parent.log_metrics([{"step": 0, **scores}])
        parent.set_tags(
            {
                "eval.latest_run": run.run_id,
                "eval.n_samples": str(result["n_samples"]),
                "eval.classifier_sha256": result["classifier_sha256"],
            }
        )
        register(params, parent, result, paths.generator)
    print(f"MLflow: evaluation run {run.run_id}" + (f" under training run {parent.run_id}" if parent else ""))
    print(f"see the runs: {connection.ui_hint(uri, experiment_id)}")
    lost = "; ".join(filter(None, (run.lost_summary(), parent.lost_summary() if parent else "")))
    if lost:
        print(
            f"warning: {lost}; the outputs are complete, run the evaluate stage again once the server is back.",
            file=sys.stderr,
        )


def log_evaluation(
    run: Run, params: Params, paths: Layout, result: dict[str, Any], grid: np.ndarray, reference_images: int
) -> None:
    """The evaluation's own run: its params, the reference as a dataset, the scores, outputs and grid."""
    # The scores are metrics (what a person compares); the real-data floors and what makes a score
    # comparable are the run's params, so the UI shows the scores, not a dozen flat floor lines.
    floors = {f"floor.{k}": str(result[f"{k}_floor"]) for k in SCALARS if f"{k}_floor" in result}
    comparable = {
        "classifier_sha256": result["classifier_sha256"],
        "feature_dim": str(result["feature_dim"]),
        "n_samples": str(result["n_samples"]),
    }
    run.log_params(
        {f"evaluate.{k}": str(v) for k, v in params.evaluate.model_dump().items()} | floors | comparable
    )
    run.log_dataset(
        f"{params.data.dataset}-reference",
        files.sha256_file(paths.reference),
        paths.reference,
        "evaluation",
        {"images": reference_images, "classes": len(data.class_names(params.data))},
    )
    run.log_metrics([{"step": 0, **{k: float(result[k]) for k in scalars(result)}}])
    for path in paths.outputs("evaluate"):
        run.log_artifact(path, "evaluation")
    run.log_image(grid, key="eval_samples", step=0)
    run.finish()


def register(params: Params, parent: Any, result: dict[str, Any], generator: Path) -> None:
    """The training run's generator as a version in the registry, and the champion decided (see registry).

    The version is the run's logged model whose weights are `generator`'s, the ones just scored: an
    extended run logs a model per training, and only the newest holds what was evaluated.
    """
    from pipeline.tracking import connection, logged_model, registry

    if parent.failure is not None:
        return  # the server went away: evaluate again once it is back
    try:
        tensors = logged_model.tensors_sha256(files.load_checkpoint(generator)["generator"])
        models = sorted(
            (m for m in parent.logged_models() if str(m.status) == "READY"),
            key=lambda m: m.creation_timestamp,
        )
        scored = [m for m in models if m.tags.get(logged_model.TENSORS_SHA_TAG) == tensors]
        if not scored:
            what = "no finished model" if not models else f"no logged model of {generator}'s weights"
            print(
                f"training run {parent.run_id} holds {what} to register (`python -m pipeline resend` logs it)."
            )
            return
        weights = {
            logged_model.ARTIFACT_SHA_TAG: scored[-1].tags[logged_model.ARTIFACT_SHA_TAG],
            logged_model.TENSORS_SHA_TAG: tensors,
        }
        score = registry.Score(
            float(result["fid"]),
            result.get("fid_floor"),
            int(result["n_samples"]),
            result["classifier_sha256"],
            (float(result["fid_low"]), float(result["fid_high"])),
        )
        name = registry.model_name(params.tracking.experiment, params.data.dataset)
        outcome = registry.register(name, parent.run_id, f"models:/{scored[-1].model_id}", score, weights)
    except Exception as exc:  # noqa: BLE001 - the registry is bookkeeping: the scores are written either way
        print(
            f"warning: the model registry did not take this evaluation ({connection.first_line(exc)}); "
            "run evaluate again to register it.",
            file=sys.stderr,
        )
        return
    said = "is now the champion" if outcome.promoted else f"champion stays version {outcome.champion}"
    print(f"registered {name} version {outcome.version}: {said} ({outcome.reason}).")
